"""The run's configuration, from train.py's parsed flags: every value checked (one line naming
the flag), the derived settings (data set and classes, t_0 from --target-speedup, epochs from
--const_time, device and precision, the run name) and the `config` dict the run and its
`config` record are made of.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from cli import check_which_dataset
from engine import effective_amp, resolve_device
from graphs import use_cuda_graphs
from models import REGISTRY, check_depth, paper_speedup, speedup_estimator
from spec import check_settings, default_name_labels, flag
from utils import solve_t_0, split_sizes, steps_per_epoch


def check_args(args, explicit: set) -> None:
    """Raise ValueError, naming the flag, for a value no run can use: each setting's own check
    (spec.py), then those of settings together."""
    check_settings(args)
    check_which_dataset(args.dataset, args.which_dataset)
    if args.target_speedup is not None and "t_0" in explicit:
        raise ValueError(f"give {flag('t_0')} or {flag('target_speedup')}, not both")
    check_depth(args.model, args.depth, args.bottleneck)


def resolve_dataset(args) -> tuple[str, int | None]:
    if args.dataset is None:
        return f"cifar{args.which_dataset or 100}", None
    return args.dataset, args.which_dataset if args.dataset == "synthetic" else None


def num_classes_of(dataset: str, synthetic_classes: int | None) -> int:
    return {"cifar10": 10, "cifar100": 100}.get(dataset, synthetic_classes or 100)


def args_paper_speedup(args, t_0: float):
    return paper_speedup(args.model, args.depth, args.growth_rate, t_0, args.how_scale, args.bottleneck)


def default_run_name(args, dataset: str, defaults: dict) -> str:
    """The settings every name spells out, then each result setting with a label in spec.py
    that differs from its default: a sweep over any of them gets a directory per value."""
    arch = REGISTRY[args.model].run_label(args.depth, args.growth_rate, args.bottleneck)
    data = dataset + (f"{args.which_dataset}" if dataset == "synthetic" and args.which_dataset else "")
    data += f"-sub{args.subset}" if args.subset else ""
    fo = (f"ts{args.target_speedup:g}" if args.target_speedup is not None else f"t0-{args.t_0:g}")
    scaling = "scaled" if args.scale_lr else "unscaled"
    name = f"{arch}_{data}_{args.how_scale}-{scaling}-{fo}_e{args.epochs}_s{args.seed}"
    return "_".join([name, *default_name_labels(args, defaults)])


def resolve_config(args, explicit: set, argv, defaults: dict) -> dict:
    """Everything the run is defined by, checked before any work is done (`defaults`: every
    flag's default, for the run's default name)."""
    check_args(args, explicit)
    dataset, synthetic_classes = resolve_dataset(args)
    steps_per_epoch(split_sizes(args.eval_mode, args.subset)[0], args.batch_size)
    t_0, epochs = args.t_0, args.epochs
    if args.const_time or args.target_speedup is not None:
        estimate, what = speedup_estimator(args.model, args.depth, args.growth_rate, args.how_scale,
                                           args.bottleneck, num_classes_of(dataset, synthetic_classes))
        if args.target_speedup is not None:
            try:
                t_0 = solve_t_0(args.target_speedup, estimate, f"{what} for {args.how_scale}")
            except ValueError as e:
                raise ValueError(f"{flag('target_speedup')}: {e}") from None
        if args.const_time:  # as many epochs as fit in the baseline's time, by the estimate
            epochs = math.ceil(args.epochs / (1 - estimate(t_0)))
    device = resolve_device(args.device)
    amp = effective_amp(args.amp, device)
    use_cuda_graphs(args.cuda_graphs, device, amp, int(os.environ.get("WORLD_SIZE", "1")) > 1)
    name = args.name or default_run_name(args, dataset, defaults)
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"{flag('name')} {name!r}: a run name must be a plain file name")
    return {
        "model": args.model, "depth": args.depth, "growth_rate": args.growth_rate,
        "bottleneck": args.bottleneck, "reduction": args.reduction, "dropout": args.dropout,
        "dataset": dataset, "synthetic_classes": synthetic_classes,
        "num_classes": num_classes_of(dataset, synthetic_classes), "data_root": args.data_root,
        "subset": args.subset, "augment": args.augment, "eval_mode": args.eval_mode,
        "loader": args.loader,
        "epochs": epochs, "requested_epochs": args.epochs, "batch_size": args.batch_size,
        "optimizer": "SGD", "nesterov": True, "lr": args.lr, "momentum": args.momentum,
        "weight_decay": args.weight_decay, "seed": args.seed,
        "t_0": t_0, "how_scale": args.how_scale, "scale_lr": args.scale_lr,
        "const_time": args.const_time, "target_speedup": args.target_speedup,
        "device": str(device), "amp": args.amp,
        "channels_last": args.channels_last, "cuda_graphs": args.cuda_graphs, "compile": args.compile,
        "compile_backend": args.compile_backend,
        "workers": args.workers,
        "out_dir": args.out_dir, "name": name, "run_dir": str(Path(args.out_dir) / name),
        "paper_speedup": args_paper_speedup(args, t_0),
        "argv": list(argv), "args": dict(vars(args)),
    }
