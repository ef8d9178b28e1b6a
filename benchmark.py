"""Realized FreezeOut speedup, measured: baseline and FreezeOut side by side in one process.

    python benchmark.py --model densenet -L 40 -k 12 --batch-size 32 --steps 40 --t_0 0.8 \\
        --how_scale cubic --repeats 3 --device cpu --json

Both runs train the same model on the same batches for the same number of steps, with
train.py's own training step; the baseline uses t_0 = 1 (no freezing), FreezeOut squeezes its
whole schedule into those steps (T = --steps). After a warm-up run of each, baseline and
FreezeOut runs alternate --repeats times and

    measured speedup = 1 - median(FreezeOut time / baseline time).

Beside it: the paper's estimate (DenseNet-BC), the FLOP estimate (FlopCounterMode, the same
T steps), and the ideal speedup predicted from the step time measured at every freeze level
that the schedule goes through: where small kernels are bound by launch latency (DenseNet on a
large GPU), FLOPs overstate the saving and the ideal is the fair target. Memory is taken over
the last quarter of the steps, where the frozen prefix is largest: autograd's saved-tensor bytes
(activations kept for backward, any device) and, on CUDA, max allocated memory.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time

import torch

from benchmark_tables import PAPER_RUN_STEPS, eager_table, other_tables, unreliable
from checkpoint import first_line
from cli import (
    EXIT_FAILED,
    ArgumentParser,
    check_positive,
    check_seed,
    check_t_0,
    examples,
    flag_spellings,
    run_as_script,
)
from compiled_step import CompiledStep, compiled_forward
from config import add_settings, flag, ignored_flags_note
from engine import Training, build_training, effective_amp, memory_format, resolve_device, tune_convolutions
from freezeout import (
    ESTIMATE_INPUT,
    SCALE_POWERS,
    first_frozen_steps,
    freeze,
    schedule_speedup,
    training_flops_by_level,
    unit_flops,
    unit_times,
)
from graphs import GRAPH_WARMUP_STEPS, CudaGraphs, GraphedStep, use_cuda_graphs
from models import build_model, check_depth, paper_speedup, resolve_size
from timing import load_average


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=examples(__doc__), flag_of=flag)

    def add(*names, **kwargs):
        p.add_argument(*flag_spellings(*names), **kwargs)

    def add_shared(*names, **overrides):  # train.py's settings, as config.py declares them
        add_settings(p, names, groups=False, **overrides)

    add_shared("model", "depth", "growth_rate")
    # Two flags in a mutually exclusive group, not one BooleanOptionalAction: given both,
    # argparse refuses instead of letting the last one win; default None tells "not given".
    bottleneck = p.add_mutually_exclusive_group()
    bottleneck.add_argument("--bottleneck", dest="bottleneck", action="store_true", default=None,
                            help="DenseNet-BC bottleneck layers; densenet only (the default)")
    bottleneck.add_argument(*flag_spellings("--no-bottleneck"), dest="bottleneck", action="store_false",
                            default=None, help="plain DenseNet layers (default: bottleneck)")
    add("--num-classes", type=int, default=100, help="classifier outputs")
    add("--batch-size", type=int, default=50, help="batch size")
    add("--steps", type=int, default=100, help="training steps per run (the schedule's T)")
    add_shared("t_0", "how_scale", "scale_lr", t_0={"help": "FreezeOut t_0 (the baseline uses 1)"})
    add("--repeats", type=int, default=3, help="timed baseline/FreezeOut pairs, alternating")
    add("--level-steps", type=int, default=3,
        help="timed steps per freeze level for the ideal speedup (0: skip it)")
    add_shared("device", "amp", "channels_last", "cuda_graphs", "compile", "compile_backend", "seed",
               amp={"help": "mixed precision"},
               cuda_graphs={"help": "auto/on: measure the graphed step beside the eager one (on: an error where "
                                    "it cannot run); off: eager only"},
               compile={"switches": (("--compile", True, "also measure the step with the model compiled by "
                                      "torch.compile, one compile per freeze level (default: off)"),)},
               seed={"help": "seed of the model and the batches"})
    add("--json", action="store_true", default=False,
        help="end stdout with one JSON object of all results (default: the table only)")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    """One model configuration, its batches, and the runs measured on them. `graphs` makes the
    graphed step's capturer (engine.CudaGraphs on a GPU; engine.EagerGraphs lets the CPU test
    the same code). `compile_graphed`: the compiled step is the graphed one with the model's
    forward compiled (what train.py --compile runs where graphs run), else the eager step with
    the model compiled."""

    def __init__(self, args, device: torch.device, graphs=CudaGraphs, compile_graphed: bool = False):
        self.args, self.device, self.graphs, self.compile_graphed = args, device, graphs, compile_graphed
        self.amp = effective_amp(args.amp, device)
        self.memory_format = memory_format(args.channels_last)
        g = torch.Generator().manual_seed(args.seed)
        n = min(args.steps, 16)  # a pool of batches, cycled: the data is not what is measured
        self.batches = [(torch.randn(args.batch_size, 3, 32, 32, generator=g)
                         .to(device, memory_format=self.memory_format),
                         torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device))
                        for _ in range(n)]

    def graphed_step(self, training: Training, steps: int, forward=None) -> GraphedStep:
        """The graphed step for `steps` steps from where the training's schedule stands: every
        freeze level captured (however short: a real run's levels are long, and capture time
        is reported apart), after train.py's eager warm-up (GRAPH_WARMUP_STEPS)."""
        step = GraphedStep(training, self.args.batch_size, steps, graphs=self.graphs(), warmup=GRAPH_WARMUP_STEPS,
                           min_steps=1, forward=forward)
        step.start_epoch(training.scheduler.last_epoch, 0)
        return step

    @contextlib.contextmanager
    def training(self, t_0: float, kind: str = "eager", total_steps: int | None = None,
                 fused: bool | None = None):
        """A fresh model and its training objects for one run of `total_steps` (default
        --steps) steps, released when the run ends: the training and its step refer to each
        other, so without that each run's graph and memory pool would stay until a full garbage
        collection. `kind`: the training step, "eager", "graphed" (every freeze level captured,
        however short: a real run's levels are long, and capture time is reported apart) or
        "compiled" (torch.compile, one compile per level, timed apart too). `fused`: the fused
        SGD without the graphed step (default: with it)."""
        graphed = kind == "graphed" or (kind == "compiled" and self.compile_graphed)
        steps = total_steps or self.args.steps
        torch.manual_seed(self.args.seed)
        training = build_training(
            build(self.args), self.device, steps, lr=0.1, momentum=0.9, weight_decay=1e-4,
            t_0=t_0, how_scale=self.args.how_scale, scale_lr=self.args.scale_lr, amp=self.amp,
            channels_last=self.args.channels_last, fused=True if graphed or fused else None)
        training.model.train()
        if kind == "graphed":
            training.step = self.graphed_step(training, steps)
        elif kind == "compiled" and self.compile_graphed:  # as train.py --compile runs on a GPU
            forward = compiled_forward(training, backend=self.args.compile_backend)
            training.step = self.graphed_step(training, steps, forward=forward)
        elif kind == "compiled":
            training.step = CompiledStep(training, backend=self.args.compile_backend)
        try:
            yield training
        finally:
            if isinstance(training.step, GraphedStep):
                training.step.release()
            training.step = None
            if (graphed or fused) and self.device.type == "cuda":
                torch.cuda.empty_cache()  # where the allocator frees the memory of released pools

    def timed_run(self, t_0: float, kind: str = "eager") -> dict:
        """Wall time of `steps` training steps (captures and compiles excluded, reported
        apart), the steps of each kind (`last_kind`) and the eager ones' seconds (each timed
        to its end on the device: they come first, the process's warm-up), the scheduler's
        share, CUDA's peaks (allocated, reserved) over the last quarter."""
        with self.training(t_0, kind) as training:
            steps, quarter = self.args.steps, (3 * self.args.steps) // 4
            sched = eager_s = 0.0
            kinds = {}
            sync(self.device)
            start = time.perf_counter()
            for k in range(steps):
                if k == quarter and self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                began = time.perf_counter()
                training.step(*self.batches[k % len(self.batches)])
                ran = training.step.last_kind
                kinds[ran] = kinds.get(ran, 0) + 1
                if ran == "eager" and kind != "eager":
                    sync(self.device)
                    eager_s += time.perf_counter() - began
                t = time.perf_counter()
                training.scheduler.step()
                sched += time.perf_counter() - t
            sync(self.device)
            # What capture_time_s holds: the captures, and the graphed step's compiles.
            captures, captured = training.step.captures, training.step.capture_time_s
            if isinstance(training.step, GraphedStep):
                captures += kinds.get("compile", 0)
            elapsed = time.perf_counter() - start - captured
            cuda = self.device.type == "cuda"
            peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
            reserved = torch.cuda.max_memory_reserved(self.device) if cuda else None
        return {"time_s": elapsed, "scheduler_s": sched, "cuda_peak_bytes": peak, "cuda_reserved_bytes": reserved,
                "captures": captures, "capture_s": captured, "step_kinds": kinds, "eager_s": eager_s}

    def saved_tensor_peak(self, t_0: float) -> int:
        """Largest per-step total of tensors autograd saves for backward (parameters aside),
        over the last quarter of the steps (the eager step: a graph saves the same tensors)."""
        with self.training(t_0) as training:
            params = {p.untyped_storage().data_ptr() for p in training.model.parameters()}
            peak = 0
            for k in range(self.args.steps):
                batch = self.batches[k % len(self.batches)]
                if k < (3 * self.args.steps) // 4:
                    training.step(*batch)
                else:
                    storages = {}

                    def pack(t, storages=storages):
                        s = t.untyped_storage()
                        if s.data_ptr() not in params:
                            storages[s.data_ptr()] = s.nbytes()
                        return t

                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                        training.step(*batch)
                    peak = max(peak, sum(storages.values()))
                training.scheduler.step()
        return peak

    def level_step_times(self, levels: list[int], kind: str = "eager") -> dict[int, float]:
        """Median time of one training step with the first n units frozen, for each n of
        `levels` (ascending), on one model whose units are frozen level after level: after a
        warm-up step at each level (compiled: the level's compile and one step more) and,
        graphed, the eager warm-up and the level's capture (a new graphed step per level). Each
        step is followed by the scheduler's, as in training (its first one ends the forward-order
        check and its process-wide hook); its schedule (t_0 = 1) spans exactly these steps, so
        nothing else freezes."""
        graphed = kind == "graphed" or (kind == "compiled" and self.compile_graphed)
        # graphed and compiled: a run's first step is eager, then each level compiles, then captures
        warmup = {"eager": 1, "compiled": 3 if graphed else 2, "graphed": GRAPH_WARMUP_STEPS + 1}[kind]
        per_level = self.args.level_steps + warmup
        times = {}
        with self.training(1.0, "eager" if graphed else kind, total_steps=len(levels) * per_level,
                           fused=graphed) as training:
            for n in levels:
                for unit in training.units[:n]:
                    freeze(unit)
                forward = compiled_forward(training, backend=self.args.compile_backend) if kind == "compiled" else None
                step = self.graphed_step(training, per_level, forward) if graphed else training.step
                taken = []
                for k in range(per_level):
                    sync(self.device)
                    start = time.perf_counter()
                    step(*self.batches[k % len(self.batches)])
                    sync(self.device)
                    taken.append(time.perf_counter() - start)
                    training.scheduler.step()
                if graphed:
                    step.release()
                times[n] = statistics.median(taken[warmup:])
        return times


