"""What the test files share, defined once: the schedule written out from the paper (never
through the freezeout package), the tiny train.py run, state comparisons, and FLOPs counted on the whole
model (never through utils.py's estimate)."""
from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
# cuBLAS gives the same sums on every stream only with a fixed workspace, read when it starts:
# the CUDA tests that compare a graph with its eager step need it (nothing changes on a CPU).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

POWERS = {"linear": 1, "squared": 2, "cubic": 3}


def pytest_configure(config):
    """Under pytest-xdist (pytest.ini starts a worker per core), each worker and the processes
    its tests start share the cores out: one thread each on a machine with as many cores as
    workers, instead of every process spinning a thread per core on all of them (the suite ran
    2.5 times as long that way)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_finish(session):
    """Everything imported so far (torch, torchvision, matplotlib: millions of objects) lives as
    long as the session; left out of garbage collection, each full collection stops walking them
    (pytest's own five at the end took over a second)."""
    gc.freeze()


RECOMPILE_LIMITS = ("recompile_limit", "accumulated_recompile_limit")


@pytest.fixture
def dynamo_limits_kept():
    """Dynamo's recompile limits put back after the test, whatever it (or a FreezeOut scheduler
    it makes) sets them to. Through torch's own `config.patch`: pytest's monkeypatch undoes a
    setting that is not in the module's __dict__ by deleting it, which hides it from torch's
    config module for the rest of the process."""
    import torch._dynamo
    config = torch._dynamo.config
    with config.patch({name: getattr(config, name) for name in RECOMPILE_LIMITS}):
        yield config


@contextlib.contextmanager
def raises_flagged(kind, match: str):
    """pytest.raises(kind), its message matched as the scripts print it (settings by their flags)."""
    with pytest.raises(kind) as caught:
        yield caught
    assert re.search(match, flagged(caught.value)), flagged(caught.value)


def flagged(error: BaseException | str) -> str:
    """An error's message (or a text) with its settings named by train.py's flags, as the
    scripts print it."""
    import config
    from messages import Reported, render
    text = error.message if isinstance(error, Reported) else str(error)
    return render(text, config.flag)


# -- the schedule, from the paper's formulas -------------------------------------------------
def closed_form_t(i: int, n_units: int, t_0: float, power: int) -> float:
    """t_i = (t_0 + (1 - t_0) * i / N) ** p, N = n_units - 1 (one unit: t = 1)."""
    if n_units == 1:
        return 1.0
    return (t_0 + (1 - t_0) * i / (n_units - 1)) ** power


def closed_form_lr(k: int, i: int, n_units: int, total: int, t_0: float, power: int = 3,
                   scaled: bool = True, base: float = 0.1) -> float:
    """Unit i's rate at step k: 0.5 * alpha_i * (1 + cos(pi * k / (t_i * T))) while k < t_i * T."""
    t_i = closed_form_t(i, n_units, t_0, power)
    if k >= t_i * total:
        return 0.0
    alpha = base / t_i if scaled else base
    return 0.5 * alpha * (1 + math.cos(math.pi * k / (t_i * total)))


def closed_form_lrs(k: int, n_units: int, total: int, t_0: float, power: int = 3,
                    scaled: bool = True, base: float = 0.1) -> list[float]:
    return [closed_form_lr(k, i, n_units, total, t_0, power, scaled, base) for i in range(n_units)]


def closed_form_frozen_at(n_units: int, total: int, t_0: float, power: int = 3) -> list:
    """The first step k < T with k >= t_i * T, for every unit (None: it never froze)."""
    return [next((k for k in range(total) if k >= closed_form_t(i, n_units, t_0, power) * total), None)
            for i in range(n_units)]


# -- the graphed step's captures, from the schedule ----------------------------------------
def planned_captures(frozen_at: list, total: int, warmup: int, min_steps: int, first: int = 0,
                     has_momentum: bool = False) -> tuple[int, int]:
    """(captures, eager steps) of the graphed step over steps first..total-1, from the freeze
    steps alone: a level (the steps between two freeze points) is captured at its first step
    where `warmup` eager steps are done, the momentum buffers exist (made by the first step)
    and at least `min_steps` of the level are left; a captured level replays to its end."""
    freezes = sorted({k for k in frozen_at if k is not None})
    captures = eager = 0
    captured = None
    for k in range(first, total):
        level = sum(f <= k for f in freezes)
        if captured == level:
            continue
        level_end = next((f for f in freezes if f > k), total)
        if eager >= warmup and has_momentum and level_end - k >= min_steps:
            captures, captured = captures + 1, level
        else:
            eager, has_momentum = eager + 1, True
    return captures, eager


def graphed_run_stopped_then_resumed(monkeypatch, argv: list, stop_at_call: int) -> dict:
    """train.main(argv) stopped by SIGINT in the graphed step's `stop_at_call`-th call (the run
    stops after that step), then train.main(argv + ["--resume"]); returns its summary."""
    import os
    import signal

    import pytest

    import train
    from graphs import GraphedStep
    real_call, calls = GraphedStep.__call__, []

    def call_then_sigint(self, x, y):
        calls.append(1)
        if len(calls) == stop_at_call:
            os.kill(os.getpid(), signal.SIGINT)
        return real_call(self, x, y)

    monkeypatch.setattr(GraphedStep, "__call__", call_then_sigint)
    with pytest.raises(SystemExit):
        train.main(argv)
    monkeypatch.setattr(GraphedStep, "__call__", real_call)
    return train.main([*argv, "--resume"])


# -- the tiny train.py run ---------------------------------------------------------------------
# DenseNet-BC L=10, k=4 on 10 synthetic classes: one layer per block, 7 units, 2,666
# parameters (counted in tests/test_models.py). 96 images in batches of 16: 6 steps an epoch.
def tiny_argv(*extra: str, subset: int = 96, depth: int = 10, k: int = 4, batch_size: int = 16,
              device: str = "cpu") -> list[str]:
    """The tiny run's flags, then `extra`: train.py's, and reproduce.py's that it shares (a
    grid's runs are tiny runs). Its size as keywords: `subset` images a split, DenseNet-BC
    L=`depth` with growth rate `k`, `batch_size`, on `device`."""
    return ["--dataset", "synthetic", "--which_dataset", "10", "--subset", str(subset), "-L", str(depth),
            "-k", str(k), "--batch_size", str(batch_size), "--device", device, *extra]


TINY = tiny_argv()
TINY_UNITS, TINY_STEPS_PER_EPOCH, TINY_PARAMS = 7, 6, 2_666


def tiny_training(seed: int = 0, total: int = 4, t_0: float = 0.5, how_scale: str = "cubic", dropout: float = 0.0,
                  device: str = "cpu", **options):
    """The tiny run's model (DenseNet-BC L=10 k=4, 10 classes, 7 units) under FreezeOut for
    `total` steps, built as train.py builds it (Nesterov SGD, lr 0.1, momentum 0.9, weight
    decay 1e-4, scaled rates) after seeding torch; `options` go to build_training (amp,
    channels_last, fused)."""
    from densenet import DenseNet
    from engine import build_training
    torch.manual_seed(seed)
    return build_training(DenseNet(10, 4, 10, dropout=dropout), torch.device(device), total, lr=0.1, momentum=0.9,
                          weight_decay=1e-4, t_0=t_0, how_scale=how_scale, scale_lr=True, **options)


def run_train(out: Path, *extra, name: str = "run") -> dict:
    """train.main on the tiny run in this process; returns its summary record."""
    import train
    return train.main([*TINY, "--out-dir", str(out), "--name", name, *extra])


def same_state(a, b) -> bool:
    """Nested state dicts equal, tensors bit for bit and of the same dtype."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_state, a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def final_state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    return {k: ckpt[k] for k in ("model", "optimizer", "scheduler", "scaler", "epoch", "step")}


def epochs_logged(run_dir: Path) -> list[int]:
    from metrics_logger import read_records
    return [r["epoch"] for r in read_records(run_dir / "metrics.jsonl", "epoch")]


def error_of(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std,
             batch: int, device="cpu", memory_format=torch.contiguous_format) -> float:
    """Percent of misclassified images, normalised as (x - 255 mean) / (255 std), in batches."""
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    images, labels = images.to(device), labels.to(device)
    model.eval()
    wrong = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch):
            x = ((images[start:start + batch].float() - m) / s).contiguous(memory_format=memory_format)
            wrong += int((model(x).argmax(1) != labels[start:start + batch]).sum())
    return 100.0 * wrong / len(labels)


# Forward FLOPs per image (2 x multiply-adds of the convolutions and the linear layer) of the
# plain DenseNet L=13 k=4 with 10 classes, unit by unit, counted by hand: 3 layers a block,
# a 3x3 convolution c -> 4 at 32x32, 16x16, 8x8 for c = 8, 12, 16 | 10, 14, 18 | 11, 15, 19;
# transitions 20 -> 10 at 32x32 and 22 -> 11 at 16x16 (1x1, before the pool); stem 3 -> 8 (3x3);
# head 23 -> 10.
PLAIN_L13_K4_FORWARD = [
    2 * 27 * 8 * 1024,                                                      # stem
    *(2 * 9 * c * 4 * 1024 for c in (8, 12, 16)), 2 * 20 * 10 * 1024,       # block 1, transition
    *(2 * 9 * c * 4 * 256 for c in (10, 14, 18)), 2 * 22 * 11 * 256,       # block 2, transition
    *(2 * 9 * c * 4 * 64 for c in (11, 15, 19)),                            # block 3
    2 * 23 * 10,                                                            # head
]


# -- FLOPs of the whole model, counted level by level ------------------------------------------
def counted_step_flops(model: torch.nn.Module, input_shape) -> list[int]:
    """FLOPs of one forward + backward of the whole model with its first n units frozen,
    n = 0..N, counted by FlopCounterMode on a meta-device copy (shapes only; the model itself
    is untouched)."""
    from freezeout import freeze
    model = copy.deepcopy(model).to("meta").train()
    units = model.freeze_units()
    levels = []
    for n in range(len(units)):
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(tuple(input_shape), device="meta")).sum().backward()
        levels.append(counter.get_total_flops())
        freeze(units[n])
    return levels


def stepped_speedup(levels: list, n_units: int, total: int, t_0: float, power: int) -> float:
    """1 - (cost of the T steps, each at its freeze level) / (T steps with nothing frozen),
    stepping k = 0..T-1 and counting the units with k >= t_i * T (never the output unit)."""
    t = [closed_form_t(i, n_units, t_0, power) for i in range(n_units)]
    cost = sum(levels[sum(k >= t_i * total for t_i in t)] for k in range(total))
    return 1 - cost / (total * levels[0])


def continuous_speedup(levels: list, n_units: int, t_0: float, power: int) -> float:
    """The same in the limit of many steps: the level with n units frozen lasts from t_{n-1}
    to t_n of the run."""
    t = [closed_form_t(i, n_units, t_0, power) for i in range(n_units)]
    cost = sum((t[n] - (t[n - 1] if n else 0.0)) * levels[n] for n in range(n_units))
    return 1 - cost / levels[0]


# -- what the training step really computes ---------------------------------------------------
def spy_on_step(monkeypatch) -> list[dict]:
    """Wrap engine.train_step; for every step record the input batch, whether it and the
    model's 3x3 convolution weights are in the channels-last layout, the dtype of the logits
    as computed inside the step, the loss's dtype and whether the GradScaler is on."""
    import engine
    real, seen = engine.train_step, []

    def channels_last(t: torch.Tensor) -> bool:
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()

    def spy(model, x, y, optimizer, scaler, autocast):
        convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        record = {"x": x, "channels_last": channels_last(x) and all(map(channels_last, convs)) and bool(convs),
                  "scaler": scaler.is_enabled()}

        def hook(module, args, out):
            record["logits"] = out.dtype

        handle = model.register_forward_hook(hook)
        try:
            loss = real(model, x, y, optimizer, scaler, autocast)
        finally:
            handle.remove()
        record["loss"] = loss.dtype
        seen.append(record)
        return loss

    monkeypatch.setattr(engine, "train_step", spy)
    return seen


# -- what a figure draws -----------------------------------------------------------------------
class KeptFigures:
    """Stands in for matplotlib.pyplot, except that closing a figure keeps it (in `figures`)
    for the test to read what was drawn."""

    def __init__(self, plt):
        self.plt, self.figures = plt, []

    def __getattr__(self, name):
        return getattr(self.plt, name)

    def close(self, fig):
        self.figures.append(fig)
