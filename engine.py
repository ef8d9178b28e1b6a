"""The training machinery, free of flags and files: device and precision choices, the
optimizer, the training step, the epoch loop with its stop signals and divergence check, and
evaluation.

- `resolve_device`, `seed_everything`, `effective_amp`, `autocast_for`, `memory_format`,
  `tune_convolutions`.
- `make_optimizer`, `build_training` -> `Training` (model, units, optimizer, FreezeOut
  scheduler, GradScaler, the DDP view, device, precision): what the loop works on.
- `train_step`, `EagerStep`, `train_one_epoch` (from any position inside an epoch), `evaluate`;
  graphs.py holds the CUDA-graphed step.
- `StopSignals` (SIGINT / SIGTERM: stop after the current step), `Diverged`.
"""
from __future__ import annotations

import contextlib
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from distributed import DDPModel, Distributed, check_replicas_agree, init_distributed
from freezeout import FreezeOut, param_groups
from messages import RunError, setting
from timing import TimeSplit

PROGRESS_EVERY = 20  # steps between reads of the loss (each read waits for the device)
NO_STEP = 2 ** 62  # "no non-finite loss yet": larger than any step
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Diverged(RunError):
    """The loss was not finite; `step` is the first step where it was not."""

    def __init__(self, step: int):
        super().__init__(f"training diverged: the loss was not finite at step {step}")
        self.step = step

    def __reduce__(self):
        return Diverged, (self.step,)


# ---------------------------------------------------------------------------------------
# Device, seeds, precision
# ---------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks cuda, then mps, then cpu; an explicit device must be available."""
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{setting('device')} cuda: no CUDA GPU is available (try {setting('device')} cpu or auto)")
    if name == "mps" and not has_mps:
        raise ValueError(f"{setting('device')} mps: Apple's MPS backend is not available (try {setting('device')} "
                         "cpu or auto)")
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{setting('device')} {name}: unknown device (choose auto, cpu, cuda or mps)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)  # every device's generator too


def effective_amp(amp: str, device: torch.device) -> str:
    """The precision autocast will really use: "off" where the device has no autocast for it."""
    if amp == "off":
        return amp
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # an unsupported pair warns and disables itself (or raises, in older torch)
            context = torch.autocast(device.type, dtype=AMP_DTYPES[amp])
        except RuntimeError:
            return "off"
    return amp if getattr(context, "_enabled", True) and not caught else "off"


def autocast_for(amp: str, device: torch.device, cache: bool = True):
    """The autocast context of an (effective) precision; a no-op context for "off". A CUDA
    graph needs cache=False: cached casts of the weights would be stale on replay."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], cache_enabled=cache)


def tune_convolutions(device: torch.device) -> None:
    """Turn on cuDNN's autotuner on CUDA: a run's convolution shapes never change, so timing
    the algorithms once per shape pays from the first epoch. Left off where deterministic
    kernels were asked for (`torch.backends.cudnn.deterministic`): the autotuner chooses by
    timing, so two processes may choose differently."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.deterministic


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


# ---------------------------------------------------------------------------------------
# What a run trains
# ---------------------------------------------------------------------------------------
def make_optimizer(units, lr: float, momentum: float, weight_decay: float, device: torch.device,
                   fused: bool | None = None) -> torch.optim.SGD:
    """SGD with Nesterov momentum, one param group per unit. By default fused on CUDA: one
    launch per group, learning rates that may live on the device (what a CUDA graph needs),
    and an fp16 GradScaler can skip a step without reading found-inf back."""
    fused = (device.type == "cuda" or None) if fused is None else fused
    return torch.optim.SGD(param_groups(units), lr=lr, momentum=momentum, nesterov=True,
                           weight_decay=weight_decay, fused=fused)


class TrainingStep(Protocol):
    """One optimizer step on a batch, returning its loss on the device without waiting for it:
    `EagerStep`, graphs.GraphedStep, compiled_step.CompiledStep. Each counts its captures (CUDA
    graphs or compiles), their seconds, and the steps it ran eagerly; `last_kind` says what
    the last call ran (timing.STEP_KINDS, or "compile" for a step that compiled)."""
    captures: int
    capture_time_s: float
    eager_steps: int
    last_kind: str

    def start_epoch(self, first_step: int, start_batch: int) -> None:
        """The epoch about to run starts at the run's step `first_step`, batch `start_batch`."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@dataclass
class EpochPosition:
    """Where an epoch stands: batches done, and the sums its record is made of (the loss summed
    over the images seen, and the training seconds). Saved in a checkpoint as a dict."""
    epoch: int
    batch: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    time_s: float = 0.0

    def stats(self) -> dict:
        """The epoch record's training figures."""
        return {"train_loss": self.loss_sum / max(self.seen, 1), "train_time_s": self.time_s,
                "images_per_s": self.seen / self.time_s if self.time_s > 0 else 0.0}