def build(args) -> torch.nn.Module:
    return build_model(args.model, args.depth, args.growth_rate, args.num_classes, args.bottleneck)


def capture_share(n_units: int, per_capture_s: float, step_s: float,
                  steps: int = PAPER_RUN_STEPS) -> float:
    """The share of a run's training time spent capturing graphs: one capture per freeze
    level (n_units of them) against `steps` steps of `step_s` seconds."""
    return n_units * per_capture_s / (steps * step_s)


def compare(bench: Bench, args, t_i, kind: str = "eager") -> dict:
    """Baseline and FreezeOut with the `kind` of step, alternating after a warm-up run of
    each, and the ideal speedup from the step time at every freeze level the schedule visits."""
    # Warm-up: allocator, cuDNN autotuning, first-call costs, and the compiles (dynamo reuses
    # them for every later model of the same structure).
    warmup = [bench.timed_run(t_0, kind) for t_0 in (1.0, args.t_0)]
    baseline, freezeout = [], []
    for _ in range(args.repeats):
        baseline.append(bench.timed_run(1.0, kind))
        freezeout.append(bench.timed_run(args.t_0, kind))
    ratios = [f["time_s"] / b["time_s"] for b, f in zip(baseline, freezeout, strict=True)]
    ideal, level_times = None, {}
    if args.level_steps > 0:
        first = first_frozen_steps(t_i, args.steps)
        visited = sorted({sum(f <= k for f in first) for k in range(args.steps)})
        level_times = bench.level_step_times(visited, kind)
        ideal = schedule_speedup([level_times.get(n, 0.0) for n in range(len(t_i))], t_i, args.steps)
    b_time = statistics.median(r["time_s"] for r in baseline)
    f_time = statistics.median(r["time_s"] for r in freezeout)
    images = args.steps * args.batch_size
    result = {
        "baseline_runs_s": [r["time_s"] for r in baseline],
        "freezeout_runs_s": [r["time_s"] for r in freezeout],
        "baseline_s": b_time, "freezeout_s": f_time,
        "measured_speedup": 1 - statistics.median(ratios), "ideal_speedup": ideal,
        "level_step_s": {str(n): t for n, t in level_times.items()},
        "baseline_images_per_s": images / b_time, "freezeout_images_per_s": images / f_time,
        # Beside the eager warm-up (a graphed or compiled run's first steps): what train.py's
        # steps of this kind should run at (tools/train_speed.py --benchmark compares them).
        "steady_images_per_s": {"baseline": statistics.median(map(steady_rate, baseline)) * args.batch_size,
                                "freezeout": statistics.median(map(steady_rate, freezeout)) * args.batch_size},
        "overhead_frac": statistics.median(r["scheduler_s"] / r["time_s"] for r in freezeout),
        "peak_mem_baseline": baseline[-1]["cuda_peak_bytes"],
        "peak_mem_freezeout": freezeout[-1]["cuda_peak_bytes"],
    }
    if kind != "eager":  # captures, or compiles: one per freeze level
        captures = freezeout[-1]["captures"]
        per_capture = statistics.median(r["capture_s"] / r["captures"] for r in freezeout)
        first = sum(r["captures"] for r in warmup), sum(r["capture_s"] for r in warmup)
        # A run pays what the warm-up runs paid: a graph is captured anew in every run, but a
        # compile is paid once per process (the timed runs find it in dynamo's cache).
        paid = first[1] / first[0] if kind == "compiled" else per_capture
        result.update(captures=captures, capture_s_per_capture=per_capture,
                      warmup_captures=first[0], warmup_capture_s=first[1],
                      paper_run_capture_share=capture_share(len(t_i), paid, f_time / args.steps),
                      step_kinds={"baseline": baseline[-1]["step_kinds"], "freezeout": freezeout[-1]["step_kinds"]},
                      compile_graphed=kind == "compiled" and getattr(bench, "compile_graphed", False),
                      reserved_baseline=baseline[-1]["cuda_reserved_bytes"],
                      reserved_freezeout=freezeout[-1]["cuda_reserved_bytes"],
                      projected_speedup=statistics.median(
                          projected_speedup(b, f, args.steps, len(t_i), paid)
                          for b, f in zip(baseline, freezeout, strict=True)))
    return result


