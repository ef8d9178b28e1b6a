"""What the scripts' command lines share: the parser (its help format, and its errors on one line
with the settings in them named by their flags), both spellings of every flag, the checks of
numeric values, the exit statuses, and how a script's main runs.

    parser = cli.ArgumentParser(description=..., epilog=cli.examples(__doc__))
    parser.error(str(error))       # "train.py: error: --data-root ./x is not a directory", exit 2
"""
from __future__ import annotations

import argparse
import gc
import math
import signal
import sys
from typing import Any, Callable

import freezeout
from messages import EXIT_FAILED, EXIT_USAGE, render

__all__ = ["EXIT_FAILED", "EXIT_USAGE"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
MAX_SEED = 2 ** 64 - 1  # torch.manual_seed takes 0 <= seed < 2**64


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: ...)" to a flag's help unless the help already says what happens
    when the flag is not given, or the flag is a switch (its help says what it turns on);
    the description and the examples keep their lines."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.nargs == 0:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose messages name settings by their flags: `flag_of(name)` renders the
    setting markers of messages.setting (a script passes its own, config.flag)."""

    def __init__(self, *args, flag_of: Callable[[str], str] = str, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.flag_of = flag_of

    def error(self, message: str):
        super().error(render(message, self.flag_of))

    def say(self, message: str, error: bool = True) -> None:
        """One line on stderr, as the script's own: "train.py: error: ..."."""
        print(f"{self.prog}: {'error: ' if error else ''}{render(message, self.flag_of)}", file=sys.stderr)


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


# -- checks of values, each raising ValueError that names the flag (None: not given) ----------
def check_positive(flags: dict) -> None:
    """The first flag ({"--epochs": value, ...}) whose integer value is not positive."""
    for flag, value in flags.items():
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be a positive integer, got {value}")


def positive(flag: str, value) -> None:
    check_positive({flag: value})


def at_least_zero(flag: str, value) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{flag} must be >= 0, got {value}")


def in_range(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """A check that low <= value <= high (ends open as asked); NaN and infinities never pass."""
    def check(flag: str, value) -> None:
        if value is None:
            return
        ok = math.isfinite(value) and (value > low if low_open else value >= low) \
            and (value < high if high_open else value <= high)
        if not ok:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise ValueError(f"{flag} must be in {interval}, got {value}")
    return check


def finite_at_least(low: float, strict: bool = False):
    """A check that value >= low (> low when strict) and finite: a learning rate of inf or NaN
    is as unusable as a negative one."""
    def check(flag: str, value) -> None:
        if value is not None and not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise ValueError(f"{flag} must be a finite number {'>' if strict else '>='} {low:g}, got {value}")
    return check


def check_t_0(flag: str, value: float) -> None:
    """FreezeOut's own t_0 check, its message naming the flag as the user spelled it."""
    try:
        freezeout.check_t_0(value)
    except ValueError:
        raise ValueError(f"{flag} must be in (0, 1], got {value}") from None


def check_seed(flag: str, value: int) -> None:
    if value is not None and not 0 <= value <= MAX_SEED:
        raise ValueError(f"{flag} must be an integer in [0, 2**64 - 1], got {value}")


# -- exit statuses: 2 for what the command line asks that cannot be (argparse's own), 1 for a run
# that failed, 128 + the signal for a run that a signal stopped with a checkpoint --------------
def stop_status(signum: int) -> int:
    return 128 + signum


def is_stop_status(code) -> bool:
    """Whether an exit status is that of a run stopped by SIGINT or SIGTERM with a checkpoint."""
    return code in {stop_status(s) for s in STOP_SIGNALS}


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
