"""Append-only JSON-lines metrics (`MetricsLogger`, `read_records`, `write_records`) and
`write_atomically`, the one way this project replaces a file (metrics, checkpoints, figures).

Every record is written with a single write of a whole line, flushed and fsynced, so an
interrupted run leaves at worst one torn last line; `read_records` skips it and a new
`MetricsLogger` on the same file cuts it off before appending. A write that fails for want of
space or permission raises `WriteError`, one line naming the file and the cause, whatever
raised it underneath (torch's zip writer raises RuntimeError, not OSError: `io_cause`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from pathlib import Path
from typing import BinaryIO, Callable, Iterable


class WriteError(OSError):
    """A file could not be written (a full disk, a read-only file system, ...); the message
    names the file, the cause and what was kept, on one line."""


def _cause(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


# What torch's zip writer (caffe2/serialize/inline_container.cc) raises when a write fails:
# "[enforce fail at inline_container.cc:672] . unexpected pos 247680 vs 247576", "file write
# failed", "PytorchStreamWriter failed writing file ...", as RuntimeError.
TORCH_WRITER_FAILED = re.compile(r"inline_container|PytorchStreamWriter|unexpected pos|file write failed")
# Less free space than this, where a write failed without saying why, is taken for a full disk.
LOW_SPACE_BYTES = 1 << 20


def io_cause(error: BaseException, directory: str | os.PathLike) -> str | None:
    """Why a write into `directory` failed, in words ("No space left on device", "Read-only file
    system", ...), or None when `error` is no I/O failure (a programming error: re-raise it).

    An OSError says it. torch's zip writer raises RuntimeError instead, chained (as cause or
    context) to the OSError of the file's write where there was one; where there was none the
    file system is asked (read-only, nearly full, not writable), and failing that torch's own
    message is the cause. Call it before removing what the failed write left: that space counts."""
    if isinstance(error, OSError):
        return _cause(error)
    if not (isinstance(error, RuntimeError) and TORCH_WRITER_FAILED.search(str(error))):
        return None
    seen, chain = set(), [error]
    while chain:
        e = chain.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return _cause(e)
        chain += [e.__cause__, e.__context__]
    return file_system_cause(directory) or f"torch's writer failed ({' '.join(str(error).split())})"


def file_system_cause(directory: str | os.PathLike) -> str | None:
    """What keeps a write in `directory` from succeeding, as the file system tells it (read-only,
    less than LOW_SPACE_BYTES free, not writable), or None."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    # root may use the blocks reserved for it: its disk is full only when none is free
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if (stat.f_bfree if root else stat.f_bavail) * stat.f_frsize < LOW_SPACE_BYTES:
        return os.strerror(errno.ENOSPC)
    if not os.access(directory, os.W_OK | os.X_OK):
        return os.strerror(errno.EACCES)
    return None


class MetricsLogger:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_torn_tail(self.path)
            # Unbuffered: a write that fails leaves nothing behind for close() to try again.
            self._file = open(self.path, "ab", buffering=0)
        except OSError as e:
            raise WriteError(f"cannot write {self.path}: {_cause(e)}") from None

    def log(self, event: str, **fields) -> dict:
        """Append one record as a whole line; one that cannot be written whole (a full disk)
        is cut off again, so the file ends with the records before it."""
        record = {"event": event, **fields}
        data = (json.dumps(record) + "\n").encode("utf-8")
        fd, start = self._file.fileno(), None
        try:
            start = os.fstat(fd).st_size
            written = 0
            while written < len(data):  # a raw write may write less than asked
                n = self._file.write(data[written:])
                if not n:
                    raise OSError(errno.EIO, "the write wrote nothing")
                written += n
            os.fsync(fd)
        except OSError as e:
            if start is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
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


class NoRecords:
    """Stands in for the metrics file on the ranks that do not write it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def log(self, event: str, **fields) -> dict:
        return {"event": event, **fields}


def holds_records(metrics: Path) -> bool:
    """Whether a metrics file holds any record (a file cut before its first line holds none);
    a damaged one counts as holding records: it is not ours to overwrite."""
    if not metrics.exists():
        return False
    try:
        return bool(read_records(metrics))
    except (ValueError, UnicodeDecodeError):
        return True


def read_lines(path: str | os.PathLike) -> tuple[list[dict], list[tuple[int, str]]]:
    """(every record of a metrics file, every other line with its number): lines that hold no
    whole record (a write cut short, damage from outside), wherever they are."""
    records, damaged = [], []
    for number, line in enumerate(Path(path).read_bytes().decode("utf-8", "replace").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                damaged.append((number, line))
    return records, damaged


def keep_aside(path: str | os.PathLike, lines: list[str]) -> Path:
    """Write `lines` of a metrics file to a file beside it, PATH.damaged-N (the first N free)."""
    path = Path(path)
    aside = next(p for n in range(1, 10_000) if not (p := path.with_name(f"{path.name}.damaged-{n}")).exists())
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    write_atomically(aside, lambda f: f.write(data))
    return aside


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
    A write that fails removes its temporary file and leaves the old file as it was: for want of
    space or permission (an OSError, or torch's writer's RuntimeError: `io_cause`) it raises
    WriteError, one line naming the file and the cause; any other error is raised as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        cause = io_cause(e, path.parent)  # before the temporary file's space is freed
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if cause is None:  # not an I/O failure: a bug, shown as it is
            raise
        kept = f"{path} is kept as it was" if path.exists() else f"no {path.name} was written"
        raise WriteError(f"cannot write {path}: {cause}; {kept}") from None
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a directory that cannot be synced
            raise WriteError(f"cannot write {path}: {_cause(e)} (syncing its directory after the rename); "
                             f"the new {path.name} is in place but may not survive a power cut") from None
