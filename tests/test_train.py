"""train.py end to end on the synthetic set: records checked against the paper's formulas,
errors recomputed from the checkpoint, evaluation modes, augmentation and speed switches seen
inside the step, estimates against hand counts, resume, bad input."""
import math
import urllib.error
import warnings

import pytest
import torch
import torchvision.datasets.cifar as tv_cifar

import checkpoint
import loaders
import plan
import train
from conftest import (
    PLAIN_L13_K4_FORWARD,
    TINY,
    TINY_PARAMS,
    TINY_STEPS_PER_EPOCH,
    TINY_UNITS,
    closed_form_frozen_at,
    closed_form_lrs,
    continuous_speedup,
    counted_step_flops,
    error_of,
    run_train,
    same_state,
    spy_on_step,
    stepped_speedup,
)
from data_sets import load_splits
from densenet import DenseNet
from metrics_logger import read_records
from models import build_model
from utils import calc_speedup


def tiny_splits(eval_mode="val"):
    """The splits the tiny run trains and evaluates on."""
    return load_splits("synthetic", eval_mode=eval_mode, subset=96, num_classes=10, seed=0)


def final_model(run_dir, make=lambda: DenseNet(10, 4, 10)):
    model = make()
    model.load_state_dict(torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"])
    return model


def whole_count(err: float, n: int) -> bool:
    """err is 100 * wrong / n for a whole number of wrong answers."""
    return abs(err * n / 100 - round(err * n / 100)) < 1e-9


@pytest.mark.slow
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
    assert (config["params"], config["n_units"], config["total_steps"]) == (TINY_PARAMS, TINY_UNITS, total)
    assert config["t_0"] == t_0 and config["steps_per_epoch"] == TINY_STEPS_PER_EPOCH
    assert config["num_classes"] == 10 and config["train_images"] == 96
    # calc_speedup's second argument: layers per dense block, (10 - 4) / 6 = 1.
    assert config["estimated_speedup"] == calc_speedup(4, 1, t_0, "cubic" if power == 3 else "linear")
    assert config["host"]["cpu_threads"] == torch.get_num_threads() and config["device"] == "cpu"
    assert config["t_i"] == [(t_0 + (1 - t_0) * i / 6) ** power for i in range(7)]
    t = config["t_i"]
    for e, record in enumerate(records[1:4], 1):
        step = 6 * e
        assert record["epoch"] == e and record["step"] == step
        assert record["lr"] == closed_form_lrs(step, 7, total, t_0, power, scaled)  # exactly
        frozen = sum(t_i * total <= min(step, total - 1) for t_i in t)
        assert (record["frozen_units"], record["active_units"]) == (frozen, 7 - frozen)
        assert whole_count(record["val_err"], 96)  # wrong answers out of the 96 validation images
        assert record["images_per_s"] == pytest.approx(96 / record["train_time_s"], rel=1e-9)
    assert records[3]["lr"] == [0.0] * 7
    assert summary == records[-1]
    assert summary["frozen_at"] == closed_form_frozen_at(7, total, t_0, power) and summary["steps"] == total

    # The last evaluation and the test error, recomputed from the final weights.
    splits = tiny_splits()
    model = final_model(run_dir)
    val_err = error_of(model, splits.eval.images, splits.eval.labels, splits.mean, splits.std, 16)
    test_err = error_of(model, splits.test.images, splits.test.labels, splits.mean, splits.std, 16)
    assert records[3]["val_err"] == pytest.approx(val_err, abs=1e-9) and summary["val_err"] == records[3]["val_err"]
    assert summary["test_err"] == pytest.approx(test_err, abs=1e-9)

    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (3, total)
    assert ckpt["scheduler"]["frozen_at"] == summary["frozen_at"]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoint.pt", "metrics.jsonl"]


@pytest.mark.slow
def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    args = ["--epochs", "3", "--t_0", "0.5", "--dropout", "0.1"]
    run_train(tmp_path, *args, name="whole")

    real_save, saves = checkpoint.save_checkpoint, []

    def save_then_die(path, training, config, epoch, step, *rest):
        real_save(path, training, config, epoch, step, *rest)
        if step == 0:
            return  # the step-0 checkpoint, written as the run starts
        saves.append(epoch)
        if len(saves) == 1:
            raise KeyboardInterrupt  # as if stopped right after the first checkpoint

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(SystemExit) as stopped:
        run_train(tmp_path, *args, name="cut")
    assert stopped.value.code == 130
    assert [r["epoch"] for r in read_records(tmp_path / "cut" / "metrics.jsonl", "epoch")] == [1]
    torch.manual_seed(12345)  # the resumed run must take its generators from the checkpoint
    summary = run_train(tmp_path, *args, "--resume", name="cut")

    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for part in ("model", "optimizer", "scheduler"):
        assert same_state(whole[part], cut[part]), part
    assert [r["epoch"] for r in read_records(tmp_path / "cut" / "metrics.jsonl", "epoch")] == [1, 2, 3]
    assert summary["test_err"] == read_records(tmp_path / "whole" / "metrics.jsonl", "summary")[0]["test_err"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_models_without_the_papers_estimate_use_the_flop_estimate(tmp_path):
    # Plain DenseNet (no bottleneck): --const_time and --target-speedup use FLOPs, here against
    # the hand-counted per-unit FLOPs and the whole model counted at every freeze level.
    flags = ["--no-bottleneck", "-L", "13", "--epochs", "2"]
    run_train(tmp_path, *flags, "--const_time", name="const")
    config = read_records(tmp_path / "const" / "metrics.jsonl", "config")[0]
    assert [u["forward"] for u in config["unit_flops"]] == [2 * f for f in PLAIN_L13_K4_FORWARD]
    levels = counted_step_flops(DenseNet(13, 4, 10, bottleneck=False), (2, 3, 32, 32))
    continuous = continuous_speedup(levels, 13, 0.8, 3)
    assert config["paper_speedup"] is None and config["epochs"] == math.ceil(2 / (1 - continuous)) == 3
    assert config["flop_speedup"] == pytest.approx(stepped_speedup(levels, 13, config["total_steps"], 0.8, 3),
                                                   rel=1e-12)
    assert config["total_steps"] == 18 and config["estimated_speedup"] == config["flop_speedup"]

    run_train(tmp_path, *flags, "--target-speedup", "0.2", name="target")
    config = read_records(tmp_path / "target" / "metrics.jsonl", "config")[0]
    assert continuous_speedup(levels, 13, config["t_0"], 3) == pytest.approx(0.2, abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("extra,dtype,channels_last", [
    (["--amp", "bf16", "--channels-last"], torch.bfloat16, True),
    (["--amp", "fp16"], torch.float16, False),
    (["--loader", "torchvision"], torch.float32, False)])
def test_speed_switches_train_and_freeze_on_cpu(tmp_path, monkeypatch, extra, dtype, channels_last):
    # fp16 runs with a GradScaler; while units freeze it must keep stepping the active ones.
    seen = spy_on_step(monkeypatch)
    made = []
    real_make = train.make_loaders
    monkeypatch.setattr(train, "make_loaders", lambda *a, **k: made.append(real_make(*a, **k)) or made[-1])
    summary = run_train(tmp_path, "--epochs", "2", "--t_0", "0.3", *extra)
    config = read_records(tmp_path / "run" / "metrics.jsonl", "config")[0]
    fp16 = extra == ["--amp", "fp16"]
    # Inside every one of the 12 steps: the precision computed in, the layout, the scaler.
    assert len(seen) == 12
    assert all((r["logits"], r["loss"], r["channels_last"], r["scaler"]) == (dtype, torch.float32, channels_last, fp16)
               for r in seen)
    kind = loaders.TorchvisionLoader if "torchvision" in extra else loaders.TensorLoader
    assert all(isinstance(loader, kind) for loader in made[0] if loader is not None)
    assert config["loader_used"] == ("torchvision" if "torchvision" in extra else "tensor")
    assert config["amp_effective"] == (extra[1] if extra[0] == "--amp" else "off")
    epochs = read_records(tmp_path / "run" / "metrics.jsonl", "epoch")
    assert all(math.isfinite(e["train_loss"]) for e in epochs)
    assert summary["frozen_at"] == closed_form_frozen_at(7, 12, 0.3, 3)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    model = final_model(tmp_path / "run")
    assert all(torch.equal(ckpt["model"][k], v) for k, v in model.state_dict().items())
    if fp16:  # the scaler's state travels with the checkpoint
        assert ckpt["scaler"]["scale"] == 65536.0 and ckpt["scaler"]["_growth_tracker"] == 12


@pytest.mark.slow  # a compile per freeze level
def test_compile_trains_as_the_eager_step_does_compiling_once_per_freeze_level(tmp_path, monkeypatch):
    import functools

    import compiled_step

    # aot_eager: dynamo and AOT autograd as inductor uses them, without generating C++ (seconds).
    monkeypatch.setattr(plan, "CompiledStep", functools.partial(compiled_step.CompiledStep, backend="aot_eager"))
    eager = run_train(tmp_path, "--epochs", "2", "--t_0", "0.3", name="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = run_train(tmp_path, "--epochs", "2", "--t_0", "0.3", "--compile", name="compiled")
    # The order was checked (the first step is eager), and no hook was left to trouble dynamo.
    assert not [w for w in caught if "not checked" in str(w.message) or "global hooks" in str(w.message)]
    config = read_records(tmp_path / "compiled" / "metrics.jsonl", "config")[0]
    assert (config["compile"], config["training_step"]) == (True, "compiled")
    assert read_records(tmp_path / "eager" / "metrics.jsonl", "config")[0]["compile"] is False
    epochs = read_records(tmp_path / "compiled" / "metrics.jsonl", "epoch")
    eager_epochs = read_records(tmp_path / "eager" / "metrics.jsonl", "epoch")
    # One compile per freeze level the compiled steps (1 to 11) ran at.
    frozen_at = [at for at in compiled["frozen_at"] if at is not None]
    levels = len({sum(at <= k for at in frozen_at) for k in range(1, 2 * TINY_STEPS_PER_EPOCH)})
    assert levels >= 4
    assert sum(e["captures"] for e in epochs) == levels
    # The first step runs eagerly, so that FreezeOut checks the order of the units.
    assert [e["eager_steps"] for e in epochs] == [1, 0]
    assert all(e["training_step"] == "compiled" for e in epochs)
    assert all(e["capture_time_s"] > 0 for e in epochs if e["captures"])
    assert compiled["frozen_at"] == eager["frozen_at"]
    for e, c in zip(eager_epochs, epochs, strict=True):
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
        assert c["val_err"] == e["val_err"]


@pytest.mark.slow
@pytest.mark.parametrize("model,depth,k,expected,params,units", [
    ("wrn", "10", "1", "WRN-10-1", 77_850, 5), ("vgg", "11", None, "VGG-11", 9_756_426, 9)])
def test_other_architectures_train_with_the_flop_estimate(tmp_path, capsys, model, depth, k, expected, params,
                                                          units):
    argv = ["--model", model, "-L", depth, *(["-k", k] if k else []), "--epochs", "1", "--dropout", "0.2"]
    run_train(tmp_path, *argv)
    config = read_records(tmp_path / "run" / "metrics.jsonl", "config")[0]
    assert (config["params"], config["n_units"]) == (params, units)  # counted by hand in test_models.py
    # The FLOP estimate over the run's 6 steps, against the whole model counted at every level.
    counted = counted_step_flops(build_model(model, int(depth), int(k) if k else None, 10), (2, 3, 32, 32))
    assert config["flop_speedup"] == pytest.approx(stepped_speedup(counted, units, 6, 0.8, 3), rel=1e-12)
    assert config["paper_speedup"] is None and config["flop_speedup"] == config["estimated_speedup"] > 0
    assert config["dropout"] == 0.2 and expected in capsys.readouterr().out


# -- evaluation modes and augmentation: one short epoch each (still end-to-end: slow) ---------
def count_evaluations(monkeypatch) -> list:
    real, calls = train.evaluate, []

    def counted(training, loader):
        result = real(training, loader)
        calls.append((loader, result))
        return result

    monkeypatch.setattr(train, "evaluate", counted)
    return calls


@pytest.mark.slow
def test_validate_test_reuses_the_last_evaluation_as_the_test_result(tmp_path, monkeypatch):
    calls = count_evaluations(monkeypatch)
    summary = run_train(tmp_path, "--epochs", "1", "--validate-test")
    epoch = read_records(tmp_path / "run" / "metrics.jsonl", "epoch")[0]
    assert len(calls) == 1  # one evaluation: the epoch's, on the test set, reused
    assert (summary["test_loss"], summary["test_err"]) == (epoch["test_loss"], epoch["test_err"]) == calls[0][1]
    assert summary["val_err"] is None and "val_err" not in epoch  # the records name what they hold
    splits = tiny_splits("test")
    assert epoch["test_err"] == pytest.approx(error_of(final_model(tmp_path / "run"), splits.test.images,
                                                      splits.test.labels, splits.mean, splits.std, 16), abs=1e-9)


@pytest.mark.slow
def test_no_validate_evaluates_only_the_test_set_at_the_end(tmp_path, monkeypatch, capsys):
    calls = count_evaluations(monkeypatch)
    summary = run_train(tmp_path, "--epochs", "1", "--no-validate")
    config = read_records(tmp_path / "run" / "metrics.jsonl", "config")[0]
    epoch = read_records(tmp_path / "run" / "metrics.jsonl", "epoch")[0]
    assert config["eval_mode"] == "none"
    assert not {"val_err", "val_loss", "eval_time_s"} & epoch.keys() and summary["val_err"] is None
    assert len(calls) == 1 and (summary["test_loss"], summary["test_err"]) == calls[0][1]
    splits = tiny_splits("none")
    assert summary["test_err"] == pytest.approx(error_of(final_model(tmp_path / "run"), splits.test.images,
                                                         splits.test.labels, splits.mean, splits.std, 16), abs=1e-9)
    assert "96 train;" in capsys.readouterr().out  # no per-epoch evaluation set


@pytest.mark.slow
@pytest.mark.parametrize("augment", [False, True])
def test_no_augment_trains_on_the_images_as_they_are(tmp_path, monkeypatch, augment):
    seen = spy_on_step(monkeypatch)
    run_train(tmp_path, "--epochs", "1", *([] if augment else ["--no-augment"]))
    config = read_records(tmp_path / "run" / "metrics.jsonl", "config")[0]
    assert config["augment"] is augment
    splits = tiny_splits()
    m = torch.tensor(splits.mean).view(1, 3, 1, 1) * 255
    s = torch.tensor(splits.std).view(1, 3, 1, 1) * 255
    images = (splits.train.images.float() - m) / s
    batch = seen[0]["x"]
    as_they_are = [any(torch.equal(x, image) for image in images) for x in batch]
    if augment:  # cropped and flipped: (almost) none is a training image as it is
        assert sum(as_they_are) < len(batch) // 2
    else:
        assert all(as_they_are) and len(seen) == 6


def test_each_architecture_has_the_papers_defaults():
    from config import parse, resolve
    for model, depth, k in [("densenet", 76, 12), ("wrn", 40, 4), ("vgg", 16, None)]:
        cfg = resolve(*parse(["--model", model])[1:])
        assert (cfg.depth, cfg.growth_rate) == (depth, k)
    cfg = resolve(*parse(["--model", "vgg", "-k", "8"])[1:])  # -k means nothing to VGG
    assert cfg.growth_rate is None


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


@pytest.mark.slow
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


def test_command_line_errors_and_help(tmp_path, capsys):
    # (A real process's error line: test_cli.test_weight_decay_error_is_one_line_from_a_real_process.)
    with pytest.raises(SystemExit) as bad:
        train.main(["--t_0", "0", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and "--t_0 must be in (0, 1]" in err.strip().splitlines()[-1]
    assert "Traceback" not in err and not any(tmp_path.iterdir())
    with pytest.raises(SystemExit) as shown:
        train.main(["-h"])
    help_text = capsys.readouterr().out
    assert shown.value.code == 0
    for text in ("--batch_size", "--t_0", "(default: 0.8)", "(default: 76 for densenet", "(default: cifar100",
                 "--no-validate", "--validate-test", "--no_scale", "--const_time", "--amp"):
        assert text in help_text, text


def test_the_default_run_name_holds_every_setting_that_changes_the_result():
    """A sweep over any setting that changes what a run computes gets one directory per value
    (the name spells out every such setting that differs from its default)."""
    from config import parse, resolve

    def name(*flags):
        _, request, typed = parse(["--dataset", "synthetic", "--device", "cpu", *flags], "", "")
        return resolve(request, typed).name

    base = "densenetBC-L76-k12_synthetic_cubic-scaled-t0-0.8_e100_s0"
    assert name() == base and name("--lr", "0.1") == base  # a default given is still the default
    sweeps = [["--lr", "0.05"], ["--dropout", "0.2"], ["--batch_size", "64"], ["--momentum", "0.95"],
              ["--weight-decay", "5e-4"], ["--no-augment"], ["--amp", "bf16"], ["--reduction", "0.25"],
              ["--validate-test"], ["--no-validate"], ["--const_time"]]
    names = [name(*flags) for flags in sweeps]
    assert names[:3] == [f"{base}_lr0.05", f"{base}_drop0.2", f"{base}_bs64"]
    assert name("--lr", "0.05", "--no-augment", "--amp", "bf16") == f"{base}_lr0.05_noaug_bf16"
    assert len(set(names + [base])) == len(sweeps) + 1  # all different from each other
    assert name("--model", "wrn", "--reduction", "0.25") == "wrn-40-4_synthetic_cubic-scaled-t0-0.8_e100_s0"
