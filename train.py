"""Train a network with FreezeOut: layer-wise cosine annealing, then freezing.

    python train.py                         # the paper's job: DenseNet-BC k=12 L=76, CIFAR-100,
                                            # cubic, scaled, t_0 = 0.8, 100 epochs
    python train.py --dataset synthetic --which_dataset 10 --subset 5000 -L 22 --epochs 2 --device cpu
    python train.py --t_0 1                 # the baseline: plain cosine annealing, no freezing

Every run writes `OUT_DIR/NAME/metrics.jsonl` (a `config` record first, one `epoch` record per
epoch, a `summary` record last) and `OUT_DIR/NAME/checkpoint.pt` as it starts (step 0) and after
every epoch. SIGINT or SIGTERM stop it after the current step with a checkpoint (exit code
130 / 143); `--resume` continues it exactly where it stopped, whatever stopped it. `python
train.py -h` lists the flags with their defaults.

This file is the command line and the run (start or resume, the plan, the epoch loop, the
summary); spec.py declares the settings, turns the flags into them and resolves them; the
machinery lives in engine.py, graphs.py, checkpoint.py, loaders.py, data_sets.py and models.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed
from tqdm import tqdm

from checkpoint import (
    RunLock,
    describe_checkpoint,
    host_info,
    load_average,
    open_run,
    restore,
    save_checkpoint,
    save_first_checkpoint,
    started_config,
)
from compiled_step import CompiledStep, compiled_forward
from data_sets import steps_per_epoch
from distributed import Distributed, check_replicas_agree, init_distributed
from engine import (
    NO_STEP,
    Diverged,
    EpochPosition,
    RunProgress,
    StopSignals,
    Training,
    build_training,
    effective_amp,
    evaluate,
    resolve_device,
    seed_everything,
    stop_or_diverged,
    train_one_epoch,
    tune_convolutions,
)
from freezeout import first_frozen_steps
from graphs import GraphedStep, use_cuda_graphs
from loaders import choose_loader, load_data, make_loaders
from messages import DataError, RunError, plural
from metrics_logger import MetricsLogger, WriteError, evaluation, read_records, write_records
from models import build_model, model_name, resolve_size, run_estimates
from spec import (
    EXIT_FAILED,
    EXIT_USAGE,
    SETTINGS,
    HelpFormatter,
    Resolved,
    RunSettings,
    add_settings,
    check_resume_flags,
    continue_argv,
    examples,
    flag,
    given,
    ignored_flags_note,
    name_settings_by_flags,
    resolve,
    resumed_settings,
    run_as_script,
    setting_differences,
    settings_record,
    stop_status,
)
from timing import TimeSplit, describe_split

# open_run's kinds of error as exit statuses (spec.py chooses them).
EXIT_OF_OPEN_ERROR = {"setting": EXIT_USAGE, "busy": EXIT_USAGE, "run": EXIT_FAILED}


class Stopped(Exception):
    """The run stopped on SIGINT / SIGTERM after writing a checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The CLI, from the run spec's table (spec.py), and every flag's default. Defaults are kept
    out of the parser so that one parse tells which flags were given (what --resume checks
    against the saved run)."""
    parser = argparse.ArgumentParser(description="Train a network with FreezeOut (Brock et al. 2017).",
                                     epilog=examples(__doc__), formatter_class=HelpFormatter)
    return parser, add_settings(parser, SETTINGS, defaults={})


def parse_args(argv):
    """(parser, the run's settings with every default filled in, the set of settings given)."""
    parser, defaults = build_parser()
    explicit = vars(parser.parse_args(argv))
    values = {**defaults, **explicit}
    values["depth"], values["growth_rate"] = resolve_size(values["model"], values["depth"], values["growth_rate"])
    return parser, RunSettings(**values), set(explicit)


# ---------------------------------------------------------------------------------------
# What the console shows
# ---------------------------------------------------------------------------------------
def describe(config: dict, splits) -> str:
    """The run's header: its config record in words."""
    sizes = f"{len(splits.train):,} train"
    if splits.eval is not None:
        sizes += f" / {len(splits.eval):,} {'val' if config['eval_mode'] == 'val' else 'test'}"
    paper = config["paper_speedup"]
    arch = model_name(config["model"], config["depth"], config["growth_rate"], config["bottleneck"])
    return "\n".join([
        f"{arch} on {config['dataset']} ({config['num_classes']} classes; {sizes}; "
        f"{len(splits.test):,} test at the end)",
        f"  {config['params']:,} parameters in {plural(config['n_units'], 'FreezeOut unit')}; "
        f"{plural(config['steps_per_epoch'], 'step')}/epoch x {plural(config['epochs'], 'epoch')} = "
        f"{plural(config['total_steps'], 'step')}",
        f"  {config['how_scale']}, {'scaled' if config['scale_lr'] else 'unscaled'}, t_0 = {config['t_0']:g}: "
        + ("baseline: no unit freezes" if config["t_0"] >= 1 else
           f"first unit freezes at {config['t_i'][0]:.1%} of the run" + too_short(config)),
        f"  estimated speedup: {'n/a' if paper is None else f'{paper:.1%}'} (paper), "
        f"{config['flop_speedup']:.1%} (FLOPs)",
        f"  device {config['device']}"
        + (f" x {config['world_size']} processes" if config["world_size"] > 1 else "")
        + f", amp {config['amp_effective']}, {config['training_step']} step"
        + (" (compiled)" if config["compile"] and config["training_step"] == "graphed" else "")
        + f", loader {config['loader_used']}, "
        f"batch {config['batch_size']}, lr {config['lr']:g}, seed {config['seed']}; "
        f"run directory {config['run_dir']}",
    ])


def too_short(config: dict) -> str:
    """A warning for a run too short for any unit to freeze (it is the baseline, whatever the
    estimates say), else nothing."""
    first = first_frozen_steps(config["t_i"][:1], config["total_steps"])[0]
    if first < config["total_steps"]:
        return ""
    return (f"; WARNING: in {plural(config['total_steps'], 'step')} no unit freezes (the first would at step "
            f"{math.ceil(config['t_i'][0] * config['total_steps'])}): this run is the baseline, whatever "
            f"the estimates below say; train for more steps (--epochs, --subset, --batch_size)")


def epoch_line(record: dict, config: dict) -> str:
    line = f"epoch {record['epoch']:>3}/{config['epochs']}  loss {record['train_loss']:.4f}"
    evaluated = evaluation(record, config["eval_mode"])
    if evaluated is not None:
        line += f"  {evaluated[0]} err {evaluated[2]:5.2f}%"
    return line + (f"  frozen {record['frozen_units']}/{config['n_units']}"
                   f"  {record['images_per_s']:.0f} img/s  {record['train_time_s']:.1f} s")


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------
class NoLog:
    """Stands in for the metrics file on the ranks that do not write it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def log(self, event: str, **fields) -> dict:
        return {"event": event, **fields}


@dataclass(frozen=True)
class Plan:
    """What this process decides for the run, at every start of it (a resumed run may run on
    another device, with other workers): where and how its step runs, its data and steps, its
    estimates. The config record holds it beside the settings; a resumed run keeps the loader
    its position was made with, and the host's load and cores when it started."""
    device: str
    amp_effective: str                  # the precision autocast really uses here
    training_step: str                  # "eager", "graphed" or "compiled"
    workers: int
    params: int
    n_units: int
    t_i: list
    steps_per_epoch: int
    total_steps: int
    train_images: int
    world_size: int
    per_rank_batch_size: int
    loader_used: str
    load_start: Optional[float]
    cpu_count: Optional[int]
    flop_speedup: float
    estimated_speedup: float
    unit_flops: list


@dataclass
class BuiltRun:
    """A run ready to train: its settings, what they resolve to, this process's plan, the
    config record (the settings' half and the plan's), the training objects and the data."""
    settings: RunSettings
    resolved: Resolved
    plan: Plan
    record: dict
    training: Training
    splits: object


def build_run(settings: RunSettings, resolved: Resolved, argv: list, dist: Distributed, device: torch.device,
              step: tuple[str, str], started: dict | None) -> BuiltRun:
    """The build phase: the data, the model, the training objects and the step (`step`:
    the precision and step kind choose_step decided), then the plan, once: what only the built
    run knows (parameters, units and their t_i, steps, loader, estimates). `started`: the
    config record of the run this one resumes, None for a run starting at step 0."""
    seed_everything(settings.seed)
    splits = load_data(dist, resolved.dataset, settings.data_root, settings.eval_mode, settings.subset,
                       resolved.synthetic_classes, settings.seed)
    if settings.batch_size % dist.world_size:
        raise RunError(f"--batch_size {settings.batch_size} is not divisible by the "
                       f"{dist.world_size} processes (it is the global batch)")
    try:
        per_epoch = steps_per_epoch(len(splits.train), settings.batch_size, dist.world_size)
    except ValueError as e:
        raise RunError(str(e)) from None
    architecture = (settings.model, settings.depth, settings.growth_rate, splits.num_classes, settings.bottleneck,
                    settings.reduction, settings.dropout)
    model = build_model(*architecture)
    amp, kind = step
    training = build_training(
        model, device, resolved.epochs * per_epoch, lr=settings.lr, momentum=settings.momentum,
        weight_decay=settings.weight_decay, t_0=resolved.t_0, how_scale=settings.how_scale,
        scale_lr=settings.scale_lr, amp=amp, channels_last=settings.channels_last, dist=dist,
        fused=True if kind == "graphed" else None)
    if kind == "graphed":
        forward = compiled_forward(training, backend=settings.compile_backend) if settings.compile else None
        training.step = GraphedStep(training, settings.batch_size, per_epoch, forward=forward)
    elif kind == "compiled":
        training.step = CompiledStep(training, backend=settings.compile_backend)
    scheduler = training.scheduler
    estimates = run_estimates(training.model, training.units, scheduler.t_i, scheduler.total_steps,
                              resolved.paper_speedup, architecture)
    # A resumed run keeps what its start found: the loader its position was made with, the
    # host's load and cores (a record of before they were kept has none: this start's).
    kept = {k: started[k] for k in ("loader_used", "load_start", "cpu_count") if k in started} if started else {}
    plan = Plan(
        device=str(device), amp_effective=amp, training_step=kind,
        workers=settings.workers if settings.workers is not None else (0 if device.type == "cpu" else 4),
        params=sum(p.numel() for p in training.model.parameters()), n_units=len(training.units),
        t_i=scheduler.t_i, steps_per_epoch=per_epoch, total_steps=scheduler.total_steps,
        train_images=len(splits.train), world_size=dist.world_size,
        per_rank_batch_size=settings.batch_size // dist.world_size,
        loader_used=kept["loader_used"] if "loader_used" in kept else choose_loader(settings.loader, splits, device),
        load_start=kept["load_start"] if "load_start" in kept else load_average(),
        cpu_count=kept["cpu_count"] if "cpu_count" in kept else os.cpu_count(),
        flop_speedup=estimates["flop_speedup"], estimated_speedup=estimates["estimated_speedup"],
        unit_flops=estimates["unit_flops"])
    record = {**settings_record(settings, resolved, argv), **dataclasses.asdict(plan)}
    return BuiltRun(settings, resolved, plan, record, training, splits)


def start_run(built: BuiltRun, run_dir: Path, clock: TimeSplit) -> None:
    """Make the run directory, write the config record first, then the step-0 checkpoint: from
    then on the run can be continued with --resume whatever stops it."""
    training, config = built.training, built.record
    dist = training.dist
    if dist.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"--out-dir {built.settings.out_dir}: cannot create {run_dir} "
                           f"({e.strerror or e})") from None
        # Replaces the file: a run started again (it stopped before its first checkpoint)
        # keeps none of the records of its first start.
        write_records(run_dir / "metrics.jsonl",
                      [{"event": "config", **config, "host": host_info(training.device)}])
    with clock.part("checkpoint"):
        save_first_checkpoint(run_dir, training, config)  # every rank: it gathers their RNG states


