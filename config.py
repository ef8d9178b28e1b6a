"""A run's settings: one frozen dataclass, `Config`, whose fields are written out below, each with
its flag spellings, help, check and kind in the field's metadata. Everything else is derived
from it: train.py's command line (and the settings benchmark.py and reproduce.py share), the
checks, the default run name, the config record, the continue command, --resume's checks and
reproduce.py's grid.

    parser, request, typed = parse(argv)    # the flags; `typed`: the settings typed on the command line
    cfg = resolve(request, typed)           # what the run uses: data set, depth and k, t_0, epochs, name
    record(cfg, argv)                       # the config record's settings half
    flag("growth_rate")                     # "-k/--growth-rate": how messages name a setting

A setting's kind: "result" (it changes what the run computes), "length" (a result setting that
also fixes the schedule's length, T), or "runtime" (how the run executes: --resume may change it
unless it is `fixed_on_resume`). Fields without flags are what resolving fills in: the run's
classes, run directory and paper estimate, and the requests that resolving replaced (the data
set, t_0, epochs and name as asked for), kept in fields of their own.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cli import (
    ArgumentParser,
    at_least_zero,
    check_seed,
    check_t_0,
    finite_at_least,
    flag_spellings,
    in_range,
    positive,
)
from data_sets import DATASETS, split_sizes, steps_per_epoch
from freezeout import SCALE_POWERS, solve_t_0
from models import MODELS, REGISTRY, applies, check_depth, paper_speedup, resolve_size, speedup_estimator

GROUPS = ("model", "data", "optimisation", "FreezeOut", "run")


def setting(default, *flags, help: str, group: str, kind: str = "result", check=None, type=None, choices=None,
            label=None, switches: tuple = (), fixed_on_resume: bool = False, planned: bool = False,
            recorded: bool = True):
    """A field that is a setting: given by `flags` (or by `switches`, each (flag, value, help));
    `check(flag, value)` raises ValueError naming the flag; `label`: its part of the default run
    name where it differs from its default. In the config record: its value (`recorded`), or,
    `planned`, what the process decided from it (the plan's half)."""
    return field(default=default, metadata=dict(
        flags=flags, switches=switches, help=help, group=group, kind=kind, check=check, type=type,
        choices=choices, label=label, fixed_on_resume=fixed_on_resume, planned=planned, recorded=recorded))


def switch(default, *switches, group: str, kind: str = "result", label=None, fixed_on_resume: bool = False,
           recorded: bool = True):
    return setting(default, help="", group=group, kind=kind, label=label, switches=switches,
                   fixed_on_resume=fixed_on_resume, recorded=recorded)


def derived(default=None, recorded: bool = True):
    """A field that resolving fills in (no flag); `recorded`: in the config record."""
    return field(default=default, metadata=dict(kind="derived", recorded=recorded))


@dataclass(frozen=True)
class Config:
    """train.py's settings, in the order of its -h, and what resolving makes of them."""
    # model
    model: str = setting("densenet", "--model", group="model", choices=MODELS,
                         help="architecture: DenseNet(-BC), Wide ResNet or VGG with BatchNorm")
    depth: Optional[int] = setting(None, "-L", "--depth", group="model", type=int, check=positive,
                                   help="depth L (default: 76 for densenet, 40 for wrn, 16 for vgg)")
    growth_rate: Optional[int] = setting(None, "-k", "--growth-rate", group="model", type=int, check=positive,
                                         help="DenseNet growth rate or WRN widening factor k; unused by vgg "
                                              "(default: 12 for densenet, 4 for wrn)")
    bottleneck: bool = switch(True, ("--bottleneck", True, "DenseNet-BC bottleneck layers; densenet only (the "
                                     "default)"),
                              ("--no-bottleneck", False, "plain DenseNet layers; densenet only (default: bottleneck)"),
                              group="model")
    reduction: float = setting(0.5, "--reduction", group="model", type=float, label="red{:g}",
                               check=in_range(0.0, 1.0, low_open=True), help="DenseNet transition compression theta")
    dropout: float = setting(0.0, "--dropout", group="model", type=float, label="drop{:g}",
                             check=in_range(0.0, 1.0, high_open=True),
                             help="dropout rate: after each DenseNet convolution, between a WRN block's "
                                  "convolutions, before VGG's hidden classifier layers")
    # data
    dataset: Optional[str] = setting(None, "--dataset", group="data", choices=DATASETS,
                                     help="data set (default: cifar100, or as --which_dataset says)")
    which_dataset: Optional[int] = setting(None, "--which_dataset", group="data", type=int, choices=(10, 100),
                                           recorded=False, help="2017 spelling: 10 = cifar10, 100 = cifar100; "
                                           "with --dataset synthetic, the number of classes (default: 100)")
    synthetic_classes: Optional[int] = derived()
    num_classes: Optional[int] = derived()
    data_root: str = setting("./data", "--data-root", group="data", kind="runtime",
                             help="where CIFAR lives or is downloaded to")
    subset: Optional[int] = setting(None, "--subset", group="data", kind="length", type=int, check=positive,
                                    help="cap every split at its first N images (default: all)")
    augment: bool = switch(True, ("--augment", True, "random crop (pad 4) and horizontal flip (the default)"),
                           ("--no-augment", False, "no data augmentation (default: augment)"), group="data",
                           label="noaug")
    eval_mode: str = switch(
        "val", ("--validate", "val", "train on the first 45,000 images, evaluate on the last 5,000 each epoch "
                                     "(the default)"),
        ("--validate-test", "test", "train on all 50,000 images, evaluate on the test set each epoch "
                                    "(default: --validate)"),
        ("--no-validate", "none", "train on all 50,000 images, no per-epoch evaluation (default: --validate)"),
        group="data", kind="length", label={"test": "valtest", "none": "noval"})
    loader: str = setting("auto", "--loader", group="data", kind="runtime", choices=("auto", "tensor", "torchvision"),
                          fixed_on_resume=True,  # a position inside an epoch is its own loader's
                          help="tensor: the data set stays on the device, augmented in batches there; torchvision: "
                               "DataLoader with per-image transforms (the reference); auto: tensor when the data "
                               "fits in a quarter of the free device memory")
    workers: Optional[int] = setting(None, "--workers", group="data", kind="runtime", type=int, check=at_least_zero,
                                     planned=True, help="worker processes of the torchvision loader (default: 0 on "
                                                        "CPU, 4 on a GPU)")
    # optimisation
    epochs: int = setting(100, "--epochs", group="optimisation", kind="length", type=int, check=positive,
                          help="training epochs")
    requested_epochs: Optional[int] = derived()  # epochs as asked for, before --const_time
    batch_size: int = setting(50, "--batch_size", group="optimisation", kind="length", type=int, check=positive,
                              label="bs{}", help="training batch size, global: under torchrun each of N processes "
                                                 "takes 1/N of it")
    optimizer: str = derived("SGD")
    nesterov: bool = derived(True)
    lr: float = setting(0.1, "--lr", group="optimisation", type=float, check=finite_at_least(0.0, strict=True),
                        label="lr{:g}", help="base learning rate")
    momentum: float = setting(0.9, "--momentum", group="optimisation", type=float, label="mom{:g}",
                              check=in_range(0.0, 1.0, high_open=True), help="SGD Nesterov momentum")
    weight_decay: float = setting(1e-4, "--weight-decay", group="optimisation", type=float, label="wd{:g}",
                                  check=finite_at_least(0.0), help="SGD weight decay")
    seed: int = setting(0, "--seed", group="optimisation", type=int, check=check_seed, help="random seed")
    # FreezeOut
    t_0: float = setting(0.8, "--t_0", group="FreezeOut", type=float, check=check_t_0,
                         help="fraction of the run (before scaling) at which the first unit freezes; 1 = baseline")
    how_scale: str = setting("cubic", "--how_scale", group="FreezeOut", choices=tuple(SCALE_POWERS),
                             help="t_i schedule")
    scale_lr: bool = switch(True, ("--no_scale", False, "start every unit at the base learning rate (default: unit "
                                                        "i starts at lr / t_i)"), group="FreezeOut")
    const_time: bool = switch(False, ("--const_time", True, "train 1/(1 - estimated speedup) times as many epochs, "
                                                            "rounded up (default: --epochs)"),
                              group="FreezeOut", kind="length", label="consttime")
    target_speedup: Optional[float] = setting(None, "--target-speedup", group="FreezeOut", type=float,
                                              check=in_range(0.0, 1.0, low_open=True, high_open=True),
                                              help="choose t_0 so that the estimated speedup equals this fraction "
                                                   "(default: use --t_0)")
    # run
    out_dir: str = setting("runs", "--out-dir", group="run", kind="runtime", help="parent directory of run directories")
    name: Optional[str] = setting(None, "--name", "--save-weights", group="run", kind="runtime",
                                  help="run name: files go to OUT_DIR/NAME; --save-weights is the 2017 spelling "
                                       "(default: derived from the settings)")
    run_dir: Optional[str] = derived()
    resume: bool = switch(False, ("--resume", True, "continue the run in OUT_DIR/NAME from its checkpoint (default: "
                                                    "start a new run)"), group="run", kind="runtime", recorded=False)
    device: str = setting("auto", "--device", group="run", kind="runtime", choices=("auto", "cpu", "cuda", "mps"),
                          planned=True, help="auto = cuda, then mps, then cpu")
    amp: str = setting("off", "--amp", group="run", choices=("off", "bf16", "fp16"), label="{}",
                       help="mixed precision: bf16 or fp16 autocast (fp16 with a GradScaler) on any device whose "
                            "autocast has the type (CPUs have both in recent torch); off where it has not (the "
                            "header's amp says which precision ran)")
    channels_last: bool = switch(False, ("--channels-last", True, "channels-last memory format for the model and "
                                                                  "inputs (default: off)"),
                                 group="run", kind="runtime", fixed_on_resume=True)
    cuda_graphs: str = setting("auto", "--cuda-graphs", group="run", kind="runtime", choices=("auto", "on", "off"),
                               help="on: the whole training step as one CUDA graph per freeze level; off: eager; "
                                    "auto: on wherever supported (CUDA, no fp16 scaler, one process)")
    compile: bool = switch(False, ("--compile", True, "compile the model for the training step with torch.compile, "
                                                      "once per freeze level; with CUDA graphs, the compiled step is "
                                                      "what each graph captures (default: off)"),
                           group="run", kind="runtime")
    compile_backend: str = setting("inductor", "--compile-backend", group="run", kind="runtime",
                                   help="torch.compile backend for --compile (aot_eager: compiled graphs without "
                                        "code generation)")
    dist_timeout: float = setting(10.0, "--dist-timeout", group="run", kind="runtime", type=float, recorded=False,
                                  check=finite_at_least(0.0, strict=True),
                                  help="minutes a torchrun process waits for the others at a collective before it "
                                       "ends the job, naming the process it waited for")
    paper_speedup: Optional[float] = derived()
    # The requests that resolving replaces, as asked for (the record's copy of the settings).
    requested_dataset: Optional[str] = derived(recorded=False)
    requested_t_0: Optional[float] = derived(recorded=False)
    requested_name: Optional[str] = derived(recorded=False)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
SETTINGS = [f for f in dataclasses.fields(Config) if f.metadata["kind"] != "derived"]
NAMES = [f.name for f in SETTINGS]
DEFAULTS = {f.name: f.default for f in SETTINGS}
RESULT = frozenset(f.name for f in SETTINGS if f.metadata["kind"] != "runtime")
RESUMABLE = frozenset(f.name for f in SETTINGS if f.metadata["kind"] == "runtime" and not f.metadata["fixed_on_resume"])
LENGTH = frozenset(f.name for f in SETTINGS if f.metadata["kind"] == "length")
REQUESTED = {"dataset": "requested_dataset", "t_0": "requested_t_0", "epochs": "requested_epochs",
             "name": "requested_name"}  # a setting resolving replaces -> the field keeping the request


def flag(name: str) -> str:
    """How messages name a setting: its short flag and first long one (-k/--growth-rate, --t_0),
    or its switches (--validate/--validate-test/--no-validate); another name as it is."""
    if name not in FIELDS or FIELDS[name].metadata["kind"] == "derived":
        return name
    meta = FIELDS[name].metadata
    if not meta["flags"]:
        return "/".join(s[0] for s in meta["switches"])
    long = [f for f in meta["flags"] if f.startswith("--")]
    return "/".join([f for f in meta["flags"] if not f.startswith("--")] + long[:1])


# -- the command line --------------------------------------------------------------------------
def add_settings(parser: argparse.ArgumentParser, names=None, suppress: bool = False, groups: bool = True,
                 **overrides: dict) -> None:
    """Add the settings `names` (all by default) to `parser`, in argument groups (`groups`).
    `suppress` leaves the defaults out of the parse (argparse.SUPPRESS), so that one parse tells
    which settings were typed. `overrides[name]`: changes of one setting's metadata (help, default,
    switches) for this script."""
    made = {}
    for f in SETTINGS if names is None else [FIELDS[n] for n in names]:
        meta = {**f.metadata, "default": f.default, **overrides.get(f.name, {})}
        target = parser
        if groups:
            target = made.get(meta["group"]) or made.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        default = argparse.SUPPRESS if suppress else meta["default"]
        if meta["switches"]:
            if len(meta["switches"]) > 1:  # given both, argparse refuses with one line
                target = target.add_mutually_exclusive_group()
            for spelling, value, text in meta["switches"]:
                target.add_argument(*flag_spellings(spelling), dest=f.name, action="store_const", const=value,
                                    default=default, help=text)
            continue
        text = meta["help"] if "(default:" in meta["help"] else f"{meta['help']} (default: {meta['default']})"
        kwargs = {"type": meta["type"]} if meta["type"] else {}
        target.add_argument(*flag_spellings(*meta["flags"]), dest=f.name, default=default, help=text,
                            choices=list(meta["choices"]) if meta["choices"] else None, **kwargs)


def parser(description: str = "", epilog: str = "") -> ArgumentParser:
    """train.py's command line: every setting, in groups, the defaults left out of a parse."""
    made = ArgumentParser(description=description, epilog=epilog, flag_of=flag)
    add_settings(made, suppress=True)
    return made


def parse(argv: list, description: str = "", epilog: str = "") -> tuple[ArgumentParser, Config, set]:
    """(the parser, the settings as asked for with every default filled in, the settings typed)."""
    parser_ = parser(description, epilog)
    typed = vars(parser_.parse_args(argv))
    return parser_, Config(**{**DEFAULTS, **typed}), set(typed)


def to_argv(cfg: Config) -> list[str]:
    """train.py's flags for settings: every one that differs from its default (parsing them
    gives the settings back)."""
    argv = []
    for name in changed(cfg):
        meta, value = FIELDS[name].metadata, getattr(cfg, name)
        if meta["switches"]:
            argv.append(next(spelling for spelling, const, _ in meta["switches"] if const == value))
        else:
            argv += [[f for f in meta["flags"] if f.startswith("--")][0], str(value)]
    return argv


def changed(cfg: Config) -> list[str]:
    """The settings that differ from their defaults, in the order of -h."""
    return [name for name in NAMES if getattr(cfg, name) != DEFAULTS[name]]


def ignored_flags_note(model: str, typed: dict) -> str | None:
    """The note naming the typed settings ({name: value}) that shape another architecture than
    `model` (one command line may be reused across --model values), or None."""
    names = [("--no-bottleneck" if name == "bottleneck" and typed[name] is False else flag(name).split("/")[0])
             for name in ("growth_rate", "bottleneck", "reduction") if name in typed and not applies(name, model)]
    if not names:
        return None
    return f"note: {', '.join(names)} {'means' if len(names) == 1 else 'mean'} nothing to {model}; ignored"


# -- resolving ---------------------------------------------------------------------------------
def check(cfg: Config, typed: set) -> None:
    """ValueError, naming the flag, for a value no run can use: each setting's own check, then
    those of settings together."""
    for f in SETTINGS:
        if f.metadata["check"] is not None:
            f.metadata["check"](flag(f.name), getattr(cfg, f.name))
    check_which_dataset(cfg.dataset, cfg.which_dataset)
    if cfg.target_speedup is not None and "t_0" in typed:
        raise ValueError(f"give {flag('t_0')} or {flag('target_speedup')}, not both")


def check_which_dataset(dataset: Optional[str], which: Optional[int]) -> None:
    """--which_dataset is the 2017 spelling of a CIFAR --dataset: both given, they must agree."""
    if dataset in ("cifar10", "cifar100") and which is not None and dataset != f"cifar{which}":
        raise ValueError(f"--dataset {dataset} contradicts --which_dataset {which}")


def resolve(request: Config, typed: set) -> Config:
    """The Config the run uses, checked before any work is done: the model's depth and k, the
    data set and its classes, t_0 solved for --target-speedup, the epochs under --const_time,
    the run's name and directory, the paper's estimate; the requests kept in fields of their own.
    ValueError, naming the flag, for settings no run can use."""
    check(request, typed)
    depth, width = resolve_size(request.model, request.depth, request.growth_rate)
    check_depth(request.model, depth, request.bottleneck)
    cfg = dataclasses.replace(request, depth=depth, growth_rate=width)
    dataset = request.dataset or f"cifar{request.which_dataset or 100}"
    synthetic = request.which_dataset if dataset == "synthetic" else None
    classes = {"cifar10": 10, "cifar100": 100}.get(dataset, synthetic or 100)
    steps_per_epoch(split_sizes(cfg.eval_mode, cfg.subset)[0], cfg.batch_size)
    t_0, epochs = request.t_0, request.epochs
    if cfg.const_time or cfg.target_speedup is not None:
        estimate, what = speedup_estimator(cfg.model, depth, width, cfg.how_scale, cfg.bottleneck, classes,
                                           cfg.reduction)
        if cfg.target_speedup is not None:
            try:
                t_0 = solve_t_0(cfg.target_speedup, estimate, f"{what} for {cfg.how_scale}")
            except ValueError as e:
                raise ValueError(f"{flag('target_speedup')}: {e}") from None
        if cfg.const_time:  # as many epochs as fit in the baseline's time, by the estimate
            epochs = math.ceil(request.epochs / (1 - estimate(t_0)))
    name = request.name or default_name(cfg, dataset)
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"{flag('name')} {name!r}: a run name must be a plain file name")
    return dataclasses.replace(
        cfg, dataset=dataset, synthetic_classes=synthetic, num_classes=classes, epochs=epochs, t_0=t_0, name=name,
        run_dir=str(Path(cfg.out_dir) / name),
        paper_speedup=paper_speedup(cfg.model, depth, width, t_0, cfg.how_scale, cfg.bottleneck),
        requested_dataset=request.dataset, requested_t_0=request.t_0, requested_epochs=request.epochs,
        requested_name=request.name)


