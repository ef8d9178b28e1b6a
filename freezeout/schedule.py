"""The schedule: each unit's t_i and learning rate, and the FreezeOut scheduler that applies them
step by step, freezes the units that are due, and saves and restores all of it.

t_i = scale(t_0 + (1 - t_0) * i / N); step k uses lr_i(k) = 0.5 * alpha_i * (1 + cos(pi * k /
(t_i * T))) while k < t_i * T; at the first k >= t_i * T unit i is frozen for good.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.hooks import RemovableHandle

from .compile import allow_a_compile_per_freeze_level
from .order import ForwardOrderWatch
from .units import Unit, _as_modules, freeze, unit_parameters

SCALE_POWERS = {"linear": 1, "squared": 2, "cubic": 3}


def check_t_0(t_0: float) -> float:
    """t_0 as a float; TypeError for what is not a real number (a string "0.8", a bool),
    ValueError for a number outside (0, 1]."""
    if isinstance(t_0, bool) or not isinstance(t_0, numbers.Real):
        raise TypeError(f"t_0 must be a number in (0, 1], got {type(t_0).__name__} {t_0!r}")
    t_0 = float(t_0)
    if not 0.0 < t_0 <= 1.0:  # also rejects NaN
        raise ValueError(f"t_0 must be in (0, 1], got {t_0}")
    return t_0


def check_how_scale(how_scale: str) -> str:
    if not isinstance(how_scale, str) or how_scale not in SCALE_POWERS:
        raise ValueError(f"how_scale must be one of {', '.join(SCALE_POWERS)}, got {how_scale!r}")
    return how_scale


def unit_times(n_units: int, t_0: float, how_scale: str = "cubic") -> list[float]:
    """t_i for units 0..N (N = n_units - 1): scale(t_0 + (1 - t_0) * i / N).

    t_0 is given before scaling (cubic with t_0 = 0.8 freezes unit 0 at 0.512 of the run);
    the output unit always gets t_N = 1.
    """
    t_0, power = check_t_0(t_0), SCALE_POWERS[check_how_scale(how_scale)]
    if n_units < 1:
        raise ValueError("FreezeOut needs at least one unit")
    if n_units == 1:
        return [1.0]
    last = n_units - 1
    return [(t_0 + (1 - t_0) * i / last) ** power for i in range(n_units)]


def check_total_steps(total_steps) -> int:
    """T as an int; ValueError for anything that is not a positive integer."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Real) \
            or int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    return int(total_steps)


def unit_lr(step: int, t_i: float, total_steps: int, alpha: float) -> float:
    """Learning rate of a unit at optimizer step `step` (counted from 0): cosine from alpha
    down to zero at step t_i * total_steps, zero from then on."""
    end = t_i * total_steps
    if step >= end:
        return 0.0
    return 0.5 * alpha * (1 + math.cos(math.pi * step / end))