def resume_run(checkpoint: dict, training: Training, run_dir: Path) -> RunProgress:
    """Restore every state; drop the epoch records of work about to be redone. Returns how far
    the run had got."""
    restore(checkpoint, training)
    done_epochs = checkpoint["epoch"]
    position = saved_position(checkpoint["position"], done_epochs + 1, run_dir)
    if training.dist.is_main:
        metrics = run_dir / "metrics.jsonl"
        kept = [r for r in read_records(metrics) if r["event"] == "config"
                or (r["event"] == "epoch" and r["epoch"] <= done_epochs)]
        write_records(metrics, kept)
        print(f"resuming {run_dir} in epoch {position.epoch} at batch {position.batch}")
    return RunProgress(done_epochs, checkpoint["train_time_s"], position)


def saved_position(saved: dict | None, next_epoch: int, run_dir: Path) -> EpochPosition:
    """The position a checkpoint holds inside an epoch (None: at the start of `next_epoch`)."""
    if saved is None:
        return EpochPosition(next_epoch)
    try:
        return EpochPosition(**saved)
    except TypeError:
        raise RunError(f"{run_dir}/checkpoint.pt holds an epoch position of another format ({sorted(saved)}); "
                       f"it cannot be continued by this version") from None


def stopped_by(signum: int, where: str, run_dir: Path) -> Stopped:
    return Stopped(signum, f"stopped by {signal.Signals(signum).name} {where}; checkpoint written "
                           f"(run directory {run_dir})")


