"""The graphed training step's logic on the CPU: rates on the device equal the schedule at
every step, the graphed step computes exactly what the eager one does, one capture per freeze
level, resume, and the fallbacks and their messages. (Real CUDA graphs: tests/test_cuda.py.)"""
import math
from itertools import pairwise

import pytest
import torch

import train
from checkpoint import restore, rng_state
from conftest import (
    TINY,
    closed_form_frozen_at,
    closed_form_lrs,
    graphed_run_stopped_then_resumed,
    planned_captures,
    raises_flagged,
    same_state,
    tiny_argv,
    tiny_training,
)
from distributed import Distributed
from engine import EagerStep
from graphs import CaptureError, EagerGraphs, GraphedStep, graphs_unsupported, use_cuda_graphs
from metrics_logger import read_records

CPU = torch.device("cpu")
T, PER_EPOCH, BATCH = 24, 8, 4


def make_training(seed=0, t_0=0.5, dropout=0.1, total=T):
    return tiny_training(seed, total, t_0, dropout=dropout, fused=True)  # 7 units


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
            for _ in range(n)]


def graphed(training, **kw):
    return GraphedStep(training, BATCH, PER_EPOCH, graphs=EagerGraphs(), **kw)


def train_steps(training, step, data, first=0):
    """Steps first..len(data)-1 as train_one_epoch takes them: rates uploaded per epoch."""
    losses, rates = [], []
    training.model.train()
    for k in range(first, len(data)):
        if k == first or k % PER_EPOCH == 0:
            step.start_epoch(k - k % PER_EPOCH, k % PER_EPOCH)
        x, y = data[k]
        losses.append(step(x, y).clone())
        if isinstance(step, GraphedStep):
            rates.append(step.lr.tolist())
        training.scheduler.step()
    return losses, rates


def test_device_rates_are_the_schedule_at_every_step():
    training = make_training()
    _, rates = train_steps(training, graphed(training, warmup=0, min_steps=1), batches(T))
    for k, row in enumerate(rates):
        # float32 on the device, from the same Python floats the host scheduler gives
        expected = torch.tensor(closed_form_lrs(k, 7, T, 0.5), dtype=torch.float32)
        assert row == expected.tolist(), k
    assert training.scheduler.num_frozen > 3  # the schedule crossed several freeze points


def test_graphed_step_computes_exactly_what_the_eager_step_does():
    data = batches(T)
    eager = make_training()
    eager_losses, _ = train_steps(eager, EagerStep(eager), data)
    run = make_training()
    step = graphed(run, warmup=0, min_steps=1)
    losses, _ = train_steps(run, step, data)
    assert all(torch.equal(a, b) for a, b in zip(losses, eager_losses, strict=True))
    a, b = eager.model.state_dict(), run.model.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)  # BN statistics too
    assert eager.scheduler.frozen_at == run.scheduler.frozen_at
    # Frozen at steps 3, 5, 8, 11, 14, 19: seven levels, each captured at its first step but
    # level 0, whose first step runs eagerly to make the momentum buffers.
    planned = planned_captures(closed_form_frozen_at(7, T, 0.5), T, warmup=0, min_steps=1)
    assert (step.captures, step.eager_steps) == planned == (7, 1)


def test_a_level_is_captured_only_when_it_lasts_long_enough():
    training = make_training(total=60)
    step = GraphedStep(training, BATCH, 60, graphs=EagerGraphs(), warmup=2, min_steps=8)
    data = batches(60)
    train_steps(training, step, data)
    t_i = [(0.5 + 0.5 * i / 6) ** 3 for i in range(7)]
    starts = [0] + [math.ceil(t * 60) for t in t_i[:-1]] + [60]  # where each level begins
    lengths = [b - a for a, b in pairwise(starts)]
    # level 0 spends its first 2 steps warming up; a later level is captured at its first step
    replayed = [length - (2 if n == 0 else 0) for n, length in enumerate(lengths)]
    replayed = [r for r in replayed if r >= 8]
    assert lengths == [8, 4, 6, 8, 9, 12, 13]  # by hand from t_i = (0.5 + i/12) ** 3
    assert step.captures == len(replayed) == 4
    assert step.eager_steps == 60 - sum(replayed) == 18


