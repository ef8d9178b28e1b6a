"""Every setting of a run, declared once: its flag spellings, default, help, check, whether it
changes what the run computes (a result setting) or only how it executes (a runtime setting),
and its label in the default run name. train.py's command line is built from this table, and
benchmark.py and reproduce.py take their shared flags from it; the checks, the messages that
name a flag, the default run name, --resume's checks and a grid's reuse of a run all read it.
`RunSettings` holds every setting as parsed (a frozen dataclass made from the table);
`resolve` turns it into what the run is defined by at every start (`Resolved`: data set and
classes, t_0 from a target speedup, epochs under --const_time, the run's name and directory);
`settings_record` is the `config` record's first half, beside which train.py records the plan
(what one process decides: device, precision, step, loader, steps, estimates).

    parser, defaults = argparse.ArgumentParser(), {}
    add_settings(parser, SETTINGS, defaults)    # train.py's flags, in groups
    settings = RunSettings(**values)            # immutable once parsed
    resolved = resolve(settings, given(settings))
    flag("growth_rate")                         # "-k/--growth-rate": how messages name it
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import freezeout
from data_sets import DATASETS, split_sizes, steps_per_epoch
from freezeout import SCALE_POWERS, solve_t_0
from messages import name_settings
from models import MODELS, REGISTRY, applies, check_depth, paper_speedup, speedup_estimator

# ---------------------------------------------------------------------------------------
# What the scripts' command lines share: choice lists, both spellings of every flag, the help
# format, the checks of numeric values, the note on flags the chosen model has no use for
# ---------------------------------------------------------------------------------------
DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("off", "bf16", "fp16")
SCALINGS = tuple(SCALE_POWERS)
LOADERS = ("auto", "tensor", "torchvision")
CUDA_GRAPHS = ("auto", "on", "off")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: ...)" to a flag's help unless the help already says what happens
    when the flag is not given, or the flag is a switch (its help says what it turns on);
    the description and the examples keep their lines."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def examples(doc: str) -> str:
    """The epilog of a script's -h: the first indented block of its docstring (its examples)."""
    block = doc.split("\n\n")[1]
    return "examples:\n" + "\n".join(line[2:] for line in block.splitlines())


def flag_spellings(*names: str) -> list[str]:
    """A flag's names plus the other spelling of each long one: --batch_size and --batch-size."""
    spellings = list(names)
    for name in names:
        if name.startswith("--"):
            for alt in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
                if alt not in spellings:
                    spellings.append(alt)
    return spellings


def check_positive(flags: dict) -> None:
    """ValueError naming the first flag ({"--epochs": value, ...}) whose integer value is not
    positive; None means not given."""
    for flag, value in flags.items():
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be a positive integer, got {value}")


def check_range(flag: str, value, low: float, high: float, low_open: bool = False,
                high_open: bool = False) -> None:
    """ValueError naming the flag unless low <= value <= high (ends open as asked); NaN and
    infinities never pass. None means not given."""
    if value is None:
        return
    ok = math.isfinite(value) and (value > low if low_open else value >= low) \
        and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{flag} must be in {interval}, got {value}")


def check_t_0(flag: str, value: float) -> None:
    """FreezeOut's own t_0 check, its message naming the flag as the user spelled it."""
    try:
        freezeout.check_t_0(value)
    except ValueError:
        raise ValueError(f"{flag} must be in (0, 1], got {value}") from None


def check_at_least(flag: str, value, low: float, strict: bool = False) -> None:
    """ValueError naming the flag unless value >= low (> low when strict) and finite: a
    learning rate of inf or NaN is as unusable as a negative one. None means not given."""
    if value is None:
        return
    if not (math.isfinite(value) and (value > low if strict else value >= low)):
        raise ValueError(f"{flag} must be a finite number {'>' if strict else '>='} {low:g}, got {value}")