def fit(built: BuiltRun, loaders, run_dir: Path, progress: RunProgress, log,
        clock: TimeSplit) -> tuple[float, tuple]:
    """The epoch loop: train, evaluate, log and checkpoint every epoch; a stop signal writes a
    checkpoint (inside the epoch if need be) and raises Stopped. Returns the training time and
    the last evaluation (loss, error), (None, None) without one. `clock` is charged each part."""
    train_loader, eval_loader, _ = loaders
    training, config, plan, epochs = built.training, built.record, built.plan, built.resolved.epochs
    eval_mode = built.settings.eval_mode
    dist, scheduler, per_epoch = training.dist, training.scheduler, plan.steps_per_epoch
    checkpoint_path, last_eval = run_dir / "checkpoint.pt", (None, None)
    cuda = training.device.type == "cuda"
    clock.training_starts()
    with StopSignals() as stop:
        train_time, position = progress.train_time_s, progress.position
        for epoch in range(progress.epochs_done + 1, epochs + 1):
            step_fn = training.step
            before = (step_fn.captures, step_fn.capture_time_s, step_fn.eager_steps)
            if cuda:
                torch.cuda.reset_peak_memory_stats(training.device)
            stopped = train_one_epoch(training, train_loader, position, per_epoch, stop,
                                      desc=f"epoch {epoch}/{epochs}", clock=clock)
            step = (epoch - 1) * per_epoch + position.batch
            if stopped:
                with clock.part("checkpoint"):
                    save_checkpoint(checkpoint_path, training, config, epoch - 1, step, train_time, position)
                raise stopped_by(stop.signum, f"in epoch {epoch} after step {step} of "
                                 f"{scheduler.total_steps}", run_dir)
            stats = position.stats()
            train_time += stats["train_time_s"]
            record = {"epoch": epoch, "step": step, **stats, "training_step": plan.training_step,
                      "captures": step_fn.captures - before[0],
                      "capture_time_s": step_fn.capture_time_s - before[1],
                      "eager_steps": step_fn.eager_steps - before[2]}
            if cuda:  # the epoch's training peaks: what the frozen units no longer need is given back
                record.update(cuda_max_allocated=torch.cuda.max_memory_allocated(training.device),
                              cuda_max_reserved=torch.cuda.max_memory_reserved(training.device))
            if not check_replicas_agree(training.model, dist, training.device):
                raise RunError("the processes' weights differ: the replicas fell out of step")
            if eval_loader is not None:
                started = time.perf_counter()
                with clock.part("eval"):
                    last_eval = evaluate(training, eval_loader)
                split = "val" if eval_mode == "val" else "test"  # the records name what they hold
                record.update({f"{split}_loss": last_eval[0], f"{split}_err": last_eval[1],
                               "eval_time_s": time.perf_counter() - started})
            record.update(frozen_units=scheduler.num_frozen,
                          active_units=len(training.units) - scheduler.num_frozen,
                          lr=[float(lr) for lr in scheduler.get_last_lr()])
            with clock.part("checkpoint"):  # the epoch's writes: its record, then its checkpoint
                log.log("epoch", **record)
                save_checkpoint(checkpoint_path, training, config, epoch, step, train_time, None)
            if dist.is_main:
                tqdm.write(epoch_line(record, config))
            position = EpochPosition(epoch + 1)
            if epoch < epochs and stop_or_diverged(torch.tensor(NO_STEP, device=training.device),
                                                              stop, dist):
                raise stopped_by(stop.signum, f"after epoch {epoch}", run_dir)
    return train_time, last_eval


