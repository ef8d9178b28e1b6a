"""Train a network with FreezeOut: layer-wise cosine annealing, then freezing.

    python train.py                         # the paper's job: DenseNet-BC k=12 L=76, CIFAR-100,
                                            # cubic, scaled, t_0 = 0.8, 100 epochs
    python train.py --dataset synthetic --which_dataset 10 --subset 5000 -L 22 --epochs 2 --device cpu
    python train.py --t_0 1                 # the baseline: plain cosine annealing, no freezing

Every run writes `OUT_DIR/NAME/metrics.jsonl` (a `config` record first, one `epoch` record per
epoch, a `summary` record last) and `OUT_DIR/NAME/checkpoint.pt` after every epoch. SIGINT or
SIGTERM stop it after the current step with a checkpoint (exit code 130 / 143); `--resume`
continues it exactly where it stopped. `python train.py -h` lists the flags with their defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import random
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed
import torch.nn.functional as F
from tqdm import tqdm

from densenet import DenseNet, layers_per_block
from vgg import VGG, check_depth as vgg_layers
from wrn import WideResNet, blocks_per_group
from freezeout import FreezeOut, SCALE_POWERS, param_groups, unit_times
from metrics_logger import MetricsLogger, read_records, write_records
from utils import (DATASETS, DataError, Distributed, TensorLoader, TorchvisionLoader,
                   densenet_paper_speedup, fits_on_device, flag_spellings, host_info,
                   init_distributed, load_splits, resolve_device, schedule_speedup, seed_everything,
                   solve_t_0, split_sizes, training_flops_by_level, unit_flops)

CHECKPOINT_FORMAT = "freezeout-checkpoint-v1"
# Flags that say where or how fast a run goes, not what it computes: --resume may change them.
RUNTIME_FLAGS = {"resume", "device", "workers", "data_root", "out_dir", "save_weights"}
PROGRESS_EVERY = 20  # steps between reads of the loss (each read waits for the device)
NO_STEP = 2 ** 62  # "no non-finite loss yet": larger than any step
# Each architecture's paper default for -L and -k (k: DenseNet growth rate, WRN widening factor).
ARCHITECTURE_DEFAULTS = {"densenet": (76, 12), "wrn": (40, 4), "vgg": (16, None)}
# Estimates use a (2, 3, 32, 32) batch: FLOP ratios do not depend on the batch size.
ESTIMATE_INPUT = (2, 3, 32, 32)


class RunError(Exception):
    """A problem with the run's files or data, reported as one line."""


