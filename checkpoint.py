"""Checkpoints and run directories: everything a resumed run needs, written atomically and
read without running any pickled code.

- `save_checkpoint` / `load_checkpoint`: the format (state_dicts, epoch, step, position inside
  the epoch, every rank's RNG state, the config), `torch.load(weights_only=True)`.
- `restore`: a checkpoint back into model, optimizer, scheduler, scaler and RNGs.
- `open_run`, `prepare_run_dir`: a new run never overwrites an old one; resuming continues one
  (the settings it may not change are checked by the caller); a run that stopped before its
  first checkpoint (only its config record written) starts again from step 0.
- `save_first_checkpoint`: the step-0 checkpoint, written as soon as a run starts, so that
  every run can be continued at every moment; `describe_checkpoint` says which one exists.
- `run_state`, `run_progress`: where a run directory's run stands.
- `rng_state`, `set_rng_state`, `host_info`, `load_average`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import pickle
import platform
import random
import re
import socket
import subprocess
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from messages import RunError, plural, setting
from metrics_logger import file_system_cause, read_records, write_atomically

CHECKPOINT_FORMAT = "freezeout-checkpoint-v1"

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


def save_checkpoint(path: Path, training, config: dict, epoch: int, step: int, train_time: float,
                    position=None) -> None:
    """`epoch` epochs are complete; `position` says how far the next one got when a signal
    stopped it (None at an epoch's end). Every rank's RNG state is gathered (a collective);
    rank 0 writes, atomically."""
    rngs = training.dist.gather(rng_state())
    if training.dist.is_main:
        where = None if position is None else dataclasses.asdict(position)  # engine.EpochPosition
        state = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, "train_time_s": train_time,
                 "position": where, "config": config, "model": training.model.state_dict(),
                 "optimizer": training.optimizer.state_dict(),
                 "scheduler": training.scheduler.state_dict(), "scaler": training.scaler.state_dict(),
                 "rng": rngs}
        write_atomically(path, lambda f: torch.save(state, f))


def save_first_checkpoint(run_dir: Path, training, config: dict) -> None:
    """The step-0 checkpoint: no epoch done, nothing trained. Taken where the run's RNG stream
    stands when training is about to start, which is where `restore` puts a resumed run, so a
    run continued from it equals one that never stopped."""
    save_checkpoint(run_dir / "checkpoint.pt", training, config, 0, 0, 0.0, None)


def describe_checkpoint(run_dir: Path) -> str:
    """Which checkpoint the run directory holds, in words, for messages that must be true."""
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        return f"no checkpoint was written in {run_dir}"
    try:
        state = load_checkpoint(path)
    except RunError:
        return f"{path} is not a loadable checkpoint"
    epoch, step = state["epoch"], state["step"]
    if step == 0:
        return f"the checkpoint kept in {run_dir} is the one of step 0, before any training"
    where = f"after epoch {epoch} (step {step})" if state["position"] is None else \
        f"at step {step} in epoch {epoch + 1}"
    return f"the last good checkpoint, {where}, is kept in {run_dir}"


def load_checkpoint(path: Path) -> dict:
    """A checkpoint of this project, read without running any pickled code. A file that cannot
    be loaded is refused with one line that says what it is (cut short, damaged, not a
    checkpoint at all, or unsafe: it holds pickled code) and what to do."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever torch raises, the file is described
        raise RunError(f"{path} is not a loadable FreezeOut checkpoint: {unloadable(path, e)}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a FreezeOut checkpoint of this project")
    return state


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6: a zip archive
PICKLE_PROTOCOLS = range(2, 6)  # a pickle of protocol 2 or later (the older torch.save format) starts 0x80 <n>


def unloadable(path: Path, error: Exception) -> str:
    """What a file torch.load(weights_only=True) refused is, and what to do, for a message."""
    again = (f"the run cannot be continued from it: move {path.parent} aside (or delete it) and start it "
             f"again, or start it under another {setting('name')}")
    recopy = f"copy it again from where it came from if it is whole there; otherwise {again}"
    put_back = f"put the run's own {path.name} back if you have a copy; otherwise {again}"
    try:
        with open(path, "rb") as f:
            head = f.read(64)
        size = path.stat().st_size
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    called = unsafe_global(error)
    if called is not None:
        return (f"it is unsafe: it holds pickled code (it calls {called}), which a weights-only load refuses; "
                f"none of it was run; it was not written by this project: {put_back}")
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):  # the central directory, at the end, is missing
            return (f"it is cut short: {size:,} bytes of a zip archive (what torch.save writes) whose end is "
                    f"missing (a copy or download that did not finish?); {recopy}")
        if not torch_archive(path):
            return f"it is a zip archive, but not one torch.save wrote; something wrote over it: {put_back}"
        return (f"it is damaged: its zip archive is whole, but what it holds cannot be read (torch.load: "
                f"{one_line(error)}); {recopy}")
    if len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS:
        if isinstance(error, EOFError) or "EOF" in str(error) or "truncated" in str(error):
            return (f"it is cut short: {size:,} bytes of a pickle (what torch.save wrote before torch 1.6) "
                    f"whose end is missing (a copy or download that did not finish?); {recopy}")
        return f"it is damaged: a pickle that cannot be read (torch.load: {one_line(error)}); {recopy}"
    if size == 0:
        return f"it is empty (0 bytes), not a checkpoint at all; something wrote over it: {put_back}"
    text = as_text(head)
    if text is not None:
        return (f"it is not a checkpoint at all but text, beginning {text!r}; something wrote over it: "
                f"{put_back}")
    return (f"it is not a checkpoint at all (neither a zip archive, what torch.save writes, nor a pickle): "
            f"its first bytes are {head[:8].hex(' ')}; something wrote over it: {put_back}")


