"""The command lines: values no run can use, contradictions, flags a model has no use for,
-h, and a failed data load that leaves nothing behind."""
import argparse
import runpy
import subprocess
import sys
import types
import urllib.error
from pathlib import Path

import pytest
import torchvision.datasets.utils as tv_utils

import benchmark
import config
import reproduce
import train
from conftest import tiny_argv
from metrics_logger import read_records
from plan import header

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_argv("--epochs", "1", subset=32)


def refused(capsys, main, argv, message):
    """main(argv) exits 2 after argparse's usage line and one error line holding `message`."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2, err
    assert err[0].startswith("usage:") and "error:" in err[-1] and message in err[-1], err
    assert not any("Traceback" in line for line in err)
    return err[-1]


# -- numeric values no run can use ------------------------------------------------------
TRAIN_VALUES = [
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "-0.1"], "--lr must be a finite number > 0"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    (["--weight_decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0"),
    (["--momentum", "1.5"], "--momentum must be in [0, 1), got 1.5"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--momentum", "-0.1"], "--momentum must be in [0, 1)"),
    (["--momentum", "nan"], "--momentum must be in [0, 1)"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--reduction", "0"], "--reduction must be in (0, 1]"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**64 - 1], got -1"),
    (["--seed", str(2 ** 64)], "--seed must be an integer in [0, 2**64 - 1]"),
    (["--target-speedup", "0"], "--target-speedup must be in (0, 1), got 0.0"),
    (["--target-speedup", "1"], "--target-speedup must be in (0, 1)"),
    (["--target-speedup", "nan"], "--target-speedup must be in (0, 1)"),
    (["-k", "0"], "-k/--growth-rate must be a positive integer"),
]


@pytest.mark.parametrize("argv,message", TRAIN_VALUES)
def test_train_refuses_values_no_run_can_use_before_writing_anything(tmp_path, capsys, monkeypatch, argv,
                                                                    message):
    monkeypatch.chdir(tmp_path)  # nothing may appear here either (./data, ./runs)
    refused(capsys, train.main, [*TINY, *argv, "--out-dir", str(tmp_path / "out")], message)
    assert list(tmp_path.iterdir()) == []


# A tiny benchmark around a bad value: where the value is not refused, it ends in seconds.
BENCH_TINY = ["-L", "10", "-k", "2", "--batch-size", "2", "--steps", "2", "--repeats", "1",
              "--level-steps", "0", "--device", "cpu"]


@pytest.mark.parametrize("argv,message", [
    (["--seed", "-1"], "--seed must be an integer in [0, 2**64 - 1]"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--batch-size", "-2"], "--batch-size must be a positive integer"),
    (["--repeats", "0"], "--repeats must be a positive integer"),
    (["--level-steps", "-1"], "--level-steps must be >= 0"),
    (["--t_0", "nan"], "--t_0 must be in (0, 1]"),
])
def test_benchmark_refuses_values_no_run_can_use(capsys, argv, message):
    refused(capsys, benchmark.main, [*BENCH_TINY, *argv], message)


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "0", "-1"], "--seeds: every seed must be an integer in [0, 2**64 - 1], got -1"),
    (["-L", "75"], "-L/--depth: depth 75 is not a valid"),
    (["-k", "0"], "-k/--growth-rate must be a positive integer"),
    (["--batch_size", "0"], "--batch_size must be a positive integer"),
    (["--subset", "-5"], "--subset must be a positive integer"),
    (["--target-speedups", "1"], "every target must be in (0, 1)"),
    (["--dataset", "cifar10", "--which_dataset", "100"], "--dataset cifar10 contradicts --which_dataset 100"),
])
def test_reproduce_refuses_values_before_making_its_output_directory(tmp_path, capsys, argv, message):
    # --report-only: where the value is not refused, nothing is trained.
    refused(capsys, reproduce.main, [*argv, "--out", str(tmp_path / "rep"), "--device", "cpu", "--report-only"],
            message)
    assert not (tmp_path / "rep").exists()


@pytest.mark.slow  # a subprocess
def test_weight_decay_error_is_one_line_from_a_real_process(tmp_path):
    # It used to be a 15-line traceback from inside torch.optim.SGD.
    p = subprocess.run([sys.executable, "train.py", *TINY, "--weight-decay", "-1",
                        "--out-dir", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and err[0].startswith("usage: train.py")
    assert err[-1] == "train.py: error: --weight-decay must be a finite number >= 0, got -1.0"
    assert "Traceback" not in p.stderr and not (tmp_path / "o").exists()


# -- a CIFAR load that fails leaves no directory behind ----------------------------------
@pytest.fixture
def offline(monkeypatch):
    """torchvision's real download path up to the network: it makes the directory, then the
    request fails (or, with partial=True, fails after writing part of the archive)."""
    state = {"partial": False}

    def redirect(url, max_hops=3):
        if not state["partial"]:
            raise urllib.error.URLError("offline")
        return url

    def retrieve(url, filename, chunk_size=0):
        Path(filename).write_bytes(b"\x1f\x8b" + b"0" * 1000)
        raise urllib.error.URLError("connection reset")

    monkeypatch.setattr(tv_utils, "_get_redirect_url", redirect)
    monkeypatch.setattr(tv_utils, "_urlretrieve", retrieve)
    return state


def test_failed_download_removes_the_directories_it_made(tmp_path, capsys, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    for argv in (["--data-root", str(tmp_path / "a" / "b" / "cifar")], []):  # [] = ./data
        with pytest.raises(SystemExit) as failed:
            train.main([*argv, "--device", "cpu", "--dataset", "cifar10", "--out-dir", str(tmp_path / "runs")])
        assert failed.value.code == 1
        assert "CIFAR-10 could not be found under" in capsys.readouterr().err.strip().splitlines()[-1]
        assert list(tmp_path.iterdir()) == [], "a failed start left a directory behind"


def test_failed_download_removes_its_partial_archive_but_keeps_what_was_there(tmp_path, capsys, offline):
    offline["partial"] = True
    root = tmp_path / "data"
    root.mkdir()
    (root / "mine.txt").write_text("keep")
    fresh = tmp_path / "fresh"
    for data_root in (root, fresh):
        with pytest.raises(SystemExit):
            train.main(["--data-root", str(data_root), "--device", "cpu", "--out-dir", str(tmp_path / "runs")])
        assert "connection reset" in capsys.readouterr().err
    assert [p.name for p in root.iterdir()] == ["mine.txt"] and not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# -- contradictions, and flags that mean nothing to the model -----------------------------
@pytest.mark.parametrize("argv", [["--validate", "--no-validate"], ["--validate-test", "--no_validate"],
                                  ["--validate", "--validate-test"], ["--augment", "--no-augment"],
                                  ["--bottleneck", "--no-bottleneck"]])
def test_opposite_switches_together_are_refused(tmp_path, capsys, argv):
    line = refused(capsys, train.main, [*TINY, *argv, "--out-dir", str(tmp_path / "o")],
                   "not allowed with argument")
    assert argv[0] in line and argv[1] in line
    assert not (tmp_path / "o").exists()


def test_benchmark_refuses_both_bottleneck_switches(capsys):
    refused(capsys, benchmark.main, [*BENCH_TINY, "--bottleneck", "--no-bottleneck"],
            "not allowed with argument")


@pytest.mark.slow  # a whole train.py run
def test_flags_a_model_has_no_use_for_get_one_note_and_the_run_goes_on(tmp_path, capsys):
    train.main([*TINY, "--model", "wrn", "-L", "10", "-k", "1", "--no-bottleneck", "--reduction", "0.3",
                "--out-dir", str(tmp_path), "--name", "wrn"])
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1 and notes[0].endswith(": note: --no-bottleneck, --reduction mean nothing to wrn; ignored")
    config = read_records(tmp_path / "wrn" / "metrics.jsonl", "config")[0]
    assert config["model"] == "wrn" and config["growth_rate"] == 1


def test_no_note_where_every_flag_means_something(tmp_path, capsys):
    with pytest.raises(SystemExit):  # no run there: stops right after the flags are read
        train.main([*TINY, "--bottleneck", "--reduction", "0.5", "--out-dir", str(tmp_path), "--resume"])
    assert "note:" not in capsys.readouterr().err


def test_k_means_nothing_to_vgg_in_every_script(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main([*TINY, "--model", "vgg", "-L", "11", "--out-dir", str(tmp_path), "--resume"])
    assert "note: -k means nothing to vgg; ignored" in capsys.readouterr().err

    parser = benchmark.build_parser()
    args = parser.parse_args(["--model", "vgg", "-L", "11", "-k", "4", "--bottleneck", "--device", "cpu"])
    benchmark.check(args, parser)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(": note: -k, --bottleneck mean nothing to vgg; ignored")
    assert args.bottleneck is True and args.growth_rate is None

    parser = reproduce.build_parser()
    args = parser.parse_args(["--model", "vgg", "-k", "4", "--device", "cpu", "--out", str(tmp_path / "r")])
    reproduce.check(args, reproduce.resolve_settings(args), parser)
    assert "note: -k means nothing to vgg; ignored" in capsys.readouterr().err


def test_benchmark_bottleneck_default_is_unchanged():
    parser = benchmark.build_parser()
    for argv, expected in (([], True), (["--bottleneck"], True), (["--no-bottleneck", "-L", "13"], False)):
        args = parser.parse_args([*argv, "--device", "cpu"])
        benchmark.check(args, parser)
        assert args.bottleneck is expected


def test_reproduce_keeps_k_given_with_another_model():
    parser = reproduce.build_parser()
    settings = reproduce.resolve_settings(parser.parse_args(["--model", "wrn", "-k", "8"]))
    assert (settings["depth"], settings["growth_rate"]) == (40, 8)  # -k was silently replaced by 4
    settings = reproduce.resolve_settings(parser.parse_args(["--model", "wrn", "-L", "16"]))
    assert (settings["depth"], settings["growth_rate"]) == (16, 4)


# -- -h says what happens when a flag is not given ---------------------------------------
def parsers():
    # plot.py has no options, only its run directory: its -h is checked below.
    return {"train.py": config.parser(), "benchmark.py": benchmark.build_parser(),
            "reproduce.py": reproduce.build_parser()}


@pytest.mark.parametrize("script", ["train.py", "benchmark.py", "reproduce.py"])
def test_help_says_what_happens_when_a_flag_is_not_given(script):
    parser = parsers()[script]
    text = parser.format_help()
    for bad in ("(default: None)", "(default: True)", "(default: False)", "(default: ["):
        assert bad not in text, f"{script} -h shows {bad}"
    formatter = parser.formatter_class(prog=script)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue  # -h itself; positional arguments have no default
        shown = formatter._get_help_string(action) or ""
        assert "default" in shown, f"{script} {action.option_strings[0]}: {shown!r}"


@pytest.mark.parametrize("script", ["train.py", "benchmark.py", "reproduce.py", "plot.py", "tools/train_speed.py"])
def test_help_runs_for_every_script_and_shows_an_example(script, monkeypatch, capsys):
    # As `python script -h` runs it (the script as __main__), in this process: a new process
    # would spend seconds importing torch (test_weight_decay_error_... starts a real one).
    monkeypatch.setattr(sys, "argv", [script, "-h"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith(f"usage: {Path(script).name}") and "(default: None)" not in out
    assert f"\n  python {script} " in out  # an example command, as it is typed


# -- the console: the baseline's header ---------------------------------------------------
def test_the_baselines_header_says_no_unit_freezes():
    splits = types.SimpleNamespace(train=range(64), eval=range(32), test=range(32))
    config = {"model": "densenet", "depth": 10, "growth_rate": 4, "bottleneck": True, "dataset": "synthetic",
              "num_classes": 10, "eval_mode": "val", "params": 1000, "n_units": 7, "steps_per_epoch": 4,
              "epochs": 2, "total_steps": 8, "how_scale": "cubic", "scale_lr": True, "t_0": 1.0,
              "t_i": [1.0] * 7, "paper_speedup": 0.0, "flop_speedup": 0.0, "device": "cpu",
              "amp_effective": "off", "training_step": "eager", "loader_used": "tensor", "batch_size": 16,
              "lr": 0.1, "seed": 0, "run_dir": "runs/x", "world_size": 1, "compile": False}
    text = header(config, splits)
    assert "t_0 = 1: baseline: no unit freezes" in text and "100.0%" not in text
    config.update(t_0=0.8, t_i=[0.512] + [1.0] * 6)
    assert "first unit freezes at 51.2% of the run" in header(config, splits)
    assert "WARNING" not in header(config, splits)  # unit 0 freezes at step ceil(0.512 * 8) = 5
    config.update(total_steps=2)  # ceil(0.512 * 2) = 2: never, in 2 steps
    assert ("first unit freezes at 51.2% of the run; WARNING: in 2 steps no unit freezes (the first would at "
            "step 2): this run is the baseline") in header(config, splits)
