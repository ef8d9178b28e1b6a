"""What the scripts and the machinery report to a user: the errors shown as one line, and how a
message names a setting.

- `RunError`, `DataError`: a run's files or progress, or a data set, that stop a run with one
  line. Each carries its message, the setting it is about (if one) and the exit status it
  ends a script with; it crosses to every torchrun rank as an object.
- `setting(name)`: a setting inside a message, as a marker: the machinery knows settings by
  their names (data_root, batch_size); whoever prints the message renders each marker, a
  script as its flag (`render(text, config.flag)`), anyone else as the name.
- `plural`: a count and its word.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

EXIT_USAGE, EXIT_FAILED = 2, 1  # what the command line asks that cannot be; a run that failed

_MARKER = re.compile(r"\u27e8([A-Za-z_][A-Za-z0-9_]*)\u27e9")


def setting(name: str) -> str:
    """A setting inside a message: a marker that `render` turns into its flag or its name."""
    return f"\u27e8{name}\u27e9"


def render(text: str, name_of: Callable[[str], str] = str) -> str:
    """`text` with every setting marker named by `name_of` (by default, the setting's name)."""
    return _MARKER.sub(lambda m: name_of(m.group(1)), text)


class Reported(Exception):
    """An error reported as one line: its message (settings in it marked), the setting it is
    about, and the exit status it ends a script with."""

    def __init__(self, message: str, setting: Optional[str] = None, status: int = EXIT_FAILED):
        super().__init__(message)
        self.message, self.setting, self.status = message, setting, status

    def __str__(self) -> str:
        return render(self.message)

    def render(self, name_of: Callable[[str], str]) -> str:
        return render(self.message, name_of)

    def __reduce__(self):  # pickled whole, to cross to the other ranks
        return type(self), (self.message, self.setting, self.status)


class DataError(Reported):
    """A data set that cannot be found, read or verified (the message says which and how)."""


class RunError(Reported):
    """A problem with the run's files or its progress (divergence), reported as one line."""


def plural(n: int, word: str, words: str | None = None) -> str:
    """`n` and the word in its number, for messages: "1 epoch", "2 epochs", "0 epochs"."""
    return f"{n:,} {word if n == 1 else words or word + 's'}"
