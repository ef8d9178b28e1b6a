"""FreezeOut's units: what a unit is, one optimizer param group per unit, freezing a unit for
good, and finding the units of any model by running it once.

A unit is a module, a list or tuple of modules (resnet18's stem is `[conv1, bn1]`), or a
container of the model's modules that the model itself does not hold: a slice of an
nn.Sequential (`model[0:3]` is a new nn.Sequential), a new nn.ModuleList. A list may also hold
parameters that a module owns directly beside its submodules (a ViT's cls_token and pos_embed
join its patch embedding: `[vit.patch_embed, vit.cls_token, vit.pos_embed]`). `unit_modules`
and `unit_parameters` are the one rule, used by the scheduler, `param_groups`, `freeze`, the
order check and the estimate. A model's units are listed in forward order, so that the frozen
ones are always a prefix of the forward pass.
"""
from __future__ import annotations

import types
import warnings
from collections import Counter
from collections.abc import Container
from typing import Iterable, Sequence, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

Unit = Union[nn.Module, Sequence[Union[nn.Module, nn.Parameter]]]


WHAT_A_UNIT_IS = ("a unit is a module, a list or tuple of modules (and of parameters that the model's modules "
                  "own directly, such as a ViT's cls_token), or a container of the model's modules (a slice of "
                  "an nn.Sequential, an nn.ModuleList)")


def unit_modules(unit: Unit, model: nn.Module | None = None) -> list[nn.Module]:
    """The modules a unit is made of: the one rule for what a unit is.

    A unit is a module, a list or tuple of modules, or a container of the model's modules;
    anything else is a TypeError. Without `model`, the modules as listed (`[unit]` for a
    module). With `model`, the model's own modules that make the unit: a module the model holds
    (one of `model.modules()`, a container such as `model.layer1` or the model itself included)
    stays as it is; a module the model does not hold, with submodules and no parameters or
    buffers of its own (a slice of an nn.Sequential, a new nn.ModuleList), stands for its
    children, resolved in turn. A module that is neither is not part of the model: ValueError.
    """
    if model is None:
        return _as_modules(unit)
    return _model_modules(unit, {id(m) for m in model.modules()})


def _model_modules(unit: Unit, held: Container[int], which: str | None = None) -> list[nn.Module]:
    """`unit_modules(unit, model)` where `held` holds the ids of the model's modules (a dict
    keyed by id, from named_modules, will do); `which` names the unit in the ValueError."""
    resolved: list[nn.Module] = []

    def resolve(module: nn.Module) -> None:
        if id(module) in held:
            resolved.append(module)
            return
        children = list(module.children())
        if not children or _owns_state(module):
            where = f"{which}: " if which else ""
            own = " (it holds parameters or buffers of its own)" if children else ""
            raise ValueError(f"{where}{type(module).__name__}({module.extra_repr()}) is not a submodule "
                             f"of the model, nor a container of the model's modules{own}; {WHAT_A_UNIT_IS}")
        for child in children:
            resolve(child)

    for module in _as_modules(unit, which):
        resolve(module)
    return resolved


def _as_modules(unit, which: str | None = None) -> list[nn.Module]:
    """The unit's modules as listed (its parameters listed on their own left out); TypeError,
    saying what a unit is, for anything else."""
    if isinstance(unit, nn.Module):
        return [unit]
    where = f"{which}: " if which else ""
    if isinstance(unit, Sequence) and not isinstance(unit, (str, bytes, torch.Tensor)):
        for i, item in enumerate(unit):
            if not isinstance(item, (nn.Module, nn.Parameter)):
                raise TypeError(f"{where}{WHAT_A_UNIT_IS}; got a {type(unit).__name__} whose item {i} "
                                f"is {type(item).__name__} {_short(item)}")
        return [item for item in unit if isinstance(item, nn.Module)]
    raise TypeError(f"{where}{WHAT_A_UNIT_IS}; got {type(unit).__name__} {_short(unit)}")


def _listed_parameters(unit: Unit) -> list[nn.Parameter]:
    """The parameters a unit lists on their own (a ViT's cls_token), beside its modules."""
    if isinstance(unit, nn.Module):
        return []
    return [item for item in unit if isinstance(item, nn.Parameter)]


