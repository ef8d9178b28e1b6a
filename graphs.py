"""The training step as CUDA graphs: one graph per freeze level, replayed from static input
buffers, with the learning rates on the device.

- `use_cuda_graphs`, `graphs_unsupported`: the cuda_graphs setting, and why a step runs eagerly.
- `GraphedStep`: the step object `engine.train_one_epoch` calls, in place of `EagerStep`.
- `CudaGraphs` captures on a GPU; `EagerGraphs` stands in for it on a CPU, so that the CPU
  tests the same logic (rates table, static buffers, when to capture).
"""
from __future__ import annotations

import math
import time
import weakref
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from engine import Training, autocast_for
from messages import setting

# Eager steps before a process's first capture: one, the fewest that work. It makes what a
# capture cannot (SGD's momentum buffers, decided on the host: `momentum_ready` checks them;
# cuBLAS and cuDNN handles; cuDNN's autotuning of every convolution shape, which the later
# levels reuse: frozen units run the same shapes forward); nothing else differs in a second step.
GRAPH_WARMUP_STEPS = 1
GRAPH_MIN_STEPS = 8       # capture a level only if it lasts this many steps: a capture costs a few


def graphs_unsupported(device: torch.device, amp: str, distributed: bool) -> str | None:
    """Why the graphed step cannot run here (one line), or None where it can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if amp == "fp16":
        return ("fp16's GradScaler decides on the host whether to skip each step, which a CUDA "
                "graph cannot; fp16 runs eagerly (bf16 needs no scaler and runs graphed)")
    if distributed:
        return ("under torchrun DDP's reducer is rebuilt as units freeze and its all-reduce "
                "hooks run on the host; the step runs eagerly")
    return None


def use_cuda_graphs(mode: str, device: torch.device, amp: str, distributed: bool) -> tuple[bool, str | None]:
    """The cuda_graphs setting: "off"; "on" (ValueError where unsupported); "auto" (on wherever
    supported). Returns (graphed, why not: a line to print where CUDA runs eagerly under auto)."""
    why = graphs_unsupported(device, amp, distributed)
    if mode == "off":
        return False, None
    if mode == "on" and why is not None:
        raise ValueError(f"{setting('cuda_graphs')} on: {why}")
    return why is None, why if device.type == "cuda" else None


class CudaGraphs:
    """Captures steps as CUDA graphs, each into a memory pool of its own, and runs the eager
    steps before a capture on a side stream, as capture asks.

    A pool per graph, so that a freeze level's memory is given back once its graph is done
    with: in PyTorch's caching allocator (c10/cuda/CUDACachingAllocator.cpp) a graph's pool
    keeps every block its capture used, activations included, while any graph captured into it
    lives (`releasePool` only marks a pool freeable once its use count is 0), and blocks of a
    freeable pool go back to the device at the next `empty_cache` once no tensor allocated in
    it is alive (`release_cached_blocks`). Captures sharing one pool would reuse its blocks,
    but the pool could never shrink below the first level's, the largest; and a capture into a
    pool whose graphs were all released, while a tensor allocated in it lives, trips its
    `use_count > 0` assertion (`create_or_incref_pool`). GraphedStep releases a level's graph
    as soon as units freeze (it is never replayed again) and drops the gradients the graph
    wrote into its pool, so the pool holds nothing alive and `empty_cache` frees it, before the
    next level's capture allocates its own."""

    def __init__(self):
        self.side = torch.cuda.Stream()

    def run(self, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            out = step()
        torch.cuda.current_stream().wait_stream(self.side)
        return out

    def capture(self, step: Callable[[], torch.Tensor], buffers: Callable[[], list] = list, pool=None):
        """(the graph, the output tensor that each replay overwrites, seconds the capture took);
        `step` is recorded, not run, into a fresh memory pool unless `pool` is given. The clock
        starts once the work already queued is done (capture waits for it anyway), so the
        seconds are the capture's own. `buffers`: what the graph reads from fixed addresses
        (checked by the CPU stand-in only)."""
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread may allocate while we capture.
        with torch.cuda.graph(graph, pool=pool if pool is not None else torch.cuda.graph_pool_handle(),
                              capture_error_mode="thread_local"):
            out = step()
        return graph, out, time.perf_counter() - start

    def give_back(self) -> None:
        """Return the memory of released pools to the device (the allocator keeps it cached)."""
        torch.cuda.empty_cache()


class CaptureError(RuntimeError):
    """What a real CUDA graph capture would refuse (raised by the CPU stand-in)."""


# Ops whose result the host must wait for: inside a capture they fail (or would be recorded
# with the value they had once). `.item()`, `bool(t)`, `float(t)` all end in _local_scalar_dense.
HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
              torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default}


