"""train.py end to end on the synthetic set: records, checkpoint, resume, bad input."""
import math
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.datasets.cifar as tv_cifar

import train
from densenet import DenseNet
from metrics_logger import read_records
from models import build_model
from freezeout import unit_times
from utils import calc_speedup, schedule_speedup, training_flops_by_level, unit_flops

ROOT = Path(__file__).resolve().parents[1]
# L=10, k=4: one layer per block, 7 units; 96 images in batches of 16: 6 steps per epoch.
TINY = ["--dataset", "synthetic", "--which_dataset", "10", "--subset", "96", "-L", "10", "-k", "4",
        "--batch_size", "16", "--device", "cpu"]


def run_train(tmp_path, *extra, name="run"):
    return train.main([*TINY, "--out-dir", str(tmp_path), "--save-weights", name, *extra])


def expected_lrs(step, total, t_0, power, scaled, n_units=7, base=0.1):
    lrs = []
    for i in range(n_units):
        t_i = (t_0 + (1 - t_0) * i / (n_units - 1)) ** power
        alpha = base / t_i if scaled else base
        lrs.append(0.0 if step >= t_i * total else 0.5 * alpha * (1 + math.cos(math.pi * step / (t_i * total))))
    return lrs


@pytest.mark.parametrize("flags,t_0,power,scaled", [
    ([], 0.8, 3, True),
    (["--t_0", "0.3", "--how_scale", "linear", "--no_scale"], 0.3, 1, False)])
def test_run_writes_config_epochs_summary_and_checkpoint(tmp_path, flags, t_0, power, scaled):
    summary = run_train(tmp_path, "--epochs", "3", *flags)
    run_dir = tmp_path / "run"
    records = read_records(run_dir / "metrics.jsonl")
    assert [r["event"] for r in records] == ["config", "epoch", "epoch", "epoch", "summary"]
    config = records[0]
    total = 18
    assert (config["params"], config["n_units"], config["total_steps"]) == (
        sum(p.numel() for p in DenseNet(10, 4, 10).parameters()), 7, total)
    assert config["t_0"] == t_0 and config["steps_per_epoch"] == 6 and config["num_classes"] == 10
    assert config["estimated_speedup"] == calc_speedup(4, 1, t_0, "cubic" if power == 3 else "linear")
    assert config["host"]["cpu_threads"] >= 1 and config["device"] == "cpu"
    t = [(t_0 + (1 - t_0) * i / 6) ** power for i in range(7)]
    for e, record in enumerate(records[1:4], 1):
        step = 6 * e
        assert record["epoch"] == e and record["step"] == step
        assert record["lr"] == expected_lrs(step, total, t_0, power, scaled)  # exactly
        frozen = sum(t_i * total <= min(step, total - 1) for t_i in t)
        assert (record["frozen_units"], record["active_units"]) == (frozen, 7 - frozen)
        assert 0 <= record["val_err"] <= 100 and record["train_time_s"] > 0 and record["images_per_s"] > 0
    assert records[3]["lr"] == [0.0] * 7
    assert summary == records[-1]
    assert summary["frozen_at"] == [next((k for k in range(total) if k >= t_i * total), None) for t_i in t]
    assert 0 <= summary["test_err"] <= 100 and summary["steps"] == total

    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (3, total)
    model = DenseNet(10, 4, 10)
    model.load_state_dict(ckpt["model"])
    assert ckpt["scheduler"]["frozen_at"] == summary["frozen_at"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]


def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    args = ["--epochs", "3", "--t_0", "0.5", "--dropout", "0.1"]
    run_train(tmp_path, *args, name="whole")

    real_save, saves = train.save_checkpoint, []

    def save_then_die(path, training, config, epoch, *rest):
        real_save(path, training, config, epoch, *rest)
        saves.append(epoch)
        if len(saves) == 1:
            raise KeyboardInterrupt  # as if stopped right after the first checkpoint

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(SystemExit) as stopped:
        run_train(tmp_path, *args, name="cut")
    assert stopped.value.code != 0
    assert [r["epoch"] for r in read_records(tmp_path / "cut" / "metrics.jsonl", "epoch")] == [1]
    summary = run_train(tmp_path, *args, "--resume", name="cut")

    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for part in ("model", "scheduler"):
        a, b = whole[part], cut[part]
        assert a.keys() == b.keys()
        for key in a:
            assert (torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]), key
    assert [r["epoch"] for r in read_records(tmp_path / "cut" / "metrics.jsonl", "epoch")] == [1, 2, 3]
    assert summary["test_err"] == read_records(tmp_path / "whole" / "metrics.jsonl", "summary")[0]["test_err"]


