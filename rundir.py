"""The run directory `OUT_DIR/NAME/`: who owns it, what it holds, and how a run starts, continues
and ends there.

- `RunLock`: one owner per directory, an OS file lock the OS releases when the process dies.
- `RunDir.open`: a new run (never over an old one), a resumed one (its saved settings, those
  --resume may not change checked), a finished one, a busy one (another process owns it), one
  whose files cannot be used; rank 0 decides, every rank gets the outcome, a failure as one
  `RunError` (its message, its setting, its exit status). A run that stopped before its first
  checkpoint (only its config record written) starts again from step 0.
- `RunDir.start` writes the config record and the step-0 checkpoint; `resume` restores the
  checkpoint and keeps the records of its epochs; `save`, `records`: checkpoints and records.
- `RunDir.failures`, `continue_command`: the one line for what ended a run early, with the
  command that continues it where it can be.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import re
import shlex
import signal
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import checkpoint
from checkpoint import describe_checkpoint, load_checkpoint, restore
from cli import stop_status
from config import RESULT_KEYS, Config, continue_argv, record, refuse_changes, resumed
from engine import Diverged, EpochPosition, RunProgress, Stopped
from messages import EXIT_FAILED, EXIT_USAGE, Reported, RunError, plural, setting
from metrics_logger import (
    MetricsLogger,
    NoRecords,
    WriteError,
    evaluation,
    file_system_cause,
    holds_records,
    keep_aside,
    read_lines,
    read_records,
    write_records,
)
from plan import host_info


@dataclass
class Opened:
    """What rank 0 found in the run directory, sent to every rank."""
    cfg: Optional[Config] = None        # the settings the run goes on with (a resumed run's: its own)
    argv: Optional[list] = None         # the command line that started it
    checkpoint: Optional[dict] = None   # the checkpoint to continue from
    saved: Optional[dict] = None        # the config record of the run continued from its checkpoint
    finished: Optional[dict] = None     # the summary of a run that has already finished
    notice: Optional[str] = None        # a line to print: the run starts again from step 0
    error: Optional[RunError] = None


class RunDir:
    """The run directory of one run, as this process sees it; rank 0 owns it (its lock) inside `with`."""

    def __init__(self, cfg: Config, dist):
        self.path, self.dist = Path(cfg.run_dir), dist
        self.lock = RunLock(self.path) if dist.is_main else None
        self.cfg = cfg                         # the settings the run goes on with, once opened
        self.per_epoch: Optional[int] = None   # its steps an epoch, once built

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()

    # -- opening -------------------------------------------------------------------------
    def open(self, cfg: Config, typed: set, argv: list) -> Opened:
        """Rank 0 takes the directory, checks what it holds and, resuming, loads the checkpoint and
        settles the settings the run goes on with; every rank gets the outcome (or its RunError)."""
        if not self.dist.is_main:
            opened = self.dist.broadcast(None)
        else:
            try:
                opened = self._open(cfg, typed, argv)
            except RunError as e:
                opened = Opened(error=e)
            opened = self.dist.broadcast(opened)
        if opened.error is not None:
            raise opened.error
        return opened

    def _open(self, cfg: Config, typed: set, argv: list) -> Opened:
        # Who owns the directory comes first, then what it holds; a directory not there yet is
        # made and locked once the checks pass (of two runs started at once, one gets it).
        if self.path.exists():
            self.lock.acquire()
        state, saved = examine(self.path, cfg.resume, cfg.out_dir)
        if not self.lock.held:
            self.lock.acquire()
        if saved is None:
            return Opened(cfg, argv)
        try:
            refuse_changes(saved["args"], cfg, typed)
        except ValueError as e:  # a setting typed that contradicts the saved run: the command line's
            raise RunError(str(e), setting="resume", status=EXIT_USAGE) from None
        try:
            opened = Opened(resumed(saved, cfg), saved["argv"], state)
        except ValueError as e:  # what the saved settings resolve to has changed: the code's
            raise RunError(str(e)) from None
        if state is None:  # nothing was trained: the world size may change
            opened.notice = f"no checkpoint in {self.path}: the run stopped before its first one; starting it again " \
                            "from step 0"
            return opened
        saved_world = saved.get("world_size", 1)
        if saved_world != self.dist.world_size:
            raise RunError(f"{setting('resume')}: the run was trained by {saved_world} process(es); resume it with "
                           f"the same number (this is {self.dist.world_size})")
        summaries = read_records(self.path / "metrics.jsonl", "summary")
        opened.saved, opened.finished = saved, summaries[-1] if summaries else None
        return opened

    # -- a run's life --------------------------------------------------------------------
    @staticmethod
    def config_record(cfg: Config, argv: list, plan) -> dict:
        """The config record: the settings' half (config.record) beside the plan's."""
        return {**record(cfg, argv), **dataclasses.asdict(plan)}

    def begin(self, opened: Opened, record: dict, training) -> RunProgress:
        """Start the run (a new one, or one started again from step 0) or resume it from its
        checkpoint; returns how far it had got."""
        if opened.checkpoint is None:
            self.start(record, training)
            return RunProgress()
        return self.resume(opened.checkpoint, training)

    def start(self, record: dict, training) -> None:
        """Make the directory, write the config record first, then the step-0 checkpoint: from
        then on the run can be continued with --resume whatever stops it."""
        if self.dist.is_main:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RunError(f"{setting('out_dir')} {record['out_dir']}: cannot create {self.path} "
                               f"({e.strerror or e})") from None
            # Replaces the file: a run started again (it stopped before its first checkpoint)
            # keeps none of the records of its first start.
            write_records(self.path / "metrics.jsonl",
                          [{"event": "config", **record, "host": host_info(training.device)}])
        # The step-0 checkpoint (every rank: it gathers their RNG states), taken where the run's RNG
        # stream stands when training is about to start, which is where `restore` puts a resumed
        # run: a run continued from it equals one that never stopped.
        self.save(training, record, 0, 0, 0.0)

    def resume(self, state: dict, training) -> RunProgress:
        """Restore every state of a checkpoint; drop the epoch records of work about to be redone.
        Returns how far the run had got."""
        restore(state, training)
        done = state["epoch"]
        position = EpochPosition(done + 1)
        if state["position"] is not None:
            try:
                position = EpochPosition(**state["position"])
            except TypeError:
                raise RunError(f"{self.path}/checkpoint.pt holds an epoch position of another format "
                               f"({sorted(state['position'])}); it cannot be continued by this version") from None
        if self.dist.is_main:
            metrics = self.path / "metrics.jsonl"
            kept, notes = records_to_keep(metrics, state)
            write_records(metrics, kept)
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
            print(f"resuming {self.path} in epoch {position.epoch} at batch {position.batch}")
        return RunProgress(done, state["train_time_s"], position)

    def save(self, training, record: dict, epoch: int, step: int, train_time: float, position=None) -> None:
        checkpoint.save_checkpoint(self.path / "checkpoint.pt", training, record, epoch, step, train_time, position)

    def records(self):
        """The metrics file to append records to: on rank 0; elsewhere a stand-in."""
        return MetricsLogger(self.path / "metrics.jsonl") if self.dist.is_main else NoRecords()

    def val_err(self, last_eval: tuple) -> Optional[float]:
        """The last epoch's validation error (None unless --validate): its evaluation, or that
        epoch's record in a run resumed after its last epoch (its summary was not written)."""
        if self.cfg.eval_mode != "val" or last_eval[1] is not None or not self.dist.is_main:
            return last_eval[1] if self.cfg.eval_mode == "val" else None
        recorded = read_records(self.path / "metrics.jsonl", "epoch")
        evaluated = evaluation(recorded[-1], "val") if recorded else None
        return evaluated[2] if evaluated is not None else None

    @staticmethod
    def error(message: str) -> RunError:
        return RunError(message)

    def stopped(self, signum: int, where: str) -> Stopped:
        return Stopped(signum, f"stopped by {signal.Signals(signum).name} {where}; checkpoint written "
                               f"(run directory {self.path})")

    # -- the last line -------------------------------------------------------------------
    @contextlib.contextmanager
    def failures(self, parser, hint: bool = True):
        """What ends the run early, as one line on stderr (rank 0's, the settings in it named by
        the parser's flags) and an exit status: the run's own errors (1, or 2 for what the command
        line asks that cannot be, after the usage line where a setting contradicts the saved run),
        a stop signal (128 + the signal, with the command that continues the run where `hint`), a
        torchrun collective that timed out (naming the rank that stopped answering)."""
        try:
            yield
        except (Reported, WriteError, Stopped, KeyboardInterrupt) as e:
            if self.dist.is_main:  # a stop by signal is not an error: the run did what it was asked
                command = self.continue_command(self.cfg) if hint else None
                if isinstance(e, RunError) and e.status == EXIT_USAGE and e.setting is not None:
                    parser.print_usage(sys.stderr)
                parser.say(self.failure(e, self.per_epoch, command), error=not isinstance(e, Stopped))
            if isinstance(e, (Stopped, KeyboardInterrupt)):
                raise SystemExit(stop_status(e.signum if isinstance(e, Stopped) else signal.SIGINT)) from None
            raise SystemExit(e.status if isinstance(e, Reported) else EXIT_FAILED) from None
        except RuntimeError as e:
            if not (self.dist.enabled and re.search(r"time[sd]? ?out", str(e), re.IGNORECASE)):
                raise
            # Who stopped answering, as far as this rank can tell: a rank silent for the whole timeout
            # that does not reach a barrier in as long again (10 s at most) is not coming back.
            minutes = self.cfg.dist_timeout
            silent = self.dist.unanswered(seconds=min(10.0, 60 * minutes))
            if self.dist.is_main or silent == [0]:
                parser.say(self.no_answer(silent, minutes, self.continue_command(self.cfg) if hint else None))
            raise SystemExit(EXIT_FAILED) from None

    def continue_command(self, cfg: Config) -> str:
        """The command that continues this run (config.continue_argv, under torchrun's launcher
        where several processes run it)."""
        world = self.dist.world_size
        launcher = ["python", "train.py"] if world == 1 else ["torchrun", f"--nproc_per_node={world}", "train.py"]
        return " ".join(shlex.quote(w) for w in launcher + continue_argv(cfg))

    def failure(self, error: BaseException, per_epoch: Optional[int], hint: Optional[str]) -> str:
        """The one line for what ended a run early, true about what the directory holds
        (`per_epoch`: the run's steps per epoch, once it is built; `hint`: the continue command)."""
        run_dir, then = self.path, f"; continue with: {hint}" if hint else ""
        if isinstance(error, Diverged):
            again = (f"; {hint} continues from it, and the same settings diverge again at the same step: a new "
                     f"run (another {setting('name')}) with a smaller {setting('lr')} may not" if hint else "")
            return (f"{error} (epoch {error.step // per_epoch + 1}, batch {error.step % per_epoch}); "
                    f"{describe_checkpoint(run_dir)}{again}")
        if isinstance(error, Stopped):
            return f"{error}{then}"
        if isinstance(error, WriteError):
            # A run whose step-0 checkpoint could not be written is continued from its config record.
            resumable = hint and ((run_dir / "checkpoint.pt").exists() or started_config(run_dir) is not None)
            return f"{error}" + (f"; once that is fixed, continue with: {hint}" if resumable else "")
        if isinstance(error, KeyboardInterrupt):
            if (run_dir / "checkpoint.pt").exists() or (run_dir / "metrics.jsonl").exists():
                return f"interrupted (run directory {run_dir}){then}"
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # made just before the interrupt, still empty: as if never started
            return "interrupted before the run started; nothing was written"
        return error.message if isinstance(error, Reported) else str(error)

    def no_answer(self, silent: list, minutes: float, hint: Optional[str]) -> str:
        """The one line for a torchrun job ended by a collective that timed out."""
        who = (f"rank {', '.join(map(str, silent))} stopped answering (stuck, stopped or dead)" if silent
               else "every rank answers again: the network or a slow rank held one up")
        kept = f"; continue with: {hint}" if hint and (self.path / "checkpoint.pt").exists() else ""
        return (f"rank {self.dist.rank} waited {minutes:g} min ({setting('dist_timeout')}) at a collective: {who}; "
                f"the job ends, its last checkpoint kept{kept}")


