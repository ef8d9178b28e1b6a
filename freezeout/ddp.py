"""FreezeOut under DistributedDataParallel, in any training loop: frozen units leave the
gradient all-reduce.

DDP builds its reducer once, over the parameters that require gradients when it is made, and
from then on waits in every step for a gradient of each of them. Once FreezeOut freezes a unit
its parameters get none: with find_unused_parameters=False the step that follows fails
("Expected to have finished reduction in the prior iteration before starting a new one"),
the step before it having all-reduced nothing; with find_unused_parameters=True DDP searches the
autograd graph after every forward pass and still all-reduces every frozen parameter's gradient,
so freezing saves no communication.

`follow_freezing(scheduler, ddp)` rebuilds the DDP module's reducer over the parameters still
training whenever the scheduler freezes units: the same step on every rank, since every rank
runs the same schedule. The all-reduce then carries only what still trains, with
find_unused_parameters=False as with True, and the DDP object stays the one the training loop
(or a trainer) holds. The reducer is rebuilt the way DDP itself rebuilds it when unpickled;
building a new DDP wrapper instead costs a broadcast of the whole model per freeze, and a
communication hook over the trainable slices needs find_unused_parameters=True and its search
of the graph in every step (docs/integrations.md measures the three).

    model = DistributedDataParallel(model)          # find_unused_parameters=False will do
    optimizer = torch.optim.SGD(freezeout.param_groups(units), lr=0.1, momentum=0.9)
    scheduler = freezeout.FreezeOut(optimizer, units, total_steps=T)
    follow_freezing(scheduler, model)
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from .schedule import FreezeOut
from .units import unit_modules, unit_parameters


def _ddp_class():
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel


def check_ddp(ddp: nn.Module) -> None:
    """ValueError, in one line that says what to change, for a DDP module whose reducer cannot
    follow FreezeOut's freezing."""
    if not isinstance(ddp, _ddp_class()):
        raise TypeError(f"follow_freezing needs a torch.nn.parallel.DistributedDataParallel module, "
                        f"got {type(ddp).__name__}")
    if getattr(ddp, "static_graph", False):
        raise ValueError("FreezeOut under DDP: static_graph=True tells DDP that the same parameters train in "
                         "every step, which freezing changes; make the DDP module with static_graph=False "
                         "(Lightning: DDPStrategy(static_graph=False); Hugging Face: ddp_static_graph=False)")
    if getattr(ddp, "_use_python_reducer", False):
        raise ValueError("FreezeOut under DDP: the Python reducer of compiled autograd "
                         "(torch._dynamo.config.optimize_ddp='python_reducer') cannot be rebuilt as units freeze; "
                         "use DDP's default reducer")
    if getattr(ddp, "_delay_all_reduce_params", None):
        raise ValueError("FreezeOut under DDP: parameters whose all-reduce is delayed "
                         "(delay_all_reduce_named_params) are not supported; make the DDP module without them")
    for name in ("_build_params_for_reducer", "_build_debug_param_to_name_mapping", "_ddp_init_helper"):
        if not hasattr(ddp, name):
            raise ValueError(f"FreezeOut under DDP: this torch ({torch.__version__}) has no "
                             f"DistributedDataParallel.{name}, which rebuilding the reducer needs")


def rebuild_reducer(ddp: nn.Module) -> None:
    """Rebuild a DDP module's reducer over the parameters that require gradients now, keeping
    its communication hooks. Call it between steps (no backward pass in flight), on every rank
    at the same step."""
    import torch.distributed as dist

    if hasattr(ddp, "_remove_autograd_hooks"):
        ddp._remove_autograd_hooks()  # the old reducer's hooks on parameters that froze
    parameters, expect_sparse_gradient = ddp._build_params_for_reducer()
    if not parameters:
        return  # nothing trains: no backward pass, nothing to all-reduce
    names = ddp._build_debug_param_to_name_mapping(parameters)
    ddp._ddp_init_helper(parameters, expect_sparse_gradient, names, ddp.static_graph)
    ddp._has_rebuilt_buckets = False  # bucket again by the order gradients now arrive in
    for hook, state in getattr(ddp, "_comm_hooks", []):
        dist._register_comm_hook(ddp.reducer, state, hook)
    if getattr(ddp, "mixed_precision", None) is not None:
        ddp.reducer._set_mixed_precision_param_dtype(ddp.mixed_precision.param_dtype)


