"""Real CUDA graphs (skipped without a GPU): the graphed step against the eager one, one
capture per freeze level, no host synchronisation in a replayed step, train.py graphed with
bf16, channels-last, dropout and the torchvision loader, and a resumed graphed run."""
import os
import signal

import pytest
import torch

import graphs
import train
from densenet import DenseNet
from engine import EagerStep, build_training
from graphs import GraphedStep
from metrics_logger import read_records

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = torch.device("cuda")
STEPS, BATCH = 50, 32


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


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_graphed_and_eager_steps_agree_across_freeze_points(amp):
    data = batches()
    eager = make_training(amp=amp)
    eager_losses = run(eager, EagerStep(eager), data)
    graphed = make_training(amp=amp)
    step = GraphedStep(graphed, BATCH, STEPS, min_steps=1)
    snapshots = {}

    def snapshot_frozen(k):
        for i in range(graphed.scheduler.num_frozen):
            snapshots.setdefault(i, [p.detach().clone() for p in graphed.units[i].parameters()])

    losses = run(graphed, step, data, snapshot_frozen)
    assert graphed.scheduler.num_frozen >= 3 and graphed.scheduler.frozen_at == eager.scheduler.frozen_at
    assert torch.allclose(losses, eager_losses, rtol=1e-4, atol=0)
    for i, before in snapshots.items():  # frozen weights untouched by every later replay
        assert all(torch.equal(a, b) for a, b in zip(before, graphed.units[i].parameters()))
    assert step.captures == graphed.scheduler.num_frozen + 1


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


TINY = ["--dataset", "synthetic", "--which_dataset", "10", "--subset", "512", "-L", "16", "-k", "6",
        "--batch_size", "32", "--epochs", "3", "--t_0", "0.5", "--device", "cuda", "--cuda-graphs", "on"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--amp", "bf16", "--channels-last"], ["--dropout", "0.2"],
                                   ["--loader", "torchvision", "--workers", "2"]])
def test_train_py_graphed(tmp_path, extra):
    summary = train.main([*TINY, *extra, "--out-dir", str(tmp_path), "--name", "g"])
    config = read_records(tmp_path / "g" / "metrics.jsonl", "config")[0]
    epochs = read_records(tmp_path / "g" / "metrics.jsonl", "epoch")
    assert config["training_step"] == "graphed" and all(e["training_step"] == "graphed" for e in epochs)
    assert sum(e["captures"] for e in epochs) >= 2 and all(e["train_loss"] < 3 for e in epochs)
    assert summary["frozen_at"][0] is not None and summary["test_err"] < 90


@pytest.mark.slow
def test_a_resumed_graphed_run_is_bit_identical(tmp_path, monkeypatch):
    # cuDNN may pick non-deterministic kernels (atomics in weight gradients): bit-identity
    # across processes needs the deterministic ones, eager or graphed alike.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    args = [*TINY, "--dropout", "0.1", "--out-dir", str(tmp_path)]
    train.main([*args, "--name", "whole"])
    real_call, calls = GraphedStep.__call__, []

    def call_then_sigint(self, x, y):
        calls.append(1)
        if len(calls) == 22:  # epoch 2 (16 steps an epoch), batch 5
            os.kill(os.getpid(), signal.SIGINT)
        return real_call(self, x, y)

    monkeypatch.setattr(GraphedStep, "__call__", call_then_sigint)
    with pytest.raises(SystemExit):
        train.main([*args, "--name", "cut"])
    monkeypatch.setattr(GraphedStep, "__call__", real_call)
    train.main([*args, "--name", "cut", "--resume"])
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])
    assert whole["scheduler"] == cut["scheduler"]
    cut_epochs = read_records(tmp_path / "cut" / "metrics.jsonl", "epoch")
    assert [e["epoch"] for e in cut_epochs] == [1, 2, 3] and graphs.GRAPH_WARMUP_STEPS > 0