def unsafe_global(error: Exception) -> str | None:
    """The function or class a pickle asked for that torch's weights-only load refused
    ("posix.system"), or None: the refusal of pickled code, not of a damaged file (whose bytes
    torch also reads as a "global", but one that names nothing)."""
    if not isinstance(error, pickle.UnpicklingError):
        return None
    found = re.search(r"GLOBAL ([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)+) (?:was not|whose)", str(error))
    return found.group(1) if found else None


def torch_archive(path: Path) -> bool:
    """Whether a whole zip archive is one torch.save wrote (a folder holding data.pkl)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def as_text(head: bytes, limit: int = 40) -> str | None:
    """The first line of a file's beginning where it is text (UTF-8, printable), else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        try:  # a multi-byte character cut by the 64 bytes read
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not all(c.isprintable() or c in "\t\n\r" for c in text):
        return None
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= limit else line[:limit - 3] + "..."


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def one_line(error: BaseException) -> str:
    """The whole message of an error, on one line."""
    return " ".join(str(error).split()) or type(error).__name__


# Param-group options that say how this process's optimizer runs its step, not what it
# computes: a run started on a CPU (foreach SGD) may continue graphed on a GPU (fused SGD).
OPTIMIZER_RUNTIME = ("fused", "foreach", "capturable", "differentiable")


def restore(checkpoint: dict, training) -> None:
    training.model.load_state_dict(checkpoint["model"])
    # load_state_dict takes every group option from the checkpoint: keep this run's own.
    runtime = [{k: g[k] for k in OPTIMIZER_RUNTIME if k in g} for g in training.optimizer.param_groups]
    training.optimizer.load_state_dict(checkpoint["optimizer"])
    for group, options in zip(training.optimizer.param_groups, runtime, strict=True):
        group.update(options)
    training.scheduler.load_state_dict(checkpoint["scheduler"])  # after the optimizer: re-freezes
    training.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"][training.dist.rank])


def prepare_run_dir(run_dir: Path, out_dir: str, resume: bool) -> tuple[dict | None, dict | None]:
    """(the checkpoint to resume, the saved config): (None, None) for a new run, after checking
    that it would overwrite nothing and that its directory can be made; (None, the config
    record's settings) for a run to start again because it stopped before its first checkpoint."""
    ckpt_path = run_dir / "checkpoint.pt"
    if resume:
        if run_dir.is_dir():
            unwritable = cannot_write_in(run_dir)
            if unwritable is not None:
                raise RunError(unwritable)
        if ckpt_path.is_file():
            checkpoint = load_checkpoint(ckpt_path)
            return checkpoint, checkpoint["config"]
        saved = started_config(run_dir)
        if saved is not None:
            return None, saved
        orphaned = records_without_checkpoint(run_dir)
        if orphaned is not None:
            raise RunError(f"{setting('resume')}: {orphaned}")
        raise RunError(f"{setting('resume')}: no checkpoint in {run_dir} and no run started there; "
                       f"start it without {setting('resume')}")
    if not ckpt_path.exists() and started_config(run_dir) is None:
        orphaned = records_without_checkpoint(run_dir)
        if orphaned is not None:  # neither a resume nor a new run can use it: one way out
            raise RunError(orphaned)
    if ckpt_path.exists() or holds_records(run_dir / "metrics.jsonl"):
        raise RunError(f"{run_dir} already holds a run: continue it with {setting('resume')}, "
                       f"or start a new one with {setting('name')} NAME")
    # The directory itself is made once the data has loaded: a failed start leaves nothing.
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"{setting('out_dir')} {out_dir}: cannot create {run_dir} "
                       f"({existing} is not a writable directory)")
    return None, None