def run(built: BuiltRun, run_dir: Path, checkpoint: dict | None, clock: TimeSplit) -> dict:
    """Start or resume the built run, train it to the end, evaluate on the test set, write the
    summary record (returned) with where this process's time went (`clock`)."""
    settings, plan, training, splits = built.settings, built.plan, built.training, built.splits
    dist, device, eval_mode = training.dist, training.device, settings.eval_mode
    if checkpoint is None:
        start_run(built, run_dir, clock)
        progress = RunProgress()
    else:
        progress = resume_run(checkpoint, training, run_dir)
    loaders = make_loaders(splits, plan.loader_used, settings.batch_size, device, augment=settings.augment,
                           eval_mode=eval_mode, workers=plan.workers, seed=settings.seed, rank=dist.rank,
                           world_size=dist.world_size)
    if dist.is_main:
        print(describe(built.record, splits), flush=True)
    with (MetricsLogger(run_dir / "metrics.jsonl") if dist.is_main else NoLog()) as log:
        train_time, last_eval = fit(built, loaders, run_dir, progress, log, clock)
        with StopSignals() as stop:  # a stop now: the last checkpoint is the run's end
            if eval_mode == "test" and last_eval[0] is not None:
                test_loss, test_err = last_eval  # the last evaluation was this same test pass
            else:
                with clock.part("eval"):
                    test_loss, test_err = evaluate(training, loaders[2])
            if stop_or_diverged(torch.tensor(NO_STEP, device=training.device), stop, dist):
                raise stopped_by(stop.signum, "during the final evaluation (continuing it evaluates the "
                                 "test set and writes the summary)", run_dir)
        val_err = last_eval[1] if eval_mode == "val" else None
        if val_err is None and eval_mode == "val" and dist.is_main:
            # Resumed after its last epoch (its summary could not be written): that epoch's record has it.
            recorded = read_records(run_dir / "metrics.jsonl", "epoch")
            evaluated = evaluation(recorded[-1], eval_mode) if recorded else None
            val_err = evaluated[2] if evaluated is not None else None
        summary = log.log(
            "summary", epochs=built.resolved.epochs, steps=training.scheduler.total_steps,
            train_time_s=train_time, val_err=val_err,
            test_loss=test_loss, test_err=test_err, estimated_speedup=plan.estimated_speedup,
            paper_speedup=built.resolved.paper_speedup, flop_speedup=plan.flop_speedup,
            frozen_at=training.scheduler.frozen_at, load_end=load_average(), time_split=clock.record())
    if dist.is_main:
        print(describe_split(summary["time_split"]))
        print(f"done: test error {test_err:.2f}%, training time {train_time:.1f} s; results in {run_dir}")
    return summary