# -- what a directory holds ----------------------------------------------------------------------
def examine(run_dir: Path, resume: bool, out_dir: str) -> tuple[Optional[dict], Optional[dict]]:
    """(the checkpoint to resume, the saved config): (None, None) for a new run, after checking
    that it would overwrite nothing and that its directory can be made; (None, the config
    record) for a run to start again because it stopped before its first checkpoint."""
    ckpt_path = run_dir / "checkpoint.pt"
    if resume:
        if run_dir.is_dir():
            unwritable = cannot_write_in(run_dir)
            if unwritable is not None:
                raise RunError(unwritable)
        if ckpt_path.is_file():
            state = load_checkpoint(ckpt_path)
            swapped = another_runs(run_dir, state["config"])
            if swapped is not None:
                raise RunError(swapped)
            return state, state["config"]
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


def records_to_keep(metrics: Path, state: dict) -> tuple[list[dict], list[str]]:
    """(the records a run resumed from the checkpoint `state` keeps: its config record and those
    of the epochs the checkpoint holds; what was damaged, in words). A line that is no record (a
    write cut short, damage from outside) is never dropped without a word: it is kept aside in
    metrics.jsonl.damaged-N; a lost record of the checkpoint's own epoch is rebuilt from it."""
    records, damaged = read_lines(metrics)
    done, notes = state["epoch"], []
    kept = [r for r in records if r.get("event") == "config" or (r.get("event") == "epoch" and r["epoch"] <= done)]
    if damaged:
        aside = keep_aside(metrics, [line for _, line in damaged])
        lines = ", ".join(str(n) for n, _ in damaged)
        notes.append(f"{metrics}: {plural(len(damaged), 'line')} ({lines}) held no whole record (a write cut short, "
                     f"or damage from outside): kept aside in {aside.name}")
    have = {r["epoch"] for r in kept if r.get("event") == "epoch"}
    lost = [e for e in range(1, done + 1) if e not in have]
    if done in lost:
        kept.append(rebuilt_record(state, kept))
        notes.append(f"epoch {done}'s record was not whole: rebuilt from the checkpoint (its step, training time, "
                     "frozen units and learning rates; not its losses and errors)")
        lost.remove(done)
    if lost:
        notes.append(f"the records of epochs {', '.join(map(str, lost))} were not whole and the checkpoint holds "
                     "nothing of them: the run goes on without them")
    return kept, notes


