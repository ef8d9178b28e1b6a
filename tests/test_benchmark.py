"""benchmark.py: what it computes from the times it measures (given here, not measured: a
loaded machine's timings prove nothing), the FLOP and paper estimates it prints beside them,
the memory it reports, and its command line."""
import argparse
import gc
import json

import pytest
import torch

import benchmark
from conftest import counted_step_flops, stepped_speedup
from densenet import DenseNet
from freezeout import unit_times
from utils import calc_speedup

KEYS = {"measured_speedup", "estimated_speedup", "flop_speedup", "ideal_speedup", "baseline_s",
        "freezeout_s", "overhead_frac", "peak_mem_baseline", "peak_mem_freezeout"}


class GivenTimes:
    """Stands in for benchmark.Bench: every timed run and every level's step time is given."""

    def __init__(self, runs, levels):
        self.runs, self.levels, self.calls = list(runs), levels, []

    def timed_run(self, t_0, kind="eager"):
        self.calls.append(("run", t_0, kind))
        return self.runs.pop(0)

    def level_step_times(self, levels, kind="eager"):
        self.calls += [("level", n, kind) for n in levels]
        return {n: self.levels[n] for n in levels}


def run(time_s, scheduler_s=0.0, captures=0, capture_s=0.0, eager=1, eager_s=0.0, steps=8):
    """A timed run's results: `eager` of its `steps` steps eager (taking `eager_s`), the others
    replayed."""
    return {"time_s": time_s, "scheduler_s": scheduler_s, "cuda_peak_bytes": None, "cuda_reserved_bytes": None,
            "captures": captures, "capture_s": capture_s, "eager_s": eager_s,
            "step_kinds": {"eager": eager, "graphed": steps - eager}}


ARGS = argparse.Namespace(repeats=3, steps=8, batch_size=4, t_0=0.5, level_steps=2)
# Linear, t_0 = 0.5, 4 units, T = 8: t_i * T = 4, 5.33, 6.67, 8, so steps 0-3 run with no unit
# frozen, 4-5 with one, 6 with two, 7 with three.
T_I = unit_times(4, 0.5, "linear")


@pytest.mark.parametrize("kind", ["eager", "graphed", "compiled"])
def test_speedups_and_overhead_are_computed_from_the_times_measured(kind):
    runs = [run(9.0, 0.0, 1, 2.0), run(9.0, 0.0, 4, 6.0),  # the warm-up pair: not timed
            run(2.0), run(1.6, 0.016, 4, 0.4), run(2.2), run(1.5, 0.03, 4, 0.8),
            run(1.8), run(1.2, 0.006, 4, 0.2)]
    bench = GivenTimes(runs, levels={0: 1.0, 1: 0.8, 2: 0.6, 3: 0.5})
    r = benchmark.compare(bench, ARGS, T_I, kind)
    assert bench.calls == [("run", 1.0, kind), ("run", 0.5, kind)] + \
        [("run", t, kind) for _ in range(3) for t in (1.0, 0.5)] + \
        [("level", n, kind) for n in range(4)]
    assert r["baseline_runs_s"] == [2.0, 2.2, 1.8] and r["freezeout_runs_s"] == [1.6, 1.5, 1.2]
    assert (r["baseline_s"], r["freezeout_s"]) == (2.0, 1.5)  # medians
    # Pair ratios 1.6/2.0, 1.5/2.2, 1.2/1.8 = 0.8, 0.682, 0.667: 1 - their median, not 1 - the
    # ratio of the medians (0.25).
    assert r["measured_speedup"] == pytest.approx(1 - 1.5 / 2.2, abs=1e-12)
    # 4 steps at 1.0, 2 at 0.8, 1 at 0.6, 1 at 0.5 against 8 at 1.0.
    assert r["ideal_speedup"] == pytest.approx(1 - 6.7 / 8, abs=1e-12)
    assert r["level_step_s"] == {"0": 1.0, "1": 0.8, "2": 0.6, "3": 0.5}
    assert r["overhead_frac"] == pytest.approx(0.01, abs=1e-12)  # median of 0.01, 0.02, 0.005
    assert (r["baseline_images_per_s"], r["freezeout_images_per_s"]) == (16.0, pytest.approx(32 / 1.5))
    if kind != "eager":  # graph captures, or compiles
        assert r["captures"] == 4 and r["capture_s_per_capture"] == pytest.approx(0.1)
        assert (r["warmup_captures"], r["warmup_capture_s"]) == (5, 8.0)
        # A run's 4 captures against a paper run (90,000 steps of 1.5 s / 8): a graph is captured
        # in every run (0.1 s), a compile paid once per process, at the warm-up's 8 s / 5.
        paid = 0.1 if kind == "graphed" else 8.0 / 5
        assert r["paper_run_capture_share"] == pytest.approx(4 * paid / (90_000 * 1.5 / 8))
        assert r["step_kinds"] == {"baseline": {"eager": 1, "graphed": 7}, "freezeout": {"eager": 1, "graphed": 7}}
        pairs = zip([run(2.0), run(2.2), run(1.8)], [run(1.6), run(1.5), run(1.2)], strict=True)
        assert r["projected_speedup"] == pytest.approx(sorted(
            benchmark.projected_speedup(b, f, 8, 4, paid) for b, f in pairs)[1])
    else:
        assert "captures" not in r


