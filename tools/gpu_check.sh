#!/usr/bin/env bash
# The GPU check of the CUDA-graph work, in one go (about 8 minutes on one H100/H200):
#   1. the CUDA tests (tests/test_cuda.py, tests/test_cuda_graphs.py);
#   2. benchmark.py, eager and graphed side by side: DenseNet-BC L=76 k=12, batch 50, 200
#      steps, 5 pairs, cubic scaled t_0 = 0.8, --amp off and bf16; then batch 256 bf16;
#   3. train.py end to end on the synthetic set (L=76, 10,000 images, 3 epochs, batch 50),
#      --cuda-graphs off against on.
# Results go to $OUT (default ./gpu_check): pytest.log, bench_*.json / .txt, train_*.jsonl and
# summary.txt. Usage: OUT=/some/dir bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

echo "== CUDA tests" | tee "$OUT/summary.txt"
timeout 180 python -m pytest -q tests/test_cuda.py tests/test_cuda_graphs.py 2>&1 | tee "$OUT/pytest.log" | tail -n 3 | tee -a "$OUT/summary.txt"

bench() {  # name, then benchmark.py flags
  local name=$1; shift
  echo "== benchmark $name" | tee -a "$OUT/summary.txt"
  timeout 170 python benchmark.py -L 76 -k 12 --t_0 0.8 --how_scale cubic --device cuda --json "$@" \
    > "$OUT/bench_$name.txt" 2>&1
  grep -v '^{' "$OUT/bench_$name.txt" | tee -a "$OUT/summary.txt"
  grep '^{' "$OUT/bench_$name.txt" > "$OUT/bench_$name.json"
}
bench fp32_b50 --batch-size 50 --steps 200 --repeats 5 --amp off
bench bf16_b50 --batch-size 50 --steps 200 --repeats 5 --amp bf16
bench bf16_b256 --batch-size 256 --steps 100 --repeats 3 --amp bf16

echo "== train.py, DenseNet-BC L=76, 10,000 synthetic images, 3 epochs, batch 50" | tee -a "$OUT/summary.txt"
rm -rf "$OUT/runs"
for graphs in off on; do
  timeout 150 python train.py --dataset synthetic --which_dataset 10 --subset 10000 --no-validate \
    --epochs 3 --batch_size 50 --device cuda --cuda-graphs $graphs --out-dir "$OUT/runs" \
    --name graphs-$graphs > "$OUT/train_$graphs.log" 2>&1
  cp "$OUT/runs/graphs-$graphs/metrics.jsonl" "$OUT/train_$graphs.jsonl" 2>/dev/null
done
python - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rates = {}
for graphs in ("off", "on"):
    path = out / f"train_{graphs}.jsonl"
    if not path.exists():
        print(f"  --cuda-graphs {graphs}: no metrics (see train_{graphs}.log)")
        continue
    records = [json.loads(line) for line in path.read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    seen = sum(r["images_per_s"] * r["train_time_s"] for r in epochs)
    rates[graphs] = seen / sum(r["train_time_s"] for r in epochs)
    print(f"  --cuda-graphs {graphs}: {rates[graphs]:.0f} training images/s, "
          f"{sum(r['captures'] for r in epochs)} captures in {sum(r['capture_time_s'] for r in epochs):.2f} s, "
          f"per epoch {[round(r['images_per_s']) for r in epochs]}")
if len(rates) == 2:
    print(f"  graphed / eager: {rates['on'] / rates['off']:.2f}x")
PY
