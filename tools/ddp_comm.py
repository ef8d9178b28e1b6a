"""What FreezeOut saves in DDP's gradient all-reduce, measured: elements all-reduced per step and
step time at several freeze levels, for four ways of running DDP while units freeze, in two
processes (gloo on CPUs; NCCL on GPUs):

- find_unused: DDP(find_unused_parameters=True) and nothing else, what runs without crashing
  when nothing follows the freezing: every parameter all-reduced, frozen or not;
- follow: DDP(find_unused_parameters=False) whose reducer freezeout.ddp rebuilds over the
  parameters still training (follow_freezing);
- hook: DDP(find_unused_parameters=True) with a communication hook that all-reduces only the
  trainable slices of each bucket (the alternative to rebuilding);
- and the one-off cost of each change of level: rebuilding the reducer in place (follow)
  against wrapping the model in a new DDP module (train.py's way until now).

    torchrun --nproc_per_node 2 tools/ddp_comm.py --model densenet -L 76 -k 12 --batch-size 16
    torchrun --nproc_per_node 2 tools/ddp_comm.py --model vit --batch-size 8

The levels freeze a prefix of the units directly (as benchmark.py does); each level's steps of
the three ways alternate, and the step time is the median over the rounds on rank 0. Every way
runs with a Python communication hook that counts the elements it all-reduces (follow and
find_unused: then all-reduces the bucket as DDP's default does), so their times compare.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from freezeout import find_units, freeze  # noqa: E402
from freezeout.ddp import rebuild_reducer  # noqa: E402

WAYS = ("find_unused", "follow", "hook")


def build(args) -> tuple[torch.nn.Module, list, tuple]:
    torch.manual_seed(0)
    if args.model == "vit":
        import timm
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=100)
        example = torch.randn(2, 3, 32, 32)
        units = find_units(model, example)
        name = "ViT-Tiny (timm), patch 4 on 32x32"
    else:
        from models import build_model, model_name
        model = build_model("densenet", args.depth, args.growth_rate, 100)
        units = model.freeze_units()
        name = model_name("densenet", args.depth, args.growth_rate)
    return model, units, name


def trainable_slices_hook(counter: list, bucket):
    """All-reduce only the gradients of the bucket's parameters that still require them."""
    live = [g for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True) if p.requires_grad]
    buffer = bucket.buffer()
    counter.append(sum(g.numel() for g in live))
    if not live:
        done = torch.futures.Future()
        done.set_result(buffer)
        return done
    flat = torch.cat([g.flatten() for g in live]).div_(dist.get_world_size())
    future = dist.all_reduce(flat, async_op=True).get_future()

    def unpack(f):
        out, offset = f.value()[0], 0
        for g in live:
            g.copy_(out[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return buffer
    return future.then(unpack)


def counting_hook(counter: list, bucket):
    counter.append(bucket.buffer().numel())
    return allreduce_hook(None, bucket)


def make_ddp(way: str, model, counter: list):
    """The DDP module of one way, with a Python communication hook that counts what it sends
    (every way has one, so their step times compare)."""
    ddp = DistributedDataParallel(model, find_unused_parameters=way != "follow")
    ddp.register_comm_hook(counter, trainable_slices_hook if way == "hook" else counting_hook)
    return ddp


def step(ddp, model, x, y) -> None:
    F.cross_entropy(ddp(x), y).backward()
    for p in model.parameters():
        p.grad = None


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=["densenet", "vit"], default="densenet", help="the network measured")
    parser.add_argument("-L", "--depth", type=int, default=76, help="DenseNet-BC depth")
    parser.add_argument("-k", "--growth-rate", type=int, default=12, help="DenseNet-BC growth rate")
    parser.add_argument("--batch-size", type=int, default=16, help="images a step in each process")
    parser.add_argument("--levels", type=int, default=5, help="freeze levels measured, from none to all but one unit")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each way at each level (rounds)")
    parser.add_argument("--json", default=None, help="write the results to this file (rank 0)")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, units, name = build(args)
    models = {way: copy.deepcopy(model) for way in WAYS}
    unit_lists = {way: [[m for m in _modules(u, models[way], model)] for u in units] for way in WAYS}
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch_size, 3, 32, 32, generator=g), torch.randint(0, 100, (args.batch_size,), generator=g)
    n = len(units)
    levels = sorted({round(i * (n - 1) / (args.levels - 1)) for i in range(args.levels)})
    total = sum(p.numel() for p in model.parameters())
    rows, frozen = [], 0
    counters = {way: [] for way in WAYS}
    # Made once, over every parameter, as a run makes them: only follow's reducer is rebuilt.
    ddps = {way: make_ddp(way, models[way], counters[way]) for way in WAYS}
    for level in levels:
        for way in WAYS:
            for unit in unit_lists[way][frozen:level]:
                freeze(unit)
        frozen, rebuild_s, rewrap_s = level, None, None
        if level:
            rebuild_s = timed(lambda: rebuild_reducer(ddps["follow"]))
            probe = copy.deepcopy(models["follow"])
            rewrap_s = timed(lambda: DistributedDataParallel(probe))  # noqa: B023 (a new wrapper instead)
            del probe
        for way in WAYS:  # warm: DDP buckets again after its first step
            for _ in range(2):
                step(ddps[way], models[way], x, y)
        elements = {way: [] for way in WAYS}
        times = {way: [] for way in WAYS}
        for _ in range(args.steps):
            for way in WAYS:
                counters[way].clear()
                dist.barrier()
                times[way].append(timed(lambda: step(ddps[way], models[way], x, y)))  # noqa: B023
                elements[way].append(sum(counters[way]))
        training = sum(p.numel() for p in models["follow"].parameters() if p.requires_grad)
        row = {"frozen_units": level, "units": n, "training": training, "total": total,
               "all_reduced": {w: max(e) for w, e in elements.items()},
               "step_ms": {w: 1e3 * statistics.median(t) for w, t in times.items()},
               "rebuild_ms": None if rebuild_s is None else 1e3 * rebuild_s,
               "rewrap_ms": None if rewrap_s is None else 1e3 * rewrap_s}
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    result = {"model": name, "batch_size": args.batch_size, "world_size": dist.get_world_size(),
              "backend": dist.get_backend(), "threads": torch.get_num_threads(), "rows": rows}
    if rank == 0:
        print(table(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    return result


def _modules(unit, copy_model, original) -> list:
    """The copy's modules (and parameters) that stand where the unit's stand in the original."""
    names = {id(m): n for n, m in original.named_modules()}
    names.update({id(p): n for n, p in original.named_parameters()})
    items = unit if isinstance(unit, list) else [unit]
    found = dict(copy_model.named_modules())
    found.update(dict(copy_model.named_parameters()))
    return [found[names[id(item)]] for item in items]


def table(result: dict) -> str:
    lines = [f"{result['model']}, batch {result['batch_size']} a process, {result['world_size']} processes "
             f"({result['backend']}, {result['threads']} thread each)", "",
             "| frozen units | training | all-reduced a step: find_unused / follow / hook "
             "| step ms: find_unused / follow / hook | level change ms: rebuild / new DDP |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        e, t = r["all_reduced"], r["step_ms"]
        change = "" if r["rebuild_ms"] is None else f"{r['rebuild_ms']:.1f} / {r['rewrap_ms']:.1f}"
        lines.append(f"| {r['frozen_units']}/{r['units']} | {r['training']:,} | {e['find_unused']:,} / "
                     f"{e['follow']:,} / {e['hook']:,} | {t['find_unused']:.0f} / {t['follow']:.0f} / "
                     f"{t['hook']:.0f} | {change} |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
