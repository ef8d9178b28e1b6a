"""engine.py: device and precision choices with their fallbacks, seeding, the eager training
step (the dtype autocast really computes in, the memory format the model really gets),
evaluation, and the epoch loop's reads of the device."""
import random
import warnings

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import raises_flagged, spy_on_step, tiny_training
from data_sets import ImageSet
from engine import (
    PROGRESS_EVERY,
    EagerStep,
    EpochPosition,
    StopSignals,
    autocast_for,
    effective_amp,
    evaluate,
    resolve_device,
    seed_everything,
    train_one_epoch,
)
from loaders import TensorLoader
from timing import TimeSplit

CPU = torch.device("cpu")


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    has_mps = torch.backends.mps.is_available()
    expected = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    assert resolve_device("auto") == torch.device(expected)
    if not torch.cuda.is_available():
        with raises_flagged(ValueError, "--device cuda: no CUDA GPU"):
            resolve_device("cuda")
    if not has_mps:
        with raises_flagged(ValueError, "--device mps: Apple's MPS backend is not available"):
            resolve_device("mps")


def test_auto_device_is_cpu_without_cuda_or_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_seed_everything_seeds_every_generator():
    def draw():
        seed_everything(7)
        return random.random(), np.random.rand(), torch.rand(1).item()

    first = draw()
    assert draw() == first
    seed_everything(8)
    assert (random.random(), np.random.rand(), torch.rand(1).item())[0] != first[0]


# -- precision --------------------------------------------------------------------------
def test_effective_amp_is_what_the_device_supports():
    assert effective_amp("off", CPU) == "off"
    assert effective_amp("bf16", CPU) == "bf16" and effective_amp("fp16", CPU) == "fp16"
    # A device type with no autocast at all: torch refuses it, so the run goes without.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert effective_amp("bf16", torch.device("meta")) == "off"


@pytest.mark.parametrize("how", ["warns", "disables", "raises"])
def test_effective_amp_falls_back_to_off_where_autocast_declines(monkeypatch, how):
    real = torch.autocast

    class Declining(real):
        def __init__(self, *args, **kwargs):
            if how == "raises":
                raise RuntimeError("unsupported autocast dtype")
            super().__init__(*args, **kwargs)
            if how == "warns":
                warnings.warn("In CPU autocast, but the target dtype is not supported. Disabling autocast.",
                              stacklevel=2)
            else:
                self._enabled = False

    monkeypatch.setattr(torch, "autocast", Declining)
    assert effective_amp("fp16", CPU) == "off"
    assert effective_amp("off", CPU) == "off"


@pytest.mark.parametrize("amp,dtype", [("off", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_eager_step_computes_in_the_precision_and_layout_asked_for(monkeypatch, amp, dtype, channels_last):
    seen = spy_on_step(monkeypatch)
    training = tiny_training(amp=amp, channels_last=channels_last)
    convs = [m.weight for m in training.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) == channels_last or w.shape[-1] == 1
               for w in convs)
    assert any(w.shape[-1] == 3 for w in convs)
    step = EagerStep(training)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))  # the loader's layout: contiguous
    training.model.train()
    for _ in range(2):
        loss = step(x, y)
        training.scheduler.step()
    assert [{k: v for k, v in r.items() if k != "x"} for r in seen] == \
        [{"channels_last": channels_last, "scaler": amp == "fp16", "logits": dtype, "loss": torch.float32}] * 2
    assert torch.isfinite(loss)
    # Parameters stay float32 (autocast computes in low precision, it does not store in it).
    assert all(p.dtype == torch.float32 for p in training.model.parameters())


def test_autocast_for_off_is_a_no_op():
    with autocast_for("off", CPU):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_for("bf16", CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


# -- evaluation ---------------------------------------------------------------------------
def test_evaluate_is_the_mean_loss_and_the_share_of_wrong_answers():
    training = tiny_training()
    data = ImageSet(torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8), torch.arange(37) % 10)
    loader = TensorLoader(data, (0.5,) * 3, (0.25,) * 3, 16, train=False)
    training.model.train()  # evaluate must switch to inference mode itself
    loss, err = evaluate(training, loader)
    model = training.model.eval()
    with torch.no_grad():
        x = (data.images.float() - 127.5) / 63.75
        logits = model(x)
    wrong = int((logits.argmax(1) != data.labels).sum())
    assert err == pytest.approx(100 * wrong / 37, abs=1e-12)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, data.labels).item(), rel=1e-5)


# -- the epoch loop never waits for the device per step ------------------------------------
class HostReads(TorchFunctionMode):
    """Counts what makes the host wait for a tensor's value (on a GPU, for the device)."""

    READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_the_epoch_loop_reads_the_device_once_a_progress_refresh_and_once_at_the_end():
    steps = 2 * PROGRESS_EVERY + 5                  # refreshes after steps 1, 21, 41 and 45 (the last)
    training = tiny_training(total=steps)
    data = ImageSet(torch.randint(0, 256, (4 * steps, 3, 32, 32), dtype=torch.uint8), torch.arange(4 * steps) % 10)
    loader = TensorLoader(data, (0.5,) * 3, (0.25,) * 3, 4, train=True)
    position, clock = EpochPosition(1), TimeSplit()
    with StopSignals() as stop, HostReads() as counted:
        train_one_epoch(training, loader, position, steps, stop, desc="test", clock=clock)
    assert position.batch == steps and clock.steps["eager"] == steps
    assert len(counted.reads) == 4 + 1, counted.reads  # never per step