def rebuilt_record(state: dict, kept: list[dict]) -> dict:
    """The epoch record of a checkpoint's epoch, as far as the checkpoint knows it."""
    scheduler = state["scheduler"]
    frozen = sum(at is not None for at in scheduler["frozen_at"])
    earlier = sum(r.get("train_time_s") or 0.0 for r in kept if r.get("event") == "epoch")
    return {"event": "epoch", "epoch": state["epoch"], "step": state["step"],
            "train_time_s": state["train_time_s"] - earlier, "frozen_units": frozen,
            "active_units": len(scheduler["frozen_at"]) - frozen, "lr": [float(lr) for lr in scheduler["_last_lr"]],
            "rebuilt_from": "checkpoint.pt"}


def another_runs(run_dir: Path, config: dict) -> str | None:
    """The one line for a checkpoint whose run is not the run directory's (its config record's):
    a checkpoint copied over from another run; None when it is the directory's own (or the
    directory keeps no config record to tell)."""
    record = saved_config(run_dir)
    if record is None:
        return None
    keys = [k for k in ("name", *RESULT_KEYS) if record.get(k) != config.get(k)]
    if not keys:
        return None

    def say(values: dict) -> str:
        return ", ".join(f"{k} {values.get(k)!r}" for k in keys)
    return (f"{run_dir / 'checkpoint.pt'} is another run's checkpoint: it says {say(config)}, where the run "
            f"directory's config record ({run_dir / 'metrics.jsonl'}) says {say(record)}; nothing was changed: put "
            f"this run's own checkpoint.pt back, or start the run again under another {setting('name')}")


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