class Stopped(Exception):
    """The run stopped on SIGINT / SIGTERM after writing a checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to every flag's help unless the help already states it."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The CLI. With with_defaults=False every default is dropped, so that parsing tells
    which flags were given on the command line (what --resume checks against the run)."""
    parser = argparse.ArgumentParser(
        description="Train a network with FreezeOut (Brock et al. 2017).",
        formatter_class=HelpFormatter)

    def add(group, *names, **kwargs):
        if not with_defaults:
            kwargs["default"] = argparse.SUPPRESS
        return group.add_argument(*flag_spellings(*names), **kwargs)

    model = parser.add_argument_group("model")
    add(model, "--model", default="densenet", choices=list(ARCHITECTURE_DEFAULTS),
        help="architecture: DenseNet(-BC), Wide ResNet or VGG with BatchNorm")
    add(model, "-L", "--depth", type=int, default=None,
        help="depth L (default: 76 for densenet, 40 for wrn, 16 for vgg)")
    add(model, "-k", "--growth-rate", type=int, default=None,
        help="DenseNet growth rate or WRN widening factor k; unused by vgg "
             "(default: 12 for densenet, 4 for wrn)")
    add(model, "--bottleneck", action=argparse.BooleanOptionalAction, default=True,
        help="DenseNet-BC bottleneck layers (--no-bottleneck: plain DenseNet layers); densenet only")
    add(model, "--reduction", type=float, default=0.5, help="DenseNet transition compression theta")
    add(model, "--dropout", type=float, default=0.0,
        help="dropout rate: after each DenseNet convolution, between a WRN block's convolutions, "
             "before VGG's hidden classifier layers")

    data = parser.add_argument_group("data")
    add(data, "--dataset", choices=DATASETS, default=None,
        help="data set (default: cifar100, or as --which_dataset says)")
    add(data, "--which_dataset", type=int, choices=[10, 100], default=None,
        help="2017 spelling: 10 = cifar10, 100 = cifar100; with --dataset synthetic, "
             "the number of classes (synthetic default: 100)")
    add(data, "--data-root", default="./data", help="where CIFAR lives or is downloaded to")
    add(data, "--subset", type=int, default=None, help="cap every split at its first N images")
    add(data, "--augment", dest="augment", action="store_true", default=True,
        help="random crop (pad 4) and horizontal flip")
    add(data, "--no-augment", dest="augment", action="store_false", default=True,
        help="no data augmentation")
    add(data, "--validate", dest="eval_mode", action="store_const", const="val", default="val",
        help="train on the first 45,000 images, evaluate on the last 5,000 each epoch")
    add(data, "--validate-test", dest="eval_mode", action="store_const", const="test", default="val",
        help="train on all 50,000 images, evaluate on the test set each epoch")
    add(data, "--no-validate", dest="eval_mode", action="store_const", const="none", default="val",
        help="train on all 50,000 images, no per-epoch evaluation")
    add(data, "--loader", choices=["auto", "tensor", "torchvision"], default="auto",
        help="tensor: the data set stays on the device, augmented in batches there; "
             "torchvision: DataLoader with per-image transforms (the reference); "
             "auto: tensor when the data fits in a quarter of the free device memory")
    add(data, "--workers", type=int, default=None,
        help="worker processes of the torchvision loader (default: 0 on CPU, 4 on a GPU)")

    optim = parser.add_argument_group("optimisation")
    add(optim, "--epochs", type=int, default=100, help="training epochs")
    add(optim, "--batch_size", type=int, default=50,
        help="training batch size, global: under torchrun each of N processes takes 1/N of it")
    add(optim, "--lr", type=float, default=0.1, help="base learning rate")
    add(optim, "--momentum", type=float, default=0.9, help="SGD Nesterov momentum")
    add(optim, "--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    add(optim, "--seed", type=int, default=0, help="random seed")

    fo = parser.add_argument_group("FreezeOut")
    add(fo, "--t_0", type=float, default=0.8,
        help="fraction of the run (before scaling) at which the first unit freezes; 1 = baseline")
    add(fo, "--how_scale", choices=list(SCALE_POWERS), default="cubic", help="t_i schedule")
    add(fo, "--no_scale", dest="scale_lr", action="store_false", default=True,
        help="do not scale each unit's initial learning rate by 1/t_i")
    add(fo, "--const_time", action="store_true", default=False,
        help="train 1/(1 - estimated speedup) times as many epochs (rounded up)")
    add(fo, "--target-speedup", type=float, default=None,
        help="choose t_0 so that the estimated speedup equals this fraction")

    run = parser.add_argument_group("run")
    add(run, "--out-dir", default="runs", help="parent directory of run directories")
    add(run, "--save-weights", default=None,
        help="run name: files go to OUT_DIR/NAME (default: derived from the settings)")
    add(run, "--resume", action="store_true", default=False,
        help="continue the run in OUT_DIR/NAME from its checkpoint")
    add(run, "--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
        help="auto = cuda, then mps, then cpu")
    add(run, "--amp", choices=["off", "bf16", "fp16"], default="off",
        help="mixed precision (off where the device does not support it)")
    add(run, "--channels-last", action="store_true", default=False,
        help="channels-last memory format for the model and inputs")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = set(vars(build_parser(with_defaults=False).parse_args(argv)))
    apply_architecture_defaults(args)
    return parser, args, explicit


def apply_architecture_defaults(args) -> None:
    """-L and -k not given: the architecture's paper defaults (VGG has no k)."""
    default_depth, default_k = ARCHITECTURE_DEFAULTS[args.model]
    args.depth = default_depth if args.depth is None else args.depth
    args.growth_rate = default_k if args.growth_rate is None or args.model == "vgg" else args.growth_rate


def check_args(args, explicit: set) -> None:
    """Raise ValueError, naming the flag, for a value no run can use."""
    if not 0.0 < args.t_0 <= 1.0:
        raise ValueError(f"--t_0 must be in (0, 1], got {args.t_0}")
    for flag in ("epochs", "batch_size", "depth", "growth_rate"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ValueError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if args.subset is not None and args.subset <= 0:
        raise ValueError(f"--subset must be a positive integer, got {args.subset}")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0.0 < args.reduction <= 1.0:
        raise ValueError(f"--reduction must be in (0, 1], got {args.reduction}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.dataset in ("cifar10", "cifar100") and args.which_dataset is not None \
            and args.dataset != f"cifar{args.which_dataset}":
        raise ValueError(f"--dataset {args.dataset} contradicts --which_dataset {args.which_dataset}")
    if args.target_speedup is not None and "t_0" in explicit:
        raise ValueError("give --t_0 or --target-speedup, not both")
    check_architecture(args.model, args.depth, args.bottleneck)


def resolve_dataset(args) -> tuple[str, int | None]:
    if args.dataset is None:
        return f"cifar{args.which_dataset or 100}", None
    return args.dataset, args.which_dataset if args.dataset == "synthetic" else None


def num_classes_of(dataset: str, synthetic_classes: int | None) -> int:
    return {"cifar10": 10, "cifar100": 100}.get(dataset, synthetic_classes or 100)


def speedup_estimator(args, num_classes: int):
    """The estimate (as a function of t_0) that drives --const_time and --target-speedup:
    the paper's for DenseNet-BC, the FLOP-based one (continuous limit) for any other model."""
    if paper_speedup(vars(args), args.t_0) is not None:
        return (lambda t_0: paper_speedup(vars(args), t_0)), "the paper's estimate"
    model = build_model({**vars(args), "num_classes": num_classes})
    units = model.freeze_units()
    levels = training_flops_by_level(unit_flops(model, units, ESTIMATE_INPUT))
    return (lambda t_0: schedule_speedup(levels, unit_times(len(units), t_0, args.how_scale))), \
        "the FLOP-based estimate"


def resolve_t_0(args, estimate, what: str) -> float:
    if args.target_speedup is None:
        return args.t_0
    try:
        return solve_t_0(args.target_speedup, estimate, f"{what} for {args.how_scale}")
    except ValueError as e:
        raise ValueError(f"--target-speedup: {e}") from None


def resolve_epochs(args, estimate: float) -> int:
    """--const_time: as many epochs as fit in the baseline's time, by the estimate."""
    if not args.const_time:
        return args.epochs
    return math.ceil(args.epochs / (1 - estimate))


def default_run_name(args, dataset: str) -> str:
    arch = {"densenet": f"densenet{'BC' if args.bottleneck else ''}-L{args.depth}-k{args.growth_rate}",
            "wrn": f"wrn-{args.depth}-{args.growth_rate}", "vgg": f"vgg{args.depth}"}[args.model]
    data = dataset + (f"{args.which_dataset}" if dataset == "synthetic" and args.which_dataset else "")
    data += f"-sub{args.subset}" if args.subset else ""
    fo = (f"ts{args.target_speedup:g}" if args.target_speedup is not None else f"t0-{args.t_0:g}")
    scaling = "scaled" if args.scale_lr else "unscaled"
    return f"{arch}_{data}_{args.how_scale}-{scaling}-{fo}_e{args.epochs}_s{args.seed}"


# ---------------------------------------------------------------------------------------
# The run's configuration
# ---------------------------------------------------------------------------------------
def resolve_config(args, explicit: set, argv) -> dict:
    """Everything the run is defined by, checked before any work is done."""
    check_args(args, explicit)
    dataset, synthetic_classes = resolve_dataset(args)
    train_images = split_sizes(args.eval_mode, args.subset)[0]
    steps_per_epoch = train_images // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch_size {args.batch_size} is larger than the training set "
                         f"({train_images} images)")
    estimate = None
    if args.const_time or args.target_speedup is not None:
        estimate, what = speedup_estimator(args, num_classes_of(dataset, synthetic_classes))
    t_0 = resolve_t_0(args, estimate, what) if args.target_speedup is not None else args.t_0
    epochs = resolve_epochs(args, estimate(t_0)) if args.const_time else args.epochs
    device = resolve_device(args.device)
    workers = args.workers if args.workers is not None else (0 if device.type == "cpu" else 4)
    name = args.save_weights or default_run_name(args, dataset)
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"--save-weights {name!r}: a run name must be a plain file name")
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
        "device": str(device), "amp": args.amp, "amp_effective": effective_amp(args.amp, device),
        "channels_last": args.channels_last, "workers": workers,
        "out_dir": args.out_dir, "name": name, "run_dir": str(Path(args.out_dir) / name),
        "paper_speedup": paper_speedup(vars(args), t_0),
        "argv": list(argv), "args": vars(args),
    }