def _short(value, limit: int = 60) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


WHAT_AN_EXAMPLE_IS = ("example_input must be a tensor, a tuple of the model's positional arguments, or a "
                      "shape as a tuple or torch.Size, such as (1, 3, 32, 32)")


def example_arguments(example_input) -> tuple[tuple | None, tuple[int, ...] | None]:
    """(the model's positional arguments, None) or (None, the shape of its one input): what an
    example input is, one rule for `find_units` and the estimate. A tensor; a tuple holding a
    tensor (positional arguments); a tuple of positive integers or a torch.Size (a shape). A
    list is none of these (a list of numbers may be data as well as a shape): TypeError, as for
    anything that is no example input at all; a tuple that is no shape is a ValueError."""
    if isinstance(example_input, torch.Tensor):
        return (example_input,), None
    if isinstance(example_input, tuple) and any(torch.is_tensor(a) for a in example_input):
        return example_input, None
    if isinstance(example_input, (tuple, torch.Size)):
        if example_input and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in example_input):
            return None, tuple(example_input)
        raise ValueError(f"{WHAT_AN_EXAMPLE_IS}; got {example_input!r}, which is neither (a shape is made of "
                         f"positive integers)")
    hint = ""
    if isinstance(example_input, list):
        if example_input and all(isinstance(d, int) and not isinstance(d, bool) for d in example_input):
            hint = f" (a list is not taken as a shape: write {tuple(example_input)!r})"
        elif any(torch.is_tensor(a) for a in example_input):
            hint = " (a list is not taken as positional arguments: write them as a tuple)"
    elif isinstance(example_input, int) and not isinstance(example_input, bool):
        hint = f" (groups={example_input}? the example input comes first: find_units(model, example_input, groups=n))"
    raise TypeError(f"{WHAT_AN_EXAMPLE_IS}; got {type(example_input).__name__} {_short(example_input)}{hint}")


def describe_arguments(args: tuple) -> str:
    """A model's example arguments in words: "a tensor of shape (4, 16)"."""
    def one(a) -> str:
        return f"a tensor of shape {tuple(a.shape)}" if torch.is_tensor(a) else f"{type(a).__name__} {_short(a)}"
    return one(args[0]) if len(args) == 1 else f"{len(args)} arguments: " + ", ".join(map(one, args))


