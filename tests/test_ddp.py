"""freezeout.ddp: under DistributedDataParallel the frozen units leave the gradient all-reduce,
with find_unused_parameters False or True, counted by a communication hook on a DDP module over
a process group of one (the reducer, its buckets and hooks work as with more: the processes
only add the sums). tests/test_integrations.py runs the same in 2 processes, in a plain loop,
Lightning and the Hugging Face Trainer, and compares their weights."""
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

import freezeout
from conftest import closed_form_frozen_at
from freezeout import FreezeOut
from freezeout.ddp import follow_freezing


# -- in one process: a DDP module over a process group of one -------------------------------
@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def blocks() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)], nn.Linear(8, 2))


def test_unsupported_ddp_settings_are_refused_in_one_line(one_process_group):
    model = blocks()
    optimizer = torch.optim.SGD(freezeout.param_groups(list(model)), lr=0.1)
    scheduler = freezeout.FreezeOut(optimizer, list(model), total_steps=4)
    with pytest.raises(ValueError, match=r"^FreezeOut under DDP: static_graph=True .* static_graph=False") as refused:
        follow_freezing(scheduler, DistributedDataParallel(model, static_graph=True))
    assert "\n" not in str(refused.value)
    with pytest.raises(TypeError, match="DistributedDataParallel module, got Sequential"):
        follow_freezing(scheduler, model)
    with pytest.raises(ValueError, match="does not hold the scheduler's units"):
        follow_freezing(scheduler, DistributedDataParallel(blocks()))


def test_a_resumed_schedule_rebuilds_the_reducer_before_the_first_step(one_process_group):
    # A run resumed with units frozen: the DDP module was made before the scheduler's state froze
    # them, and is found at its first forward (as a trainer's is): it must all-reduce only what
    # still trains from that very step, or DDP would wait for the frozen units' gradients.
    def make():
        model = blocks()
        optimizer = torch.optim.SGD(freezeout.param_groups(list(model)), lr=0.1, momentum=0.9)
        return model, optimizer, freezeout.FreezeOut(optimizer, list(model), total_steps=8, t_0=0.5)

    def step(ddp, optimizer, scheduler):
        ddp(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    model, optimizer, scheduler = make()
    ddp = DistributedDataParallel(model)
    follower = follow_freezing(scheduler, ddp)
    for _ in range(4):
        step(ddp, optimizer, scheduler)
    assert scheduler.num_frozen == 2 and follower.rebuilds == 2
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    follower.remove()

    model, optimizer, scheduler = make()
    ddp = DistributedDataParallel(model)  # over every parameter
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    follower = follow_freezing(scheduler)  # found at the first forward
    sizes = []
    ddp.register_comm_hook(sizes, lambda state, bucket: (state.append(bucket.buffer().numel()),
                                                         allreduce_hook(None, bucket))[1])
    for _ in range(3):
        sizes.clear()
        step(ddp, optimizer, scheduler)
    assert follower.ddp is ddp and sum(sizes) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    follower.remove()


def test_follow_freezing_needs_a_freezeout_scheduler():
    model = blocks()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="needs a FreezeOut scheduler, got StepLR"):
        follow_freezing(torch.optim.lr_scheduler.StepLR(optimizer, 1))


def counted_run(find_unused: bool, follow: bool) -> tuple[list[dict], FreezeOut]:
    """12 steps of 6 units (5 blocks and a head), linear, t_0 = 0.3: per step, the elements
    all-reduced and the parameters still training."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU()) for _ in range(5)],
                          nn.Linear(16, 4))
    ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
    sizes = []
    ddp.register_comm_hook(sizes, lambda state, bucket: (state.append(bucket.buffer().numel()),
                                                         allreduce_hook(None, bucket))[1])
    optimizer = torch.optim.SGD(freezeout.param_groups(list(model)), lr=0.1, momentum=0.9)
    scheduler = freezeout.FreezeOut(optimizer, list(model), total_steps=12, t_0=0.3, how_scale="linear")
    if follow:
        follow_freezing(scheduler, ddp)
    steps = []
    for _ in range(12):
        sizes.clear()
        ddp(torch.randn(8, 16)).square().mean().backward()
        training = sum(p.numel() for p in model.parameters() if p.requires_grad)
        steps.append({"all_reduced": sum(sizes), "training": training})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return steps, scheduler


@pytest.mark.parametrize("find_unused", [False, True])
def test_each_freeze_level_all_reduces_only_the_parameters_still_training(one_process_group, find_unused):
    steps, scheduler = counted_run(find_unused, follow=True)
    assert scheduler.frozen_at == closed_form_frozen_at(6, 12, 0.3, power=1)
    assert all(s["all_reduced"] == s["training"] for s in steps), steps
    assert len({s["training"] for s in steps}) == 6  # a level for each unit frozen


def test_without_it_ddp_fails_or_all_reduces_every_frozen_parameter(one_process_group):
    steps, _ = counted_run(find_unused=True, follow=False)
    assert all(s["all_reduced"] == steps[0]["training"] for s in steps)  # frozen or not
    assert steps[-1]["training"] < steps[0]["training"] / 10
    with pytest.raises(RuntimeError, match="Expected to have finished reduction in the prior iteration"):
        counted_run(find_unused=False, follow=False)
