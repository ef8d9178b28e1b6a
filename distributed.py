"""Several processes under torchrun: this process's place in the job, the collectives the run
needs, and the model wrapped in DistributedDataParallel, all-reducing what still trains.

- `Distributed`, `init_distributed`: rank, world size, all_reduce / broadcast / gather.
- `DDPModel`: the module the training step calls, all-reducing the trainable parameters alone
  as units freeze (freezeout.ddp); `check_replicas_agree`: the ranks' weights are the same.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch


@dataclass
class Distributed:
    """This process's place in a torchrun job (one process, rank 0 of 1, without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    monitor: object = None  # a Gloo group for `unanswered`

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce a tensor over the ranks (in place; a no-op in one process)."""
        if self.enabled:
            import torch.distributed as dist
            dist.all_reduce(values, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return values

    def broadcast(self, obj):
        """Rank 0's `obj`, on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def unanswered(self, seconds: float = 10.0) -> list[int]:
        """The ranks that do not reach a barrier within `seconds`, as this rank can tell: after
        a collective timed out, the process that stopped answering. Rank 0 hears from every
        rank; another rank can tell only that rank 0 did not answer ([0]) or that it did ([])."""
        import torch.distributed as dist
        try:
            dist.monitored_barrier(group=self.monitor, timeout=datetime.timedelta(seconds=seconds),
                                   wait_all_ranks=True)
        except RuntimeError as e:
            listed = re.search(r"Ranks? ([\d, ]+) failed to pass", str(e))
            return [int(r) for r in re.findall(r"\d+", listed.group(1))] if listed else [0]
        return []

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init_distributed(device: torch.device, timeout_minutes: float = 10.0) -> tuple[Distributed, torch.device]:
    """Join torchrun's process group when there is one (WORLD_SIZE > 1): NCCL with one GPU per
    process (LOCAL_RANK), Gloo on CPUs; a collective waits `timeout_minutes` for the other
    processes before it fails. Returns this process's place and its device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), device
    import torch.distributed as dist
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    # A group of its own for finding out who stopped answering once a collective timed out.
    monitor = dist.new_group(backend="gloo")
    return Distributed(rank, world_size, local_rank, monitor), device


class DDPModel:
    """What the training step calls: the model itself in one process; under torchrun one
    DistributedDataParallel wrapper, made at the first step, whose gradient all-reduce follows
    the freezing (freezeout.ddp.follow_freezing: its reducer is rebuilt over the parameters
    still training whenever units freeze, at the same step on every rank, since the schedule is
    the same): frozen parameters leave the all-reduce, and no step waits for gradients that
    never come, without find_unused_parameters."""

    def __init__(self, model: torch.nn.Module, dist: Distributed, device: torch.device):
        self.model, self.dist, self.device = model, dist, device
        self.module, self.follower = model, None

    def module_for(self, scheduler) -> torch.nn.Module:
        """The module to call in a step of `scheduler`'s run (the DDP wrapper is made once)."""
        if self.dist.enabled and self.follower is None:
            from torch.nn.parallel import DistributedDataParallel

            from freezeout.ddp import follow_freezing
            self.module = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
            self.follower = follow_freezing(scheduler, self.module)
        return self.module


def check_replicas_agree(model: torch.nn.Module, dist: Distributed, device: torch.device) -> bool:
    """Under torchrun, whether every rank holds the same weights (a checksum compared)."""
    if not dist.enabled:
        return True
    with torch.no_grad():
        total = torch.stack([p.double().sum() for p in model.parameters()]).sum().to(device)
    spread = dist.all_reduce(torch.stack([total, -total]), "max")
    return spread[0].item() == -spread[1].item()