def replayed_steps(run: dict) -> int:
    """A graphed or compiled run's steps past the eager warm-up and the level compiles (whose
    seconds its time leaves out, with the captures')."""
    return sum(n for kind, n in run["step_kinds"].items() if kind not in ("eager", "compile"))


def steady_rate(run: dict) -> float:
    """Steps a second of a timed run, its eager steps aside (none aside for an eager run)."""
    replayed = replayed_steps(run)
    if not replayed:
        return run["step_kinds"].get("eager", 0) / run["time_s"]
    return replayed / (run["time_s"] - run["eager_s"])


def projected_speedup(baseline: dict, freezeout: dict, steps: int, n_units: int, per_capture: float,
                      real_steps: int = PAPER_RUN_STEPS) -> float:
    """The measured speedup of a graphed (or compiled) pair of runs, projected to a run of
    `real_steps` steps with the same schedule: the eager warm-up steps, which a short run
    counts many times over, are paid once as measured; the other steps at the rate they were
    measured at, where the steps FreezeOut did not replay (its warm-up, in its first level:
    the baseline's own step) count at the baseline's rate; and a capture (or compile) per
    freeze level, against the baseline's one."""
    warm_b, warm_f = baseline["step_kinds"].get("eager", 0), freezeout["step_kinds"].get("eager", 0)
    rate_b = (baseline["time_s"] - baseline["eager_s"]) / replayed_steps(baseline)
    replayed_f = replayed_steps(freezeout)
    # FreezeOut's mean step over its whole schedule
    rate_f = (freezeout["time_s"] - freezeout["eager_s"] + (steps - replayed_f) * rate_b) / steps
    base = baseline["eager_s"] + (real_steps - warm_b) * rate_b + per_capture
    ours = freezeout["eager_s"] + (real_steps - warm_f) * rate_f + n_units * per_capture
    return 1 - ours / base


