"""What the DDP tests measure in each process, shared by tests/ddp_*.py: the elements every
gradient all-reduce carries (a DDP communication hook that counts, then all-reduces as DDP
does), per optimizer step beside the parameters still training, and at the end whether every
rank holds the same weights and buffers bit for bit. Rank 0 writes it all as JSON."""
import json

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook


class Counts:
    def __init__(self):
        self.bucket_elements: list[int] = []
        self.steps: list[dict] = []

    def hook(self, state, bucket):
        self.bucket_elements.append(bucket.buffer().numel())
        return allreduce_hook(None, bucket)

    def register(self, ddp) -> None:
        ddp.register_comm_hook(None, lambda state, bucket: self.hook(state, bucket))

    def end_step(self, model: torch.nn.Module, num_frozen: int) -> None:
        """After the backward pass of a step (before the scheduler freezes more units)."""
        self.steps.append({"frozen": num_frozen, "all_reduced": sum(self.bucket_elements),
                           "training": sum(p.numel() for p in model.parameters() if p.requires_grad)})
        self.bucket_elements.clear()

    def finish(self, model: torch.nn.Module, path: str, **extra) -> None:
        state = [t.detach().double().flatten() for t in (*model.parameters(), *model.buffers())]
        mine = torch.cat(state)
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        if dist.get_rank() == 0:
            record = {"steps": self.steps, "ranks_identical": all(torch.equal(every[0], e) for e in every),
                      "world_size": dist.get_world_size(), **extra}
            with open(path, "w") as f:
                json.dump(record, f)