def choose_step(settings: RunSettings, device: torch.device, dist: Distributed) -> tuple[str, str]:
    """(the precision autocast really uses here, the training step: graphed, compiled or eager)
    for this invocation: a resumed run may change device or --cuda-graphs. ValueError for CUDA
    graphs asked for where they cannot run."""
    amp = effective_amp(settings.amp, device)
    graphed, why_not = use_cuda_graphs(settings.cuda_graphs, device, amp, dist.enabled)
    if settings.compile and not graphed:  # --compile without CUDA graphs
        return amp, "compiled"
    if why_not is not None and dist.is_main:
        print(f"eager training step: {why_not}")
    return amp, "graphed" if graphed else "eager"


def continued(saved: dict, now: RunSettings, resolved: Resolved) -> tuple[RunSettings, Resolved, list]:
    """(settings, what they resolve to, the command line that started it) of a run continued
    from its config record `saved`: the saved settings with this invocation's runtime ones, in
    the directory it was opened in. What they resolve to must be what the run was started with
    (t_0 from a target speedup, epochs under --const_time), or it would not be the same run."""
    settings = resumed_settings(saved["args"], now)
    try:
        again = resolve(settings, given(settings))
    except ValueError as e:
        raise RunError(f"{flag('resume')}: the saved run's settings: {e}") from None
    again = dataclasses.replace(again, name=resolved.name, run_dir=resolved.run_dir)
    wanted = settings_record(settings, again, saved["argv"])
    differences = setting_differences({k: saved[k] for k in wanted if k in saved},
                                      {k: wanted[k] for k in wanted if k in saved})
    if differences:
        raise RunError(f"{flag('resume')}: this version resolves the saved run's settings otherwise "
                       f"({'; '.join(differences)}); continue it with the version of the code that started it")
    return settings, again, saved["argv"]


