"""Checkpoints: everything a resumed run needs, written atomically and read without running any
pickled code (the run directory they live in: rundir.py).

- `save_checkpoint` / `load_checkpoint`: the format (state_dicts, epoch, step, position inside
  the epoch, every rank's RNG state, the config), `torch.load(weights_only=True)`.
- `restore`: a checkpoint back into model, optimizer, scheduler, scaler and RNGs.
- `describe_checkpoint`: which checkpoint a run directory holds, in words; `unloadable`: what a
  file that cannot be loaded is (cut short, damaged, not a checkpoint, unsafe) and what to do.
- `rng_state`, `set_rng_state`.
"""
from __future__ import annotations

import dataclasses
import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from messages import RunError, setting
from metrics_logger import write_atomically

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