def check_resume_args(saved: dict, args, explicit: set) -> None:
    """Flags given with --resume must agree with the saved run (runtime flags aside)."""
    for flag in sorted(explicit - RUNTIME_FLAGS):
        given, was = getattr(args, flag), saved["args"].get(flag)
        if given != was:
            raise ValueError(f"--resume: --{flag} {given} contradicts the saved run's {flag} = {was}")


def prepare_run_dir(config: dict, resume: bool) -> tuple[Path, dict | None]:
    run_dir = Path(config["run_dir"])
    ckpt_path = run_dir / "checkpoint.pt"
    if resume:
        if not ckpt_path.is_file():
            raise RunError(f"--resume: no checkpoint in {run_dir}")
        return run_dir, load_checkpoint(ckpt_path)
    if (run_dir / "metrics.jsonl").exists() or ckpt_path.exists():
        raise RunError(f"{run_dir} already holds a run: continue it with --resume, "
                       f"or start a new one with --save-weights NAME")
    # The directory itself is made once the data has loaded: a failed start leaves nothing.
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"--out-dir {config['out_dir']}: cannot create {run_dir} "
                       f"({existing} is not a writable directory)")
    return run_dir, None


# ---------------------------------------------------------------------------------------
# Building blocks: model, optimizer, precision, data, estimates
# ---------------------------------------------------------------------------------------
def check_architecture(model: str, depth: int, bottleneck: bool = True) -> None:
    """Raise ValueError naming -L for a depth the architecture cannot have."""
    try:
        if model == "densenet":
            layers_per_block(depth, bottleneck)
        elif model == "wrn":
            blocks_per_group(depth)
        else:
            vgg_layers(depth)
    except ValueError as e:
        raise ValueError(f"-L/--depth: {e}") from None