def test_const_time_baseline_and_target_speedup(tmp_path):
    run_train(tmp_path, "--epochs", "2", "--const_time", name="const")
    config = read_records(tmp_path / "const" / "metrics.jsonl", "config")[0]
    estimate = calc_speedup(4, 1, 0.8, "cubic")
    assert config["epochs"] == math.ceil(2 / (1 - estimate)) == 3 and config["requested_epochs"] == 2

    summary = run_train(tmp_path, "--epochs", "1", "--t_0", "1", "--const_time", name="baseline")
    assert summary["frozen_at"] == [None] * 7 and summary["epochs"] == 1

    run_train(tmp_path, "--epochs", "1", "--target-speedup", "0.25", name="target")
    config = read_records(tmp_path / "target" / "metrics.jsonl", "config")[0]
    assert calc_speedup(4, 1, config["t_0"], "cubic") == pytest.approx(0.25, abs=1e-9)


def test_models_without_the_papers_estimate_use_the_flop_estimate(tmp_path):
    # Plain DenseNet (no bottleneck): --const_time and --target-speedup use FLOPs.
    flags = ["--no-bottleneck", "-L", "13", "--epochs", "2"]
    run_train(tmp_path, *flags, "--const_time", name="const")
    config = read_records(tmp_path / "const" / "metrics.jsonl", "config")[0]
    model = DenseNet(13, 4, 10, bottleneck=False)
    units = model.freeze_units()
    levels = training_flops_by_level(unit_flops(model, units, (2, 3, 32, 32)))
    flop = schedule_speedup(levels, unit_times(len(units), 0.8, "cubic"))  # continuous limit
    assert config["paper_speedup"] is None and config["epochs"] == math.ceil(2 / (1 - flop))
    assert config["flop_speedup"] == schedule_speedup(levels, config["t_i"], config["total_steps"])
    assert config["estimated_speedup"] == config["flop_speedup"] > 0

    run_train(tmp_path, *flags, "--target-speedup", "0.2", name="target")
    config = read_records(tmp_path / "target" / "metrics.jsonl", "config")[0]
    assert schedule_speedup(levels, unit_times(len(units), config["t_0"], "cubic")) == \
        pytest.approx(0.2, abs=1e-9)


@pytest.mark.parametrize("extra", [["--amp", "bf16", "--channels-last"], ["--amp", "fp16"],
                                   ["--loader", "torchvision"]])
def test_speed_switches_train_and_freeze_on_cpu(tmp_path, extra):
    # fp16 runs with a GradScaler; while units freeze it must keep stepping the active ones.
    summary = run_train(tmp_path, "--epochs", "2", "--t_0", "0.3", *extra)
    config = read_records(tmp_path / "run" / "metrics.jsonl", "config")[0]
    if extra[0] == "--amp":
        assert config["amp_effective"] == extra[1] and config["loader_used"] == "tensor"
    else:
        assert config["loader_used"] == "torchvision"
    epochs = read_records(tmp_path / "run" / "metrics.jsonl", "epoch")
    assert all(math.isfinite(e["train_loss"]) for e in epochs)
    assert summary["frozen_at"][0] is not None and summary["frozen_at"][-1] is None
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    if extra[1] == "fp16":
        assert ckpt["scaler"]["scale"] > 0  # the scaler's state travels with the checkpoint


@pytest.mark.parametrize("model,depth,k,expected", [
    ("wrn", "10", "1", "WRN-10-1"), ("vgg", "11", None, "VGG-11")])
def test_other_architectures_train_with_the_flop_estimate(tmp_path, capsys, model, depth, k, expected):
    argv = ["--model", model, "-L", depth, *(["-k", k] if k else []), "--epochs", "1", "--dropout", "0.2"]
    run_train(tmp_path, *argv)
    config = read_records(tmp_path / "run" / "metrics.jsonl", "config")[0]
    built = build_model(config["model"], config["depth"], config["growth_rate"], config["num_classes"])
    assert config["params"] == sum(p.numel() for p in built.parameters())
    assert config["paper_speedup"] is None and 0 < config["flop_speedup"] == config["estimated_speedup"]
    assert config["n_units"] == len(built.freeze_units()) and config["dropout"] == 0.2
    assert expected in capsys.readouterr().out