def continue_command(settings: RunSettings, name: str, world_size: int = 1) -> str:
    """The command that continues this run: its name, and this invocation's value of every
    setting --resume may change where it is not the default (the checkpoint holds every
    setting that changes the result)."""
    launcher = ["python", "train.py"] if world_size == 1 else \
        ["torchrun", f"--nproc_per_node={world_size}", "train.py"]
    return " ".join(shlex.quote(w) for w in launcher + continue_argv(settings, name))


def failure(error: BaseException, run_dir: Path, per_epoch: int | None, resume_hint: str | None) -> str:
    """The one line for what ended a run early, true about what the run directory holds
    (`per_epoch`: the run's steps per epoch, once it is built)."""
    hint = f"; continue with: {resume_hint}" if resume_hint else ""
    if isinstance(error, Diverged):
        again = (f"; {resume_hint} continues from it, and the same settings diverge again at the same "
                 f"step: a new run (another --name) with a smaller --lr may not" if resume_hint else "")
        return (f"{error} (epoch {error.step // per_epoch + 1}, batch {error.step % per_epoch}); "
                f"{describe_checkpoint(run_dir)}{again}")
    if isinstance(error, Stopped):
        return f"{error}{hint}"
    if isinstance(error, WriteError):
        # A run whose step-0 checkpoint could not be written is continued from its config record.
        resumable = resume_hint and ((run_dir / "checkpoint.pt").exists() or started_config(run_dir) is not None)
        return f"{error}" + (f"; once that is fixed, continue with: {resume_hint}" if resumable else "")
    if isinstance(error, KeyboardInterrupt):
        if (run_dir / "checkpoint.pt").exists() or (run_dir / "metrics.jsonl").exists():
            return f"interrupted (run directory {run_dir}){hint}"
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # made just before the interrupt, still empty: as if never started
        return "interrupted before the run started; nothing was written"
    return str(error)


def no_answer(rank: int, silent: list, minutes: float, run_dir: Path, resume_hint: str | None) -> str:
    """The one line for a torchrun job ended by a collective that timed out."""
    who = (f"rank {', '.join(map(str, silent))} stopped answering (stuck, stopped or dead)" if silent
           else "every rank answers again: the network or a slow rank held one up")
    kept = f"; continue with: {resume_hint}" if resume_hint and (run_dir / "checkpoint.pt").exists() else ""
    return (f"rank {rank} waited {minutes:g} min ({flag('dist_timeout')}) at a collective: {who}; the job ends, "
            f"its last checkpoint kept{kept}")