def test_the_graphed_speedup_is_projected_to_a_real_runs_length():
    # 8 steps of 4 units, the first eager in both runs (0.5 s: a short run counts it against
    # 7 replays, a real run against 89,999): baseline replays at 0.1 s, FreezeOut's 7 at 0.07 s;
    # FreezeOut's missing first replay (level 0, the baseline's step) counts at 0.1 s.
    baseline, freezeout = run(1.2, eager=1, eager_s=0.5), run(0.99, eager=1, eager_s=0.5)
    mean = (0.49 + 0.1) / 8
    base, ours = 0.5 + 89_999 * 0.1 + 0.01, 0.5 + 89_999 * mean + 4 * 0.01
    assert benchmark.projected_speedup(baseline, freezeout, 8, 4, 0.01) == pytest.approx(1 - ours / base)
    assert 1 - 0.99 / 1.2 < 0.18 < 0.26 < 1 - ours / base  # the raw figure understates it
    # With no warm-up and no capture cost, the projection is the ratio of the mean steps.
    assert benchmark.projected_speedup(run(0.8, eager=0), run(0.6, eager=0), 8, 4, 0.0) == pytest.approx(0.25)


def test_a_slower_freezeout_is_reported_as_a_negative_speedup():
    bench = GivenTimes([run(1.0), run(1.0), run(1.0), run(1.25)],
                       levels={0: 1.0, 1: 1.5, 2: 1.5, 3: 1.5})
    r = benchmark.compare(bench, argparse.Namespace(**{**vars(ARGS), "repeats": 1}), T_I)
    assert r["measured_speedup"] == pytest.approx(-0.25)
    assert r["ideal_speedup"] == pytest.approx(1 - (4 + 4 * 1.5) / 8)


def test_no_ideal_speedup_without_level_steps():
    bench = GivenTimes([run(1.0)] * 4, levels={})
    r = benchmark.compare(bench, argparse.Namespace(**{**vars(ARGS), "repeats": 1, "level_steps": 0}), T_I)
    assert r["ideal_speedup"] is None and r["level_step_s"] == {} and bench.calls[-1][0] == "run"