def measure(args, report=lambda result: None) -> dict:
    """What main measures on the device --device names: `measure_on`, eager then graphed."""
    device = resolve_device(args.device)
    tune_convolutions(device)  # as train.py does
    graphed, _ = use_cuda_graphs(args.cuda_graphs, device, effective_amp(args.amp, device), False)
    loads = [load_average()]
    result = measure_on(args, device, graphed, report=report)
    loads = [x for x in (*loads, load_average()) if x is not None]  # the host's, at the start and the end
    return {**result, "host_load": max(loads, default=None), "cpu_count": os.cpu_count()}


def measure_on(args, device: torch.device, graphed: bool, graphs=CudaGraphs,
               report=lambda result: None) -> dict:
    """Eager, and beside it the graphed step when `graphed` and the compiled one with
    --compile: the results as one dict (the eager figures at the top level, the others under
    "graphed" and "compiled"). `report(result)` gets the eager results before the others are
    measured, so that a failure there loses nothing; such a failure (a RuntimeError) is kept
    as result["graphed_error"] or result["compiled_error"] (one line)."""
    bench = Bench(args, device, graphs, compile_graphed=graphed)
    model = build(args)
    units = model.freeze_units()
    t_i = unit_times(len(units), args.t_0, args.how_scale)
    levels = training_flops_by_level(unit_flops(model, units, ESTIMATE_INPUT))
    result = {
        "model": args.model, "depth": args.depth, "growth_rate": args.growth_rate,
        "bottleneck": args.bottleneck, "num_classes": args.num_classes, "batch_size": args.batch_size,
        "steps": args.steps, "t_0": args.t_0, "how_scale": args.how_scale, "scale_lr": args.scale_lr,
        "seed": args.seed, "repeats": args.repeats, "level_steps": args.level_steps,
        "cuda_graphs": args.cuda_graphs, "compile": args.compile,
        "compile_backend": args.compile_backend if args.compile else None,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else None, "amp": bench.amp, "channels_last": args.channels_last, "threads": torch.get_num_threads(),
        "torch": str(torch.__version__), "n_units": len(units),
        "params": sum(p.numel() for p in model.parameters()),
        **compare(bench, args, t_i),
        "estimated_speedup": paper_speedup(args.model, args.depth, args.growth_rate, args.t_0,
                                           args.how_scale, args.bottleneck),
        "flop_speedup": schedule_speedup(levels, t_i, args.steps),
        "saved_bytes_baseline": bench.saved_tensor_peak(1.0),
        "saved_bytes_freezeout": bench.saved_tensor_peak(args.t_0),
        "graphed": None, "compiled": None,
    }
    report(result)
    for kind, wanted in (("graphed", graphed), ("compiled", args.compile)):
        if wanted:
            try:
                result[kind] = compare(bench, args, t_i, kind)
            except RuntimeError as e:
                result[f"{kind}_error"] = first_line(e)
    return result