def build_model(config: dict) -> torch.nn.Module:
    if config["model"] == "wrn":
        return WideResNet(depth=config["depth"], widen_factor=config["growth_rate"],
                          num_classes=config["num_classes"], dropout=config["dropout"])
    if config["model"] == "vgg":
        return VGG(depth=config["depth"], num_classes=config["num_classes"], dropout=config["dropout"])
    return DenseNet(depth=config["depth"], growth_rate=config["growth_rate"],
                    num_classes=config["num_classes"], bottleneck=config["bottleneck"],
                    reduction=config["reduction"], dropout=config["dropout"])


def architecture_name(config: dict) -> str:
    if config["model"] == "wrn":
        return f"WRN-{config['depth']}-{config['growth_rate']}"
    if config["model"] == "vgg":
        return f"VGG-{config['depth']} (BN)"
    bc = "-BC" if config["bottleneck"] else ""
    return f"DenseNet{bc} L={config['depth']} k={config['growth_rate']}"


def paper_speedup(config: dict, t_0: float) -> float | None:
    """The paper's estimate where it applies (DenseNet-BC), else None."""
    if config["model"] != "densenet":
        return None
    return densenet_paper_speedup(config["depth"], config["growth_rate"], t_0,
                                  config["how_scale"], config["bottleneck"])


def make_optimizer(units, config: dict, device: torch.device) -> torch.optim.SGD:
    """SGD with Nesterov momentum, one param group per unit. On CUDA the fused kernel: one
    launch per step, and an fp16 GradScaler can skip a step without reading found-inf back."""
    return torch.optim.SGD(param_groups(units), lr=config["lr"], momentum=config["momentum"],
                           nesterov=True, weight_decay=config["weight_decay"],
                           fused=True if device.type == "cuda" else None)


def build_training(config: dict, device: torch.device, total_steps: int):
    """Model, its units, SGD over one param group per unit, the FreezeOut scheduler, the scaler."""
    model = build_model(config).to(device)
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    units = model.freeze_units()
    optimizer = make_optimizer(units, config, device)
    scheduler = FreezeOut(optimizer, units, total_steps=total_steps, t_0=config["t_0"],
                          how_scale=config["how_scale"], scale_lr=config["scale_lr"])
    scaler = torch.amp.GradScaler(device.type, enabled=config["amp_effective"] == "fp16")
    return model, units, optimizer, scheduler, scaler


class Replicas:
    """What the training step calls: the model itself in one process; under torchrun a
    DistributedDataParallel wrapper over the parameters still training. DDP buckets only
    parameters that require gradients, so the wrapper is rebuilt whenever units freeze (at most
    once per unit, at the same step on every rank, since the schedule is the same): frozen
    parameters leave the all-reduce, and no step waits for gradients that never come, without
    find_unused_parameters. Each rebuild also re-broadcasts rank 0's weights."""

    def __init__(self, model: torch.nn.Module, dist: Distributed, device: torch.device):
        self.model, self.dist, self.device = model, dist, device
        self.module, self.num_frozen = model, None

    def sync(self, num_frozen: int) -> torch.nn.Module:
        if self.dist.enabled and num_frozen != self.num_frozen:
            from torch.nn.parallel import DistributedDataParallel
            self.module = None  # release the old wrapper (and its gradient hooks) first
            self.module = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
            self.num_frozen = num_frozen
        return self.module


def effective_amp(amp: str, device: torch.device) -> str:
    """The precision autocast will really use: "off" where the device has no autocast for it."""
    if amp == "off":
        return amp
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # an unsupported pair warns and disables itself (or raises, in older torch)
            context = torch.autocast(device.type, dtype=dtype)
        except RuntimeError:
            return "off"
    return amp if getattr(context, "_enabled", True) and not caught else "off"


def autocast_for(amp: str, device: torch.device):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def resolve_loader(config: dict, splits, device: torch.device) -> str:
    if config["loader"] != "auto":
        return config["loader"]
    data = [d for d in (splits.train, splits.eval, splits.test) if d is not None]
    return "tensor" if fits_on_device(data, device) else "torchvision"


def make_loaders(config: dict, splits, device: torch.device, kind: str, dist: Distributed):
    """(train loader, per-epoch evaluation loader or None, test loader), each serving this
    process's shard: per-rank training batches of batch_size / world_size."""
    batch = config["batch_size"] // dist.world_size
    # Evaluation batches: larger on a GPU; on a CPU the training size runs fastest (cache).
    eval_batch = batch if device.type == "cpu" else max(batch, 500)
    shard = {"rank": dist.rank, "world_size": dist.world_size}
    if kind == "tensor":
        def make(data, size, train):
            return TensorLoader(data, splits.mean, splits.std, size, train, config["augment"],
                                device, seed=config["seed"], **shard)
    else:
        def make(data, size, train):
            return TorchvisionLoader(data, splits.mean, splits.std, size, train, config["augment"],
                                     config["workers"], seed=config["seed"],
                                     pin_memory=device.type == "cuda", **shard)
    evaluated = make(splits.eval, eval_batch, False) if splits.eval is not None else None
    test = evaluated if config["eval_mode"] == "test" else make(splits.test, eval_batch, False)
    return make(splits.train, batch, True), evaluated, test


