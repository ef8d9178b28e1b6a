"""What this process decides for a run, at every start of it (a resumed run may run on another
device, with other workers), in one function, `make_plan`: device, precision, the kind of
training step, workers, loader, steps, estimates. The config record holds the plan beside the
settings; a resumed run keeps the loader its position was made with, and the host's load and
cores when it started. And what the console shows of a run: its header and a line an epoch.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from compiled_step import CompiledStep, compiled_forward
from config import Config
from data_sets import steps_per_epoch
from engine import effective_amp
from freezeout import first_frozen_steps, unit_times
from graphs import GraphedStep, use_cuda_graphs
from loaders import choose_loader
from messages import RunError, plural, setting
from metrics_logger import evaluation
from models import model_name, run_estimates
from timing import load_average


@dataclass(frozen=True)
class Plan:
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


def choose_step(cfg: Config, device: torch.device, dist) -> tuple[str, str]:
    """(the precision autocast really uses here, the training step: graphed, compiled or eager).
    ValueError for CUDA graphs asked for where they cannot run."""
    amp = effective_amp(cfg.amp, device)
    graphed, why_not = use_cuda_graphs(cfg.cuda_graphs, device, amp, dist.enabled)
    if cfg.compile and not graphed:  # --compile without CUDA graphs
        return amp, "compiled"
    if why_not is not None and dist.is_main:
        print(f"eager training step: {why_not}")
    return amp, "graphed" if graphed else "eager"


def make_step(cfg: Config, training, plan: Plan) -> None:
    """Give `training` the step the plan chose (eager is its own)."""
    if plan.training_step == "graphed":
        forward = compiled_forward(training, backend=cfg.compile_backend) if cfg.compile else None
        training.step = GraphedStep(training, cfg.batch_size, plan.steps_per_epoch, forward=forward)
    elif plan.training_step == "compiled":
        training.step = CompiledStep(training, backend=cfg.compile_backend)


def steps(cfg: Config, splits, dist) -> int:
    """Optimizer steps an epoch in each process (the last partial batch dropped)."""
    if cfg.batch_size % dist.world_size:
        raise RunError(f"{setting('batch_size')} {cfg.batch_size} is not divisible by the {dist.world_size} "
                       "processes (it is the global batch)")
    try:
        return steps_per_epoch(len(splits.train), cfg.batch_size, dist.world_size)
    except ValueError as e:
        raise RunError(str(e)) from None


def make_plan(cfg: Config, model, splits, dist, device: torch.device, saved: Optional[dict]) -> Plan:
    """Everything this process decides for the run, once: the precision and the training step
    here, the steps, the workers and the loader, and the estimates for the model it trains
    (`saved`: the config record of the run it resumes, None for a run starting at step 0).
    ValueError for CUDA graphs asked for where they cannot run; RunError for a batch that the
    processes cannot share or that is larger than the training set."""
    amp, kind = choose_step(cfg, device, dist)
    per_epoch = steps(cfg, splits, dist)
    units = model.freeze_units()
    t_i, total = unit_times(len(units), cfg.t_0, cfg.how_scale), cfg.epochs * per_epoch
    architecture = (cfg.model, cfg.depth, cfg.growth_rate, splits.num_classes, cfg.bottleneck, cfg.reduction,
                    cfg.dropout)
    estimates = run_estimates(model, units, t_i, total, cfg.paper_speedup, architecture)
    # A resumed run keeps what its start found (a record of before they were kept has none).
    kept = {k: saved[k] for k in ("loader_used", "load_start", "cpu_count") if k in saved} if saved else {}
    return Plan(
        device=str(device), amp_effective=amp, training_step=kind,
        workers=cfg.workers if cfg.workers is not None else (0 if device.type == "cpu" else 4),
        params=sum(p.numel() for p in model.parameters()), n_units=len(units), t_i=t_i,
        steps_per_epoch=per_epoch, total_steps=total, train_images=len(splits.train), world_size=dist.world_size,
        per_rank_batch_size=cfg.batch_size // dist.world_size,
        loader_used=kept["loader_used"] if "loader_used" in kept else choose_loader(cfg.loader, splits, device),
        load_start=kept["load_start"] if "load_start" in kept else load_average(),
        cpu_count=kept["cpu_count"] if "cpu_count" in kept else os.cpu_count(),
        flop_speedup=estimates["flop_speedup"], estimated_speedup=estimates["estimated_speedup"],
        unit_flops=estimates["unit_flops"])


def host_info(device: torch.device) -> dict:
    """What runs the job, for the config record: CPU model and threads, GPU name, the code's git commit."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu": cpu, "cpu_threads": torch.get_num_threads(), "gpu": gpu, "git_commit": commit,
            "torch": str(torch.__version__), "python": platform.python_version()}


