#!/usr/bin/env bash
# The GPU check of the CUDA-graph step, sized for one short GPU window: every stage under its
# own time limit (530 s in all); the stages' expected times are a guess until a run on a GPU
# has measured them (the previous version of this check took 6 minutes on an H200).
#
#   1. smoke: the quick CUDA tests (-x), then train.py on a small DenseNet-BC (L=16, 2,048
#      synthetic images, 3 epochs, 9 freeze points, every level captured) eagerly and graphed,
#      their losses compared;
#   2. benchmark.py, eager and graphed side by side: DenseNet-BC L=76 k=12, cubic scaled
#      t_0 = 0.8, batch 50, fp32 and bf16: measured and projected speedups, the steps of each
#      kind, CUDA memory (allocated, and reserved: the graphs' pools);
#   3. benchmark.py --compile in CUDA graphs (inductor) on a small DenseNet-BC, 12 steps;
#   4. train.py, DenseNet-BC L=76 on CIFAR-sized synthetic data, 12 epochs, graphed: its time
#      split, end-to-end images/s, its steps against benchmark.py's, the predicted time of the
#      paper's 100-epoch run, and each epoch's CUDA memory as units freeze.
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
# In one process (pytest.ini's workers need pytest-xdist, and the GPU tests measure the GPU alone).
stage "CUDA tests" 40 "$PYTHON" -m pytest -o "addopts=-p no:cacheprovider" -x -q -m "not slow" \
  tests/test_cuda.py tests/test_cuda_graphs.py
cp "$RUNS/stage.txt" "$OUT/pytest.log"
tail -n 1 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"
SMALL=(--dataset synthetic --which_dataset 10 --subset 2048 -L 16 -k 6 --batch_size 32 --epochs 3
       --t_0 0.5 --no-validate --device cuda --out-dir "$RUNS")
stage "train.py small, eager" 15 "$PYTHON" train.py "${SMALL[@]}" --cuda-graphs off --name small-eager
stage "train.py small, graphed" 15 "$PYTHON" train.py "${SMALL[@]}" --cuda-graphs on --name small-graphed
# Eager steps read Python-float rates, graphed ones float32 rates on the device: close, not equal.
stage "small runs agree" 5 "$PYTHON" tools/train_speed.py "$RUNS/small-eager" "$RUNS/small-graphed" \
  --max-loss-diff 0.02
tee -a "$OUT/summary.txt" < "$RUNS/stage.txt"

say "== 2. benchmark.py, DenseNet-BC L=76 k=12, cubic scaled t_0 = 0.8, batch 50"
bench() {  # name, time limit, then benchmark.py flags
  stage "benchmark $1" "$2" "$PYTHON" benchmark.py --t_0 0.8 --how_scale cubic --device cuda --cuda-graphs on \
    --json "${@:3}"
  grep -v '^{' "$RUNS/stage.txt" | tee -a "$OUT/summary.txt"
  grep '^{' "$RUNS/stage.txt" >> "$OUT/bench.jsonl"
}
bench "fp32, batch 50" 95 -L 76 -k 12 --batch-size 50 --steps 160 --repeats 2 --level-steps 2 --amp off
bench "bf16, batch 50" 95 -L 76 -k 12 --batch-size 50 --steps 160 --repeats 2 --level-steps 2 --amp bf16

say "== 3. benchmark.py --compile in CUDA graphs (inductor), DenseNet-BC L=22 k=12, batch 50, 12 steps"
bench "compiled in graphs" 100 -L 22 -k 12 --batch-size 50 --steps 12 --repeats 1 --level-steps 0 --amp off \
  --compile

say "== 4. train.py, DenseNet-BC L=76 on CIFAR-sized synthetic data (45,000 / 5,000), batch 50, graphed"
stage "train.py L=76, 12 epochs" 165 "$PYTHON" train.py --dataset synthetic -L 76 -k 12 \
  --epochs 12 --batch_size 50 --device cuda --cuda-graphs on --out-dir "$RUNS" --name long
tail -n 3 "$RUNS/stage.txt" | tee -a "$OUT/summary.txt"
cat "$RUNS/long/metrics.jsonl" >> "$OUT/train.jsonl" 2>/dev/null
stage "train.py speed" 5 "$PYTHON" tools/train_speed.py "$RUNS/long" --benchmark "$OUT/bench.jsonl"
tee -a "$OUT/summary.txt" < "$RUNS/stage.txt"
"$PYTHON" - "$RUNS/long/metrics.jsonl" <<'PY' 2>/dev/null | tee -a "$OUT/summary.txt"
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
for r in records:
    if r["event"] == "epoch":
        print(f"   epoch {r['epoch']:>2}: frozen {r['frozen_units']:>2}, CUDA max allocated "
              f"{r['cuda_max_allocated'] / 2**20:.0f} MiB, max reserved {r['cuda_max_reserved'] / 2**20:.0f} MiB, "
              f"{r['images_per_s']:.0f} img/s, {r['captures']} captures, {r['eager_steps']} eager steps")
PY

say "gpu_check: $([ $failed = 0 ] && echo 'every stage passed' || echo 'SOME STAGES FAILED (see above)')"
exit $failed