def started_config(run_dir: Path) -> dict | None:
    """The config record of a run that wrote it and stopped before its first checkpoint (killed,
    or lost power, in its first moments), without what is no setting (its event, the host);
    None when the directory holds no such run: nothing, or records of work done."""
    metrics = run_dir / "metrics.jsonl"
    try:
        records = read_records(metrics) if metrics.is_file() else []
    except (ValueError, UnicodeDecodeError):
        return None
    if [r.get("event") for r in records] != ["config"]:
        return None
    return {k: v for k, v in records[0].items() if k not in ("event", "host")}


def saved_config(run_dir: Path) -> dict | None:
    """The config a run directory's run was started with (its first record), or None."""
    metrics = run_dir / "metrics.jsonl"
    try:
        configs = read_records(metrics, "config") if metrics.is_file() else []
    except (ValueError, UnicodeDecodeError):
        return None
    return configs[0] if configs else None


# -- one owner ---------------------------------------------------------------------------------
class RunBusy(RunError):
    """Another process owns the run directory."""


class RunLock:
    """One owner per run directory: an exclusive OS file lock (flock) on its `.lock`, taken before
    the run's first write. The OS releases it when the process dies (`kill -9` too): it is never
    stale. The file holds the owner's pid and host, for the message another process gets."""

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
            error = RunBusy(f"{self.run_dir} is in use by another run (pid {owner[0]} on {owner[-1]}); wait for it "
                            f"to end, or give this one another {setting('name')}", status=EXIT_USAGE)
            error.owner = f"pid {owner[0]} on {owner[-1]}"
            raise error from None
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


