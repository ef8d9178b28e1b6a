"""FreezeOut (Brock et al. 2017) as a PyTorch learning-rate scheduler, for any model.

Each unit i of a network (a module, or a list of modules, in forward order) gets its own
learning rate, cosine-annealed to zero at its own fraction t_i of the run. Once a unit's
learning rate has reached zero the unit is frozen for good: its parameters stop requiring
gradients, its optimizer state is dropped and it stays in inference mode. Because the frozen
units are always a prefix of the forward pass, autograd records nothing for them, which is
where the wall-clock saving comes from.

    units = model.freeze_units()
    optimizer = torch.optim.SGD(param_groups(units), lr=0.1, momentum=0.9, nesterov=True)
    scheduler = FreezeOut(optimizer, units, total_steps=T, t_0=0.8, how_scale="cubic")
    for x, y in loader:                  # T iterations in all
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

t_0 = 1 gives every unit t_i = 1: plain per-step cosine annealing with no freezing, the
baseline, through the same code.

What the module holds:
    FreezeOut     the scheduler: per-unit learning rates (lr_at), freezing, checkpointing.
    param_groups  one optimizer param group per unit, what FreezeOut expects.
    unit_times    t_i of every unit, from t_0 and how_scale.
    unit_lr       one unit's learning rate at one step: the formula, nothing else.
    freeze        take a unit out of training for good.
    find_units    a model's units found by running it once, for models that do not list them.
"""
from __future__ import annotations

import math
import types
import warnings
import weakref
from collections import Counter
from typing import Iterable, Sequence, Union

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

Unit = Union[nn.Module, Sequence[nn.Module]]

SCALE_POWERS = {"linear": 1, "squared": 2, "cubic": 3}


def check_t_0(t_0: float) -> float:
    t_0 = float(t_0)
    if not 0.0 < t_0 <= 1.0:  # also rejects NaN
        raise ValueError(f"t_0 must be in (0, 1], got {t_0}")
    return t_0


def check_how_scale(how_scale: str) -> str:
    if how_scale not in SCALE_POWERS:
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


def unit_lr(step: int, t_i: float, total_steps: int, alpha: float) -> float:
    """Learning rate of a unit at optimizer step `step` (counted from 0): cosine from alpha
    down to zero at step t_i * total_steps, zero from then on."""
    end = t_i * total_steps
    if step >= end:
        return 0.0
    return 0.5 * alpha * (1 + math.cos(math.pi * step / end))


def unit_modules(unit: Unit) -> list[nn.Module]:
    return [unit] if isinstance(unit, nn.Module) else list(unit)


def unit_parameters(unit: Unit) -> list[nn.Parameter]:
    return [p for m in unit_modules(unit) for p in m.parameters()]


def param_groups(units: Iterable[Unit], **group_options) -> list[dict]:
    """One optimizer param group per unit, in unit order (what FreezeOut expects).

    Extra keyword arguments (say weight_decay=0) go into every group.
    """
    groups, seen = [], set()
    for i, unit in enumerate(units):
        params = unit_parameters(unit)
        shared = [p for p in params if id(p) in seen]
        if shared:
            raise ValueError(f"unit {i} shares parameters with an earlier unit; "
                             "every parameter must belong to exactly one unit")
        seen.update(id(p) for p in params)
        groups.append({"params": params, **group_options})
    return groups


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _owns_state(module: nn.Module) -> bool:
    return _owns_parameters(module) or next(module.buffers(recurse=False), None) is not None


def _owns_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


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


def _trainable_modules_outside(ran: list[nn.Module],
                               unit_of: dict[int, int]) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the modules in `ran` that hold trainable parameters themselves
    but belong to no unit. Only modules inside something that ran and holds units count (the
    model, or a wrapper around it): another network trained beside it, say a GAN's
    discriminator, is none of FreezeOut's business."""
    names: dict[int, str] = {}
    for root in ran:  # outermost first: a module runs before the modules it calls
        if id(root) in names:
            continue
        subtree = list(root.named_modules())
        if any(id(m) in unit_of for _, m in subtree):
            for name, m in subtree:
                names.setdefault(id(m), name)
    return [(names[id(m)], m) for m in ran
            if id(m) in names and id(m) not in unit_of and _owns_trainable(m)]