# The order of the labels in a default run name (the order names have always had).
NAME_ORDER = ("reduction", "dropout", "batch_size", "lr", "momentum", "weight_decay", "augment", "eval_mode",
              "const_time", "amp")


def default_name(cfg: Config, dataset: str) -> str:
    """The settings every name spells out, then each result setting with a label that differs
    from its default: a sweep over any of them gets a directory per value."""
    arch = REGISTRY[cfg.model].run_label(cfg.depth, cfg.growth_rate, cfg.bottleneck)
    data = dataset + (f"{cfg.which_dataset}" if dataset == "synthetic" and cfg.which_dataset else "")
    data += f"-sub{cfg.subset}" if cfg.subset else ""
    fo = f"ts{cfg.target_speedup:g}" if cfg.target_speedup is not None else f"t0-{cfg.t_0:g}"
    name = f"{arch}_{data}_{cfg.how_scale}-{'scaled' if cfg.scale_lr else 'unscaled'}-{fo}_e{cfg.epochs}_s{cfg.seed}"
    labels = []
    for setting_name in NAME_ORDER:
        label, value = FIELDS[setting_name].metadata["label"], getattr(cfg, setting_name)
        if value != DEFAULTS[setting_name] and applies(setting_name, cfg.model):
            labels.append(label[value] if isinstance(label, dict) else label.format(value))
    return "_".join([name, *labels])