def main(argv=None, *, resume_hint: bool = True) -> dict:
    """Train as the command line says; return the run's summary record. A run that stops
    early raises SystemExit after one line on stderr ending, where it can be continued, with
    the command that continues it (a caller that continues runs its own way, as reproduce.py,
    passes resume_hint=False)."""
    clock = TimeSplit()  # where this process's time goes, from here to the summary
    name_settings_by_flags()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, settings, explicit = parse_args(argv)
    try:
        resolved = resolve(settings, explicit)
        device = resolve_device(settings.device)
    except ValueError as e:  # a flag value no run can use
        parser.error(str(e))
    dist, device = init_distributed(device, settings.dist_timeout)
    tune_convolutions(device)
    note = ignored_flags_note(settings.model, {dest: getattr(settings, dest) for dest in explicit})
    if note and dist.is_main:
        print(f"{parser.prog}: {note}", file=sys.stderr)
    run_dir, built = Path(resolved.run_dir), None
    lock = RunLock(run_dir) if dist.is_main else None  # rank 0 owns the directory
    try:
        opened = open_run(run_dir, settings.out_dir, dist, settings.resume,
                          lambda saved: check_resume_flags(saved["args"], settings, explicit), lock)
        if opened.error is not None:
            if opened.error_kind == "setting" and dist.is_main:  # as argparse reports errors
                parser.print_usage(sys.stderr)
            if dist.is_main:
                print(f"{parser.prog}: error: {opened.error}", file=sys.stderr)
            raise SystemExit(EXIT_OF_OPEN_ERROR[opened.error_kind])
        if opened.saved is not None:
            settings, resolved, argv = continued(opened.saved, settings, resolved)
        try:
            step = choose_step(settings, device, dist)
        except ValueError as e:
            parser.error(str(e))
        if opened.finished is not None:
            if dist.is_main:
                print(f"{run_dir} has already finished; nothing to resume")
            return opened.finished
        if opened.notice is not None and dist.is_main:
            print(opened.notice, flush=True)
        started = opened.saved if opened.checkpoint is not None else None
        built = build_run(settings, resolved, argv, dist, device, step, started)
        return run(built, run_dir, opened.checkpoint, clock)
    except (RunError, DataError, WriteError, Stopped, KeyboardInterrupt) as e:
        if dist.is_main:  # a stop by signal is not an error: the run did what it was asked
            prefix = "" if isinstance(e, Stopped) else "error: "
            command = continue_command(settings, resolved.name, dist.world_size) if resume_hint else None
            per_epoch = built.plan.steps_per_epoch if built is not None else None
            print(f"{parser.prog}: {prefix}{failure(e, run_dir, per_epoch, command)}", file=sys.stderr)
        stopped = stop_status(e.signum if isinstance(e, Stopped) else signal.SIGINT)
        raise SystemExit(stopped if isinstance(e, (Stopped, KeyboardInterrupt)) else EXIT_FAILED) from None
    except RuntimeError as e:
        if not (dist.enabled and re.search(r"time[sd]? ?out", str(e), re.IGNORECASE)):
            raise
        # Who stopped answering, as far as this rank can tell: a rank silent for the whole timeout
        # that does not reach a barrier in as long again (10 s at most) is not coming back.
        silent = dist.unanswered(seconds=min(10.0, 60 * settings.dist_timeout))
        if dist.is_main or silent == [0]:
            command = continue_command(settings, resolved.name, dist.world_size) if resume_hint else None
            print(f"{parser.prog}: error: {no_answer(dist.rank, silent, settings.dist_timeout, run_dir, command)}",
                  file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from None
    finally:
        if lock is not None:
            lock.release()
        if dist.enabled:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_as_script(main)