def _describe(named_modules: list[tuple[str, nn.Module]], limit: int = 10) -> str:
    def one(name: str, module: nn.Module) -> str:
        pname, p = next(module.named_parameters(recurse=False))
        shape = "x".join(map(str, p.shape))
        return f"{name or 'the model itself'}: {type(module).__name__}({pname} {shape})"

    text = ", ".join(one(name, m) for name, m in named_modules[:limit])
    more = len(named_modules) - limit
    return text + (f" and {more} more" if more > 0 else "")


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    # Bound onto every submodule of a frozen unit: model.train() must not bring back
    # batch statistics or dropout, or the frozen weights would no longer be what was learned.
    return nn.Module.train(self, False)


def freeze(unit: Unit) -> None:
    """Take a unit out of training for good: its parameters stop requiring (and lose) their
    gradients, and all its submodules stay in inference mode, whatever calls train()."""
    for p in unit_parameters(unit):
        p.requires_grad_(False)
        p.grad = None
    for top in unit_modules(unit):
        for module in top.modules():
            module.train = types.MethodType(_stay_in_eval, module)
            module.training = False


class FreezeOut(LRScheduler):
    """Per-unit cosine annealing with progressive freezing.

    Args:
        optimizer: any torch.optim optimizer whose param groups are `param_groups(units)`.
        units: modules (or lists of modules, or slices of an nn.Sequential) in forward order;
            the last is the output unit. find_units(model, example_input) finds them for any model.
        total_steps: T, the number of scheduler steps (training iterations) of the whole run.
        t_0: fraction of the run (before scaling) at which unit 0 freezes, in (0, 1].
        how_scale: "linear", "squared" or "cubic": t_i = tau_i ** (1, 2, 3).
        scale_lr: start unit i at base_lr / t_i, so that units that train for less time
            cover about the same learning-rate area (the paper's default).

    Step k (counted from 0) uses lr_i(k) = 0.5 * alpha_i * (1 + cos(pi * k / (t_i * T)))
    while k < t_i * T. When preparing step k < T, every unit with k >= t_i * T is frozen.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, units: Sequence[Unit], total_steps: int,
                 t_0: float = 0.8, how_scale: str = "cubic", scale_lr: bool = True,
                 last_epoch: int = -1):
        self.units = list(units)
        if len(optimizer.param_groups) != len(self.units):
            raise ValueError(f"the optimizer has {len(optimizer.param_groups)} param groups but "
                             f"there are {len(self.units)} units; build it from param_groups(units)")
        for i, (unit, group) in enumerate(zip(self.units, optimizer.param_groups)):
            if {id(p) for p in unit_parameters(unit)} != {id(p) for p in group["params"]}:
                raise ValueError(f"param group {i} does not hold exactly the parameters of unit {i}; "
                                 "build the optimizer from param_groups(units)")
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps}")
        self.total_steps = int(total_steps)
        self.t_0 = check_t_0(t_0)
        self.how_scale = check_how_scale(how_scale)
        self.scale_lr = bool(scale_lr)
        self.t_i = unit_times(len(self.units), self.t_0, self.how_scale)
        self.frozen_at: list[int | None] = [None] * len(self.units)
        self.num_frozen = 0
        self._order_watch = None
        self._warned_past_end = False  # a loop that runs past total_steps is told once
        super().__init__(optimizer, last_epoch)
        self._watch_forward_order()

    # -- the schedule -------------------------------------------------------------------
    def alphas(self) -> list[float]:
        """Initial learning rate alpha_i of every unit."""
        if self.scale_lr:
            return [base / t for base, t in zip(self.base_lrs, self.t_i)]
        return [float(base) for base in self.base_lrs]

    def lr_at(self, step: int) -> list[float]:
        """Every unit's learning rate for optimizer step `step` (counted from 0), from the formula
        alone: the one source of the rates, for the scheduler itself and for anything that needs
        them ahead of time (a table of rates uploaded once, a figure)."""
        return [unit_lr(step, t_i, self.total_steps, alpha)
                for t_i, alpha in zip(self.t_i, self.alphas())]

    def get_lr(self) -> list[float]:
        return self.lr_at(self.last_epoch)

    def step(self, epoch: None = None) -> None:
        if epoch is not None:
            raise TypeError("FreezeOut.step() takes no epoch; call it once per optimizer step")
        if self._order_watch is not None:
            self._check_forward_order()
        if self.last_epoch >= self.total_steps and not self._warned_past_end:
            self._warned_past_end = True
            warnings.warn(f"FreezeOut.step() after optimizer step {self.last_epoch}, past the end of "
                          f"the run (total_steps={self.total_steps}: steps 0 to "
                          f"{self.total_steps - 1}); every learning rate stays 0", stacklevel=2)
        super().step()
        self._freeze_due_units()

    # -- the units must be listed in forward order ------------------------------------------
    def _watch_forward_order(self) -> None:
        """Record which modules run until the first step: freezing saves work only if the frozen
        units are a prefix of the forward pass. A process-wide hook, so that copies of the model
        (an EMA, a FLOP count) neither carry it nor feed it, and so that units the model never
        calls itself (slices of an nn.Sequential) are seen running through their modules."""
        # Every module called, in the order of its first call; held until the first step, so
        # that no id is reused by another module meanwhile.
        ran: dict[int, nn.Module] = {}

        def record(module, args):
            if id(module) not in ran:
                ran[id(module)] = module

        handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
        self._order_watch = (handle, ran)
        weakref.finalize(self, handle.remove)

    def _check_forward_order(self) -> None:
        handle, ran = self._order_watch
        handle.remove()
        self._order_watch = None
        if not ran:  # no forward pass before the first step: nothing to judge
            return
        unit_of = _module_units(self.units)
        first_calls = list(dict.fromkeys(unit_of[key] for key in ran if key in unit_of))
        for a, b in zip(first_calls, first_calls[1:]):
            if b < a:
                raise ValueError(f"FreezeOut units are not in forward order: unit {a} ran before "
                                 f"unit {b}. Frozen units must be a prefix of the forward pass; "
                                 "list the units in the order the model calls them")
        missing = sorted(set(range(len(self.units))) - set(first_calls))
        if missing:
            warnings.warn(f"FreezeOut units {missing} did not run in the first training step; "
                          "freezing them saves nothing if they are not part of the forward pass",
                          stacklevel=3)
        left_out = _trainable_modules_outside(list(ran.values()), unit_of)
        if left_out:
            warnings.warn("FreezeOut: modules that ran in the first step hold trainable parameters "
                          "but belong to no unit, so they are never annealed or frozen: "
                          + _describe(left_out), stacklevel=3)

    # -- freezing -----------------------------------------------------------------------
    @property
    def frozen(self) -> list[bool]:
        return [i < self.num_frozen for i in range(len(self.units))]

    def _freeze_due_units(self) -> None:
        # Units freeze in index order (t_i never decreases with i), so only the next ones
        # can be due: O(newly frozen units) per step, no loop over parameters.
        k = self.last_epoch
        if k >= self.total_steps:
            return
        while self.num_frozen < len(self.units) and k >= self.t_i[self.num_frozen] * self.total_steps:
            self.frozen_at[self.num_frozen] = k
            self._freeze(self.num_frozen)
            self.num_frozen += 1

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
            self._order_watch[0].remove()
            self._order_watch = None
        for i in range(self.num_frozen):
            self._freeze(i)
        self._last_lr = list(state_dict["_last_lr"])
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


# -- units for any model -------------------------------------------------------------------
def find_units(model: nn.Module, example_input, groups: int | None = None) -> list[Unit]:
    """The units of any model, found by running it once on `example_input` (a tensor, or a tuple
    of positional arguments): the modules that own parameters themselves, in the order they
    first run. With groups=n they are cut into n contiguous lists of modules of about equal
    parameter count (the largest as small as can be). A module that owns parameters and holds
    submodules that own some too is one unit with all of them, since a unit is a whole module.

        units = find_units(model, torch.randn(2, 3, 32, 32), groups=8)
        optimizer = torch.optim.SGD(param_groups(units), lr=0.1, momentum=0.9)
        scheduler = FreezeOut(optimizer, units, total_steps=T)

    Only the order of execution is judged, not the dataflow: freezing a prefix of that order
    saves work as long as no later unit feeds an earlier one, which one pass cannot check
    cheaply (a ResNet's shortcut convolution runs after the block's main path but reads the
    block's input: still a valid prefix). What the order itself rules out is refused with a
    ValueError: a module that runs at two places with other units in between (weight sharing
    across the network), and a trainable parameter that would be in two units (tied weights).
    Modules with trainable parameters that never run are left out, with a warning.

    The pass runs without gradients, in the model's current mode, and leaves nothing behind:
    the buffers (batch-norm statistics) and the random number generators are restored.
    """
    unit_of = _owner_units(model)
    calls = _calls_in_one_pass(model, example_input, _owners(model))
    names = {id(m): name for name, m in model.named_modules()}
    units = _units_in_order([unit_of[id(m)] for m in calls], names)
    ran = {id(u) for u in units}
    never_ran = [(names[id(m)], m) for m in _owners(model) if id(unit_of[id(m)]) not in ran]
    if any(_owns_trainable(m) for _, m in never_ran):
        warnings.warn("find_units: modules with trainable parameters did not run on the example "
                      "input and are left out of the units: "
                      + _describe([(n, m) for n, m in never_ran if _owns_trainable(m)]), stacklevel=2)
    if groups is not None:
        units = _balanced_groups(units, groups)
    left_out = {id(p) for _, m in never_ran for p in m.parameters(recurse=False)}
    _check_every_parameter_once(model, units, left_out)
    return units


def _owners(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _owns_parameters(m)]


def _owner_units(model: nn.Module) -> dict[int, nn.Module]:
    """id of every module that owns parameters -> its unit: the module itself, or the outermost
    module above it that owns parameters too. The model itself cannot be that module: one unit
    for the whole model would freeze nothing until the end."""
    unit_of: dict[int, nn.Module] = {}
    for module in model.modules():  # parents before children
        if _owns_parameters(module) and id(module) not in unit_of:
            if module is model and sum(map(_owns_parameters, model.modules())) > 1:
                own = ", ".join(n for n, _ in model.named_parameters(recurse=False))
                raise ValueError(f"find_units: {type(model).__name__} owns parameters itself ({own}) "
                                 "besides those of its submodules, and a unit is a whole module, so "
                                 "the whole model would be one unit; move them into a submodule, or "
                                 "list the units by hand")
            for inner in module.modules():
                if _owns_parameters(inner):
                    unit_of.setdefault(id(inner), module)
    return unit_of


def _calls_in_one_pass(model: nn.Module, example_input, watched: list[nn.Module]) -> list[nn.Module]:
    """Every call of a `watched` module during one forward pass, in order. Without gradients;
    the buffers and the random number generators are put back, so finding the units changes
    nothing in the run that follows (dropout and batch statistics still work as in training)."""
    calls: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda module, args: calls.append(module))
               for m in watched]
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    cuda = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    return calls


def _units_in_order(called_units: list[nn.Module], names: dict[int, str]) -> list[nn.Module]:
    """The units in order of first run; a unit that runs again after another one has run cannot
    be part of a frozen prefix (or of the trained rest) and is refused."""
    order: list[nn.Module] = []
    for unit in called_units:
        if order and order[-1] is unit:
            continue  # called again straight away (a loop over one layer): still one place
        if any(u is unit for u in order):
            raise ValueError(f"find_units: module {names[id(unit)] or 'the model'!r} "
                             f"({type(unit).__name__}) runs at two places of the forward pass with "
                             f"{names[id(order[-1])]!r} and maybe others in between (weight "
                             "sharing); no frozen prefix of the forward pass can hold it, so FreezeOut cannot "
                             "use it as a unit")
        order.append(unit)
    return order


def _balanced_groups(units: list[nn.Module], n: int) -> list[list[nn.Module]]:
    """The units cut into n contiguous non-empty groups whose largest parameter count is as
    small as can be: a binary search on that largest count, each try cut greedily."""
    if isinstance(n, bool) or int(n) != n or not 1 <= n <= len(units):
        raise ValueError(f"groups must be an integer between 1 and {len(units)} (the number of "
                         f"modules that own parameters), got {n}")
    n = int(n)
    sizes = [sum(p.numel() for p in unit_parameters(u)) for u in units]
    low, high = max(sizes), sum(sizes)
    while low < high:
        cap = (low + high) // 2
        if len(_cuts(sizes, n, cap)) == n:
            high = cap
        else:
            low = cap + 1
    starts = _cuts(sizes, n, low)
    return [units[a:b] for a, b in zip(starts, starts[1:] + [len(units)])]


def _cuts(sizes: list[int], n: int, cap: int) -> list[int]:
    """Where each group starts when a group closes before it would exceed `cap`, or when the
    items left are only just enough for one group each. At least n groups; exactly n when
    `cap` allows n groups at all."""
    starts, total = [0], 0
    for j, size in enumerate(sizes):
        if j > starts[-1] and (total + size > cap or len(sizes) - j == n - len(starts)):
            starts.append(j)
            total = 0
        total += size
    return starts


def _check_every_parameter_once(model: nn.Module, units: list, left_out: set[int]) -> None:
    """Every trainable parameter of the model, but those of modules that never ran, must be in
    exactly one unit, or param_groups(units) would not cover the model (or would refuse it)."""
    count = Counter(id(p) for unit in units for p in unit_parameters(unit))
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in left_out and count[id(p)] != 1:
            holders = ", ".join(repr(n) for n, m in model.named_modules()
                                if any(q is p for q in m.parameters(recurse=False)))
            raise ValueError(f"find_units: trainable parameter {name!r} (held by {holders}) would be "
                             f"in {count[id(p)]} units, not exactly one (tied weights?); "
                             "FreezeOut needs every parameter in exactly one unit")