@dataclass
class RunProgress:
    """How far a run has got: the epochs done, their training seconds, and where the next epoch
    stands (a checkpoint holds them as its epoch, train_time_s and position)."""
    epochs_done: int = 0
    train_time_s: float = 0.0
    position: EpochPosition | None = None  # None: the next epoch from its start

    def __post_init__(self):
        if self.position is None:
            self.position = EpochPosition(self.epochs_done + 1)


@dataclass
class Training:
    """The objects one training run works on."""
    model: torch.nn.Module
    units: list
    optimizer: torch.optim.Optimizer
    scheduler: FreezeOut
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: str = "off"                      # the effective precision
    channels_last: bool = False
    dist: Distributed = field(default_factory=Distributed)
    ddp: DDPModel = None
    step: TrainingStep = None             # EagerStep unless another is given

    def __post_init__(self):
        if self.ddp is None:
            self.ddp = DDPModel(self.model, self.dist, self.device)
        if self.step is None:
            self.step = EagerStep(self)

    @property
    def memory_format(self) -> torch.memory_format:
        return memory_format(self.channels_last)


def start_process(device: torch.device, timeout_minutes: float) -> tuple[Distributed, torch.device]:
    """This process's place in a torchrun job (joined when there is one) and its device, its
    convolutions tuned."""
    dist, device = init_distributed(device, timeout_minutes)
    tune_convolutions(device)
    return dist, device


def replicas_agree(training: "Training") -> bool:
    """Under torchrun, whether every rank holds the same weights (a checksum compared)."""
    return check_replicas_agree(training.model, training.dist, training.device)


