#!/usr/bin/env bash
# The GPU check of the CUDA-graph work, in one go (about 8 minutes on one H100/H200):
#   1. the CUDA tests (tests/test_cuda.py, tests/test_cuda_graphs.py);
#   2. benchmark.py, eager and graphed side by side: DenseNet-BC L=76 k=12, batch 50, 200
#      steps, 5 pairs, cubic scaled t_0 = 0.8, --amp off and bf16; then batch 256 bf16;
#   3. train.py end to end on the synthetic set (L=76, 10,000 images, 3 epochs, batch 50),
#      --cuda-graphs off against on.
# Results, in $OUT (default ./gpu_check), five files: summary.txt (what to read), pytest.log,
# bench.jsonl (one JSON object per benchmark), train.jsonl (both runs' metrics records) and
# logs.txt (everything the commands printed). Usage: OUT=/some/dir bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
RUNS=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
say() { echo "$@" | tee -a "$OUT/summary.txt"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/summary.txt"

say "== CUDA tests"
timeout 180 python -m pytest -q tests/test_cuda.py tests/test_cuda_graphs.py > "$OUT/pytest.log" 2>&1
tail -n 3 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"

bench() {  # name, then benchmark.py flags
  say "== benchmark $1"; shift
  timeout 170 python benchmark.py -L 76 -k 12 --t_0 0.8 --how_scale cubic --device cuda --json "$@" \
    > "$RUNS/bench.txt" 2>&1
  cat "$RUNS/bench.txt" >> "$OUT/logs.txt"
  grep -v '^{' "$RUNS/bench.txt" | tee -a "$OUT/summary.txt"
  grep '^{' "$RUNS/bench.txt" >> "$OUT/bench.jsonl"
}
bench "fp32, batch 50" --batch-size 50 --steps 200 --repeats 5 --amp off
bench "bf16, batch 50" --batch-size 50 --steps 200 --repeats 5 --amp bf16
bench "bf16, batch 256" --batch-size 256 --steps 100 --repeats 3 --amp bf16

say "== train.py, DenseNet-BC L=76, 10,000 synthetic images, 3 epochs, batch 50"
for graphs in off on; do
  timeout 150 python train.py --dataset synthetic --which_dataset 10 --subset 10000 --no-validate \
    --epochs 3 --batch_size 50 --device cuda --cuda-graphs $graphs --out-dir "$RUNS" \
    --name graphs-$graphs >> "$OUT/logs.txt" 2>&1
  cat "$RUNS/graphs-$graphs/metrics.jsonl" >> "$OUT/train.jsonl" 2>/dev/null
done
python tools/train_speed.py "$RUNS/graphs-off" "$RUNS/graphs-on" 2>&1 | tee -a "$OUT/summary.txt"
rm -rf "$RUNS"
