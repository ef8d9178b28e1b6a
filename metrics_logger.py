"""Append-only JSON-lines metrics (`MetricsLogger`, `read_records`, `write_records`) and
`write_atomically`, the one way this project replaces a file (metrics and checkpoints).

Every record is written with a single write of a whole line, flushed and fsynced, so an
interrupted run leaves at worst one torn last line; `read_records` skips it and a new
`MetricsLogger` on the same file cuts it off before appending.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterable


class WriteError(OSError):
    """A file could not be written (a full disk, a read-only file system, ...); the message
    names the file, the cause and what was kept, on one line."""


def _cause(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


class MetricsLogger:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_torn_tail(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise WriteError(f"cannot write {self.path}: {_cause(e)}") from None

    def log(self, event: str, **fields) -> dict:
        record = {"event": event, **fields}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            raise WriteError(f"cannot append the {event} record to {self.path}: {_cause(e)}; the records "
                             f"before it are kept") from None
        return record

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_torn_tail(path: Path) -> None:
    """Cut an unterminated last line (a write that was interrupted) so appends start clean."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def evaluation(record: dict, eval_mode: str | None = None) -> tuple[str, float | None, float] | None:
    """An epoch record's evaluation as (split, loss, error %), or None without one. The split
    is what the record's names say: val_* for the validation split, test_* for the test set
    under --validate-test. Records written before those names held the test set's under val_*:
    given the run's eval_mode, they are read as what they were."""
    for split in ("val", "test"):
        if record.get(f"{split}_err") is not None:
            split_read = "test" if split == "val" and eval_mode == "test" else split
            return split_read, record.get(f"{split}_loss"), record[f"{split}_err"]
    return None


def read_records(path: str | os.PathLike, event: str | None = None) -> list[dict]:
    """All records of a metrics file (only those of `event` if given).

    A last line that does not parse (a write cut short) is skipped; a bad line anywhere else
    means the file was damaged and raises ValueError naming the line.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON record") from None
    return [r for r in records if event is None or r.get("event") == event]


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Replace a metrics file with `records`, atomically (used when a resumed run drops the
    records of work it is about to redo)."""
    data = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    write_atomically(path, lambda f: f.write(data))


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write a file through `write(binary file)` so that a crash at any moment leaves either
    the old file or the new one, whole: a temporary file, fsync, rename, fsync the directory.
    A write that fails (WriteError) removes its temporary file and leaves the old file as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        kept = f"{path} is kept as it was" if path.exists() else f"no {path.name} was written"
        raise WriteError(f"cannot write {path}: {_cause(e)}; {kept}") from None
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