def check_which_dataset(dataset: str | None, which: int | None) -> None:
    """--which_dataset is the 2017 spelling of a CIFAR --dataset: both given, they must agree."""
    if dataset in ("cifar10", "cifar100") and which is not None and dataset != f"cifar{which}":
        raise ValueError(f"--dataset {dataset} contradicts --which_dataset {which}")


# Seeds go to torch.manual_seed, which takes 0 <= seed < 2**64.
MAX_SEED = 2 ** 64 - 1


# Exit statuses of the scripts, chosen here alone (docs/training.md, "Exit codes"): 2 for what
# the command line asks that cannot be (argparse's own), 1 for a run that failed, 128 + the
# signal for a run that a signal stopped with a checkpoint.
EXIT_USAGE, EXIT_FAILED = 2, 1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_status(signum: int) -> int:
    return 128 + signum


def run_as_script(main: Callable[[], Any]) -> None:
    """A script's `main`, as `python script.py` runs it, without Python's garbage collector
    walking what lives until the process ends: the objects the imports made (torch's, millions)
    when main starts, and everything left when it returns or raises, which the interpreter's
    last collections at exit would walk for about a second and free nothing the OS does not."""
    gc.freeze()
    try:
        main()
    finally:
        gc.freeze()


def is_stop_status(code) -> bool:
    """Whether an exit status is that of a run stopped by SIGINT or SIGTERM with a checkpoint."""
    return code in {stop_status(s) for s in STOP_SIGNALS}


def check_seed(flag: str, value: int) -> None:
    if value is not None and not 0 <= value <= MAX_SEED:
        raise ValueError(f"{flag} must be an integer in [0, 2**64 - 1], got {value}")


# Flags that shape one architecture only: dest -> (the flag as a user writes it, the models it
# means something to). A flag given for another model is ignored with one printed note rather
# than refused, so that one command line can be reused across --model values.
MODEL_FLAGS = {dest: (flag, tuple(m for m, a in REGISTRY.items() if dest in a.settings))
               for dest, flag in (("growth_rate", "-k"), ("bottleneck", "--bottleneck"), ("reduction", "--reduction"))}


def ignored_flags_note(model: str, given: dict) -> str | None:
    """The note naming the flags in `given` ({dest: value}, the flags on the command line)
    that mean nothing to `model`, or None when there are none."""
    names = []
    for dest, (flag, models) in MODEL_FLAGS.items():
        if dest in given and model not in models:
            names.append("--no-bottleneck" if dest == "bottleneck" and given[dest] is False else flag)
    if not names:
        return None
    return f"note: {', '.join(names)} {'means' if len(names) == 1 else 'mean'} nothing to {model}; ignored"


Check = Callable[[str, Any], None]  # check(flag, value) raises ValueError naming the flag


def positive(flag: str, value) -> None:
    check_positive({flag: value})


def at_least_zero(flag: str, value) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{flag} must be >= 0, got {value}")