def cannot_write_in(run_dir: Path, path: Path | None = None, error: OSError | None = None) -> str | None:
    """The one line for a run directory a run cannot write in (a read-only file system, no
    permission), naming `path` (the file that could not be written; the directory itself if
    None) and the cause (`error`'s, else what the file system says); None for any other cause
    (a full disk is reported by the write that runs out of room) or none."""
    if error is not None:
        code = error.errno
    else:
        cause = file_system_cause(run_dir)
        code = next((c for c in (errno.EROFS, errno.EACCES) if cause == os.strerror(c)), None)
    if code not in (errno.EROFS, errno.EACCES, errno.EPERM):  # a full disk: the writes report it
        return None
    cause = os.strerror(code)
    where = "is on a read-only file system" if code == errno.EROFS else "is not writable"
    return (f"cannot write {path or run_dir}: {cause} ({run_dir} {where}: a run writes its checkpoint and "
            f"records there; nothing was changed): make it writable, or copy {run_dir} into a writable "
            f"directory DIR and use {setting('out_dir')} DIR")


def holds_records(metrics: Path) -> bool:
    """Whether a metrics file holds any record (a file cut before its first line holds none);
    a damaged one counts as holding records: it is not ours to overwrite."""
    if not metrics.exists():
        return False
    try:
        return bool(read_records(metrics))
    except (ValueError, UnicodeDecodeError):
        return True


def records_without_checkpoint(run_dir: Path) -> str | None:
    """What is wrong with a run directory that holds records of work done (epochs, a summary,
    or a metrics file that cannot be read) but no checkpoint.pt, with the one way out: the run
    cannot be continued, and a new run there would mix its records with them. None for any
    other directory (a checkpoint, nothing, or only the config record of a run that stopped
    before its first checkpoint: resuming starts that one again)."""
    metrics = run_dir / "metrics.jsonl"
    if (run_dir / "checkpoint.pt").exists() or not holds_records(metrics) or started_config(run_dir) is not None:
        return None
    try:
        records = read_records(metrics)
    except (ValueError, UnicodeDecodeError):
        held = f"a {metrics.name} that cannot be read"
    else:
        epochs = plural(sum(r.get("event") == "epoch" for r in records), "epoch")
        finished = any(r.get("event") == "summary" for r in records)
        held = f"the records of a finished run ({epochs})" if finished else f"records of {epochs}"
    return (f"{run_dir} holds {held} but no checkpoint.pt (removed?): the run cannot be continued; move "
            f"{run_dir} aside (or delete it) and start it again, or start it under another {setting('name')}")


# Fields of the config record that are not settings: the run recomputes them when it starts.
RECORD_ONLY = ("event", "host")


def started_config(run_dir: Path) -> dict | None:
    """The settings of a run that wrote its config record and stopped before its first
    checkpoint (killed, or lost power, in its first moments); None when the directory holds
    no such run: nothing, or records of work done (whose checkpoint was removed)."""
    metrics = run_dir / "metrics.jsonl"
    try:
        records = read_records(metrics) if metrics.is_file() else []
    except (ValueError, UnicodeDecodeError):
        return None
    if [r.get("event") for r in records] != ["config"]:
        return None
    return {k: v for k, v in records[0].items() if k not in RECORD_ONLY}


def saved_config(run_dir: Path) -> dict | None:
    """The config a run directory's run was started with (its first record), or None."""
    metrics = run_dir / "metrics.jsonl"
    try:
        configs = read_records(metrics, "config") if metrics.is_file() else []
    except (ValueError, UnicodeDecodeError):
        return None
    return configs[0] if configs else None


def run_state(run_dir: Path) -> str:
    """"finished" (a summary record), "interrupted" (a checkpoint, no summary) or "new"."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and read_records(metrics, "summary"):
        return "finished"
    if (run_dir / "checkpoint.pt").exists():
        return "interrupted"
    return "new"


def run_progress(run_dir: Path, epochs: int) -> str:
    """A run's state in words, for reports: finished, not started, or how far it got."""
    metrics = run_dir / "metrics.jsonl"
    records = read_records(metrics) if metrics.exists() else []
    if any(r["event"] == "summary" for r in records):
        return "finished"
    if not records and not (run_dir / "checkpoint.pt").exists():
        return "not started"
    done = sum(r["event"] == "epoch" for r in records)
    return f"interrupted ({done} of {plural(epochs, 'epoch')} done)"


def load_average() -> float | None:
    """The host's 1-minute load average (None where the OS has none): a busy host makes a
    run's times, and the speedups measured from them, unreliable."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def host_info(device: torch.device) -> dict:
    """What ran the job: CPU model and threads, GPU name, the code's git commit."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu": cpu, "cpu_threads": torch.get_num_threads(), "gpu": gpu, "git_commit": commit,
            "torch": str(torch.__version__), "python": platform.python_version()}