# -- what the console shows ----------------------------------------------------------------------
def header(record: dict, splits) -> str:
    """The run's header: its config record in words."""
    sizes = f"{len(splits.train):,} train"
    if splits.eval is not None:
        sizes += f" / {len(splits.eval):,} {'val' if record['eval_mode'] == 'val' else 'test'}"
    paper = record["paper_speedup"]
    arch = model_name(record["model"], record["depth"], record["growth_rate"], record["bottleneck"])
    return "\n".join([
        f"{arch} on {record['dataset']} ({record['num_classes']} classes; {sizes}; "
        f"{len(splits.test):,} test at the end)",
        f"  {record['params']:,} parameters in {plural(record['n_units'], 'FreezeOut unit')}; "
        f"{plural(record['steps_per_epoch'], 'step')}/epoch x {plural(record['epochs'], 'epoch')} = "
        f"{plural(record['total_steps'], 'step')}",
        f"  {record['how_scale']}, {'scaled' if record['scale_lr'] else 'unscaled'}, t_0 = {record['t_0']:g}: "
        + ("baseline: no unit freezes" if record["t_0"] >= 1 else
           f"first unit freezes at {record['t_i'][0]:.1%} of the run" + too_short(record)),
        f"  estimated speedup: {'n/a' if paper is None else f'{paper:.1%}'} (paper), "
        f"{record['flop_speedup']:.1%} (FLOPs)",
        f"  device {record['device']}"
        + (f" x {record['world_size']} processes" if record["world_size"] > 1 else "")
        + f", amp {record['amp_effective']}, {record['training_step']} step"
        + (" (compiled)" if record["compile"] and record["training_step"] == "graphed" else "")
        + f", loader {record['loader_used']}, "
        f"batch {record['batch_size']}, lr {record['lr']:g}, seed {record['seed']}; "
        f"run directory {record['run_dir']}",
    ])


def too_short(record: dict) -> str:
    """A warning for a run too short for any unit to freeze (it is the baseline, whatever the
    estimates say), else nothing."""
    first = first_frozen_steps(record["t_i"][:1], record["total_steps"])[0]
    if first < record["total_steps"]:
        return ""
    return (f"; WARNING: in {plural(record['total_steps'], 'step')} no unit freezes (the first would at step "
            f"{math.ceil(record['t_i'][0] * record['total_steps'])}): this run is the baseline, whatever "
            f"the estimates below say; train for more steps (--epochs, --subset, --batch_size)")


def epoch_line(logged: dict, record: dict) -> str:
    line = f"epoch {logged['epoch']:>3}/{record['epochs']}  loss {logged['train_loss']:.4f}"
    evaluated = evaluation(logged, record["eval_mode"])
    if evaluated is not None:
        line += f"  {evaluated[0]} err {evaluated[2]:5.2f}%"
    return line + (f"  frozen {logged['frozen_units']}/{record['n_units']}"
                   f"  {logged['images_per_s']:.0f} img/s  {logged['train_time_s']:.1f} s")
