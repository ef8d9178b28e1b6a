"""What the trainer adapters (freezeout.lightning, freezeout.hf) share, with no framework
imported: T taken from the trainer, the metrics they log, the word at the end of a run whose
optimizer steps were not T, and DDP followed when there is one."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .schedule import FreezeOut

METRIC_PREFIX = "freezeout/"


def take_total_steps(scheduler: FreezeOut, total_steps: int, how: str) -> None:
    """Give the trainer's T to a scheduler made with total_steps=None; refuse, in one line that
    says what to change, a scheduler whose T is another (`how`: how the trainer counts them)."""
    if total_steps != total_steps or total_steps in (float("inf"), float("-inf")):  # NaN or endless
        raise ValueError(f"FreezeOut needs the run's number of optimizer steps, and this trainer's is unbounded "
                         f"({how}); give it max_steps or a number of epochs")
    if scheduler.total_steps is None:
        scheduler.set_total_steps(int(total_steps))
    elif scheduler.total_steps != total_steps:
        raise ValueError(f"FreezeOut's total_steps is {scheduler.total_steps} but this trainer makes "
                         f"{int(total_steps)} optimizer steps ({how}); make the scheduler with total_steps=None "
                         "and the callback takes T from the trainer (resuming, resume with the settings the run "
                         "started with)")


def rate_metrics(scheduler: FreezeOut, rates: list[float]) -> dict[str, float]:
    """The metrics logged for one optimizer step: every unit's learning rate in that step
    (`freezeout/lr_unit_<i>`) and the number of units frozen after it."""
    metrics = {f"{METRIC_PREFIX}lr_unit_{i}": float(lr) for i, lr in enumerate(rates)}
    metrics[f"{METRIC_PREFIX}frozen_units"] = scheduler.num_frozen
    return metrics


def group_rates(optimizer: torch.optim.Optimizer) -> list[float]:
    """The rate of each param group, that is of each unit (FreezeOut's optimizer has a group a
    unit); an optimizer a trainer wrapped is read through its `optimizer`."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return [float(group["lr"]) for group in inner.param_groups]


def warn_if_not_t(scheduler: FreezeOut, steps_done: int) -> None:
    """At the end of a run: say so when its optimizer steps were not T (a run stopped early, or
    a T that was never the run's), with what that did to the schedule."""
    total = scheduler.total_steps
    if total is None or steps_done == total:
        return
    never = [i for i, at in enumerate(scheduler.frozen_at) if at is None][:-1]  # the output unit never freezes
    head = scheduler.lr_at(min(steps_done, total - 1))[-1] if steps_done < total else 0.0
    if steps_done < total:
        what = (f"units {_span(never)} never froze and the output unit's rate was still {head:.3g}, not 0"
                if never else f"the output unit's rate was still {head:.3g}, not 0")
    else:
        what = f"every rate was 0 for the last {steps_done - total} of them"
    warnings.warn(f"FreezeOut: the run made {steps_done} optimizer steps, but the schedule was made for "
                  f"T={total}: {what}; the schedule (and its estimated speedup) is not the one this run had",
                  stacklevel=2)


def _span(indices: list[int]) -> str:
    if len(indices) > 2 and indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}"
    return ", ".join(map(str, indices))


def distributed_world() -> int:
    """The number of processes training together (1 without torch.distributed)."""
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def follow_ddp(scheduler: FreezeOut, ddp: Optional[torch.nn.Module] = None):
    """freezeout.ddp.follow_freezing on the DDP module given (a process group of one included),
    or, where several processes train, on the first one found running the units; else None."""
    if ddp is None and distributed_world() == 1:
        return None
    from .ddp import follow_freezing
    return follow_freezing(scheduler, ddp)