# -- the config record -------------------------------------------------------------------------
def requests(cfg: Config) -> dict:
    """Every setting as asked for (a resolved setting's request; depth and k as the model fills
    them in): the record's copy of the settings, from which a resume starts again."""
    return {name: getattr(cfg, REQUESTED[name]) if name in REQUESTED and cfg.run_dir is not None
            else getattr(cfg, name) for name in NAMES}


def record(cfg: Config, argv: list) -> dict:
    """The config record's settings half: every recorded field of the resolved Config, the
    command line that started the run, and the settings as asked for (`args`). The plan's half,
    beside it, holds the planned settings (device, workers) as the process decided them."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)
              if f.metadata["recorded"] and not f.metadata.get("planned")}
    return {**fields, "argv": list(argv), "args": requests(cfg)}


def from_requests(values: dict) -> Config:
    """A Config as asked for, from a dict of settings (a record's `args`, a grid's choices):
    what it lacks takes its default (a run recorded before a setting existed ran as its default
    does), what is no setting (one since removed) is left out."""
    return Config(**{name: values.get(name, DEFAULTS[name]) for name in NAMES})


# The config record's keys that hold what the result settings resolved to (the data set's
# request: dataset and synthetic_classes).
RESULT_KEYS = [key for name in NAMES if name in RESULT
               for key in {"which_dataset": ("synthetic_classes",)}.get(name, (name,))]


def differences(saved: dict, wanted: dict) -> list[str]:
    """One phrase per result setting on which two config records differ."""
    return [f"{key} = {saved.get(key)!r}, not {wanted.get(key)!r}" for key in RESULT_KEYS
            if saved.get(key) != wanted.get(key)]


# -- resuming ----------------------------------------------------------------------------------
def refuse_changes(saved_args: dict, now: Config, typed: set) -> None:
    """Settings typed with --resume must agree with the saved run, the runtime ones that may
    change aside: ValueError naming the first that does not, and why."""
    for name in sorted(typed - RESUMABLE):
        value, was = getattr(now, name), saved_args.get(name)
        if value != was:
            why = ("FreezeOut's schedule is set by the run's length (every unit freezes at its fraction of "
                   "all the steps), so a run of another length freezes its units at other steps than this "
                   "one did" if name in LENGTH else "a run continues with the settings it started with")
            raise ValueError(f"--resume: {flag(name)} {value} contradicts the saved run's {name} = {was}: {why}; "
                             f"leave {flag(name)} out to continue this run, or start a new run with it under "
                             f"another --name")


def resumed(saved: dict, now: Config) -> Config:
    """The Config a run continued from its config record `saved` goes on with: the saved
    settings, with this invocation's value of every setting --resume may change (where it
    runs, how fast; --resume itself aside), in the directory it was opened in. What they resolve
    to must be what the run was started with, or it would not be the same run: ValueError."""
    asked = requests(now)
    request = from_requests({**saved["args"], **{name: asked[name] for name in RESUMABLE if name != "resume"}})
    try:
        cfg = resolve(request, set(changed(request)))
    except ValueError as e:
        raise ValueError(f"--resume: the saved run's settings: {e}") from None
    cfg = dataclasses.replace(cfg, name=now.name, run_dir=now.run_dir)
    wanted = record(cfg, saved["argv"])
    found = differences({k: saved[k] for k in wanted if k in saved}, {k: wanted[k] for k in wanted if k in saved})
    if found:
        raise ValueError(f"--resume: this version resolves the saved run's settings otherwise ({'; '.join(found)}); "
                         "continue it with the version of the code that started it")
    return cfg


def continue_argv(cfg: Config) -> list[str]:
    """The flags that continue the run: its name, every setting --resume may change where this
    invocation gives it another value than its default, --resume last."""
    runtime = {name: getattr(cfg, name) for name in RESUMABLE}
    return to_argv(from_requests({**runtime, "name": cfg.name, "resume": False})) + ["--resume"]