class FreezeOut(LRScheduler):
    """Per-unit cosine annealing with progressive freezing.

    Args:
        optimizer: any torch.optim optimizer whose param groups are `param_groups(units)`.
        units: modules (or lists of modules, or slices of an nn.Sequential) in forward order;
            the last is the output unit. find_units(model, example_input) finds them for any model.
        total_steps: T, the number of scheduler steps (optimizer steps) of the whole run; None
            when a trainer gives it before the first step (the adapters in freezeout.lightning
            and freezeout.hf take it from the trainer, or call `set_total_steps`).
        t_0: fraction of the run (before scaling) at which unit 0 freezes, in (0, 1].
        how_scale: "linear", "squared" or "cubic": t_i = tau_i ** (1, 2, 3).
        scale_lr: start unit i at base_lr / t_i, so that units that train for less time
            cover about the same learning-rate area (the paper's default).

    Step k (counted from 0) uses lr_i(k) = 0.5 * alpha_i * (1 + cos(pi * k / (t_i * T)))
    while k < t_i * T. When preparing step k < T, every unit with k >= t_i * T is frozen.

    The model may be compiled (torch.compile(model) or model.compile(), before or after the
    scheduler is made): each freeze level compiles once, and the scheduler makes room for that
    in dynamo's recompile limit (freezeout/compile.py).

    `register_freeze_hook(hook)` calls `hook(scheduler, newly_frozen)` whenever units freeze,
    in a step or when a saved state is loaded (freezeout.ddp uses it to take the frozen
    parameters out of DistributedDataParallel's gradient all-reduce).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, units: Sequence[Unit], total_steps: Optional[int],
                 t_0: float = 0.8, how_scale: str = "cubic", scale_lr: bool = True,
                 last_epoch: int = -1):
        self.units = list(units)
        for i, unit in enumerate(self.units):
            _as_modules(unit, f"unit {i}")  # a TypeError that says what a unit is, for anything else
        if len(optimizer.param_groups) != len(self.units):
            raise ValueError(f"the optimizer has {len(optimizer.param_groups)} param groups but "
                             f"there are {len(self.units)} units; build it from param_groups(units)")
        for i, (unit, group) in enumerate(zip(self.units, optimizer.param_groups, strict=True)):
            if {id(p) for p in unit_parameters(unit)} != {id(p) for p in group["params"]}:
                raise ValueError(f"param group {i} does not hold exactly the parameters of unit {i}; "
                                 "build the optimizer from param_groups(units)")
        self.total_steps = None if total_steps is None else check_total_steps(total_steps)
        self.t_0 = check_t_0(t_0)
        self.how_scale = check_how_scale(how_scale)
        self.scale_lr = bool(scale_lr)
        self.t_i = unit_times(len(self.units), self.t_0, self.how_scale)
        self.frozen_at: list[int | None] = [None] * len(self.units)
        self.num_frozen = 0
        self._order_watch = None
        self._warned_past_end = False  # a loop that runs past total_steps is told once
        self._freeze_hooks: OrderedDict[int, Callable] = OrderedDict()
        super().__init__(optimizer, last_epoch)
        self._order_watch = ForwardOrderWatch(self.units)
        allow_a_compile_per_freeze_level(len(self.units))

    # -- the schedule -------------------------------------------------------------------
    def alphas(self) -> list[float]:
        """Initial learning rate alpha_i of every unit."""
        if self.scale_lr:
            return [base / t for base, t in zip(self.base_lrs, self.t_i, strict=True)]
        return [float(base) for base in self.base_lrs]

    def lr_at(self, step: int) -> list[float]:
        """Every unit's learning rate for optimizer step `step` (counted from 0), from the formula
        alone: the one source of the rates, for the scheduler itself and for anything that needs
        them ahead of time (a table of rates uploaded once, a figure)."""
        if self.total_steps is None:
            if step == 0:  # every unit starts at alpha_i, whatever T
                return self.alphas()
            raise RuntimeError(_NO_TOTAL_STEPS)
        return [unit_lr(step, t_i, self.total_steps, alpha)
                for t_i, alpha in zip(self.t_i, self.alphas(), strict=True)]

    def set_total_steps(self, total_steps: int) -> None:
        """Give T to a scheduler made with total_steps=None (what a trainer's adapter does, from
        the trainer, before the first step). A T that was already given stays: ValueError for
        another one, the mistake of a wrong T caught before the run instead of at its end."""
        total_steps = check_total_steps(total_steps)
        if self.total_steps is not None and self.total_steps != total_steps:
            raise ValueError(f"FreezeOut's total_steps is {self.total_steps}, not {total_steps}")
        self.total_steps = total_steps

    def get_lr(self) -> list[float]:
        return self.lr_at(self.last_epoch)

    def step(self, epoch: None = None) -> None:
        if epoch is not None:
            raise TypeError("FreezeOut.step() takes no epoch; call it once per optimizer step")
        if self.total_steps is None and self.last_epoch >= 0:
            raise RuntimeError(_NO_TOTAL_STEPS)
        if self._order_watch is not None:
            watch, self._order_watch = self._order_watch, None
            watch.check()
        if self.total_steps is not None and self.last_epoch >= self.total_steps and not self._warned_past_end:
            self._warned_past_end = True
            warnings.warn(f"FreezeOut.step() after optimizer step {self.last_epoch}, past the end of "
                          f"the run (total_steps={self.total_steps}: steps 0 to "
                          f"{self.total_steps - 1}); every learning rate stays 0", stacklevel=2)
        super().step()
        self._freeze_due_units()

    @property
    def checking_order(self) -> bool:
        """Whether the scheduler still watches the modules run, to check the units' order at
        the first step. A compiled forward pass is not watched: run the first step eagerly."""
        return self._order_watch is not None

    # -- freezing -----------------------------------------------------------------------
    @property
    def frozen(self) -> list[bool]:
        return [i < self.num_frozen for i in range(len(self.units))]

    def _freeze_due_units(self) -> None:
        # Units freeze in index order (t_i never decreases with i), so only the next ones
        # can be due: O(newly frozen units) per step, no loop over parameters.
        k = self.last_epoch
        if self.total_steps is None or k >= self.total_steps:
            return
        newly = []
        while self.num_frozen < len(self.units) and k >= self.t_i[self.num_frozen] * self.total_steps:
            self.frozen_at[self.num_frozen] = k
            self._freeze(self.num_frozen)
            newly.append(self.num_frozen)
            self.num_frozen += 1
            # A model compiled after the scheduler was made recompiles at this new level.
            allow_a_compile_per_freeze_level(len(self.units))
        if newly:
            self._call_freeze_hooks(newly)

    def register_freeze_hook(self, hook: Callable[["FreezeOut", list[int]], None]) -> RemovableHandle:
        """Call `hook(scheduler, newly_frozen)` (the indices of the units just frozen) whenever
        units freeze: in `step()`, after the optimizer step that came before it, and in
        `load_state_dict`, for the units a saved state has frozen. Returns a handle whose
        `remove()` takes the hook away."""
        handle = RemovableHandle(self._freeze_hooks)
        self._freeze_hooks[handle.id] = hook
        return handle

    def _call_freeze_hooks(self, newly: list[int]) -> None:
        for hook in list(self._freeze_hooks.values()):
            hook(self, list(newly))

    def _freeze(self, i: int) -> None:
        group = self.optimizer.param_groups[i]
        group["lr"] = 0.0
        for p in group["params"]:
            self.optimizer.state.pop(p, None)  # momentum / Adam moments are dead weight now
        freeze(self.units[i])

    # -- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "last_epoch": self.last_epoch,
            "_step_count": self._step_count,
            "total_steps": self.total_steps,
            "t_0": self.t_0,
            "how_scale": self.how_scale,
            "scale_lr": self.scale_lr,
            "t_i": list(self.t_i),
            "base_lrs": [float(b) for b in self.base_lrs],
            "frozen_at": list(self.frozen_at),
            "_last_lr": [float(lr) for lr in self._last_lr],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the schedule and re-freeze the units that were frozen, so a resumed run
        freezes exactly as an uninterrupted one. Call it after optimizer.load_state_dict."""
        if len(state_dict["t_i"]) != len(self.units):
            raise ValueError(f"scheduler state has {len(state_dict['t_i'])} units, "
                             f"this model has {len(self.units)}")
        for key in ("last_epoch", "_step_count", "total_steps", "t_0", "how_scale", "scale_lr"):
            setattr(self, key, state_dict[key])
        self.t_i = list(state_dict["t_i"])
        self.base_lrs = list(state_dict["base_lrs"])
        self.frozen_at = list(state_dict["frozen_at"])
        self.num_frozen = sum(at is not None for at in self.frozen_at)
        if self.last_epoch > 0 and self._order_watch is not None:  # checked in the first run
            self._order_watch.stop()
            self._order_watch = None
        for i in range(self.num_frozen):
            self._freeze(i)
        self._last_lr = list(state_dict["_last_lr"])
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr
        if self.num_frozen:
            self._call_freeze_hooks(list(range(self.num_frozen)))


_NO_TOTAL_STEPS = ("FreezeOut.total_steps is not set: give total_steps=T (the run's optimizer steps), call "
                   "scheduler.set_total_steps(T) before the first step, or attach the scheduler to a trainer "
                   "through freezeout.lightning or freezeout.hf, which take T from the trainer")