def estimates(config: dict, model, units, t_i, total_steps: int) -> dict:
    """The paper's estimate (DenseNet-BC) and the FLOP-based one (any model) for this run."""
    per_unit = unit_flops(model, units, ESTIMATE_INPUT)
    flop = schedule_speedup(training_flops_by_level(per_unit), t_i, total_steps)
    paper = paper_speedup(config, config["t_0"])
    return {"paper_speedup": paper, "flop_speedup": flop,
            "estimated_speedup": paper if paper is not None else flop,
            "unit_flops": per_unit}


# ---------------------------------------------------------------------------------------
# Checkpoints: every state a resumed run needs, written atomically, read safely
# ---------------------------------------------------------------------------------------
def rng_state() -> dict:
    keys, pos, has_gauss, gauss = np.random.get_state()[1:]
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])


def write_checkpoint(path: Path, dist: Distributed, config, model, optimizer, scheduler, scaler,
                     epoch: int, step: int, train_time: float, position: dict | None) -> None:
    """`epoch` epochs are complete; `position` says how far the next one got when a signal
    stopped it (None at an epoch's end). Every rank's RNG state is gathered (a collective);
    rank 0 writes."""
    rngs = dist.gather(rng_state())
    if dist.is_main:
        save_checkpoint(path, {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, "train_time_s": train_time,
            "position": position, "config": config, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rngs})


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file, fsync, then rename: a crash leaves the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint of this project, read without running any pickled code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = ("it holds pickled objects other than tensors and plain containers, possibly code; "
               "nothing of it was run" if "Weights only load failed" in str(e) else
               str(e).strip().splitlines()[0][:200] if str(e).strip() else "unreadable pickle")
        raise RunError(f"{path} is not a loadable FreezeOut checkpoint ({why})") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RunError(f"{path} is not a loadable FreezeOut checkpoint ({first})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a FreezeOut checkpoint of this project")
    return state


def restore(checkpoint: dict, model, optimizer, scheduler, scaler, dist: Distributed) -> None:
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])  # after the optimizer: re-freezes units
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"][dist.rank])


