"""Real CUDA graphs (skipped without a GPU): the graphed step against the eager one, one
capture per freeze level, no host synchronisation in a replayed step, train.py graphed with
bf16, channels-last, dropout and the torchvision loader, and a resumed graphed run."""

import pytest
import torch

import graphs
import train
from conftest import closed_form_frozen_at, graphed_run_stopped_then_resumed, planned_captures, tiny_argv
from densenet import DenseNet
from engine import build_training
from graphs import GraphedStep
from metrics_logger import read_records

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = torch.device("cuda")
STEPS, BATCH = 50, 32
UNITS = 10  # DenseNet-BC L=16


def make_training(t_0=0.3, dropout=0.0, amp="off"):
    torch.manual_seed(0)
    return build_training(DenseNet(16, 6, 10, dropout=dropout), DEVICE, STEPS, lr=0.1, momentum=0.9,
                          weight_decay=1e-4, t_0=t_0, how_scale="cubic", scale_lr=True, amp=amp)


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 32, 32, generator=g).to(DEVICE),
             torch.randint(0, 10, (BATCH,), generator=g).to(DEVICE)) for _ in range(STEPS)]


def run(training, step, data, on_step=None):
    training.model.train()
    step.start_epoch(0, 0)
    losses = []
    for k, (x, y) in enumerate(data):
        losses.append(step(x, y).clone())
        training.scheduler.step()
        if on_step is not None:
            on_step(k)
    return torch.stack(losses).cpu()


@pytest.fixture
def deterministic():
    """Deterministic cuDNN algorithms, no TF32, no autotuning: the same kernels on the same
    inputs give the same numbers, so a graph and the eager run of its own step can be compared."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)  # warns for a kernel with atomics only
    yield
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved[:4]
    torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


# The graphed step's own eager path runs the same kernels as its graphs (the rates as float32
# tensors on the device, casts uncached), so the two agree to the rounding of the few kernels
# that exist only with atomic adds (reordered sums: a few float32 ulps a step, kept small over
# 50 steps; bf16 rounds activations to 8 bits, so one flipped rounding shows at 1e-2).
TOLERANCE = {"off": dict(rtol=1e-5, atol=1e-6), "bf16": dict(rtol=2e-2, atol=1e-3)}


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_graphs_captured_back_to_back_compute_what_their_step_does_eagerly(amp, deterministic):
    data = batches()
    eager = make_training(amp=amp)
    eager_losses = run(eager, GraphedStep(eager, BATCH, STEPS, min_steps=10 ** 9), data)  # never captures
    graphed = make_training(amp=amp)
    step = GraphedStep(graphed, BATCH, STEPS, min_steps=1)  # every level captured, one after another
    snapshots = {}

    def snapshot_frozen(k):
        for i in range(graphed.scheduler.num_frozen):
            snapshots.setdefault(i, [p.detach().clone() for p in graphed.units[i].parameters()])

    losses = run(graphed, step, data, snapshot_frozen)
    assert graphed.scheduler.frozen_at == eager.scheduler.frozen_at == closed_form_frozen_at(UNITS, STEPS, 0.3)
    planned = planned_captures(graphed.scheduler.frozen_at, STEPS, graphs.GRAPH_WARMUP_STEPS, 1)
    assert (step.captures, step.eager_steps) == planned and step.captures >= 5
    torch.testing.assert_close(losses, eager_losses, **TOLERANCE[amp])
    for a, b in zip(graphed.model.parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, **TOLERANCE[amp])
    for i, before in snapshots.items():  # frozen weights untouched by every later replay
        assert all(torch.equal(a, b) for a, b in zip(before, graphed.units[i].parameters(), strict=True))


def test_a_replayed_step_never_waits_for_the_gpu():
    training = make_training(t_0=1.0)  # no freezing: one capture, then replays only
    step = GraphedStep(training, BATCH, STEPS, min_steps=1)
    data = batches()
    step.start_epoch(0, 0)
    for x, y in data[:3]:  # two warm-up steps and the capture
        step(x, y)
        training.scheduler.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flag = torch.zeros((), device=DEVICE)
        for x, y in data[3:]:
            loss = step(x, y)
            flag = torch.where(torch.isfinite(loss), flag, flag + 1)
            training.scheduler.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.captures == 1 and flag.item() == 0


# DenseNet-BC L=16 (10 units), 2,048 images in batches of 32: 64 steps an epoch, 192 in all.
# Cubic t_0 = 0.5 freezes units at steps 24, 33, 44, 57, 73, 91, 112, 135, 162: every level
# lasts at least GRAPH_MIN_STEPS (8), so each is captured, one after another.
TINY = tiny_argv("--epochs", "3", "--t_0", "0.5", "--cuda-graphs", "on", subset=2048, depth=16, k=6, batch_size=32,
                 device="cuda")
TINY_STEPS, TINY_PER_EPOCH = 192, 64


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--amp", "bf16", "--channels-last"], ["--dropout", "0.2"],
                                   ["--loader", "torchvision", "--workers", "2"]])
def test_train_py_graphed(tmp_path, extra):
    summary = train.main([*TINY, *extra, "--out-dir", str(tmp_path), "--name", "g"])
    config = read_records(tmp_path / "g" / "metrics.jsonl", "config")[0]
    epochs = read_records(tmp_path / "g" / "metrics.jsonl", "epoch")
    assert config["training_step"] == "graphed" and all(e["training_step"] == "graphed" for e in epochs)
    frozen_at = closed_form_frozen_at(UNITS, TINY_STEPS, 0.5)
    assert summary["frozen_at"] == frozen_at
    planned = planned_captures(frozen_at, TINY_STEPS, graphs.GRAPH_WARMUP_STEPS, graphs.GRAPH_MIN_STEPS)
    assert (sum(e["captures"] for e in epochs), sum(e["eager_steps"] for e in epochs)) == planned == (10, 2)
    assert all(e["train_loss"] < 3 for e in epochs) and summary["test_err"] < 90


@pytest.mark.slow
def test_a_resumed_graphed_run_is_bit_identical(tmp_path, monkeypatch, deterministic):
    args = [*TINY, "--dropout", "0.1", "--out-dir", str(tmp_path)]
    train.main([*args, "--name", "whole"])
    # Stopped after step 84 (epoch 2, batch 20).
    graphed_run_stopped_then_resumed(monkeypatch, [*args, "--name", "cut"], stop_at_call=TINY_PER_EPOCH + 21)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])
    assert whole["scheduler"] == cut["scheduler"]
    cut_epochs = read_records(tmp_path / "cut" / "metrics.jsonl", "epoch")
    assert [e["epoch"] for e in cut_epochs] == [1, 2, 3]
    # The resumed process (from step 85, in level 5: steps 73-90) warmed up again, then captured
    # every level that had at least 8 steps left: its steps were not all eager.
    resumed = read_records(tmp_path / "cut" / "metrics.jsonl", "epoch")[1:]
    planned = planned_captures(closed_form_frozen_at(UNITS, TINY_STEPS, 0.5), TINY_STEPS, graphs.GRAPH_WARMUP_STEPS,
                               graphs.GRAPH_MIN_STEPS, first=85, has_momentum=True)
    assert planned == (4, 6)
    assert (sum(e["captures"] for e in resumed), sum(e["eager_steps"] for e in resumed)) == planned