def test_each_architecture_has_the_papers_defaults():
    for model, depth, k in [("densenet", 76, 12), ("wrn", 40, 4), ("vgg", 16, None)]:
        _, args, _ = train.parse_args(["--model", model])
        assert (args.depth, args.growth_rate) == (depth, k)
    _, args, _ = train.parse_args(["--model", "vgg", "-k", "8"])  # -k means nothing to VGG
    assert args.growth_rate is None


def fails(capsys, argv, message, code=None):
    """main(argv) exits non-zero with `message` on the last line of stderr, no traceback."""
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code not in (0, None) and (code is None or info.value.code == code)
    assert message in err[-1] and "error" in err[-1], err
    assert not any("Traceback" in line for line in err)


BAD_FLAGS = [
    (["--t_0", "0"], "--t_0 must be in (0, 1]"),
    (["--t_0", "1.5"], "--t_0 must be in (0, 1]"),
    (["--t_0", "nan"], "--t_0 must be in (0, 1]"),
    (["--how_scale", "quartic"], "argument --how_scale"),
    (["--model", "resnet"], "argument --model"),
    (["--device", "tpu"], "argument --device"),
    (["-L", "75"], "-L/--depth: depth 75 is not a valid"),
    (["--model", "wrn", "-L", "41"], "-L/--depth: depth 41 is not a valid Wide ResNet depth"),
    (["--model", "vgg", "-L", "17"], "-L/--depth: depth 17 is not a VGG depth"),
    (["--no-bottleneck", "-L", "41"], "-L/--depth: depth 41 is not a valid"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--epochs", "two"], "argument --epochs"),
    (["--batch_size", "-4"], "--batch_size must be a positive integer"),
    (["--subset", "0"], "--subset must be a positive integer"),
    (["--dataset", "cifar10", "--which_dataset", "100"], "--dataset cifar10 contradicts --which_dataset 100"),
    (["--target-speedup", "0.9"], "--target-speedup: no t_0 in (0, 1] reaches"),
    (["--t_0", "0.5", "--target-speedup", "0.2"], "not both"),
    (["--no-bottleneck", "-L", "13", "-k", "4", "--target-speedup", "0.8"],
     "--target-speedup: no t_0 in (0, 1] reaches a speedup of 0.8: the FLOP-based estimate"),
    (["--batch_size", "50000"], "--batch_size 50000 is larger than the training set"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS)
def test_bad_flags_give_one_clear_line_before_any_work(tmp_path, capsys, argv, message):
    fails(capsys, [*argv, "--out-dir", str(tmp_path / "out")], message, code=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(tmp_path, capsys):
    fails(capsys, ["--device", "cuda", "--out-dir", str(tmp_path)], "--device cuda: no CUDA GPU", code=2)


def test_bad_paths_and_run_directories(tmp_path, capsys, monkeypatch):
    out = ["--out-dir", str(tmp_path)]
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    fails(capsys, ["--data-root", str(a_file), "--device", "cpu", *out], f"--data-root {a_file} is not a directory")
    fails(capsys, [*TINY, "--out-dir", str(a_file)], "cannot create")
    fails(capsys, [*TINY, *out, "--save-weights", "none", "--resume"], "--resume: no checkpoint in")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    fails(capsys, ["--data-root", str(tmp_path / "data"), "--device", "cpu", *out],
          "CIFAR-100 could not be found under")

    run_train(tmp_path, "--epochs", "1", name="done")
    before = {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir()}
    fails(capsys, [*TINY, *out, "--epochs", "1", "--save-weights", "done"], "already holds a run")
    fails(capsys, [*TINY, *out, "--epochs", "2", "--save-weights", "done", "--resume"],
          "--resume: --epochs 2 contradicts the saved run's epochs = 1")
    assert {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir()} == before
    assert a_file.read_text() == "keep me"


def test_command_line_errors_and_help(tmp_path):
    bad = subprocess.run([sys.executable, "train.py", "--t_0", "0", "--out-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--t_0 must be in (0, 1]" in bad.stderr.strip().splitlines()[-1]
    assert "Traceback" not in bad.stderr and not any(tmp_path.iterdir())
    help_text = subprocess.run([sys.executable, "train.py", "-h"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    for text in ("--batch_size", "--t_0", "(default: 0.8)", "(default: 76 for densenet", "(default: cifar100",
                 "--no-validate", "--validate-test", "--no_scale", "--const_time", "--amp"):
        assert text in help_text, text