class DDPFollower:
    """Keeps a DDP module's all-reduce over the parameters still training while `scheduler`
    freezes units (see follow_freezing). `ddp` is the DDP module, once known."""

    def __init__(self, scheduler: FreezeOut, ddp: Optional[nn.Module] = None):
        self.scheduler = scheduler
        self.ddp: Optional[nn.Module] = None
        self.rebuilds = 0
        self._built_for: Optional[frozenset] = None
        self._finder = None
        self._freeze_hook = scheduler.register_freeze_hook(self._units_froze)
        if ddp is not None:
            self.attach(ddp)
        else:
            self._find_at_first_forward()

    def attach(self, ddp: nn.Module) -> None:
        """Follow `ddp` from now on; if units are frozen already (a resumed run), its reducer is
        rebuilt over the parameters still training before it runs again."""
        check_ddp(ddp)
        held = {id(p) for p in ddp.module.parameters()}
        mine = [p for unit in self.scheduler.units for p in unit_parameters(unit)]
        if not all(id(p) in held for p in mine):
            raise ValueError("follow_freezing: the DDP module does not hold the scheduler's units; "
                             "give the DistributedDataParallel that wraps the model they belong to")
        self.ddp = ddp
        self._stop_finding()
        if self.scheduler.num_frozen:
            self._rebuild()
        else:
            self._built_for = self._trainable()

    def remove(self) -> None:
        """Stop following (the reducer stays as it is)."""
        self._freeze_hook.remove()
        self._stop_finding()

    def _trainable(self) -> frozenset:
        return frozenset(id(p) for p in self.ddp.module.parameters() if p.requires_grad)

    def _units_froze(self, scheduler: FreezeOut, newly: list[int]) -> None:
        if self.ddp is not None and self._trainable() != self._built_for:
            self._rebuild()

    def _rebuild(self) -> None:
        rebuild_reducer(self.ddp)
        self._built_for = self._trainable()
        self.rebuilds += 1

    # -- a DDP module that a trainer made and keeps to itself ------------------------------
    def _find_at_first_forward(self) -> None:
        """Watch forward calls (a process-wide pre-hook, removed once found) for the first DDP
        module that wraps the scheduler's units: it runs before DDP's own forward, so a reducer
        built before a resumed schedule froze units is rebuilt before it is used."""
        first = next((m for unit in self.scheduler.units for m in unit_modules(unit)), None)
        if first is None:
            return
        ddp_class, target, follower, handle = _ddp_class(), weakref.ref(first), weakref.ref(self), []

        def find(module, args):
            if torch.compiler.is_compiling():  # a hook is not for dynamo to trace; DDP's own forward is eager
                return
            me, unit_module = follower(), target()
            if me is None or unit_module is None:  # nothing left to follow: the hook goes
                handle[0].remove()
            elif isinstance(module, ddp_class) and any(m is unit_module for m in module.module.modules()):
                me.attach(module)

        self._finder = torch.nn.modules.module.register_module_forward_pre_hook(find)
        handle.append(self._finder)

    def _stop_finding(self) -> None:
        if self._finder is not None:
            self._finder.remove()
            self._finder = None


def follow_freezing(scheduler: FreezeOut, ddp: Optional[nn.Module] = None) -> DDPFollower:
    """Keep `ddp` (a DistributedDataParallel wrapping the model of `scheduler`'s units)
    all-reducing only the parameters still training: its reducer is rebuilt whenever the
    scheduler freezes units, and at once if some are frozen already. Without `ddp`, the first
    DistributedDataParallel that runs the units is followed (for trainers that make it and
    keep it to themselves). Unsupported DDP settings are refused in one line
    (static_graph=True, the Python reducer, delayed all-reduce). Returns the follower, whose
    `remove()` stops it."""
    if not isinstance(scheduler, FreezeOut):
        raise TypeError(f"follow_freezing needs a FreezeOut scheduler, got {type(scheduler).__name__}")
    return DDPFollower(scheduler, ddp)
