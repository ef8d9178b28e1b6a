"""FreezeOut (Brock et al. 2017) for PyTorch: layer-wise cosine annealing, then freezing, as an
LR scheduler, for any model.

Each unit i of a network (a module, or a list of modules, in forward order) gets its own
learning rate, cosine-annealed to zero at its own fraction t_i of the run. Once a unit's
learning rate has reached zero the unit is frozen for good: its parameters stop requiring
gradients, its optimizer state is dropped and it stays in inference mode. Because the frozen
units are always a prefix of the forward pass, autograd records nothing for them, which is
where the wall-clock saving comes from.

    units = model.freeze_units()         # or find_units(model, example_input, groups=8)
    optimizer = torch.optim.SGD(param_groups(units), lr=0.1, momentum=0.9, nesterov=True)
    scheduler = FreezeOut(optimizer, units, total_steps=T, t_0=0.8, how_scale="cubic")
    for x, y in loader:                  # T iterations in all
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    estimate_speedup(model, units, example_input, t_0=0.8)   # fraction of training FLOPs saved
    t_0_for_speedup(model, units, example_input, 0.2)        # the t_0 that saves 20%

t_0 = 1 gives every unit t_i = 1: plain per-step cosine annealing with no freezing, the
baseline, through the same code. torch.compile(model) and model.compile() work, before or
after the scheduler is made (one compile per freeze level; see freezeout.compile).

Under DistributedDataParallel, follow_freezing(scheduler, ddp_model) takes each frozen unit out
of the gradient all-reduce. In Lightning and the Hugging Face Trainer, the callbacks of
freezeout.lightning and freezeout.hf (optional: `pip install "freezeout[lightning]"`, `[hf]`)
take T from the trainer, follow DDP and log every unit's rate.

The modules:
    schedule   unit_times, unit_lr, the FreezeOut scheduler
    units      param_groups, freeze, find_units: what a unit is and how to get them
    order      the check that the units run in the order they are listed
    estimate   the FLOP-based speedup of a schedule for any model, and t_0 for a target
    compile    room in dynamo's recompile limit for a compile per freeze level
    ddp        follow_freezing: DDP's all-reduce over the parameters still training
    trainers   what the adapters share (no framework imported)
    lightning  FreezeOutCallback for Lightning (imports Lightning)
    hf         FreezeOutCallback for the Hugging Face Trainer (imports transformers)
"""
from .compile import compile_model, compiles_needed
from .ddp import follow_freezing
from .estimate import (
                       ESTIMATE_INPUT,
                       estimate_speedup,
                       first_frozen_steps,
                       schedule_speedup,
                       solve_t_0,
                       t_0_for_speedup,
                       training_flops_by_level,
                       unit_flops,
)
from .schedule import SCALE_POWERS, FreezeOut, check_how_scale, check_t_0, check_total_steps, unit_lr, unit_times
from .units import Unit, find_units, freeze, param_groups, unit_modules, unit_parameters

__all__ = [
    # the scheduler and its schedule
    "FreezeOut", "unit_times", "unit_lr", "SCALE_POWERS", "check_t_0", "check_how_scale", "check_total_steps",
    # units
    "Unit", "param_groups", "freeze", "find_units", "unit_modules", "unit_parameters",
    # the estimate for any model
    "estimate_speedup", "t_0_for_speedup", "unit_flops", "training_flops_by_level",
    "schedule_speedup", "first_frozen_steps", "solve_t_0", "ESTIMATE_INPUT",
    # torch.compile
    "compile_model", "compiles_needed",
    # DistributedDataParallel
    "follow_freezing",
]
