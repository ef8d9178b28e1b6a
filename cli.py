"""What the scripts' command lines share: the choice lists, both spellings of every flag, the
help format, the checks of numeric values (one line naming the flag), and the note that names
flags the chosen model has no use for."""
from __future__ import annotations

import argparse
import math

import freezeout
from freezeout import SCALE_POWERS
from models import REGISTRY
from utils import DATASETS  # noqa: F401  (re-exported: the choice list of --dataset)

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