# ---------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------
class StopSignals:
    """While active, SIGINT and SIGTERM ask the run to stop after the current step; a second
    signal stops it at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        with contextlib.suppress(ValueError):  # only the main thread may set handlers
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train_step(model, x, y, optimizer, scaler, autocast) -> torch.Tensor:
    """Forward, backward and update on one batch (the scheduler steps separately)."""
    with autocast:
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def new_position(epoch: int) -> dict:
    """Where an epoch stands: batches done, and the sums its record is made of."""
    return {"epoch": epoch, "batch": 0, "loss_sum": 0.0, "seen": 0, "time_s": 0.0}


def train_one_epoch(replicas: Replicas, loader, optimizer, scheduler, scaler, config, device,
                    position: dict, stop: StopSignals, dist: Distributed, desc: str) -> bool:
    """Train from `position` (updated in place) to the epoch's end or until a stop signal;
    returns whether it was stopped. A non-finite loss raises RunError naming its first step:
    the check runs on the device and is read with the progress bar, never waiting per step.

    Under torchrun the ranks agree at those reads (one small all-reduce) on whether to stop
    and on the first bad step, so they all stop at the same step; the epoch's loss and image
    count are summed over the ranks at its end."""
    replicas.model.train()
    autocast = autocast_for(config["amp_effective"], device)
    memory_format = torch.channels_last if config["channels_last"] else torch.contiguous_format
    steps_per_epoch = config["steps_per_epoch"]
    first_step = (position["epoch"] - 1) * steps_per_epoch + position["batch"]
    # The epoch's running sums continue from the position (on rank 0; the others add theirs at
    # the end), in float64, so that an interrupted epoch sums exactly as an uninterrupted one.
    exact = torch.float32 if device.type == "mps" else torch.float64
    loss_sum = torch.tensor(position["loss_sum"] if dist.is_main else 0.0, dtype=exact, device=device)
    step_no = torch.tensor(first_step - 1, device=device)
    bad_step = torch.tensor(NO_STEP, device=device)  # first step with a non-finite loss
    seen = position["seen"] if dist.is_main else 0
    stopped, seen_before = False, seen
    start = time.perf_counter()
    loader.set_epoch(position["epoch"], position["batch"])
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0,
               initial=position["batch"], total=steps_per_epoch, disable=not dist.is_main)
    for i, (x, y) in enumerate(bar, position["batch"]):
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        loss = train_step(replicas.sync(scheduler.num_frozen), x, y, optimizer, scaler, autocast)
        scheduler.step()
        loss_sum += loss.to(exact) * len(y)
        step_no += 1
        bad_step = torch.where(torch.isfinite(loss), bad_step, torch.minimum(bad_step, step_no))
        seen += len(y)
        position["batch"] = i + 1
        last = i + 1 == steps_per_epoch
        if i % PROGRESS_EVERY == 0 or last or (stop.signum is not None and not dist.enabled):
            stop_all = agree(bad_step, stop, dist, config)
            bar.set_postfix(loss=f"{loss_sum.item() / max(seen, 1):.3f}", frozen=scheduler.num_frozen,
                            img_s=f"{(seen - seen_before) * dist.world_size / (time.perf_counter() - start):.0f}")
            if stop_all and not last:
                stopped = True
                break
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    totals = dist.all_reduce(torch.stack([loss_sum, torch.tensor(float(seen), dtype=exact, device=device)]))
    elapsed = dist.all_reduce(torch.tensor(time.perf_counter() - start, dtype=exact, device=device), "max")
    position.update(loss_sum=totals[0].item(), seen=int(totals[1].item()),
                    time_s=position["time_s"] + elapsed.item())
    return stopped


def agree(bad_step: torch.Tensor, stop: StopSignals, dist: Distributed, config: dict) -> bool:
    """Read the divergence flag (and, under torchrun, agree with the other ranks on it and on
    stopping); raise RunError at a non-finite loss; return whether to stop now."""
    wide = torch.float32 if bad_step.device.type == "mps" else torch.float64
    stopping = torch.tensor(float(stop.signum is not None), dtype=wide, device=bad_step.device)
    flags = dist.all_reduce(torch.stack([stopping, -bad_step.to(wide)]), "max")
    step = int(-flags[1].item())
    if step < NO_STEP:
        per_epoch = config["steps_per_epoch"]
        raise RunError(f"training diverged: the loss was not finite at step {step} (epoch "
                       f"{step // per_epoch + 1}, batch {step % per_epoch}); the last good "
                       f"checkpoint is kept in {config['run_dir']}")
    return bool(flags[0].item())


def epoch_stats(position: dict) -> dict:
    t = position["time_s"]
    return {"train_loss": position["loss_sum"] / max(position["seen"], 1), "train_time_s": t,
            "images_per_s": position["seen"] / t if t > 0 else 0.0}


@torch.inference_mode()
def evaluate(model, loader, config, device, dist: Distributed) -> tuple[float, float]:
    """Mean cross-entropy and error (percent) over a split (each rank holds a shard of it)."""
    model.eval()
    autocast = autocast_for(config["amp_effective"], device)
    memory_format = torch.channels_last if config["channels_last"] else torch.contiguous_format
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    wrong = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with autocast:
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        wrong += (logits.argmax(1) != y).sum()
        seen += len(y)
    totals = dist.all_reduce(torch.stack([loss_sum, wrong.double(),
                                          torch.tensor(float(seen), dtype=torch.float64, device=device)]))
    loss_sum, wrong, seen = totals.tolist()
    return loss_sum / seen, 100.0 * wrong / seen


def check_replicas_agree(model, dist: Distributed, device) -> None:
    """Under torchrun, every rank must hold the same weights: compare a checksum."""
    if not dist.enabled:
        return
    with torch.no_grad():
        total = torch.stack([p.double().sum() for p in model.parameters()]).sum().to(device)
    spread = dist.all_reduce(torch.stack([total, -total]), "max")
    if spread[0].item() != -spread[1].item():
        raise RunError("the processes' weights differ: the replicas fell out of step")


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------
def describe(config: dict, splits, loader_kind: str) -> str:
    arch = architecture_name(config)
    sizes = f"{len(splits.train):,} train"
    if splits.eval is not None:
        sizes += f" / {len(splits.eval):,} {'val' if config['eval_mode'] == 'val' else 'test'}"
    paper = config["paper_speedup"]
    lines = [
        f"{arch} on {config['dataset']} ({config['num_classes']} classes; {sizes}; "
        f"{len(splits.test):,} test at the end)",
        f"  {config['params']:,} parameters in {config['n_units']} FreezeOut units; "
        f"{config['steps_per_epoch']} steps/epoch x {config['epochs']} epochs = {config['total_steps']:,} steps",
        f"  {config['how_scale']}, {'scaled' if config['scale_lr'] else 'unscaled'}, t_0 = {config['t_0']:g}: "
        f"first unit freezes at {config['t_i'][0]:.1%} of the run",
        f"  estimated speedup: {'n/a' if paper is None else f'{paper:.1%}'} (paper), "
        f"{config['flop_speedup']:.1%} (FLOPs)",
        f"  device {config['device']}"
        + (f" x {config['world_size']} processes" if config.get("world_size", 1) > 1 else "")
        + f", amp {config['amp_effective']}, loader {loader_kind}, "
        f"batch {config['batch_size']}, lr {config['lr']:g}, seed {config['seed']}; "
        f"run directory {config['run_dir']}",
    ]
    return "\n".join(lines)


def epoch_line(record: dict, config: dict) -> str:
    line = (f"epoch {record['epoch']:>3}/{config['epochs']}  loss {record['train_loss']:.4f}")
    if "val_err" in record:
        line += f"  {'val' if config['eval_mode'] == 'val' else 'test'} err {record['val_err']:5.2f}%"
    return line + (f"  frozen {record['frozen_units']}/{config['n_units']}"
                   f"  {record['images_per_s']:.0f} img/s  {record['train_time_s']:.1f} s")


class NoLog:
    """Stands in for the metrics file on the ranks that do not write it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def log(self, event: str, **fields) -> dict:
        return {"event": event, **fields}


