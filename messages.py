"""What the scripts and the machinery report to a user: the errors shown as one line, and how a
message names a setting.

- `DataError`, `RunError`: a data set, or a run's files or progress, that stop a run with one line.
- `setting(name)`: a setting as messages name it. The machinery knows settings by their names
  (data_root, batch_size) and messages read those names, unless a command line calls
  `name_settings` with its own spelling (spec.py's flags), as the scripts do first thing
  in their `main`.
- `plural`: a count and its word.
"""
from __future__ import annotations


class DataError(Exception):
    """A data set that cannot be found, read or verified (the message says which and how)."""


class RunError(Exception):
    """A problem with the run's files or its progress (divergence), reported as one line."""


# How messages name a setting: its name, until a command line installs its spelling.
_setting_name = str


def setting(name: str) -> str:
    """A setting as messages name it."""
    return _setting_name(name)


def name_settings(namer) -> None:
    """Make messages name each setting as `namer(name)` says (spec.flag: its flag)."""
    global _setting_name
    _setting_name = namer


def plural(n: int, word: str, words: str | None = None) -> str:
    """`n` and the word in its number, for messages: "1 epoch", "2 epochs", "0 epochs"."""
    return f"{n:,} {word if n == 1 else words or word + 's'}"