def cannot_run(args: tuple, error: Exception, where: str = "") -> ValueError:
    """The one-line error for a model that fails on its example input."""
    text = " ".join(str(error).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return ValueError(f"example_input: the model cannot run on {describe_arguments(args)}{where}: "
                      f"{type(error).__name__}: {text}; example_input must be what the model is called with: "
                      f"a tensor, a tuple of its positional arguments, or the shape of its one input")


def unit_parameters(unit: Unit) -> list[nn.Parameter]:
    """The parameters of the unit's modules, then those it lists on their own (each once)."""
    params = [p for m in unit_modules(unit) for p in m.parameters()]
    held = {id(p) for p in params}
    listed = {id(p): p for p in _listed_parameters(unit) if id(p) not in held}
    return params + list(listed.values())


def param_groups(units: Iterable[Unit], **group_options) -> list[dict]:
    """One optimizer param group per unit, in unit order (what FreezeOut expects).

    Extra keyword arguments (say weight_decay=0) go into every group.
    """
    groups, seen = [], set()
    for i, unit in enumerate(units):
        _as_modules(unit, f"unit {i}")  # what is no unit: a TypeError that says what a unit is
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


class _Required:
    def __repr__(self) -> str:
        return "<required>"


_REQUIRED = _Required()


def find_units(model: nn.Module, example_input=_REQUIRED, groups: int | None = None) -> list[Unit]:
    """The units of any model, found by running it once on `example_input` (required: what the
    model is called with, a tensor, a tuple of positional arguments, or a shape such as
    (2, 3, 32, 32) for a random input), in the order they first run:

    - a model made of blocks, an nn.Sequential of which two children or more are blocks of the
      same make (`nn.Sequential(*blocks, head)`, blocks that hold several layers each): its
      children that hold parameters, each block whole (a Sequential that wraps a single such
      model is looked into);
    - any other model: the modules that own parameters themselves (a ResNet's every conv, batch
      norm and fc). A module that owns parameters and holds submodules that own some too is one
      unit with all of them, since a unit is a whole module; but the model itself (or the one
      module that wrappers around it lead to) is not cut that way: the parameters it owns
      directly (a ViT's cls_token and pos_embed, a top-level bias) join the unit that ran last
      before their first use, or the first unit when none had (`[patch_embed, cls_token,
      pos_embed]`), so that every parameter is in a unit and the frozen prefix needs no
      gradient.

    With groups=n they are cut into n contiguous lists of modules of about equal parameter count
    (the largest as small as can be).

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
    if example_input is _REQUIRED:
        raise TypeError("find_units(model, example_input, groups=None) needs an example input: it runs the model "
                        "once on it to see the order its modules run in; give what the model is called with, "
                        "a tensor such as torch.randn(2, 3, 32, 32), a "
                        "tuple of its positional arguments, or a shape such as (2, 3, 32, 32)")
    args, shape = example_arguments(example_input)
    top = _top_module(model)
    loose = list(top.parameters(recurse=False)) if any(_owns_parameters(m) for m in top.modules()
                                                       if m is not top) else []
    owners = [m for m in _owners(model) if not (loose and m is top)]
    unit_of = _owner_units(model, top if loose else None)
    calls, first_use = _calls_in_one_pass(model, args, shape, owners, loose)
    names = {id(m): name for name, m in model.named_modules()}
    units = None
    block_of = _block_units(model)
    if block_of is not None:
        try:
            units = _units_in_order([block_of[id(m)] for m in calls], names)
            unit_of = block_of
        except ValueError:  # blocks that do not run one after another: their modules, as for any model
            pass
    if units is None:
        units = _units_in_order([unit_of[id(m)] for m in calls], names)
    ran = {id(u) for u in units}
    never_ran = [(names[id(m)], m) for m in owners if id(unit_of[id(m)]) not in ran]
    if any(_owns_trainable(m) for _, m in never_ran):
        warnings.warn("find_units: modules with trainable parameters did not run on the example "
                      "input and are left out of the units: "
                      + _describe([(n, m) for n, m in never_ran if _owns_trainable(m)]), stacklevel=2)
    members = [[u] for u in units]
    index = {id(u): i for i, u in enumerate(units)}
    for p in loose:  # each to the unit that ran last before its first use; the first unit else
        used_after = first_use.get(id(p), 0)
        members[index[id(unit_of[id(calls[used_after - 1])])] if used_after else 0].append(p)
    if groups is not None:
        units = _balanced_groups(members, groups)
    else:
        units = [m[0] if len(m) == 1 else m for m in members]
    left_out = {id(p) for _, m in never_ran for p in m.parameters(recurse=False)}
    _check_every_parameter_once(model, units, left_out)
    return units


def _owners(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _owns_parameters(m)]


def _top_module(model: nn.Module) -> nn.Module:
    """The model, or the module that wrappers holding nothing else lead to: `nn.Sequential(vit)`
    is cut as `vit` is."""
    top = model
    while not _owns_parameters(top):
        holders = [c for c in top.children() if next(c.parameters(), None) is not None]
        if len(holders) != 1:
            break
        top = holders[0]
    return top


def _owner_units(model: nn.Module, cut: nn.Module | None = None) -> dict[int, nn.Module]:
    """id of every module that owns parameters -> its unit: the module itself, or the outermost
    module above it that owns parameters too; `cut`, a module that owns parameters itself (the
    model, a ViT), is no unit: its submodules are units of their own, and its own parameters are
    placed by find_units."""
    unit_of: dict[int, nn.Module] = {}
    for module in model.modules():  # parents before children
        if _owns_parameters(module) and id(module) not in unit_of and module is not cut:
            for inner in module.modules():
                if _owns_parameters(inner):
                    unit_of.setdefault(id(inner), module)
    return unit_of


def _block_units(model: nn.Module) -> dict[int, nn.Module] | None:
    """For a model made of blocks: id of every module that owns parameters -> the child of the
    model that holds it; None for any other model. Made of blocks: an nn.Sequential (or one
    that wraps a single such) of which two children or more are blocks of the same make (the
    same classes of modules, nested alike, whatever their sizes), a block being a child in which
    several modules own parameters. `nn.Sequential(*blocks, head)` is; `nn.Sequential(backbone,
    head)` is not (its backbone would be one unit), nor is a flat `nn.Sequential` of layers."""
    module = model
    while isinstance(module, nn.Sequential) and not _owns_parameters(module):
        holders = [c for c in module.children() if next(c.parameters(), None) is not None]
        if len(holders) != 1:
            break
        module = holders[0]
    if not isinstance(module, nn.Sequential) or _owns_parameters(module):
        return None
    holders = [c for c in module.children() if next(c.parameters(), None) is not None]
    blocks = Counter(_make(c) for c in holders if sum(map(_owns_parameters, c.modules())) > 1)
    if not any(n > 1 for n in blocks.values()):
        return None
    return {id(inner): child for child in holders for inner in child.modules() if _owns_parameters(inner)}


def _make(module: nn.Module) -> tuple:
    """What a module is made of, sizes aside: its class and its children's makes, in order."""
    return type(module), tuple(_make(c) for c in module.children())


def _calls_in_one_pass(model: nn.Module, args: tuple | None, shape: tuple | None, watched: list[nn.Module],
                       loose: Sequence[nn.Parameter] = ()) -> tuple[list[nn.Module], dict[int, int]]:
    """Every call of a `watched` module during one forward pass on `args` (or on a random
    tensor of `shape`, on the model's device), in order, and for each of the `loose` parameters
    that the pass uses, id -> how many calls came before its first use. A batch of one that the
    model refuses (batch norm in training mode) is run again as a batch of two. Without
    gradients; the buffers and the random number generators are put back, so finding the units
    changes nothing in the run that follows (dropout and batch statistics still work as in
    training)."""
    calls: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda module, args: calls.append(module))
               for m in watched]
    first_use = _FirstUse(loose, calls)
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            if args is None:
                p = next((p for p in model.parameters() if p.is_floating_point()), None)
                args = (torch.randn(shape, device=p.device if p is not None else None,
                                    dtype=p.dtype if p is not None else None),)
            try:
                with first_use:
                    model(*args)
            except Exception as e:  # whatever the model raises on an input it cannot take
                if not _batch_of_one(args):
                    raise cannot_run(args, e) from None
                # Batch norm does not train on one value per channel: the batch of one, twice.
                calls.clear()
                first_use.at.clear()
                try:
                    with first_use:
                        model(*[torch.cat([a, a]) if torch.is_tensor(a) else a for a in args])
                except Exception:
                    raise cannot_run(args, e) from None
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    return calls, first_use.at


class _FirstUse(TorchFunctionMode):
    """Records, for each of `params`, how many module calls had been made (len(calls)) when a
    torch function or tensor method first took it as an argument."""

    def __init__(self, params: Sequence[nn.Parameter], calls: list):
        super().__init__()
        self.ids, self.calls, self.at = {id(p) for p in params}, calls, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if len(self.at) < len(self.ids):
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and id(leaf) in self.ids:
                    self.at.setdefault(id(leaf), len(self.calls))
        return func(*args, **kwargs)


def _batch_of_one(args: tuple) -> bool:
    tensors = [a for a in args if torch.is_tensor(a)]
    return bool(tensors) and all(a.dim() > 0 and a.shape[0] == 1 for a in tensors)


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


def _balanced_groups(units: list[list], n: int) -> list[list]:
    """The units (each a list: a module and the parameters that joined it) cut into n contiguous
    non-empty groups whose largest parameter count is as small as can be: a binary search on
    that largest count, each try cut greedily."""
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
    return [[item for unit in units[a:b] for item in unit]
            for a, b in zip(starts, starts[1:] + [len(units)], strict=True)]


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
