"""GPU checks (skipped without CUDA): no host-device synchronisation in the training step,
frozen units untouched under AMP, the tensor loader and train.py on the GPU."""
import pytest
import torch

import engine
import train
from conftest import closed_form_frozen_at, error_of, tiny_argv
from data_sets import ImageSet, load_splits
from densenet import DenseNet
from freezeout import FreezeOut, param_groups
from loaders import TensorLoader
from metrics_logger import read_records

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = torch.device("cuda")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_steps_never_wait_for_the_gpu(amp):
    torch.manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8), torch.arange(512) % 10)
    loader = TensorLoader(data, (0.5,) * 3, (0.25,) * 3, 32, train=True, device=DEVICE, seed=0)
    loader.set_epoch(1)
    model = DenseNet(16, 6, 10).to(DEVICE)
    units = model.freeze_units()
    optimizer = engine.make_optimizer(units, lr=0.1, momentum=0.9, weight_decay=1e-4, device=DEVICE)
    scheduler = FreezeOut(optimizer, units, total_steps=16, t_0=0.3)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    autocast = engine.autocast_for(amp, DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        loss_sum = torch.zeros((), device=DEVICE)
        for x, y in loader:  # 16 steps: units freeze along the way
            loss_sum += engine.train_step(model, x, y, optimizer, scaler, autocast).float()
            scheduler.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert scheduler.num_frozen > 0 and torch.isfinite(loss_sum)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_frozen_units_stay_bit_identical_under_amp(amp):
    torch.manual_seed(0)
    model = DenseNet(16, 6, 10).to(DEVICE)
    units = model.freeze_units()
    optimizer = torch.optim.SGD(param_groups(units), lr=0.1, momentum=0.9, nesterov=True)
    scheduler = FreezeOut(optimizer, units, total_steps=30, t_0=0.2, how_scale="linear")
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    autocast = engine.autocast_for(amp, DEVICE)
    x, y = torch.randn(16, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (16,), device=DEVICE)
    snapshot = None
    for _ in range(30):
        model.train()
        engine.train_step(model, x, y, optimizer, scaler, autocast)
        scheduler.step()
        if snapshot is None and scheduler.num_frozen >= 3:
            frozen = units[:3]
            snapshot = [{k: v.clone() for k, v in u.state_dict().items()} for u in frozen]
    for unit, before in zip(frozen, snapshot, strict=True):
        after = unit.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--amp", "bf16", "--channels-last"], ["--amp", "fp16"],
                                   ["--loader", "torchvision", "--workers", "2"]])
def test_train_py_on_the_gpu(tmp_path, extra):
    summary = train.main(tiny_argv("--epochs", "2", "--out-dir", str(tmp_path), "--save-weights", "gpu", *extra,
                                   subset=256, depth=16, k=6, batch_size=32, device="cuda"))
    config = read_records(tmp_path / "gpu" / "metrics.jsonl", "config")[0]
    assert config["device"].startswith("cuda") and config["host"]["gpu"]
    if extra[0] == "--amp":
        assert config["amp_effective"] == extra[1]
    else:
        assert config["loader_used"] == "torchvision"
    assert summary["frozen_at"] == closed_form_frozen_at(10, 16, 0.8, 3)  # 10 units; 256 images / 32 x 2 epochs
    # The test error, recomputed from the final weights on the 256 test images (one batch, as
    # train.py evaluates on a GPU): the same up to an image or two whose logits tie differently.
    splits = load_splits("synthetic", eval_mode="val", subset=256, num_classes=10, seed=0)
    model = DenseNet(16, 6, 10).to(DEVICE, memory_format=engine.memory_format(config["channels_last"]))
    model.load_state_dict(torch.load(tmp_path / "gpu" / "checkpoint.pt", weights_only=True)["model"])
    with engine.autocast_for(config["amp_effective"], DEVICE):
        err = error_of(model, splits.test.images, splits.test.labels, splits.mean, splits.std, 500, DEVICE,
                       engine.memory_format(config["channels_last"]))
    wrong = summary["test_err"] * 256 / 100
    assert abs(wrong - round(wrong)) < 1e-9 and abs(summary["test_err"] - err) <= 2 * 100 / 256 + 1e-9