@dataclass
class OpenedRun:
    """What rank 0 found in the run directory, sent to every rank."""
    saved: dict | None = None      # the config record of the run to continue (or to start again)
    checkpoint: dict | None = None
    finished: dict | None = None   # the summary of a run that has already finished
    error: str | None = None
    # What the error is: "setting" (a setting contradicts the saved run), "busy" (another
    # process owns the directory) or "run" (the directory or checkpoint cannot be used).
    error_kind: str | None = None
    notice: str | None = None      # a line to print: the run starts again from step 0


class RunBusy(RunError):
    """Another process owns the run directory."""


class RunLock:
    """One owner per run directory: an exclusive OS file lock (flock) on its `.lock`, taken
    before the run's first write and held until the process exits. The OS releases it when the
    process dies, `kill -9` included, so a lock is never stale. The file holds the owner's pid
    and host, for the message another process gets."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path = run_dir, run_dir / ".lock"
        self.file, self.made = None, []  # the directories acquire() made, innermost first

    @property
    def held(self) -> bool:
        return self.file is not None

    def acquire(self) -> None:
        """Lock the directory (made if need be), or raise RunBusy naming the owner."""
        self.made = [d for d in [self.run_dir, *self.run_dir.parents] if not d.exists()]
        existed = self.run_dir.is_dir()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+", encoding="utf-8")  # never truncates an owner's file
        except OSError as e:
            if existed:  # a run to resume on a read-only file system, a directory not ours
                raise RunError(cannot_write_in(self.run_dir, self.path, e)
                               or f"cannot write {self.path} ({e.strerror or e})") from None
            raise RunError(f"cannot create {self.run_dir} ({e.strerror or e})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().split() or ["?", "?"]
            f.close()
            raise RunBusy(f"{self.run_dir} is in use by another run (pid {owner[0]} on {owner[-1]}); "
                          f"wait for it to end, or give this one another {setting('name')}") from None
        except OSError as e:  # a file system without locks (some network mounts)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(f"{self.run_dir}: this file system has no file locks, so nothing stops a second "
                          f"run from using the same directory", stacklevel=2)
        self.file = f
        try:  # straight to the file, unbuffered: a write that fails leaves nothing to flush at close
            os.ftruncate(f.fileno(), 0)
            os.write(f.fileno(), f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError as e:  # a full disk
            self.release()
            raise RunError(f"cannot write {self.path}: {e.strerror or e}") from None

    def release(self) -> None:
        """Give the directory up; one that holds nothing but the lock (a start that failed
        before writing anything) is removed, as if never made."""
        if self.file is None:
            return
        with contextlib.suppress(OSError):
            if [p.name for p in self.run_dir.iterdir()] == [self.path.name]:
                self.path.unlink()
                for directory in self.made:
                    directory.rmdir()
        self.file.close()
        self.file = None


def open_run(run_dir: Path, out_dir: str, dist, resume: bool, check_flags: Callable[[dict], None],
             lock: RunLock | None = None) -> OpenedRun:
    """On rank 0: check the run directory; when resuming load the checkpoint and check the
    settings against its config record (`check_flags(saved record)` raises ValueError): the
    record the run continues from. A run that stopped before its first checkpoint has only its
    config record: it starts again from step 0. `lock`, taken first, makes this process the run
    directory's one owner. Every rank gets the outcome (`dist`: a distributed.Distributed)."""
    if not dist.is_main:
        return dist.broadcast(None)
    try:
        # Who owns the directory comes first, then what it holds; a directory not there yet is
        # made and locked once the checks pass (of two runs started at once, one gets it).
        if lock is not None and run_dir.exists():
            lock.acquire()
        checkpoint, saved = prepare_run_dir(run_dir, out_dir, resume)
        if lock is not None and not lock.held:
            lock.acquire()
        opened = OpenedRun(saved, checkpoint)
        if saved is not None:
            check_flags(saved)
        if checkpoint is not None:
            saved_world = saved.get("world_size", 1)
            if saved_world != dist.world_size:
                raise RunError(f"{setting('resume')}: the run was trained by {saved_world} process(es); "
                               f"resume it with the same number (this is {dist.world_size})")
            summaries = read_records(run_dir / "metrics.jsonl", "summary")
            opened.finished = summaries[-1] if summaries else None
        elif saved is not None:  # nothing was trained: the world size may change
            opened.notice = (f"no checkpoint in {run_dir}: the run stopped before its first one; "
                             f"starting it again from step 0")
    except ValueError as e:  # a flag that contradicts the saved run
        opened = OpenedRun(error=str(e), error_kind="setting")
    except RunBusy as e:
        opened = OpenedRun(error=str(e), error_kind="busy")
    except RunError as e:
        opened = OpenedRun(error=str(e), error_kind="run")
    return dist.broadcast(opened)
