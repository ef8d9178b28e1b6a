#!/usr/bin/env bash
# The GPU check of the CUDA-graph step, sized for one short GPU window: every stage under its
# own time limit (525 s in all, about twice what each stage took on an H200, the benchmarks
# 1.3 times); a whole run took 6 minutes on one H200.
#
#   1. smoke (35 s on an H200): the quick CUDA tests (-x), then train.py on a small DenseNet-BC
#      (L=16, 2,048 synthetic images, 3 epochs, 9 freeze points, every level captured) eagerly
#      and graphed, their losses compared;
#   2. benchmark.py, eager and graphed side by side: DenseNet-BC L=76 k=12, cubic scaled
#      t_0 = 0.8, batch 50 in fp32 and bf16, then batch 256 in bf16;
#   3. train.py, DenseNet-BC L=76 on 10,000 synthetic images for 3 epochs, --cuda-graphs off and on.
#   4. four such runs (graphed) at once on the one GPU: what several runs per GPU gain over one.
#
# Each stage appends its results as soon as it ends, so a stage that fails or runs out of time
# keeps what the others measured, and does not stop them. Results, in the folder $OUT (default:
# a new temporary folder, printed at the start; nothing is written in the clone), five files:
# summary.txt (what to read), logs.txt (everything the commands printed), pytest.log,
# bench.jsonl (one JSON object per benchmark), train.jsonl (the train.py runs' records).
# Exit status: 0 when every stage passed, 1 otherwise (also without a GPU).
#
#   OUT=/some/dir bash tools/gpu_check.sh        # PYTHON=python3 by default
set -uo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False, or no torch); nothing was run" >&2
  exit 1
fi
OUT=${OUT:-$(mktemp -d -t freezeout-gpu-check.XXXXXX)}
mkdir -p "$OUT"
RUNS=$(mktemp -d)  # train.py run directories and each stage's output, outside the clone
trap 'rm -rf "$RUNS"' EXIT
export PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS, for the tests that compare runs
failed=0

say() { echo "$@" | tee -a "$OUT/summary.txt"; }

# stage NAME SECONDS COMMAND...: run it under its time limit, its output kept in logs.txt and
# in $RUNS/stage.txt for the caller; say how it ended and how long it took.
stage() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout -k 5 "$limit" "$@" > "$RUNS/stage.txt" 2>&1
  rc=$?
  { echo "== $name (exit $rc)"; cat "$RUNS/stage.txt"; } >> "$OUT/logs.txt"
  case $rc in
    0) say "   $name: ok ($((SECONDS - start)) s)" ;;
    124|137) say "   $name: TIMED OUT after $limit s"; failed=1 ;;
    *) say "   $name: FAILED (exit $rc, $((SECONDS - start)) s; see logs.txt)"; failed=1 ;;
  esac
  return $rc
}

say "gpu_check: results in $OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$OUT/summary.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee -a "$OUT/summary.txt"

say "== 1. smoke"
stage "CUDA tests" 40 "$PYTHON" -m pytest -x -q -m "not slow" tests/test_cuda.py tests/test_cuda_graphs.py
cp "$RUNS/stage.txt" "$OUT/pytest.log"
tail -n 1 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"
SMALL=(--dataset synthetic --which_dataset 10 --subset 2048 -L 16 -k 6 --batch_size 32 --epochs 3
       --t_0 0.5 --no-validate --device cuda --out-dir "$RUNS")
stage "train.py small, eager" 20 "$PYTHON" train.py "${SMALL[@]}" --cuda-graphs off --name small-eager
stage "train.py small, graphed" 20 "$PYTHON" train.py "${SMALL[@]}" --cuda-graphs on --name small-graphed
# Eager steps read Python-float rates, graphed ones float32 rates on the device: close, not equal.
stage "small runs agree" 5 "$PYTHON" tools/train_speed.py "$RUNS/small-eager" "$RUNS/small-graphed" \
  --max-loss-diff 0.02
tee -a "$OUT/summary.txt" < "$RUNS/stage.txt"

say "== 2. benchmark.py, DenseNet-BC L=76 k=12, cubic scaled t_0 = 0.8"
bench() {  # name, then benchmark.py flags
  stage "benchmark $1" 100 "$PYTHON" benchmark.py -L 76 -k 12 --t_0 0.8 --how_scale cubic --device cuda \
    --cuda-graphs on --level-steps 2 --json "${@:2}"
  grep -v '^{' "$RUNS/stage.txt" | tee -a "$OUT/summary.txt"
  grep '^{' "$RUNS/stage.txt" >> "$OUT/bench.jsonl"
}
bench "fp32, batch 50" --batch-size 50 --steps 160 --repeats 2 --amp off
bench "bf16, batch 50" --batch-size 50 --steps 160 --repeats 2 --amp bf16
bench "bf16, batch 256" --batch-size 256 --steps 100 --repeats 2 --amp bf16

say "== 3. train.py, DenseNet-BC L=76, 10,000 synthetic images, 3 epochs, batch 50"
L76=(--dataset synthetic --which_dataset 10 --subset 10000 --no-validate --epochs 3 --batch_size 50
     --device cuda --out-dir "$RUNS")
for graphs in off on; do
  stage "train.py L=76, --cuda-graphs $graphs" 40 "$PYTHON" train.py "${L76[@]}" --cuda-graphs $graphs \
    --name "graphs-$graphs"
  cat "$RUNS/graphs-$graphs/metrics.jsonl" >> "$OUT/train.jsonl" 2>/dev/null
done
stage "train.py speed" 5 "$PYTHON" tools/train_speed.py "$RUNS/graphs-off" "$RUNS/graphs-on"
tee -a "$OUT/summary.txt" < "$RUNS/stage.txt"

say "== 4. four of the graphed L=76 runs at once on the one GPU (the stage's time is their wall clock)"
# $0 is the interpreter and $1 the runs' folder; each run's images/s is over its own training time.
stage "4 runs at once" 50 bash -c 'pids=(); for i in 0 1 2 3; do "$0" train.py "${@:2}" --cuda-graphs on \
    --seed $i --name together-$i > "$1/together-$i.txt" 2>&1 & pids+=($!); done
  rc=0; for p in "${pids[@]}"; do wait $p || rc=1; done; exit $rc' "$PYTHON" "$RUNS" "${L76[@]}"
cat "$RUNS"/together-*/metrics.jsonl >> "$OUT/train.jsonl" 2>/dev/null
stage "4 runs at once, speed" 5 "$PYTHON" tools/train_speed.py "$RUNS/graphs-on" "$RUNS"/together-{0,1,2,3}
tee -a "$OUT/summary.txt" < "$RUNS/stage.txt"

say "gpu_check: $([ $failed = 0 ] && echo 'every stage passed' || echo 'SOME STAGES FAILED (see above)')"
exit $failed
