"""The speedup FreezeOut can give any model, from FLOPs counted by PyTorch.

    estimate_speedup(model, units, torch.randn(1, 3, 224, 224), t_0=0.8, how_scale="cubic")
    t_0_for_speedup(model, units, torch.randn(1, 3, 224, 224), target=0.2)

Each unit's forward and backward FLOPs are counted with `torch.utils.flop_counter.
FlopCounterMode` on a copy of the model on the meta device (shapes only, no arithmetic, the
model itself untouched); a training step with the first n units frozen costs every unit's
forward, the backward of the units still training, and for the first of them only its weight
gradients. The speedup of a schedule is then 1 - cost(FreezeOut run) / cost(baseline run).
It estimates FLOPs saved, not time: `benchmark.py` in the repository measures time.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .schedule import unit_times
from .units import Unit, _model_modules, cannot_run, example_arguments, unit_parameters

# The scripts count FLOPs on a (2, 3, 32, 32) batch: FLOP ratios do not depend on the batch size.
ESTIMATE_INPUT = (2, 3, 32, 32)


def estimate_speedup(model: nn.Module, units: Sequence[Unit], example_input, t_0: float = 0.8,
                     how_scale: str = "cubic", total_steps: Optional[int] = None) -> float:
    """Fraction of a run's training FLOPs that FreezeOut saves on `model` with these units and
    this schedule (scaled or not: the learning rates do not change the FLOPs).

    `units`: what FreezeOut takes (`unit_modules`): modules of the model, lists of them, or
    containers of them such as slices of an nn.Sequential (a slice gives the same figure as the
    list of its modules). `example_input`: what the model is called with, a tensor or a tuple
    of positional arguments (a batch of one will do), or a shape as a tuple or torch.Size (not a
    list: a TypeError, as for anything else that is no example input). With `total_steps` the run's real steps
    are counted, without it the schedule's continuous limit (smooth in t_0). The model is left
    exactly as it was: weights, buffers, train/eval mode, hooks, random number generators.
    """
    levels = training_flops_by_level(unit_flops(model, units, example_input))
    return schedule_speedup(levels, unit_times(len(units), t_0, how_scale), total_steps)


def t_0_for_speedup(model: nn.Module, units: Sequence[Unit], example_input, target: float,
                    how_scale: str = "cubic", total_steps: Optional[int] = None) -> float:
    """The t_0 in (0, 1] at which `estimate_speedup` equals `target` (a fraction, 0.2 for 20%).
    ValueError when no t_0 reaches it. The FLOPs are counted once."""
    levels = training_flops_by_level(unit_flops(model, units, example_input))
    return solve_t_0(target, lambda t_0: schedule_speedup(levels, unit_times(len(units), t_0, how_scale),
                                                          total_steps),
                     f"the FLOP estimate for {how_scale}")


def solve_t_0(target: float, estimate: Callable[[float], float], what: str = "the estimate") -> float:
    """The t_0 in (0, 1] at which `estimate(t_0)` (decreasing in t_0, 0 at t_0 = 1) equals
    `target`, found by bisection."""
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise TypeError(f"target speedup must be a number, got {target!r}")
    if not math.isfinite(target) or target < 0:
        raise ValueError(f"target speedup must be a number >= 0, got {target}")
    if target == 0:
        return 1.0
    lo, hi = 1e-6, 1.0
    best = estimate(lo)
    if best < target:
        raise ValueError(f"no t_0 in (0, 1] reaches a speedup of {target:g}: "
                         f"{what} is at most {best:.4f}")
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if estimate(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo


def first_frozen_steps(t_i: Sequence[float], total_steps: int) -> list[int]:
    """The step at which each unit is first frozen (FreezeOut's `k >= t_i * T`), or
    `total_steps` for a unit that trains to the end."""
    return [min(math.ceil(t * total_steps), total_steps) for t in t_i]


def schedule_speedup(level_costs: Sequence[float], t_i: Sequence[float],
                     total_steps: Optional[int] = None) -> float:
    """1 - cost(FreezeOut run) / cost(baseline run), where level_costs[n] is the cost (FLOPs,
    seconds, ...) of one training step with the first n units frozen.

    With `total_steps` the run's real steps are counted (unit i frozen from step
    ceil(t_i * T) on); without, the schedule's continuous limit (unit i frozen for the last
    1 - t_i of the run), which is smooth in t_0.
    """
    if total_steps is None:
        ends = list(t_i)
        total_steps = 1.0
    else:
        ends = first_frozen_steps(t_i, total_steps)
    cost, start = 0.0, 0.0
    for n, end in enumerate(ends):  # from start to end the step has n units frozen
        cost += (end - start) * level_costs[n]
        start = max(start, end)
    return 1.0 - cost / (total_steps * level_costs[0])


def training_flops_by_level(per_unit: Sequence[dict]) -> list[int]:
    """FLOPs of one training step with the first n units frozen, n = 0..N: every unit runs
    forward, active units run backward, and the first active unit (like the stem, whose input
    is the data) needs no gradient for its input."""
    forward = sum(u["forward"] for u in per_unit)
    costs = []
    for n in range(len(per_unit)):
        backward = sum(u["backward"] for u in per_unit[n + 1:])
        costs.append(forward + per_unit[n]["backward_no_input_grad"] + backward)
    return costs


def unit_flops(model: nn.Module, units: Sequence[Unit], example_input) -> list[dict]:
    """Per-unit FLOPs of a training step, counted by `torch.utils.flop_counter.FlopCounterMode`:
    `forward`, `backward` (weight and input gradients) and `backward_no_input_grad` (weight
    gradients only, what the first active unit after a frozen prefix computes).

    `example_input` is a shape (a tuple or torch.Size; a list is refused), a tensor, or a tuple
    of positional arguments; anything else is a TypeError, and one the model cannot run on a
    ValueError, each one line that says what example_input must be. Counted on a copy
    of the model on the meta device, in training mode: one forward pass records each unit's
    inputs, then every module of every unit is run on its own, once forward and twice
    backward (with and without its input's gradient). A batch of one is counted as a
    batch of two, halved: batch norm refuses to train on a single value per channel, and the
    FLOPs of a batch are the sum of its examples'.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: count the model inside
    # Each unit as the model's own modules (a slice of an nn.Sequential is a new container: its
    # modules stand for it), named, so that the copy's modules of the same names are counted.
    name_of = {id(m): name for name, m in model.named_modules()}
    unit_names = [[name_of[id(m)] for m in _model_modules(u, name_of, f"unit {i}")]
                  for i, u in enumerate(units)]
    args, per_example = _meta_arguments(example_input)
    meta = _meta_copy(model, {id(p) for u in units for p in unit_parameters(u)})
    modules = dict(meta.named_modules())
    try:
        inputs = _unit_inputs(meta, modules, {n for names in unit_names for n in names}, args)
    except Exception as e:  # whatever the model raises on an input it cannot take
        given = example_arguments(example_input)[0] or (torch.empty(tuple(example_input), device="meta"),)
        raise cannot_run(given, e, " (counting FLOPs on a meta copy of it)") from None

    def count(name: str) -> tuple[int, int, int]:
        """(forward, backward, backward without the input gradients) of one module, from one
        forward pass: autograd computes what the gradients asked for need, nothing more."""
        args, kwargs = inputs[name]
        args = [a.detach().requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a for a in args]
        with FlopCounterMode(display=False) as forward:
            out = modules[name](*args, **kwargs)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
                if torch.is_tensor(o) and o.requires_grad]
        weights = [p for p in modules[name].parameters() if p.requires_grad]
        given = [a for a in args if torch.is_tensor(a) and a.requires_grad]
        total = sum(o.float().sum() for o in outs) if outs else None
        counts = [forward.get_total_flops()]
        for wanted in (weights + given, weights):
            with FlopCounterMode(display=False) as backward:
                if total is not None and wanted:
                    torch.autograd.grad(total, wanted, retain_graph=True, allow_unused=True)
            counts.append(backward.get_total_flops())
        return tuple(c // per_example for c in counts)

    result = []
    for names in unit_names:
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ValueError(f"unit module {missing[0]!r} is not called by the model's forward pass")
        counts = [count(n) for n in names]
        result.append({"forward": sum(c[0] for c in counts), "backward": sum(c[1] for c in counts),
                       "backward_no_input_grad": sum(c[2] for c in counts)})
    return result


def _meta_arguments(example_input) -> tuple[tuple, int]:
    """(the model's positional arguments on the meta device, the factor the batch was grown by).
    A batch of one becomes a batch of two, so that batch norm may train on it. What an example
    input may be: `units.example_arguments` (a list is none: TypeError)."""
    args, shape = example_arguments(example_input)
    if args is None:
        args = (torch.empty(shape, device="meta"),)
    tensors = [a for a in args if torch.is_tensor(a)]
    grow = 2 if all(a.dim() > 0 and a.shape[0] == 1 for a in tensors) else 1
    return tuple(torch.empty((a.shape[0] * grow, *a.shape[1:]), dtype=a.dtype, device="meta")
                 if torch.is_tensor(a) and a.dim() > 0 else a for a in args), grow


def _meta_copy(model: nn.Module, trained: set[int]) -> nn.Module:
    """A copy of the model on the meta device, in training mode, as the run starts: the units'
    parameters (ids in `trained`) require gradients and no module is held in inference mode,
    whatever a scheduler has frozen since, so the estimate is the same at any point of a run;
    parameters outside the units keep their own `requires_grad`. The model itself keeps its
    weights, buffers, mode and hooks. Parameters are made meta before they are copied, so a
    model on a GPU is not first duplicated there."""
    memo = {id(b): torch.empty_like(b, device="meta") for b in model.buffers()}
    memo.update({id(p): nn.Parameter(torch.empty_like(p, device="meta"),
                                     requires_grad=p.requires_grad or (id(p) in trained and p.is_floating_point()))
                 for p in model.parameters()})
    meta = copy.deepcopy(model, memo)
    for module in meta.modules():
        module.__dict__.pop("train", None)  # a frozen unit's hold on inference mode (units.freeze)
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None  # model.compile(): count eagerly, dynamo cannot trace meta models well
    return meta.train()


def _unit_inputs(meta: nn.Module, modules: dict, names: set[str], args: tuple) -> dict:
    """name -> (args, kwargs) of the first call of each named module in one forward pass."""
    inputs, hooks = {}, []
    for name in names:
        def record(module, args, kwargs, name=name):
            inputs.setdefault(name, (args, kwargs))
        hooks.append(modules[name].register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            meta(*args)
    finally:
        for h in hooks:
            h.remove()
    return inputs