def test_a_resumed_graphed_run_continues_bit_for_bit(tmp_path):
    data = batches(T)
    whole = make_training()
    train_steps(whole, graphed(whole, warmup=1, min_steps=2), data)

    first = make_training()
    train_steps(first, graphed(first, warmup=1, min_steps=2), data[:11])
    saved = {"model": first.model.state_dict(), "optimizer": first.optimizer.state_dict(),
             "scheduler": first.scheduler.state_dict(), "rng": torch.get_rng_state()}
    torch.save(saved, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = make_training(seed=123)  # other initial weights: all of it must come from the checkpoint
    resumed.model.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(saved["optimizer"])
    resumed.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    train_steps(resumed, graphed(resumed, warmup=1, min_steps=2), data, first=11)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert whole.scheduler.frozen_at == resumed.scheduler.frozen_at


def test_a_level_lasting_no_longer_than_the_warm_up_is_never_captured():
    # Level 0 lasts 3 steps (unit 0 freezes at step 3), all of them warm-up: the first capture
    # is level 1's, so captures != freeze events + 1.
    training = make_training()
    step = graphed(training, warmup=3, min_steps=1)
    train_steps(training, step, batches(T))
    planned = planned_captures(closed_form_frozen_at(7, T, 0.5), T, warmup=3, min_steps=1)
    assert (step.captures, step.eager_steps) == planned == (6, 3)
    assert step.captures == training.scheduler.num_frozen


def test_no_capture_before_the_momentum_buffers_exist():
    # SGD makes a group's momentum buffer at its first step, deciding on the host: captured
    # then, every replay would take the step for a first one.
    training = make_training()
    step = graphed(training, warmup=0, min_steps=1)
    step.start_epoch(0, 0)
    x, y = batches(1)[0]
    step(x, y)
    assert (step.captures, step.eager_steps) == (0, 1) and step.momentum_ready()


class Allocating:
    """A step that allocates what a training step does (a gradient, a loss) and keeps it."""

    def __init__(self):
        self.w = torch.ones(3, requires_grad=True)

    def __call__(self):
        self.w.grad = None
        loss = (self.w * 2).sum()
        loss.backward()
        return loss.detach()


def test_the_stand_in_refuses_a_capture_into_a_pool_whose_graphs_were_all_released():
    graphs, step = EagerGraphs(), Allocating()
    pool = graphs.new_pool()
    graph, _, _ = graphs.capture(step, pool=pool)
    graph.replay()
    following, _, _ = graphs.capture(step, pool=pool)  # the pool holds a live graph: allowed
    following.replay()
    del graph, following                    # every graph released, the gradient still alive
    with pytest.raises(CaptureError, match=r"graphs were all released \(1 tensors allocated in it still alive\)"):
        graphs.capture(step, pool=pool)
    graphs.capture(step)                    # a new pool: allowed
    step.w.grad = None                      # nothing of the pool alive: given back, made anew
    graphs.capture(step, pool=pool)


def pools_held(t_0: float) -> tuple[list[int], list[int], int]:
    """A graphed run of T steps, every level captured, on the stand-in: after each step, the
    bytes the graphs' pools hold and how many pools are held; and the captures."""
    training = make_training(t_0=t_0, dropout=0.0)
    pools = EagerGraphs()
    step = GraphedStep(training, BATCH, PER_EPOCH, graphs=pools, warmup=1, min_steps=1)
    held, count = [], []
    training.model.train()
    for k, (x, y) in enumerate(batches(T)):
        if k % PER_EPOCH == 0:
            step.start_epoch(k, 0)
        step(x, y)
        training.scheduler.step()
        held.append(pools.reserved_bytes())
        count.append(sum(not pool.freed for pool in pools.pools))
    return held, count, step.captures


def test_a_freeze_levels_graph_memory_goes_back_once_units_freeze():
    # What the caching allocator holds for the graphs, as the stand-in accounts for it: each
    # level's graph in a pool of its own, given back when units freeze, so the graphs' memory
    # falls with freezing; one pool shared by every level would hold the first level's (the
    # largest, the baseline's) to the end.
    baseline, _, captures = pools_held(1.0)
    assert captures == 1 and baseline[0] == 0 and len(set(baseline[1:])) == 1
    held, count, captures = pools_held(0.5)
    assert captures == 7 and max(count) == 1            # one pool held at a time
    assert held[1] == baseline[1]                      # level 0 is the baseline's step
    assert all(b <= a for a, b in pairwise(held[1:]))  # never grows
    assert held[-1] < 0.6 * baseline[-1]               # falls as units freeze
    assert max(held[3 * T // 4:]) <= baseline[-1]


def test_the_stand_in_refuses_host_reads_and_replaced_buffers_inside_a_captured_step():
    graphs, w = EagerGraphs(), torch.ones(3)
    graph, _, _ = graphs.capture(lambda: (w * float(w.sum())).sum())  # float(): a read on the host
    with pytest.raises(CaptureError, match="reads a tensor's value on the host"):
        graph.replay()
    buffers = [torch.zeros(2)]
    graph, _, _ = graphs.capture(lambda: (buffers[0] + 1).sum(), lambda: buffers)
    graph.replay()
    buffers[0] = torch.zeros(2)  # a new tensor where the graph reads the old one's address
    with pytest.raises(CaptureError, match="replaced after the capture"):
        graph.replay()


def test_rates_uploaded_into_a_new_tensor_are_refused():
    class NewTable(GraphedStep):
        def start_epoch(self, first_step, start_batch):
            self.rates = self.rates.clone()  # the graph would go on reading the old table
            super().start_epoch(first_step, start_batch)

    training = make_training()
    step = NewTable(training, BATCH, PER_EPOCH, graphs=EagerGraphs(), warmup=1, min_steps=1)
    with pytest.raises(CaptureError, match="replaced after the capture"):
        train_steps(training, step, batches(T))


def test_the_foreach_sgd_path_reads_the_rate_on_the_host_and_is_refused():
    training = make_training()
    step = graphed(training, warmup=1, min_steps=1)
    for group in training.optimizer.param_groups:
        group["fused"] = None  # what an optimizer state_dict of a CPU run would set
    with pytest.raises(ValueError, match="fused=True"):
        train_steps(training, step, batches(T))
    step.check_fused = lambda: None  # without the check, the capture itself is refused
    with pytest.raises(CaptureError, match="on the host"):
        train_steps(training, step, batches(T))


def test_a_run_started_with_a_foreach_optimizer_resumes_graphed_and_fused(tmp_path):
    """A run started on a CPU (foreach SGD) and continued with --device cuda: loading the
    optimizer's state_dict must not take fused=True away from the graphed step."""
    data = batches(T)
    first = make_training()
    for group in first.optimizer.param_groups:
        group["fused"] = None  # as make_optimizer leaves it on a CPU
    train_steps(first, EagerStep(first), data[:10])
    torch.save({"model": first.model.state_dict(), "optimizer": first.optimizer.state_dict(),
                "scheduler": first.scheduler.state_dict(), "scaler": first.scaler.state_dict(),
                "rng": [rng_state()]}, tmp_path / "ckpt.pt")
    resumed = make_training(seed=5)
    step = graphed(resumed, warmup=1, min_steps=1)
    restore(torch.load(tmp_path / "ckpt.pt", weights_only=True), resumed)
    assert all(group["fused"] is True for group in resumed.optimizer.param_groups)
    train_steps(resumed, step, data, first=10)  # the stand-in refuses the foreach path's .item()
    planned = planned_captures(closed_form_frozen_at(7, T, 0.5), T, 1, 1, first=10, has_momentum=True)
    assert (step.captures, step.eager_steps) == planned == (3, 1)  # levels 4, 5, 6


def test_the_graphed_step_needs_a_fused_optimizer():
    training = tiny_training(total=T)  # foreach SGD on the CPU
    with pytest.raises(ValueError, match="fused=True"):
        graphed(training)


def test_when_graphs_are_used_and_why_not():
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert use_cuda_graphs("auto", cuda, "bf16", False) == (True, None)
    assert use_cuda_graphs("on", cuda, "off", False) == (True, None)
    assert use_cuda_graphs("off", cuda, "off", False) == (False, None)
    assert use_cuda_graphs("auto", CPU, "off", False) == (False, None)  # nothing to say on a CPU
    graphed_, why = use_cuda_graphs("auto", cuda, "fp16", False)
    assert not graphed_ and "fp16" in why and "eagerly" in why
    graphed_, why = use_cuda_graphs("auto", cuda, "off", True)
    assert not graphed_ and "torchrun" in why
    for args, message in [((CPU, "off", False), "need a CUDA device"), ((cuda, "fp16", False), "GradScaler"),
                          ((cuda, "bf16", True), "torchrun")]:
        with raises_flagged(ValueError, f"--cuda-graphs on: .*{message}"):
            use_cuda_graphs("on", *args)
    assert graphs_unsupported(cuda, "bf16", Distributed().enabled) is None


@pytest.mark.slow
def test_train_py_records_the_step_it_ran_and_refuses_graphs_it_cannot_run(tmp_path, capsys):
    tiny = [*TINY, "--subset", "48", "--epochs", "1", "--out-dir", str(tmp_path)]
    train.main([*tiny, "--name", "auto"])
    config = read_records(tmp_path / "auto" / "metrics.jsonl", "config")[0]
    epoch = read_records(tmp_path / "auto" / "metrics.jsonl", "epoch")[0]
    assert (config["cuda_graphs"], config["training_step"]) == ("auto", "eager")
    assert (epoch["training_step"], epoch["captures"], epoch["capture_time_s"]) == ("eager", 0, 0.0)
    assert epoch["eager_steps"] == 3  # 48 images in batches of 16
    assert epoch["eval_time_s"] > 0
    with pytest.raises(SystemExit) as failed:
        train.main([*tiny, "--name", "on", "--cuda-graphs", "on"])
    err = capsys.readouterr().err.strip().splitlines()
    assert failed.value.code == 2 and "--cuda-graphs on: CUDA graphs need a CUDA device, not cpu" in err[-1]
    assert not (tmp_path / "on").exists()


@pytest.mark.slow
def test_benchmark_measures_the_graphed_step_beside_the_eager_one():
    import benchmark
    import benchmark_tables
    parser = benchmark.build_parser()
    args = parser.parse_args(["-L", "10", "-k", "4", "--batch-size", "4", "--steps", "12", "--repeats", "1",
                              "--level-steps", "1", "--device", "cpu", "--num-classes", "10"])
    benchmark.check(args, parser)
    result = benchmark.measure_on(args, CPU, graphed=True, graphs=EagerGraphs)
    g = result["graphed"]
    # cubic t_0 = 0.8, 7 units, 12 steps: units 0..5 freeze at ceil(12 * t_i) = 7, 7, 8, 9, 10,
    # 11, so the run visits levels 0, 2, 3, 4, 5, 6, each captured (level 0 after 2 warm-up steps).
    assert g["captures"] == 6 and sorted(g["level_step_s"], key=int) == ["0", "2", "3", "4", "5", "6"]
    assert len(g["baseline_runs_s"]) == len(g["freezeout_runs_s"]) == 1
    assert g["measured_speedup"] == 1 - g["freezeout_runs_s"][0] / g["baseline_runs_s"][0]
    assert "CUDA graphs" in benchmark_tables.table(result)
    eager_only = benchmark.measure_on(args, CPU, graphed=False)
    assert eager_only["graphed"] is None and "CUDA graphs" not in benchmark_tables.table(eager_only)
    assert eager_only["compiled"] is None and "torch.compile" not in benchmark_tables.table(eager_only)


@pytest.mark.slow  # a compile per freeze level
def test_benchmark_measures_the_compiled_step_in_graphs_as_train_py_runs_it(dynamo_limits_kept):
    # --compile where graphs run: the graphed step with the compiled forward, each level compiled
    # in an uncaptured step, then captured; the compiles and captures are timed apart. (Dynamo's
    # "eager" backend: where dynamo compiles is the point, not AOT autograd's tracing.)
    import torch._dynamo

    import benchmark
    torch._dynamo.reset()
    parser = benchmark.build_parser()
    args = parser.parse_args(["-L", "10", "-k", "4", "--batch-size", "4", "--steps", "24", "--repeats", "1",
                              "--level-steps", "0", "--device", "cpu", "--num-classes", "10", "--compile",
                              "--compile-backend", "eager"])
    benchmark.check(args, parser)
    c = benchmark.measure_on(args, CPU, graphed=True, graphs=EagerGraphs)["compiled"]
    # The first step eager (the order check), then a compile per level visited and a capture of
    # each level that has a step left: 7 of each in FreezeOut's run, one of each in the baseline's.
    assert c["compile_graphed"] and c["step_kinds"] == {"baseline": {"eager": 1, "compile": 1, "graphed": 22},
                                                        "freezeout": {"eager": 1, "compile": 7, "graphed": 16}}
    assert c["captures"] == 7 + 6 and math.isfinite(c["projected_speedup"])  # the stand-in's times mean nothing
    torch._dynamo.reset()


def test_capture_share_of_a_paper_run():
    import benchmark
    # 40 captures of 50 ms against 90,000 steps of 10 ms: 2 s of 900 s
    assert benchmark.capture_share(40, 0.05, 0.01) == pytest.approx(2 / 900)
    assert benchmark.PAPER_RUN_STEPS == 90_000


@pytest.mark.slow
def test_train_speed_tool_compares_runs(tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "train_speed", Path(__file__).resolve().parents[1] / "tools" / "train_speed.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tiny = tiny_argv("--epochs", "2", "--no-validate", "--out-dir", str(tmp_path), subset=48)
    for name in ("a", "b"):
        train.main([*tiny, "--name", name])
    capsys.readouterr()
    rows = tool.main([str(tmp_path / "a"), str(tmp_path / "b")])
    epochs = read_records(tmp_path / "b" / "metrics.jsonl", "epoch")
    assert rows[1]["images_per_s"] == 2 * 3 * 16 / sum(e["train_time_s"] for e in epochs)
    assert rows[1]["captures"] == 0 and rows[1]["training_step"] == "eager"
    assert "1.00x a" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.slow
def test_train_py_graphed_on_the_cpu_stand_in_resumes_bit_for_bit(tmp_path, monkeypatch):
    """train.py's whole graphed path (the step chosen, built before a resume, the rates per
    epoch, captures counted in the records, a stop and --resume) on the CPU, under the
    stand-in's capture rules."""
    import graphs
    monkeypatch.setattr(graphs, "graphs_unsupported", lambda *args: None)
    monkeypatch.setattr(graphs, "CudaGraphs", EagerGraphs)
    # 480 images in batches of 16: 30 steps an epoch, 60 in all; 7 units frozen at steps 8, 12,
    # 18, 26, 35, 47: levels of 8, 4, 6, 8, 9, 12 and 13 steps, the last four captured.
    args = [*TINY, "--subset", "480", "--epochs", "2", "--t_0", "0.5", "--dropout", "0.1", "--no-validate",
            "--cuda-graphs", "on", "--out-dir", str(tmp_path)]
    train.main([*args, "--name", "whole"])
    epochs = read_records(tmp_path / "whole" / "metrics.jsonl", "epoch")
    frozen_at = closed_form_frozen_at(7, 60, 0.5)
    planned = planned_captures(frozen_at, 60, graphs.GRAPH_WARMUP_STEPS, graphs.GRAPH_MIN_STEPS)
    assert (sum(e["captures"] for e in epochs), sum(e["eager_steps"] for e in epochs)) == planned == (4, 18)
    assert all(e["training_step"] == "graphed" for e in epochs)

    # Stopped after step 39, in level 4 (steps 35-46).
    graphed_run_stopped_then_resumed(monkeypatch, [*args, "--name", "cut"], stop_at_call=40)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert same_state(whole["model"], cut["model"]) and same_state(whole["optimizer"], cut["optimizer"])
    assert whole["scheduler"] == cut["scheduler"]
    resumed = read_records(tmp_path / "cut" / "metrics.jsonl", "epoch")[1:]
    planned = planned_captures(frozen_at, 60, graphs.GRAPH_WARMUP_STEPS, graphs.GRAPH_MIN_STEPS,
                               first=40, has_momentum=True)
    assert (resumed[0]["captures"], resumed[0]["eager_steps"]) == planned == (1, 7)  # level 5


@pytest.mark.slow  # a compile per freeze level
def test_train_py_graphed_and_compiled_on_the_cpu_stand_in(tmp_path, monkeypatch, dynamo_limits_kept):
    """--compile with CUDA graphs: the graphed step captures the compiled forward, each level
    compiled in one uncaptured step first (a compile must not happen inside a capture)."""
    import torch._dynamo

    import graphs
    monkeypatch.setattr(graphs, "graphs_unsupported", lambda *args: None)
    monkeypatch.setattr(graphs, "CudaGraphs", EagerGraphs)
    torch._dynamo.reset()
    calls = []  # (a graph's step, graphs dynamo made in it), step by step
    real_step = graphs.GraphedStep.traced_step

    def count_compiles(self):
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        out = real_step(self)
        replay = self.graph_level == self.training.scheduler.num_frozen
        calls.append((replay, torch._dynamo.utils.counters["stats"]["unique_graphs"] - before))
        return out

    monkeypatch.setattr(graphs.GraphedStep, "traced_step", count_compiles)
    args = [*TINY, "--subset", "480", "--epochs", "2", "--t_0", "0.5", "--no-validate", "--out-dir", str(tmp_path),
            "--cuda-graphs", "on", "--compile", "--compile-backend", "eager"]  # where dynamo compiles
    train.main([*args, "--name", "g"])
    config = read_records(tmp_path / "g" / "metrics.jsonl", "config")[0]
    epochs = read_records(tmp_path / "g" / "metrics.jsonl", "epoch")
    assert (config["training_step"], config["compile"], config["compile_backend"]) == ("graphed", True, "eager")
    # Levels of 8, 4, 6, 8, 9, 12 and 13 steps (frozen at 8, 12, 18, 26, 35, 47): after the two
    # warm-up steps, a level is captured once one of its steps ran uncaptured (and compiled) and
    # 8 of its steps are left: levels 4, 5 and 6; 8 + 4 + 6 + 8 + 1 + 1 + 1 = 29 steps ran eagerly.
    assert sum(e["captures"] for e in epochs) == 3 and sum(e["eager_steps"] for e in epochs) == 29
    # Dynamo compiled in the uncaptured steps only, never in a graph's step (the stand-in runs it
    # at every replay, its first standing for the capture).
    assert len(calls) == 60 and sum(n for _, n in calls) >= 7
    assert [n for replay, n in calls if replay] == [0] * (60 - 29)
    torch._dynamo.reset()