def in_range(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Check:
    return lambda flag, value: check_range(flag, value, low, high, low_open, high_open)


def finite_at_least(low: float, strict: bool = False) -> Check:
    return lambda flag, value: check_at_least(flag, value, low, strict)


@dataclass(frozen=True)
class Setting:
    """One setting. `flags`: its spellings as declared (the other spelling of each long one is
    added: --batch_size and --batch-size). `switches` replace `flags` for a setting chosen by
    switches, each (flag, value it sets, help); several are mutually exclusive. `result`: the
    setting changes what the run computes (else it is how the run executes, and --resume may
    change it). `label`: its part of the default run name where it differs from its default."""
    dest: str
    group: str
    default: Any
    help: str = ""
    flags: tuple = ()
    switches: tuple = ()
    type: Optional[type] = None
    choices: Optional[tuple] = None
    result: bool = True
    check: Optional[Check] = None
    label: Any = None
    length: bool = False  # fixes the schedule's length (T = epochs x steps per epoch)
    metavar: Optional[str] = None
    # A runtime setting --resume still may not change: the loader's position in an epoch is
    # its own (the tensor loader's and torchvision's batches differ).
    fixed_on_resume: bool = False
    # How the config record holds it: as its value; `planned`: as what the process decided from
    # it (the device that ran, the number of workers), in the plan's half; not `recorded`: not
    # at all (it concerns one invocation, not the run), only in the record's copy of the settings.
    planned: bool = False
    recorded: bool = True

    @property
    def resumable(self) -> bool:
        """--resume may give it another value."""
        return not self.result and not self.fixed_on_resume

    @property
    def flag(self) -> str:
        """How messages name the setting: its short flag and first long one (-k/--growth-rate,
        --t_0, --name), or its switches (--validate/--validate-test/--no-validate)."""
        if not self.flags:
            return "/".join(s[0] for s in self.switches)
        long = [f for f in self.flags if f.startswith("--")]
        return "/".join([f for f in self.flags if not f.startswith("--")] + long[:1])


# train.py's settings, in the order of its -h.
SETTINGS = (
    # model
    Setting("model", "model", "densenet", "architecture: DenseNet(-BC), Wide ResNet or VGG with BatchNorm",
            flags=("--model",), choices=MODELS),
    Setting("depth", "model", None, "depth L (default: 76 for densenet, 40 for wrn, 16 for vgg)",
            flags=("-L", "--depth"), type=int, check=positive),
    Setting("growth_rate", "model", None, "DenseNet growth rate or WRN widening factor k; unused by vgg "
            "(default: 12 for densenet, 4 for wrn)", flags=("-k", "--growth-rate"), type=int, check=positive),
    Setting("bottleneck", "model", True, switches=(
        ("--bottleneck", True, "DenseNet-BC bottleneck layers; densenet only (the default)"),
        ("--no-bottleneck", False, "plain DenseNet layers; densenet only (default: bottleneck)"))),
    Setting("reduction", "model", 0.5, "DenseNet transition compression theta", flags=("--reduction",),
            type=float, check=in_range(0.0, 1.0, low_open=True), label="red{:g}"),
    Setting("dropout", "model", 0.0, "dropout rate: after each DenseNet convolution, between a WRN block's "
            "convolutions, before VGG's hidden classifier layers", flags=("--dropout",), type=float,
            check=in_range(0.0, 1.0, high_open=True), label="drop{:g}"),
    # data
    Setting("dataset", "data", None, "data set (default: cifar100, or as --which_dataset says)",
            flags=("--dataset",), choices=DATASETS),
    Setting("which_dataset", "data", None, "2017 spelling: 10 = cifar10, 100 = cifar100; with --dataset "
            "synthetic, the number of classes (default: 100)", flags=("--which_dataset",), type=int,
            choices=(10, 100)),
    Setting("data_root", "data", "./data", "where CIFAR lives or is downloaded to", flags=("--data-root",),
            result=False),
    Setting("subset", "data", None, "cap every split at its first N images (default: all)", flags=("--subset",),
            type=int, check=positive, length=True),
    Setting("augment", "data", True, switches=(
        ("--augment", True, "random crop (pad 4) and horizontal flip (the default)"),
        ("--no-augment", False, "no data augmentation (default: augment)")), label="noaug"),
    Setting("eval_mode", "data", "val", switches=(
        ("--validate", "val", "train on the first 45,000 images, evaluate on the last 5,000 each epoch "
                              "(the default)"),
        ("--validate-test", "test", "train on all 50,000 images, evaluate on the test set each epoch "
                                    "(default: --validate)"),
        ("--no-validate", "none", "train on all 50,000 images, no per-epoch evaluation (default: --validate)")),
        label={"test": "valtest", "none": "noval"}, length=True),
    Setting("loader", "data", "auto", "tensor: the data set stays on the device, augmented in batches there; "
            "torchvision: DataLoader with per-image transforms (the reference); auto: tensor when the data "
            "fits in a quarter of the free device memory", flags=("--loader",), choices=LOADERS, result=False,
            fixed_on_resume=True),
    Setting("workers", "data", None, "worker processes of the torchvision loader (default: 0 on CPU, 4 on a "
            "GPU)", flags=("--workers",), type=int, check=at_least_zero, result=False, planned=True),
    # optimisation
    Setting("epochs", "optimisation", 100, "training epochs", flags=("--epochs",), type=int, check=positive,
            length=True),
    Setting("batch_size", "optimisation", 50, "training batch size, global: under torchrun each of N "
            "processes takes 1/N of it", flags=("--batch_size",), type=int, check=positive, label="bs{}",
            length=True),
    Setting("lr", "optimisation", 0.1, "base learning rate", flags=("--lr",), type=float,
            check=finite_at_least(0.0, strict=True), label="lr{:g}"),
    Setting("momentum", "optimisation", 0.9, "SGD Nesterov momentum", flags=("--momentum",), type=float,
            check=in_range(0.0, 1.0, high_open=True), label="mom{:g}"),
    Setting("weight_decay", "optimisation", 1e-4, "SGD weight decay", flags=("--weight-decay",), type=float,
            check=finite_at_least(0.0), label="wd{:g}"),
    Setting("seed", "optimisation", 0, "random seed", flags=("--seed",), type=int, check=check_seed),
    # FreezeOut
    Setting("t_0", "FreezeOut", 0.8, "fraction of the run (before scaling) at which the first unit freezes; "
            "1 = baseline", flags=("--t_0",), type=float, check=check_t_0),
    Setting("how_scale", "FreezeOut", "cubic", "t_i schedule", flags=("--how_scale",), choices=SCALINGS),
    Setting("scale_lr", "FreezeOut", True, switches=(
        ("--no_scale", False, "start every unit at the base learning rate (default: unit i starts at "
                              "lr / t_i)"),)),
    Setting("const_time", "FreezeOut", False, switches=(
        ("--const_time", True, "train 1/(1 - estimated speedup) times as many epochs, rounded up "
                               "(default: --epochs)"),), label="consttime", length=True),
    Setting("target_speedup", "FreezeOut", None, "choose t_0 so that the estimated speedup equals this "
            "fraction (default: use --t_0)", flags=("--target-speedup",), type=float,
            check=in_range(0.0, 1.0, low_open=True, high_open=True)),
    # run
    Setting("out_dir", "run", "runs", "parent directory of run directories", flags=("--out-dir",), result=False),
    Setting("name", "run", None, "run name: files go to OUT_DIR/NAME; --save-weights is the 2017 spelling "
            "(default: derived from the settings)", flags=("--name", "--save-weights"), result=False),
    Setting("resume", "run", False, switches=(
        ("--resume", True, "continue the run in OUT_DIR/NAME from its checkpoint (default: start a new run)"),),
        result=False, recorded=False),
    Setting("device", "run", "auto", "auto = cuda, then mps, then cpu", flags=("--device",), choices=DEVICES,
            result=False, planned=True),
    Setting("amp", "run", "off", "mixed precision: bf16 or fp16 autocast (fp16 with a GradScaler) on any "
            "device whose autocast has the type (CPUs have both in recent torch); off where it has not (the "
            "header's amp says which precision ran)", flags=("--amp",), choices=AMP_MODES, label="{}"),
    Setting("channels_last", "run", False, switches=(
        ("--channels-last", True, "channels-last memory format for the model and inputs (default: off)"),),
        result=False, fixed_on_resume=True),
    Setting("cuda_graphs", "run", "auto", "on: the whole training step as one CUDA graph per freeze level; "
            "off: eager; auto: on wherever supported (CUDA, no fp16 scaler, one process)",
            flags=("--cuda-graphs",), choices=CUDA_GRAPHS, result=False),
    Setting("compile", "run", False, switches=(
        ("--compile", True, "compile the model for the training step with torch.compile, once per freeze "
                            "level; with CUDA graphs, the compiled step is what each graph captures "
                            "(default: off)"),), result=False),
    Setting("compile_backend", "run", "inductor", "torch.compile backend for --compile (aot_eager: compiled "
            "graphs without code generation)", flags=("--compile-backend",), result=False),
    Setting("dist_timeout", "run", 10.0, "minutes a torchrun process waits for the others at a collective "
            "before it ends the job, naming the process it waited for", flags=("--dist-timeout",), type=float,
            check=finite_at_least(0.0, strict=True), result=False, recorded=False),
)
BY_DEST = {s.dest: s for s in SETTINGS}
SETTING_DEFAULTS = {s.dest: s.default for s in SETTINGS}  # every setting's default, by its name
GROUPS = ("model", "data", "optimisation", "FreezeOut", "run")
RESULT = frozenset(s.dest for s in SETTINGS if s.result)
RUNTIME = frozenset(s.dest for s in SETTINGS if not s.result)
RESUMABLE = frozenset(s.dest for s in SETTINGS if s.resumable)
LENGTH = frozenset(s.dest for s in SETTINGS if s.length)

RunSettings = dataclasses.make_dataclass(
    "RunSettings", [(s.dest, Any) for s in SETTINGS], frozen=True,
    namespace={"__doc__": "train.py's settings as parsed, every default filled in: immutable."})


def settings_from(values: dict) -> RunSettings:
    """RunSettings from a dict of settings (a record's copy of them, a grid's choices): what it
    lacks takes its default (a run recorded before a setting existed ran as its default does),
    what is no setting (one since removed) is left out."""
    return RunSettings(**{s.dest: values.get(s.dest, s.default) for s in SETTINGS})


def flag(dest: str) -> str:
    """How messages name a setting."""
    return BY_DEST[dest].flag


def message_name(name: str) -> str:
    """A setting as the command line's messages name it: its flag (other names as they are)."""
    return flag(name) if name in BY_DEST else name


def name_settings_by_flags() -> None:
    """Make the machinery's messages name settings by the flags of this table: what a script
    whose command line is built from it calls first."""
    name_settings(message_name)


def add_settings(parser: argparse.ArgumentParser, settings=SETTINGS, defaults: Optional[dict] = None,
                 groups: bool = True, **overrides: dict) -> dict:
    """Add `settings` to `parser`, in argument groups (`groups`). With a `defaults` dict the
    parser's defaults are left out (argparse.SUPPRESS, so that one parse tells which flags were
    given) and collected there; else they are the parser's own. `overrides[dest]`: keyword
    changes of one setting for this script (its help or default). Returns `defaults`."""
    made, collect = {}, defaults is not None
    defaults = {} if defaults is None else defaults
    for s in settings:
        s = dataclasses.replace(s, **overrides.get(s.dest, {}))
        if groups and s.group not in made:
            made[s.group] = parser.add_argument_group(s.group)
        target = made[s.group] if groups else parser
        default = argparse.SUPPRESS if collect else s.default
        defaults.setdefault(s.dest, s.default)
        if s.switches:
            if len(s.switches) > 1:  # given both, argparse refuses with one line
                target = target.add_mutually_exclusive_group()
            for spelling, value, text in s.switches:
                target.add_argument(*flag_spellings(spelling), dest=s.dest, action="store_const", const=value,
                                    default=default, help=text)
            continue
        text = s.help if "(default:" in s.help else f"{s.help} (default: {s.default})"
        kwargs = {"type": s.type} if s.type else {}
        target.add_argument(*flag_spellings(*s.flags), dest=s.dest, default=default, help=text,
                            choices=list(s.choices) if s.choices else None, metavar=s.metavar, **kwargs)
    return defaults


def check_settings(values, names=None) -> None:
    """Each setting's own check (ValueError naming its flag) on `values` (a spec or args)."""
    for s in SETTINGS if names is None else [BY_DEST[n] for n in names]:
        if s.check is not None:
            s.check(s.flag, getattr(values, s.dest))


def given(values) -> set:
    """The settings of a spec that differ from their defaults: what a command line gives."""
    return {s.dest for s in SETTINGS if getattr(values, s.dest) != s.default}


def to_argv(values) -> list[str]:
    """train.py's flags for settings: every setting that differs from its default (parsing them
    gives the settings back)."""
    argv, changed = [], given(values)
    for s in SETTINGS:
        value = getattr(values, s.dest)
        if s.dest not in changed:
            continue
        if s.switches:
            argv.append(next(spelling for spelling, const, _ in s.switches if const == value))
        else:
            argv += [[f for f in s.flags if f.startswith("--")][0], str(value)]
    return argv


# ---------------------------------------------------------------------------------------
# Comparing runs
# ---------------------------------------------------------------------------------------
# The config record's entries that a result setting becomes (--which_dataset is resolved into
# dataset and synthetic_classes; epochs under --const_time are the resolved count).
RESULT_CONFIG_KEYS = tuple(k for s in SETTINGS if s.result for k in
                           {"which_dataset": ("synthetic_classes",)}.get(s.dest, (s.dest,)))


def setting_differences(saved: dict, wanted: dict) -> list[str]:
    """One phrase per result setting on which two config records differ."""
    return [f"{key} = {saved.get(key)!r}, not {wanted.get(key)!r}" for key in RESULT_CONFIG_KEYS
            if saved.get(key) != wanted.get(key)]


def continue_argv(settings, name: str) -> list[str]:
    """The flags that continue a run named `name`: its name, every setting --resume may change
    where `settings` (this invocation's) give it another value than its default, --resume last."""
    resumable = {s.dest: getattr(settings, s.dest) for s in SETTINGS if s.resumable}
    return to_argv(settings_from({**resumable, "name": name, "resume": False})) + [BY_DEST["resume"].switches[0][0]]


def resumed_settings(saved_args: dict, now) -> RunSettings:
    """The settings a resumed run goes on with: the saved run's, with this invocation's value
    of every setting --resume may change (where it runs, how fast) but --resume itself, which
    says how this invocation starts, not how the run goes on (a run started again from step 0
    records the settings it started with)."""
    now_values = {s.dest: getattr(now, s.dest) for s in SETTINGS if s.resumable and s.dest != "resume"}
    return settings_from({**saved_args, **now_values})


def check_resume_flags(saved_args: dict, spec, explicit: set) -> None:
    """Settings given with --resume must agree with the saved run, the runtime ones that may
    change aside: ValueError naming the first that does not, and why."""
    for dest in sorted(explicit - RESUMABLE):
        given, was = getattr(spec, dest), saved_args.get(dest)
        if given != was:
            why = ("FreezeOut's schedule is set by the run's length (every unit freezes at its fraction of "
                   "all the steps), so a run of another length freezes its units at other steps than this "
                   "one did" if dest in LENGTH else "a run continues with the settings it started with")
            name = flag(dest)
            raise ValueError(f"--resume: {name} {given} contradicts the saved run's {dest} = {was}: {why}; "
                             f"leave {name} out to continue this run, or start a new run with it under "
                             f"another --name")


# The order of the labels in a default run name (the order names have always had).
NAME_ORDER = ("reduction", "dropout", "batch_size", "lr", "momentum", "weight_decay", "augment", "eval_mode",
              "const_time", "amp")


def default_name_labels(spec, defaults: dict) -> list[str]:
    """The default run name's parts for result settings that differ from their defaults and
    have a label (those every name spells out have none)."""
    parts = []
    for s in sorted((s for s in SETTINGS if s.label is not None), key=lambda s: NAME_ORDER.index(s.dest)):
        value = getattr(spec, s.dest)
        if value == defaults[s.dest] or not applies(s.dest, spec.model):
            continue
        parts.append(s.label[value] if isinstance(s.label, dict) else s.label.format(value))
    return parts


# ---------------------------------------------------------------------------------------
# Resolving a spec: the run's settings
# ---------------------------------------------------------------------------------------
def check_args(args, explicit: set) -> None:
    """Raise ValueError, naming the flag, for a value no run can use: each setting's own check,
    then those of settings together."""
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


@dataclass(frozen=True)
class Resolved:
    """What a run's settings resolve to, the same at every start of it: the data set and its
    classes, t_0 (from --target-speedup), the epochs (more under --const_time), the run's name
    (derived when not given) and directory, the paper's estimate where it applies."""
    dataset: str
    synthetic_classes: Optional[int]
    num_classes: int
    epochs: int
    t_0: float
    name: str
    run_dir: str
    paper_speedup: Optional[float]


def resolve(args, explicit: set, defaults: dict = SETTING_DEFAULTS) -> Resolved:
    """Everything the run is defined by, checked before any work is done (`explicit`: the
    settings given; `defaults`: every setting's default, for the run's default name).
    ValueError, naming the flag, for settings no run can use."""
    check_args(args, explicit)
    dataset, synthetic_classes = resolve_dataset(args)
    steps_per_epoch(split_sizes(args.eval_mode, args.subset)[0], args.batch_size)
    t_0, epochs = args.t_0, args.epochs
    if args.const_time or args.target_speedup is not None:
        estimate, what = speedup_estimator(args.model, args.depth, args.growth_rate, args.how_scale,
                                           args.bottleneck, num_classes_of(dataset, synthetic_classes),
                                           args.reduction)
        if args.target_speedup is not None:
            try:
                t_0 = solve_t_0(args.target_speedup, estimate, f"{what} for {args.how_scale}")
            except ValueError as e:
                raise ValueError(f"{flag('target_speedup')}: {e}") from None
        if args.const_time:  # as many epochs as fit in the baseline's time, by the estimate
            epochs = math.ceil(args.epochs / (1 - estimate(t_0)))
    name = args.name or default_run_name(args, dataset, defaults)
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"{flag('name')} {name!r}: a run name must be a plain file name")
    return Resolved(dataset, synthetic_classes, num_classes_of(dataset, synthetic_classes), epochs, t_0, name,
                    str(Path(args.out_dir) / name), args_paper_speedup(args, t_0))


