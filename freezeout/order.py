"""The check that a scheduler's units are listed in forward order: freezing saves work only if
the frozen units are a prefix of the forward pass, so FreezeOut watches which modules run until
its first step and judges the order then.

The watch is a process-wide forward pre-hook (copies of the model, an EMA or a FLOP count,
neither carry it nor feed it, and units the model never calls itself, slices of an
nn.Sequential, are seen running through their modules). Under torch.compile it records nothing:
a hook that mutates Python state breaks dynamo's tracing, so a compiled model's order is not
checked, and FreezeOut says so once.
"""
from __future__ import annotations

import gc
import sys
import warnings
import weakref
from itertools import pairwise
from typing import Sequence

import torch
from torch import nn

from .units import Unit, _owns_state, unit_modules, unit_parameters


def _module_units(units: Sequence[Unit]) -> dict[int, int]:
    """id of every module whose call shows a unit running -> that unit's index: the unit's own
    modules, and every module inside them that holds parameters or buffers itself. A slice of an
    nn.Sequential is a new container that the model never calls, so its modules must speak for
    it; a parameter-free module (one ReLU reused all over the model) says nothing about which
    unit is running, so it does not count. A module inside two units counts for the first."""
    unit_of: dict[int, int] = {}
    for i, unit in enumerate(units):
        for top in unit_modules(unit):
            unit_of.setdefault(id(top), i)
            for module in top.modules():
                if _owns_state(module):
                    unit_of.setdefault(id(module), i)
    return unit_of


def _trainable_parameters_outside(ran: list[nn.Module], units: Sequence[Unit]) -> list[str]:
    """Qualified names of the trainable parameters owned by modules in `ran` that belong to no
    unit. Only modules inside something that ran and holds units count (the model, or a wrapper
    around it): another network trained beside it, say a GAN's discriminator, is none of
    FreezeOut's business."""
    in_units = {id(p) for unit in units for p in unit_parameters(unit)}
    unit_modules_ = {id(m) for unit in units for top in unit_modules(unit) for m in top.modules()}
    names: dict[int, str] = {}
    for root in ran:  # outermost first: a module runs before the modules it calls
        if id(root) in names:
            continue
        subtree = list(root.named_modules())
        if any(id(m) in unit_modules_ for _, m in subtree):
            for name, m in subtree:
                names.setdefault(id(m), name)
    return [f"{names[id(m)]}.{pname}" if names[id(m)] else pname
            for m in ran if id(m) in names
            for pname, p in m.named_parameters(recurse=False) if p.requires_grad and id(p) not in in_units]


_said_compiled = False  # the skipped check is reported once per process


# Every watch records through one process-wide hook, added with the first watch and removed by
# the last one's stop(), never by the garbage collector: a finalizer may run in the middle of
# torch.compile's tracing, and a hooks dict that changes under it makes dynamo fail (a KeyError
# while it builds a guard on the global hooks).
_watching: "weakref.WeakSet[ForwardOrderWatch]" = weakref.WeakSet()
_hook = None


def _record(module, args):
    # Under dynamo a hook that writes to a dict of modules is traced as a mutation of those
    # modules and fails ("already tracked for mutation"): record eager calls only.
    if torch.compiler.is_compiling():
        return
    for watch in tuple(_watching):
        watch.ran.setdefault(id(module), module)


def drop_idle_hook() -> None:
    """Remove the process-wide hook if no watch is left (watches of schedulers dropped before
    their first step are gone from `_watching` once collected). Called by a watch's stop, and
    safe to call from anywhere but a finalizer."""
    global _hook
    if not _watching and _hook is not None:
        _hook.remove()
        _hook = None


class ForwardOrderWatch:
    """Every module called (in the order of its first call) from now until `check()`; held
    until then, so that no id is reused by another module meanwhile."""

    def __init__(self, units: Sequence[Unit]):
        global _hook
        self.units = units
        self.ran: dict[int, nn.Module] = {}
        self.compiled_frames = _compiled_frames()
        _watching.add(self)
        if _hook is None:
            _hook = torch.nn.modules.module.register_module_forward_pre_hook(_record)

    def stop(self) -> None:
        _watching.discard(self)
        if _watching:  # perhaps only watches of schedulers dropped unchecked, kept by cycles
            gc.collect()
        drop_idle_hook()

    def check(self) -> None:
        """Stop watching; raise ValueError for units that ran out of order, warn about units that
        did not run and about trainable modules that ran outside every unit."""
        self.stop()
        unit_of = _module_units(self.units)
        first_calls = list(dict.fromkeys(unit_of[key] for key in self.ran if key in unit_of))
        if not first_calls:  # no eager forward pass before the first step: nothing to judge
            if self._ran_compiled():
                _say_order_not_checked()
            return
        for a, b in pairwise(first_calls):
            if b < a:
                raise ValueError(f"FreezeOut units are not in forward order: unit {a} ran before "
                                 f"unit {b}. Frozen units must be a prefix of the forward pass; "
                                 "list the units in the order the model calls them")
        missing = sorted(set(range(len(self.units))) - set(first_calls))
        if missing:
            warnings.warn(f"FreezeOut units {missing} did not run in the first training step; "
                          "freezing them saves nothing if they are not part of the forward pass",
                          stacklevel=3)
        left_out = _trainable_parameters_outside(list(self.ran.values()), self.units)
        if left_out:
            listed = ", ".join(left_out[:10]) + (f" and {len(left_out) - 10} more" if len(left_out) > 10 else "")
            warnings.warn(f"FreezeOut: trainable parameters that the model used in the first step belong to no "
                          f"unit ({listed}). They are never optimized (the optimizer holds the units' "
                          "parameters), and as long as they require gradients, backward keeps running "
                          "through the frozen units before them, so freezing saves little; put them in a "
                          "unit (find_units does: a ViT's cls_token joins its patch embedding) or set "
                          "requires_grad=False on them", stacklevel=3)

    def _ran_compiled(self) -> bool:
        """Whether the forward pass ran under torch.compile: the wrapper torch.compile(model)
        returns ran eagerly, or dynamo compiled a frame since the watch began (model.compile())."""
        eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing compiled
        if eval_frame is None:
            return False
        return (any(isinstance(m, eval_frame.OptimizedModule) for m in self.ran.values())
                or _compiled_frames() > self.compiled_frames)


def _compiled_frames() -> int:
    dynamo_utils = sys.modules.get("torch._dynamo.utils")  # not imported: nothing was compiled
    return 0 if dynamo_utils is None else dynamo_utils.counters["frames"]["total"]


def _say_order_not_checked() -> None:
    global _said_compiled
    if not _said_compiled:
        _said_compiled = True
        warnings.warn("FreezeOut: the model ran under torch.compile before the first step, so the "
                      "order of the units was not checked; to check it, run one step eagerly "
                      "first (or list the units in the order the model calls them)", stacklevel=4)