def build_training(model: torch.nn.Module, device: torch.device, total_steps: int, *,
                   lr: float, momentum: float, weight_decay: float, t_0: float, how_scale: str,
                   scale_lr: bool, amp: str = "off", channels_last: bool = False,
                   dist: Distributed | None = None, fused: bool | None = None) -> Training:
    """Put the model on the device; SGD over one param group per unit; the FreezeOut
    scheduler; a GradScaler that is active for fp16 only (`dist`: one process by default)."""
    dist = dist or Distributed()
    model = model.to(device, memory_format=memory_format(channels_last))
    units = model.freeze_units()
    optimizer = make_optimizer(units, lr, momentum, weight_decay, device, fused)
    scheduler = FreezeOut(optimizer, units, total_steps=total_steps, t_0=t_0, how_scale=how_scale,
                          scale_lr=scale_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    return Training(model, units, optimizer, scheduler, scaler, device, amp, channels_last, dist)


# ---------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------
class Stopped(Exception):
    """The run stopped on SIGINT / SIGTERM after writing a checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """While active, SIGINT and SIGTERM ask the run to stop after the current step; a second
    signal stops it at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        with contextlib.suppress(ValueError):  # only the main thread may set handlers
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train_step(model, x, y, optimizer, scaler, autocast) -> torch.Tensor:
    """Forward, backward and update on one batch (the scheduler steps separately)."""
    with autocast:
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


class EagerStep:
    """The training step as PyTorch runs it, kernel by kernel (any device, AMP, DDP)."""

    def __init__(self, training: Training):
        self.training = training
        self.autocast = autocast_for(training.amp, training.device)
        self.captures, self.capture_time_s, self.eager_steps = 0, 0.0, 0
        self.last_kind = "eager"

    def start_epoch(self, first_step: int, start_batch: int) -> None:
        pass

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = self.training
        x = x.to(t.device, non_blocking=True, memory_format=t.memory_format)
        y = y.to(t.device, non_blocking=True)
        model = t.ddp.module_for(t.scheduler)
        self.eager_steps += 1
        return train_step(model, x, y, t.optimizer, t.scaler, self.autocast)


def train_one_epoch(training: Training, loader, position: EpochPosition, steps_per_epoch: int,
                    stop: StopSignals, desc: str, clock: TimeSplit | None = None) -> bool:
    """Train from `position` (updated in place) to the epoch's end or until a stop signal;
    returns whether it was stopped. A non-finite loss raises `Diverged` naming its first
    step: the check runs on the device and is read with the progress bar, never waiting per
    step: the host reads the device once a progress refresh (every PROGRESS_EVERY steps) and
    once at the epoch's end, nowhere else. `clock` is charged the time of each batch's fetch
    ("data") and of each step, by the kind of step that ran (captures and compiles apart).

    Under torchrun the ranks agree at those reads (one small all-reduce) on whether to stop
    and on the first bad step, so they all stop at the same step; the epoch's loss and image
    count are summed over the ranks at its end."""
    device, dist, scheduler, step = training.device, training.dist, training.scheduler, training.step
    clock = clock or TimeSplit()
    training.model.train()
    first_step = (position.epoch - 1) * steps_per_epoch + position.batch
    # The epoch's running sums continue from the position (on rank 0; the others add theirs at
    # the end), in float64, so that an interrupted epoch sums exactly as an uninterrupted one.
    exact = torch.float32 if device.type == "mps" else torch.float64
    loss_sum = torch.tensor(position.loss_sum if dist.is_main else 0.0, dtype=exact, device=device)
    step_no = torch.tensor(first_step - 1, device=device)
    bad_step = torch.tensor(NO_STEP, device=device)  # first step with a non-finite loss
    seen = position.seen if dist.is_main else 0
    stopped, seen_before = False, seen
    start = time.perf_counter()
    loader.set_epoch(position.epoch, position.batch)
    step.start_epoch((position.epoch - 1) * steps_per_epoch, position.batch)
    bar = tqdm(desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0, initial=position.batch,
               total=steps_per_epoch, disable=not dist.is_main)
    batches, i = iter(loader), position.batch
    while True:
        fetch = time.perf_counter()
        batch = next(batches, None)
        fetched = time.perf_counter()
        clock.add("data", fetched - fetch)
        if batch is None:
            break
        x, y = batch
        captured = step.capture_time_s
        loss = step(x, y)
        scheduler.step()
        loss_sum += loss.to(exact) * len(y)
        step_no += 1
        bad_step = torch.where(torch.isfinite(loss), bad_step, torch.minimum(bad_step, step_no))
        seen += len(y)
        i = position.batch = i + 1
        bar.update()
        last = i == steps_per_epoch
        if (i - 1) % PROGRESS_EVERY == 0 or last or (stop.signum is not None and not dist.enabled):
            stop_all, (shown,) = agree_and_read(bad_step, stop, dist, loss_sum)
            bar.set_postfix(loss=f"{shown / max(seen, 1):.3f}", frozen=scheduler.num_frozen,
                            img_s=f"{(seen - seen_before) * dist.world_size / (time.perf_counter() - start):.0f}")
            if stop_all and not last:
                stopped = True
        if stopped or last:
            if device.type == "cuda":  # the queued steps' device time is theirs
                torch.cuda.synchronize(device)
        charge_step(clock, step, time.perf_counter() - fetched, step.capture_time_s - captured)
        if stopped:
            break
    bar.close()
    totals = dist.all_reduce(torch.stack([loss_sum, torch.tensor(float(seen), dtype=exact, device=device)]))
    elapsed = dist.all_reduce(torch.tensor(time.perf_counter() - start, dtype=exact, device=device), "max")
    position.loss_sum, seen_total, took = torch.cat([totals, elapsed.view(1)]).tolist()
    position.seen = int(seen_total)
    position.time_s += took
    return stopped


def charge_step(clock: TimeSplit, step: TrainingStep, seconds: float, captured: float) -> None:
    """Charge one step's seconds to the clock: a step that compiled is a compile, whole; a
    graph's capture is apart from the replays that follow it."""
    if step.last_kind == "compile":
        clock.add("compile", seconds, steps=1)
        return
    clock.add("capture", captured)
    clock.add(step.last_kind, seconds - captured, steps=1)


def agree_and_read(bad_step: torch.Tensor, stop: StopSignals, dist: Distributed,
                   *local: torch.Tensor) -> tuple[bool, list[float]]:
    """Read the divergence flag and the stop request, agreed over the ranks under torchrun
    (one all-reduce), and this rank's `local` scalars, in one wait for the device: raise
    `Diverged` at a non-finite loss, else return (whether every rank should stop now, the
    local values)."""
    wide = torch.float32 if bad_step.device.type == "mps" else torch.float64
    stopping = torch.tensor(float(stop.signum is not None), dtype=wide, device=bad_step.device)
    flags = dist.all_reduce(torch.stack([stopping, -bad_step.to(wide)]), "max")
    values = torch.cat([flags, *(t.to(wide).view(1) for t in local)]).tolist()
    step = int(-values[1])
    if step < NO_STEP:
        raise Diverged(step)
    return bool(values[0]), values[2:]


def stop_or_diverged(bad_step: torch.Tensor, stop: StopSignals, dist: Distributed) -> bool:
    """`agree_and_read` without local values: whether every rank should stop now."""
    return agree_and_read(bad_step, stop, dist)[0]


@torch.inference_mode()
def evaluate(training: Training, loader) -> tuple[float, float]:
    """Mean cross-entropy and error (percent) over a split (each rank holds a shard of it)."""
    device, model = training.device, training.model
    model.eval()
    autocast = autocast_for(training.amp, device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    wrong = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=training.memory_format)
        y = y.to(device, non_blocking=True)
        with autocast:
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        wrong += (logits.argmax(1) != y).sum()
        seen += len(y)
    totals = training.dist.all_reduce(torch.stack([
        loss_sum, wrong.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)]))
    loss_sum, wrong, seen = totals.tolist()
    return loss_sum / seen, 100.0 * wrong / seen
