"""benchmark.py: runs end to end on a tiny model and reports what it promises."""
import json
import subprocess
import sys
from pathlib import Path

import benchmark
from densenet import DenseNet
from freezeout import unit_times
from utils import calc_speedup, schedule_speedup, training_flops_by_level, unit_flops

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"measured_speedup", "estimated_speedup", "flop_speedup", "ideal_speedup", "baseline_s",
        "freezeout_s", "overhead_frac", "peak_mem_baseline", "peak_mem_freezeout"}


def test_benchmark_reports_speedups_memory_and_overhead(capsys):
    r = benchmark.main(["-L", "16", "-k", "6", "--batch-size", "8", "--steps", "12", "--repeats", "2",
                        "--level-steps", "1", "--device", "cpu", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(r))  # the last line is the JSON object
    assert "measured" in "\n".join(out[:-1])  # and a table before it
    assert KEYS <= r.keys()
    assert len(r["baseline_runs_s"]) == len(r["freezeout_runs_s"]) == 2
    assert r["baseline_s"] > 0 and r["freezeout_s"] > 0 and -1 < r["measured_speedup"] < 1
    assert r["estimated_speedup"] == calc_speedup(6, 2, 0.8, "cubic")
    model = DenseNet(16, 6, 100)
    levels = training_flops_by_level(unit_flops(model, model.freeze_units(), (2, 3, 32, 32)))
    assert r["flop_speedup"] == schedule_speedup(levels, unit_times(len(levels), 0.8, "cubic"), 12)
    assert 0 < r["ideal_speedup"] < 1 and 0 <= r["overhead_frac"] < 0.5
    # Over the last quarter of the steps FreezeOut keeps far fewer activations for backward.
    assert 0 < r["saved_bytes_freezeout"] < 0.5 * r["saved_bytes_baseline"]
    assert r["peak_mem_baseline"] is None  # CUDA-only figure


def test_benchmark_refuses_bad_values():
    for argv, message in [(["--steps", "0"], "--steps must be a positive integer"),
                          (["--t_0", "2"], "--t_0 must be in (0, 1]"),
                          (["-L", "75"], "depth 75 is not a valid")]:
        p = subprocess.run([sys.executable, "benchmark.py", *argv], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 2 and message in p.stderr.strip().splitlines()[-1], p.stderr
        assert "Traceback" not in p.stderr