class StandInPool:
    """A CUDA graph memory pool as the stand-in models it: the storages its captures allocated,
    and what it reserves, the most bytes alive in it at once during a capture (the blocks a
    graph replays into stay the pool's, freed or not, while a graph of the pool lives)."""

    def __init__(self):
        self.graphs = weakref.WeakSet()   # graphs captured into it, not yet released
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.reserved = 0
        self.freed = False                # given back to the device

    def add(self, storage) -> None:
        key = storage._cdata
        old = self.storages.get(key)
        if old is None or old[0].expired():
            self.storages[key] = (StorageWeakRef(storage), storage.nbytes())

    def alive(self) -> list[StorageWeakRef]:
        return [ref for ref, _ in self.storages.values() if not ref.expired()]

    def live_bytes(self) -> int:
        return sum(n for ref, n in self.storages.values() if not ref.expired())

    def observe(self) -> None:
        self.reserved = max(self.reserved, self.live_bytes())


class CaptureRules(TorchDispatchMode):
    """While the CPU stand-in runs a graph's step for the first time: refuses reading a
    tensor's value on the host, and records the storages the step allocates in the graph's
    pool (what a capture would allocate there), with the most bytes alive in it at once."""

    def __init__(self, pool: StandInPool):
        super().__init__()
        self.pool = pool

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise CaptureError(f"{func} reads a tensor's value on the host inside a captured step "
                               "(.item(), bool(tensor), a learning rate read as a number)")
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for t in tree_leaves(out):
            if torch.is_tensor(t) and t.untyped_storage()._cdata not in inputs:
                self.pool.add(t.untyped_storage())
        self.pool.observe()
        return out


class EagerGraph:
    """What a captured graph does, kernel by kernel: nothing runs at capture, each replay runs
    the step and writes its output into the same tensor. The first replay stands for the
    capture: it runs under `CaptureRules`. Every replay checks that the buffers the graph
    reads are still the ones it was captured with (a graph reads fixed addresses)."""

    def __init__(self, step: Callable[[], torch.Tensor], buffers: Callable[[], list], pool: StandInPool):
        self.step, self.output, self.pool = step, torch.zeros(()), pool
        self.buffers = buffers
        self.addresses = [t.data_ptr() for t in buffers()]
        self.replays = 0

    def replay(self) -> None:
        if [t.data_ptr() for t in self.buffers()] != self.addresses:
            raise CaptureError("a buffer the graph reads was replaced after the capture (a graph "
                               "reads the addresses it was captured with: copy into buffers instead)")
        if self.replays == 0:
            with CaptureRules(self.pool):
                out = self.step()
        else:
            out = self.step()
        self.output.copy_(out)
        self.replays += 1