@pytest.mark.slow
def test_benchmark_reports_estimates_memory_and_a_json_line(capsys):
    r = benchmark.main(["-L", "16", "-k", "6", "--batch-size", "8", "--steps", "12", "--repeats", "2",
                        "--level-steps", "1", "--device", "cpu", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == json.loads(json.dumps(r))  # the last line is the JSON object
    table = "\n".join(out[:-1])
    assert "DenseNet-BC L=16 k=6, batch 8, 12 steps, cubic scaled t_0=0.8, cpu" in table
    assert f"measured {100 * r['measured_speedup']:.1f}%" in table
    assert KEYS <= r.keys()
    assert len(r["baseline_runs_s"]) == len(r["freezeout_runs_s"]) == 2
    assert r["estimated_speedup"] == calc_speedup(6, 2, 0.8, "cubic")  # 2 layers per block at L=16
    # The FLOP estimate against the whole model counted at every freeze level, over 12 steps.
    counted = counted_step_flops(DenseNet(16, 6, 100), (2, 3, 32, 32))
    # Stem 324; per block layers of 1,656 and 1,812; transitions 336; head BN(24) + 24 -> 100.
    assert r["n_units"] == len(counted) == 10 and r["params"] == 324 + 3 * (1_656 + 1_812) + 2 * 336 + 2_548
    assert r["flop_speedup"] == pytest.approx(stepped_speedup(counted, 10, 12, 0.8, 3), rel=1e-12)
    # Cubic t_0 = 0.8, 10 units, T = 12: t_i * T = 6.14, 6.67, 7.23, 7.81, 8.43, 9.08, 9.76, 10.47,
    # 11.22, 12: steps 0-6 run with no unit frozen, 7 with 2, 8 with 4, 9 with 5, 10 with 7, 11
    # with 8: the levels whose step time is measured.
    assert sorted(map(int, r["level_step_s"])) == [0, 2, 4, 5, 7, 8]
    # Over the last quarter of the steps FreezeOut keeps far fewer activations for backward.
    assert 0 < r["saved_bytes_freezeout"] < 0.5 * r["saved_bytes_baseline"]
    assert r["peak_mem_baseline"] is None and r["peak_mem_freezeout"] is None  # CUDA-only figures
    assert r["graphed"] is None  # no CUDA graphs on a CPU


@pytest.mark.parametrize("argv,message", [(["--steps", "0"], "--steps must be a positive integer"),
                                          (["--t_0", "2"], "--t_0 must be in (0, 1]"),
                                          (["-L", "75"], "depth 75 is not a valid"),
                                          (["--steps", "1"], "--steps 1: no unit freezes in so few steps")])
def test_benchmark_refuses_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        benchmark.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err.strip().splitlines()[-1], err
    assert "Traceback" not in err


def tiny_args(*extra):
    parser = benchmark.build_parser()
    args = parser.parse_args(["-L", "10", "-k", "4", "--batch-size", "4", "--steps", "12", "--repeats", "1",
                              "--level-steps", "1", "--device", "cpu", "--num-classes", "10", *extra])
    benchmark.check(args, parser)
    return args


def test_a_finished_run_frees_its_graphs_and_their_memory_without_a_garbage_collection():
    from graphs import EagerGraphs
    pools = []

    def new_pool():
        pools.append(EagerGraphs())
        return pools[-1]

    bench = benchmark.Bench(tiny_args(), torch.device("cpu"), graphs=new_pool)
    gc.collect()
    gc.disable()
    try:
        run = bench.timed_run(0.8, "graphed")
        pool = pools[-1]
        assert run["captures"] == pool.captures == 6 and pool.allocated
        # No graph left, nothing allocated by a capture alive (gradients, losses): all freed
        # when the run ended, not at some later collection.
        assert not pool.live and all(ref.expired() for ref in pool.allocated)
    finally:
        gc.enable()


def test_timing_the_freeze_levels_leaves_no_process_wide_hook_behind():
    # One model for every level, frozen level after level; graphed, one capture per level.
    from torch.nn.modules import module

    from graphs import EagerGraphs
    bench = benchmark.Bench(tiny_args(), torch.device("cpu"), graphs=EagerGraphs)
    before = len(module._global_forward_pre_hooks)
    for kind in ("eager", "graphed"):
        times = bench.level_step_times([0, 3, 5], kind)
        assert sorted(times) == [0, 3, 5] and all(t > 0 for t in times.values())
    assert len(module._global_forward_pre_hooks) == before


class FailingGraphs:
    """A capturer whose every capture fails, as a broken GPU capture would."""

    def run(self, step):
        return step()

    def capture(self, step, buffers=list):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")


def test_a_failed_graphed_part_keeps_the_eager_figures_and_exits_1(monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "measure", lambda args, report: benchmark.measure_on(
        args, torch.device("cpu"), True, FailingGraphs, report))
    with pytest.raises(SystemExit) as info:
        benchmark.main(["-L", "10", "-k", "4", "--batch-size", "4", "--steps", "8", "--repeats", "1",
                        "--level-steps", "0", "--device", "cpu", "--num-classes", "10", "--json"])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert info.value.code == 1 and lines[1].startswith("  baseline runs")  # the eager table first
    assert "  CUDA graphs: failed: CUDA error: operation not permitted when stream is capturing" in lines
    r = json.loads(lines[-1])
    assert r["graphed"] is None and r["graphed_error"].endswith("is capturing")
    assert r["measured_speedup"] is not None and (r["seed"], r["repeats"], r["num_classes"]) == (0, 1, 10)
    assert "the graphed step failed" in err and "the eager figures above stand" in err



@pytest.mark.slow  # torch.compile: a compile per freeze level
def test_the_compiled_step_is_measured_beside_the_eager_one(capsys, dynamo_limits_kept):
    # Dynamo's own "eager" backend: benchmark.py's compiled path (a compile per level, timed
    # apart) without AOT autograd's tracing, which tests/test_compile.py and test_train.py cover.
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    r = benchmark.main(["-L", "10", "-k", "4", "--batch-size", "4", "--steps", "12", "--repeats", "1",
                        "--level-steps", "1", "--device", "cpu", "--num-classes", "10", "--compile",
                        "--compile-backend", "eager", "--json"])
    c = r["compiled"]
    out = capsys.readouterr().out
    # cubic t_0 = 0.8, 7 units, 12 steps: levels 0, 2, 3, 4, 5, 6 (as in the graphed test): level 0
    # runs its first step eagerly (the order check), then compiles; every later level compiles.
    assert c["captures"] == 6 and sorted(c["level_step_s"], key=int) == ["0", "2", "3", "4", "5", "6"]
    assert c["measured_speedup"] == 1 - c["freezeout_runs_s"][0] / c["baseline_runs_s"][0]
    assert (r["compile"], r["compile_backend"]) == (True, "eager") and r["graphed"] is None
    assert "  torch.compile (one compile per freeze level; compile time excluded from the runs" in out
    assert "6 compiles, " in out and json.loads(out.strip().splitlines()[-1])["compiled"] == c
    assert counters["stats"]["unique_graphs"] > 0 and not counters["frames"].get("fallback")
    torch._dynamo.reset()


def test_repeats_that_spread_or_a_busy_host_are_warned_about(monkeypatch, capsys):
    from benchmark_tables import unreliable
    quiet = {"baseline_runs_s": [60.0, 62.0, 61.0], "freezeout_runs_s": [45.0, 46.0, 44.0], "host_load": 1.9,
             "cpu_count": 2}
    assert unreliable(quiet) is None
    spread = {**quiet, "baseline_runs_s": [67.0, 42.0, 82.0]}  # as measured on a loaded host
    assert unreliable(spread).startswith("the baseline runs spread 1.95x (42 to 82 s): the machine's speed varied")
    busy = {**quiet, "host_load": 3.4}
    assert unreliable(busy).startswith("the host's load average reached 3.4 on 2 cores")
    fake = {**spread, "graphed": None, "compiled": None}
    monkeypatch.setattr(benchmark, "measure", lambda args, report: report(fake) or fake)
    monkeypatch.setattr(benchmark, "eager_table", lambda r: "the table")
    benchmark.main(["-L", "10", "-k", "4", "--device", "cpu", "--steps", "12"])
    err = capsys.readouterr().err
    assert "warning: the baseline runs spread 1.95x" in err and "not reliable" in err
