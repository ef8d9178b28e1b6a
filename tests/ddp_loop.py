"""A plain training loop under DistributedDataParallel with FreezeOut, instrumented by
tests/ddp_count.py; run by tests/test_ddp.py under torchrun. One run for each of: follow_freezing
with find_unused_parameters False and True, and DDP's own find_unused_parameters=True without it.

    torchrun --nproc_per_node 2 tests/ddp_loop.py OUT_PREFIX
"""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from ddp_count import Counts
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import freezeout
from freezeout.ddp import follow_freezing

RUNS = {"follow": (False, True), "follow_find_unused": (True, True), "find_unused": (True, False)}


def run(out: str, find_unused: bool, follow: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU()) for _ in range(5)],
                          nn.Linear(16, 4))
    units = list(model)
    ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
    counts = Counts()
    counts.register(ddp)
    optimizer = torch.optim.SGD(freezeout.param_groups(units), lr=0.1, momentum=0.9)
    scheduler = freezeout.FreezeOut(optimizer, units, total_steps=12, t_0=0.3, how_scale="linear")
    if follow:
        follow_freezing(scheduler, ddp)
    g = torch.Generator().manual_seed(dist.get_rank())  # each rank its own data
    for _ in range(12):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        loss = F.cross_entropy(ddp(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        counts.end_step(model, scheduler.num_frozen)
        optimizer.step()
        scheduler.step()
    counts.finish(model, out, frozen_at=scheduler.frozen_at)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    for name, (find_unused, follow) in RUNS.items():
        run(f"{sys.argv[1]}{name}.json", find_unused, follow)
    dist.destroy_process_group()
