"""Checkpoints and run directories: everything a resumed run needs, written atomically and
read without running any pickled code.

- `save_checkpoint` / `load_checkpoint`: the format (state_dicts, epoch, step, position inside
  the epoch, every rank's RNG state, the config), `torch.load(weights_only=True)`.
- `restore`: a checkpoint back into model, optimizer, scheduler, scaler and RNGs.
- `open_run`, `prepare_run_dir`, `check_resume_flags`: a new run never overwrites an old one;
  --resume continues one and refuses flags that contradict it.
- `rng_state`, `set_rng_state`, `host_info`.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import platform
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from metrics_logger import read_records, write_atomically
from utils import RunError

CHECKPOINT_FORMAT = "freezeout-checkpoint-v1"
# Flags that say where or how fast a run goes, not what it computes: --resume may change them.
RUNTIME_FLAGS = {"resume", "device", "workers", "data_root", "out_dir", "name", "cuda_graphs"}
# The config entries a resumed run takes from the new invocation rather than the checkpoint.
RUNTIME_CONFIG = ("device", "workers", "data_root", "out_dir", "run_dir", "cuda_graphs")


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
                    position: dict | None) -> None:
    """`epoch` epochs are complete; `position` says how far the next one got when a signal
    stopped it (None at an epoch's end). Every rank's RNG state is gathered (a collective);
    rank 0 writes, atomically."""
    rngs = training.dist.gather(rng_state())
    if training.dist.is_main:
        state = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, "train_time_s": train_time,
                 "position": position, "config": config, "model": training.model.state_dict(),
                 "optimizer": training.optimizer.state_dict(),
                 "scheduler": training.scheduler.state_dict(), "scaler": training.scaler.state_dict(),
                 "rng": rngs}
        write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint of this project, read without running any pickled code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = ("it holds pickled objects other than tensors and plain containers, possibly code; "
               "nothing of it was run" if "Weights only load failed" in str(e) else
               first_line(e) if str(e).strip() else "unreadable pickle")
        raise RunError(f"{path} is not a loadable FreezeOut checkpoint ({why})") from None
    except Exception as e:
        raise RunError(f"{path} is not a loadable FreezeOut checkpoint ({first_line(e)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} is not a FreezeOut checkpoint of this project")
    return state


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def restore(checkpoint: dict, training) -> None:
    training.model.load_state_dict(checkpoint["model"])
    training.optimizer.load_state_dict(checkpoint["optimizer"])
    training.scheduler.load_state_dict(checkpoint["scheduler"])  # after the optimizer: re-freezes
    training.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"][training.dist.rank])


def check_resume_flags(saved_args: dict, args, explicit: set) -> None:
    """Flags given with --resume must agree with the saved run (runtime flags aside)."""
    for flag in sorted(explicit - RUNTIME_FLAGS):
        given, was = getattr(args, flag), saved_args.get(flag)
        if given != was:
            raise ValueError(f"--resume: --{flag} {given} contradicts the saved run's {flag} = {was}")


def prepare_run_dir(run_dir: Path, out_dir: str, resume: bool, name_flag: str) -> dict | None:
    """The checkpoint to resume (None for a new run), after checking that a new run would
    overwrite nothing and that its directory can be made."""
    ckpt_path = run_dir / "checkpoint.pt"
    if resume:
        if not ckpt_path.is_file():
            raise RunError(f"--resume: no checkpoint in {run_dir}")
        return load_checkpoint(ckpt_path)
    if (run_dir / "metrics.jsonl").exists() or ckpt_path.exists():
        raise RunError(f"{run_dir} already holds a run: continue it with --resume, "
                       f"or start a new one with {name_flag} NAME")
    # The directory itself is made once the data has loaded: a failed start leaves nothing.
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"--out-dir {out_dir}: cannot create {run_dir} "
                       f"({existing} is not a writable directory)")
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
    config: dict
    checkpoint: dict | None = None
    finished: dict | None = None   # the summary of a run that has already finished
    error: str | None = None
    exit_code: int = 0


def open_run(config: dict, dist, resume: bool, name_flag: str,
             check_flags: Callable[[dict], None]) -> OpenedRun:
    """On rank 0: check the run directory; with --resume load the checkpoint, check the flags
    against its config (`check_flags(saved config)` raises ValueError) and make that config,
    with this invocation's runtime settings, the run's. Every rank gets the outcome (`dist`:
    a distributed.Distributed); each keeps its own device."""
    if not dist.is_main:
        opened = dist.broadcast(None)
        if opened.error is None:
            opened.config = {**opened.config, "device": config["device"]}
        return opened
    run_dir = Path(config["run_dir"])
    try:
        checkpoint = prepare_run_dir(run_dir, config["out_dir"], resume, name_flag)
        opened = OpenedRun(config, checkpoint)
        if checkpoint is not None:
            check_flags(checkpoint["config"])
            saved_world = checkpoint["config"].get("world_size", 1)
            if saved_world != dist.world_size:
                raise RunError(f"--resume: the run was trained by {saved_world} process(es); "
                               f"resume it with the same number (this is {dist.world_size})")
            opened.config = {**checkpoint["config"], **{k: config[k] for k in RUNTIME_CONFIG}}
            summaries = read_records(run_dir / "metrics.jsonl", "summary")
            opened.finished = summaries[-1] if summaries else None
    except ValueError as e:  # a flag that contradicts the saved run
        opened = OpenedRun(config, error=str(e), exit_code=2)
    except RunError as e:
        opened = OpenedRun(config, error=str(e), exit_code=1)
    return dist.broadcast(opened)