class EagerGraphs:
    """Stands in for `CudaGraphs` where no graph can be captured, so that the CPU tests the
    graphed step's logic (rates on the device, static buffers, when to capture, when a pool's
    memory goes back) under the rules a real capture enforces: no host reads inside a
    captured step (`CaptureRules`), no buffer replaced after its capture, and no capture into
    a pool whose graphs were all released while a tensor allocated in it lives (see
    `CudaGraphs`). It keeps the account of the pools' memory: `reserved_bytes()` is what the
    graphs' pools hold now, as the caching allocator would."""

    def __init__(self):
        self.pools: list[StandInPool] = []
        self.captures = 0

    @property
    def live(self) -> list[EagerGraph]:
        """The graphs not yet released, of every pool."""
        return [g for pool in self.pools for g in pool.graphs]

    @property
    def allocated(self) -> list[StorageWeakRef]:
        """The storages the captures allocated, of every pool."""
        return [ref for pool in self.pools for ref, _ in pool.storages.values()]

    def new_pool(self) -> StandInPool:
        self.pools.append(StandInPool())
        return self.pools[-1]

    def run(self, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        return step()

    def capture(self, step: Callable[[], torch.Tensor], buffers: Callable[[], list] = list,
                pool: StandInPool | None = None):
        self.give_back()  # as torch.cuda.graph does before each capture
        if pool is not None and not pool.graphs and pool.alive():
            raise CaptureError(
                f"capture into a memory pool whose graphs were all released ({len(pool.alive())} tensors "
                "allocated in it still alive): the CUDA caching allocator refuses it "
                "(create_or_incref_pool asserts use_count > 0); capture into a new pool")
        if pool is not None and pool.freed:  # given back: the allocator makes the pool anew
            pool.__init__()
        start = time.perf_counter()
        graph = EagerGraph(step, buffers, pool if pool is not None else self.new_pool())
        graph.pool.graphs.add(graph)
        self.captures += 1
        return graph, graph.output, time.perf_counter() - start

    def give_back(self) -> None:
        """empty_cache: a pool with no graph and nothing alive in it goes back to the device."""
        for pool in self.pools:
            if not pool.graphs and not pool.alive():
                pool.freed = True

    def reserved_bytes(self) -> int:
        """What the graphs' pools hold now (pools not yet given back)."""
        return sum(pool.reserved for pool in self.pools if not pool.freed)


class GraphedStep:
    """The whole training step (forward, loss, backward, SGD update) as one CUDA graph per
    freeze level, replayed from static input buffers: one launch instead of about a thousand.

    Learning rates live on the device: each epoch's rates (`FreezeOut.lr_at`, the host
    scheduler staying the one source of truth) are uploaded as a (steps, units) table, and the
    graph itself picks the step's row and advances its row index, so no step waits for the
    host and none is captured again for a new rate. The fused SGD reads each unit's rate from a
    0-dim view of that row: the views are put into the param groups only while a step is
    traced or run here, so the optimizer's and scheduler's state stays plain floats.

    When units freeze, the level's graph is released at once with the gradients it wrote into
    its pool, which goes back to the device (see `CudaGraphs`), and the smaller step is
    captured anew, into a pool of its own, if the level lasts at least `min_steps`: a freeze
    level's memory is what that level needs. The loss is copied into a buffer of this object's,
    so no output of a graph keeps its pool alive. A process's first capture comes after
    `warmup` eager steps, and none before every trainable parameter has its momentum buffer:
    SGD makes it at a group's first step, a host decision a graph would record for good. Every step, eager or replayed,
    runs the same kernels in the same order, so a resumed run gives what an uninterrupted one
    does (bit for bit where those kernels are deterministic: cuDNN's are with
    torch.backends.cudnn.deterministic)."""

    def __init__(self, training: Training, batch_size: int, steps_per_epoch: int,
                 image_shape: Sequence[int] = (3, 32, 32), graphs=None,
                 warmup: int = GRAPH_WARMUP_STEPS, min_steps: int = GRAPH_MIN_STEPS,
                 forward: Callable[[torch.Tensor], torch.Tensor] | None = None):
        t = self.training = training
        # The model's forward: a compiled one when compiling, whose every level is compiled in
        # an uncaptured step before its capture (a compile must not happen in a capture).
        self.forward = forward or t.model
        device = t.device
        self.check_fused()
        self.autocast = autocast_for(t.amp, device, cache=False)  # cached casts go stale in a graph
        self.x = torch.zeros(batch_size, *image_shape, device=device).contiguous(
            memory_format=t.memory_format)
        self.y = torch.zeros(batch_size, dtype=torch.int64, device=device)
        n = len(t.optimizer.param_groups)
        self.rates = torch.zeros(steps_per_epoch, n, dtype=torch.float32, device=device)
        self.row = torch.zeros(1, dtype=torch.int64, device=device)
        self.lr = torch.zeros(n, dtype=torch.float32, device=device)
        self.lr_views = list(self.lr.unbind(0))
        self.steps_per_epoch = steps_per_epoch
        self.graphs = graphs if graphs is not None else CudaGraphs()
        self.warmup, self.min_steps = warmup, min_steps
        self.loss = torch.zeros((), device=device)  # each step's loss, outside every graph's pool
        self.graph = None
        self.graph_level = None   # the freeze level self.graph computes
        self.eager_steps = 0
        self.captures, self.capture_time_s = 0, 0.0
        self.last_kind = "eager"
        self.compiled_levels: set[int] = set()  # levels whose compiled forward has run

    def release(self) -> None:
        """Drop the level's graph and the gradients it wrote into its pool, and give the pool
        back to the device, now rather than whenever this object is collected (the graph is
        never replayed again once units freeze)."""
        if self.graph is None:
            return
        self.graph = self.graph_level = None
        self.training.optimizer.zero_grad(set_to_none=True)  # the next step makes them anew
        self.graphs.give_back()

    def check_fused(self) -> None:
        """The fused SGD reads the rates from the device; the other paths read them with
        `.item()`, which a capture cannot (checked again at each capture: loading an
        optimizer's state_dict can change it)."""
        if not all(group.get("fused") for group in self.training.optimizer.param_groups):
            raise ValueError("the graphed step needs torch.optim.SGD(..., fused=True), which reads "
                             "learning rates from the device")

    def static_buffers(self) -> list[torch.Tensor]:
        """What a graph reads from fixed addresses: refilled in place, never replaced."""
        return [self.x, self.y, self.rates, self.row, self.lr, self.loss]

    def start_epoch(self, first_step: int, start_batch: int) -> None:
        """Upload the epoch's rates (first_step: the epoch's step 0) and point at start_batch."""
        lr_at = self.training.scheduler.lr_at
        table = [lr_at(first_step + b) for b in range(self.steps_per_epoch)]
        self.rates.copy_(torch.tensor(table, dtype=torch.float32))
        self.row.fill_(start_batch)

    def steps_left_at_level(self) -> int:
        """Steps from the coming one until the next unit freezes (or the run ends)."""
        s = self.training.scheduler
        k = s.last_epoch
        if s.num_frozen + 1 >= len(s.units):  # the output unit never freezes
            return s.total_steps - k
        return min(math.ceil(s.t_i[s.num_frozen] * s.total_steps), s.total_steps) - k

    def momentum_ready(self) -> bool:
        """Whether every trainable parameter has its momentum buffer already."""
        optimizer = self.training.optimizer
        return all(optimizer.state.get(p, {}).get("momentum_buffer") is not None
                   for group in optimizer.param_groups if group["momentum"] != 0
                   for p in group["params"] if p.requires_grad)

    def should_capture(self, level: int) -> bool:
        compiled = self.forward is self.training.model or level in self.compiled_levels
        return (self.eager_steps >= self.warmup and compiled
                and self.steps_left_at_level() >= self.min_steps and self.momentum_ready())

    def traced_step(self) -> torch.Tensor:
        """What one step does, in the order a graph records it: the row's rates, forward,
        backward, update, next row."""
        t = self.training
        groups = t.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        for group, lr in zip(groups, self.lr_views, strict=True):
            group["lr"] = lr
        try:
            # Gradients are made anew each step: in a graph, backward writes them into the
            # memory it wrote at capture, without zeroing or accumulating.
            t.optimizer.zero_grad(set_to_none=True)
            self.lr.copy_(self.rates.index_select(0, self.row).view(-1))
            with self.autocast:
                loss = F.cross_entropy(self.forward(self.x), self.y)
            loss.backward()
            t.optimizer.step()
            self.row.add_(1)
            self.loss.copy_(loss.detach())
        finally:
            for group, lr in zip(groups, floats, strict=True):
                group["lr"] = lr
        return self.loss

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        level = self.training.scheduler.num_frozen  # units froze: the last graph computes too much
        self.x.copy_(x, non_blocking=True)
        self.y.copy_(y, non_blocking=True)
        if self.graph_level != level:
            self.release()
            if self.should_capture(level):
                self.check_fused()
                graph, _, seconds = self.graphs.capture(self.traced_step, self.static_buffers)
                self.graph, self.graph_level = graph, level
                self.captures += 1
                self.capture_time_s += seconds
        if self.graph_level == level:
            self.graph.replay()
            self.last_kind = "graphed"
            return self.loss
        self.eager_steps += 1
        self.last_kind = self.eager_kind(level)
        if self.last_kind == "eager":
            return self.graphs.run(self.traced_step)
        started = time.perf_counter()  # a step that compiles: timed as a capture is
        loss = self.graphs.run(self.traced_step)
        if self.training.device.type == "cuda":
            torch.cuda.synchronize(self.training.device)
        self.capture_time_s += time.perf_counter() - started
        return loss

    def eager_kind(self, level: int) -> str:
        """"compile" for the first step of a level that runs the compiled forward (dynamo
        compiles the level then; its seconds count with the captures'), "eager" for the others."""
        if self.forward is self.training.model or self.training.scheduler.checking_order \
                or level in self.compiled_levels:
            return "eager"
        self.compiled_levels.add(level)
        return "compile"