# What a setting becomes in the config record where that is not its own value: its resolved
# value, or entries of its own (the optimizer, fixed, is recorded beside its learning rate).
RECORD_ENTRIES = {
    "dataset": lambda s, r: {"dataset": r.dataset},
    "which_dataset": lambda s, r: {"synthetic_classes": r.synthetic_classes, "num_classes": r.num_classes},
    "epochs": lambda s, r: {"epochs": r.epochs, "requested_epochs": s.epochs},
    "lr": lambda s, r: {"optimizer": "SGD", "nesterov": True, "lr": s.lr},
    "t_0": lambda s, r: {"t_0": r.t_0},
    "name": lambda s, r: {"name": r.name, "run_dir": r.run_dir},
}


def settings_record(settings, resolved: Resolved, argv) -> dict:
    """The config record's first half: every recorded setting (in the table's order) as the run
    resolved it, the paper's estimate, the command line that started the run (`argv`) and the
    settings as parsed (what --resume compares a later command line with). The plan's half
    holds the planned settings."""
    record = {}
    for s in SETTINGS:
        if s.recorded and not s.planned:
            entries = RECORD_ENTRIES.get(s.dest)
            record.update(entries(settings, resolved) if entries else {s.dest: getattr(settings, s.dest)})
    return {**record, "paper_speedup": resolved.paper_speedup, "argv": list(argv),
            "args": dataclasses.asdict(settings)}


__all__ = ["Setting", "SETTINGS", "RunSettings", "Resolved", "RESULT", "RUNTIME", "flag", "add_settings",
           "check_settings", "given", "to_argv", "settings_from", "resolve", "settings_record", "continue_argv",
           "resumed_settings", "default_run_name", "setting_differences", "check_resume_flags",
           "default_name_labels", "name_settings_by_flags"]