def check(args, parser) -> None:
    """One line naming the flag, exit 2, for a value no benchmark can use."""
    given = {dest: getattr(args, dest) for dest in ("growth_rate", "bottleneck")
             if getattr(args, dest) is not None}
    args.bottleneck = args.bottleneck is not False
    args.depth, args.growth_rate = resolve_size(args.model, args.depth, args.growth_rate)
    try:
        check_positive({f"--{flag.replace('_', '-')}": getattr(args, flag) for flag in
                        ("depth", "growth_rate", "batch_size", "steps", "repeats", "num_classes")})
        if args.level_steps < 0:
            raise ValueError(f"--level-steps must be >= 0, got {args.level_steps}")
        check_t_0("--t_0", args.t_0)
        check_seed("--seed", args.seed)
        check_depth(args.model, args.depth, args.bottleneck)
        device = resolve_device(args.device)
        use_cuda_graphs(args.cuda_graphs, device, effective_amp(args.amp, device), False)
        if args.t_0 < 1 and math.ceil(args.t_0 ** SCALE_POWERS[args.how_scale] * args.steps) >= args.steps:
            raise ValueError(f"--steps {args.steps}: no unit freezes in so few steps (the first would at step "
                             f"{math.ceil(args.t_0 ** SCALE_POWERS[args.how_scale] * args.steps)}), so FreezeOut "
                             f"would be timed as the baseline; give more --steps")
    except ValueError as e:
        parser.error(str(e))
    note = ignored_flags_note(args.model, given)
    if note:  # on stderr: stdout stays the table (and the JSON line)
        parser.say(note, error=False)


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    check(args, parser)
    # The eager table is printed as soon as it is measured: what the graphed or compiled part
    # does cannot take it away.
    result = measure(args, report=lambda eager: print(eager_table(eager), flush=True))
    others = other_tables(result)
    if others:
        print(others)
    if args.json:
        print(json.dumps(result))
    sys.stdout.flush()
    doubt = unreliable(result)
    if doubt:
        parser.say(f"warning: {doubt}", error=False)
    failed = [kind for kind in ("graphed", "compiled") if f"{kind}_error" in result]
    for kind in failed:
        parser.say(f"the {kind} step failed ({result[f'{kind}_error']}); the eager figures above stand")
    if failed:
        raise SystemExit(EXIT_FAILED)
    return result


if __name__ == "__main__":
    run_as_script(main)