def load_data(config: dict, dist: Distributed):
    """The splits; under torchrun rank 0 loads (and downloads) first, then the others."""
    def load():
        return load_splits(config["dataset"], config["data_root"], config["eval_mode"],
                           config["subset"], config["synthetic_classes"], config["seed"])
    if not dist.enabled:
        return load()
    error, splits = None, None
    if dist.is_main:
        try:
            splits = load()
        except DataError as e:
            error = str(e)
    error = dist.broadcast(error)  # every rank learns whether rank 0 could load the data
    if error is not None:
        raise DataError(error)
    return splits if dist.is_main else load()


def run(config: dict, run_dir: Path, checkpoint: dict | None, dist: Distributed = Distributed()) -> dict:
    metrics_path = run_dir / "metrics.jsonl"
    seed_everything(config["seed"])
    device = torch.device(config["device"])
    splits = load_data(config, dist)
    if config["batch_size"] % dist.world_size:
        raise RunError(f"--batch_size {config['batch_size']} is not divisible by the "
                       f"{dist.world_size} processes (it is the global batch)")
    steps_per_epoch = (len(splits.train) // dist.world_size) // (config["batch_size"] // dist.world_size)
    if steps_per_epoch == 0:
        raise RunError(f"--batch_size {config['batch_size']} is larger than the training set "
                       f"({len(splits.train)} images)")
    total_steps = config["epochs"] * steps_per_epoch
    model, units, optimizer, scheduler, scaler = build_training(config, device, total_steps)
    replicas = Replicas(model, dist, device)

    if checkpoint is None:
        config.update(num_classes=splits.num_classes, params=sum(p.numel() for p in model.parameters()),
                      n_units=len(units), t_i=scheduler.t_i, steps_per_epoch=steps_per_epoch,
                      total_steps=total_steps, train_images=len(splits.train),
                      world_size=dist.world_size, per_rank_batch_size=config["batch_size"] // dist.world_size,
                      loader_used=resolve_loader(config, splits, device),
                      **estimates(config, model, units, scheduler.t_i, total_steps))
        if dist.is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RunError(f"--out-dir {config['out_dir']}: cannot create {run_dir} "
                               f"({e.strerror or e})") from None
            with MetricsLogger(metrics_path) as log:
                log.log("config", **config, host=host_info(device))
        done_epochs, train_time, position = 0, 0.0, new_position(1)
    else:
        restore(checkpoint, model, optimizer, scheduler, scaler, dist)
        done_epochs, train_time = checkpoint["epoch"], checkpoint["train_time_s"]
        position = checkpoint["position"] or new_position(done_epochs + 1)
        if dist.is_main:
            # Epoch records after the checkpoint belong to work about to be redone: drop them.
            kept = [r for r in read_records(metrics_path) if r["event"] == "config"
                    or (r["event"] == "epoch" and r["epoch"] <= done_epochs)]
            write_records(metrics_path, kept)
            print(f"resuming {run_dir} in epoch {position['epoch']} at batch {position['batch']}")
    train_loader, eval_loader, test_loader = make_loaders(config, splits, device,
                                                          config["loader_used"], dist)
    if dist.is_main:
        print(describe(config, splits, config["loader_used"]), flush=True)

    last_val = (None, None)
    logger = MetricsLogger(metrics_path) if dist.is_main else NoLog()
    with StopSignals() as stop, logger as log:
        for epoch in range(done_epochs + 1, config["epochs"] + 1):
            stopped = train_one_epoch(replicas, train_loader, optimizer, scheduler, scaler, config,
                                      device, position, stop, dist,
                                      desc=f"epoch {epoch}/{config['epochs']}")
            step = (epoch - 1) * steps_per_epoch + position["batch"]
            if stopped:
                write_checkpoint(run_dir / "checkpoint.pt", dist, config, model, optimizer, scheduler,
                                 scaler, epoch - 1, step, train_time, position)
                raise Stopped(stop.signum, f"stopped by {signal.Signals(stop.signum).name} in epoch "
                              f"{epoch} after step {step} of {total_steps}; checkpoint written: "
                              f"continue with --resume (run directory {run_dir})")
            stats = epoch_stats(position)
            train_time += stats["train_time_s"]
            record = {"epoch": epoch, "step": step, **stats}
            check_replicas_agree(model, dist, device)
            if eval_loader is not None:
                last_val = evaluate(model, eval_loader, config, device, dist)
                record.update(val_loss=last_val[0], val_err=last_val[1])
            record.update(frozen_units=scheduler.num_frozen,
                          active_units=len(units) - scheduler.num_frozen,
                          lr=[float(lr) for lr in scheduler.get_last_lr()])
            log.log("epoch", **record)
            write_checkpoint(run_dir / "checkpoint.pt", dist, config, model, optimizer, scheduler,
                             scaler, epoch, step, train_time, None)
            if dist.is_main:
                tqdm.write(epoch_line(record, config))
            position = new_position(epoch + 1)
            if epoch < config["epochs"] and agree(torch.tensor(NO_STEP, device=device), stop, dist, config):
                raise Stopped(stop.signum, f"stopped by {signal.Signals(stop.signum).name} after "
                              f"epoch {epoch}; checkpoint written: continue with --resume "
                              f"(run directory {run_dir})")

        if config["eval_mode"] == "test" and last_val[0] is not None:
            test_loss, test_err = last_val  # the last evaluation was this same test pass
        else:
            test_loss, test_err = evaluate(model, test_loader, config, device, dist)
        summary = log.log(
            "summary", epochs=config["epochs"], steps=total_steps, train_time_s=train_time,
            val_err=last_val[1] if config["eval_mode"] == "val" else None,
            test_loss=test_loss, test_err=test_err, estimated_speedup=config["estimated_speedup"],
            paper_speedup=config["paper_speedup"], flop_speedup=config["flop_speedup"],
            frozen_at=scheduler.frozen_at)
    if dist.is_main:
        print(f"done: test error {test_err:.2f}%, training time {train_time:.1f} s; "
              f"results in {run_dir}")
    return summary


def prepare(config: dict, args, explicit: set, dist: Distributed) -> tuple:
    """On rank 0: check the run directory, load and check the checkpoint to resume. Every
    rank gets the outcome: ("error", message, exit code) or ("ok", config, checkpoint, summary
    of a run that has already finished or None)."""
    if dist.is_main:
        try:
            run_dir, checkpoint = prepare_run_dir(config, args.resume)
            finished = None
            if checkpoint is not None:
                check_resume_args(checkpoint["config"], args, explicit)
                saved_world = checkpoint["config"].get("world_size", 1)
                if saved_world != dist.world_size:
                    raise RunError(f"--resume: the run was trained by {saved_world} process(es); "
                                   f"resume it with the same number (this is {dist.world_size})")
                runtime = {k: config[k] for k in ("device", "workers", "data_root", "out_dir", "run_dir")}
                config = {**checkpoint["config"], **runtime}
                config["amp_effective"] = effective_amp(config["amp"], torch.device(config["device"]))
                summaries = read_records(run_dir / "metrics.jsonl", "summary")
                finished = summaries[-1] if summaries else None
            outcome = ("ok", config, checkpoint, finished)
        except ValueError as e:  # a flag that contradicts the saved run
            outcome = ("error", str(e), 2)
        except RunError as e:
            outcome = ("error", str(e), 1)
    else:
        outcome = None
    outcome = dist.broadcast(outcome)
    if outcome[0] == "ok" and not dist.is_main:  # each rank keeps its own device
        outcome = ("ok", {**outcome[1], "device": config["device"]}, *outcome[2:])
    return outcome


def main(argv=None) -> dict:
    """Train as the command line says; return the run's summary record."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, args, explicit = parse_args(argv)

    def fail(message: str, code: int = 1, dist: Distributed = Distributed()) -> None:
        if dist.is_main:
            print(f"{parser.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(code)

    try:
        config = resolve_config(args, explicit, argv)
    except ValueError as e:  # a flag value no run can use
        parser.error(str(e))
    dist, device = init_distributed(torch.device(config["device"]))
    config["device"] = str(device)
    try:
        outcome = prepare(config, args, explicit, dist)
        if outcome[0] == "error":
            if outcome[2] == 2 and dist.is_main:
                parser.print_usage(sys.stderr)
            fail(outcome[1], outcome[2], dist)
        _, config, checkpoint, finished = outcome
        if finished is not None:
            if dist.is_main:
                print(f"{config['run_dir']} has already finished; nothing to resume")
            return finished
        return run(config, Path(config["run_dir"]), checkpoint, dist)
    except (RunError, DataError) as e:
        fail(str(e), 1, dist)
    except Stopped as e:
        if dist.is_main:
            print(f"{parser.prog}: {e}", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    except KeyboardInterrupt:
        fail(f"interrupted; continue from the last checkpoint with --resume "
             f"(run directory {config['run_dir']})", 128 + signal.SIGINT, dist)
    finally:
        if dist.enabled:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
