"""Interruptions, crashes, hostile checkpoints and divergence: nothing lost, nothing run,
and a resumed run ends bit-identical to one that never stopped."""
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import engine
import train
from metrics_logger import read_records

ROOT = Path(__file__).resolve().parents[1]
# The acceptance run: 10 steps per epoch, about a second an epoch on 2 cores.
REAL = ["--dataset", "synthetic", "--which_dataset", "10", "-L", "22", "--subset", "640",
        "--epochs", "3", "--batch_size", "64", "--device", "cpu"]
TINY = ["--dataset", "synthetic", "--which_dataset", "10", "--subset", "96", "-L", "10", "-k", "4",
        "--batch_size", "16", "--device", "cpu", "--epochs", "3", "--dropout", "0.1", "--t_0", "0.5"]


def same_state(a: dict, b: dict) -> bool:
    """Nested state dicts equal, tensors bit for bit."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def final_state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    return {k: ckpt[k] for k in ("model", "optimizer", "scheduler", "epoch", "step")}


def epochs_logged(run_dir: Path) -> list:
    return [r["epoch"] for r in read_records(run_dir / "metrics.jsonl", "epoch")]


# -- a real train.py process stopped by SIGTERM or killed with SIGKILL -----------------
def start(out: Path, name: str, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *REAL, "--out-dir", str(out),
                             "--save-weights", name, *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_to_end(out: Path, name: str, *extra) -> None:
    p = start(out, name, *extra)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("runs")
    run_to_end(out, "whole")
    return final_state(out / "whole")


def signal_in_epoch_2(out: Path, name: str, signum: int) -> subprocess.Popen:
    p = start(out, name)
    metrics = out / name / "metrics.jsonl"
    deadline = time.time() + 60
    while not (metrics.exists() and 1 in epochs_logged(out / name)):
        assert p.poll() is None and time.time() < deadline, "the run ended before epoch 2"
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.6))  # somewhere in epoch 2
    p.send_signal(signum)
    p.communicate(timeout=60)
    return p


def test_sigterm_mid_epoch_then_resume_is_bit_identical(tmp_path, uninterrupted):
    p = signal_in_epoch_2(tmp_path, "cut", signal.SIGTERM)
    assert p.returncode == 128 + signal.SIGTERM, "a stop by signal says so in the exit code"
    stopped = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert stopped["step"] < 30
    run_to_end(tmp_path, "cut", "--resume")
    assert same_state(final_state(tmp_path / "cut"), uninterrupted)
    assert epochs_logged(tmp_path / "cut") == [1, 2, 3]


def test_sigkill_then_resume_is_bit_identical(tmp_path, uninterrupted):
    p = signal_in_epoch_2(tmp_path, "killed", signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)  # still loadable
    run_to_end(tmp_path, "killed", "--resume")
    assert same_state(final_state(tmp_path / "killed"), uninterrupted)
    assert epochs_logged(tmp_path / "killed") == [1, 2, 3]


# -- in process: a stop at an exact step, torn metrics, divergence ---------------------
def test_stop_inside_an_epoch_resumes_inside_it(tmp_path, monkeypatch, capsys):
    train.main([*TINY, "--out-dir", str(tmp_path), "--save-weights", "whole"])
    real_step, calls = engine.train_step, []

    def step_then_sigint(*args):
        calls.append(1)
        if len(calls) == 8:  # epoch 2, batch 2 of 6
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args)

    monkeypatch.setattr(engine, "train_step", step_then_sigint)
    with pytest.raises(SystemExit) as stopped:
        train.main([*TINY, "--out-dir", str(tmp_path), "--save-weights", "cut"])
    assert stopped.value.code == 128 + signal.SIGINT
    assert "stopped by SIGINT in epoch 2 after step 8 of 18" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["position"]["batch"]) == (1, 8, 2)
    monkeypatch.setattr(engine, "train_step", real_step)

    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"event": "epoch", "epoch": 2, "tr')  # as if killed while writing a record
    summary = train.main([*TINY, "--out-dir", str(tmp_path), "--save-weights", "cut", "--resume"])
    assert same_state(final_state(tmp_path / "cut"), final_state(tmp_path / "whole"))
    whole = read_records(tmp_path / "whole" / "metrics.jsonl", "epoch")
    cut = read_records(tmp_path / "cut" / "metrics.jsonl", "epoch")
    assert [r["epoch"] for r in cut] == [1, 2, 3]
    # The interrupted epoch is one record whose loss covers all of it.
    assert [r["train_loss"] for r in cut] == [r["train_loss"] for r in whole]
    assert summary["test_err"] == read_records(tmp_path / "whole" / "metrics.jsonl", "summary")[0]["test_err"]


def test_divergence_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_step, calls = engine.train_step, []

    def nan_from_step_10(*args):
        calls.append(1)
        loss = real_step(*args)
        return loss * float("nan") if len(calls) > 10 else loss

    monkeypatch.setattr(engine, "train_step", nan_from_step_10)
    with pytest.raises(SystemExit) as failed:
        train.main([*TINY, "--out-dir", str(tmp_path), "--save-weights", "nan"])
    err = capsys.readouterr().err.strip().splitlines()
    assert failed.value.code == 1 and "Traceback" not in "\n".join(err)
    assert "diverged: the loss was not finite at step 10 (epoch 2, batch 4)" in err[-1]
    assert torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert epochs_logged(tmp_path / "nan") == [1]


# -- checkpoints that are not ours, or that carry code ---------------------------------
class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["pickle", "torch.save", "foreign", "garbage"])
def test_hostile_or_foreign_checkpoints_are_refused_without_running_code(tmp_path, capsys, how):
    train.main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--save-weights", "run"])
    ckpt, marker = tmp_path / "run" / "checkpoint.pt", tmp_path / "pwned"
    if how == "pickle":
        ckpt.write_bytes(pickle.dumps({"format": checkpoint.CHECKPOINT_FORMAT, "x": RunsAShellCommand(marker)}))
    elif how == "torch.save":
        torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "x": RunsAShellCommand(marker)}, ckpt)
    elif how == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    else:
        ckpt.write_bytes(os.urandom(300))
    metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(SystemExit) as refused:
        train.main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--save-weights", "run", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 1 and "Traceback" not in "\n".join(err)
    assert str(ckpt) in err[-1] and ("not a loadable" in err[-1] or "not a FreezeOut checkpoint" in err[-1])
    assert not marker.exists(), "the checkpoint's code ran"
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.parametrize("flag,value,saved", [("--depth", "16", "10"), ("--dataset", "cifar10", "synthetic"),
                                              ("--model", "densenet", None), ("--t_0", "0.8", "0.5")])
def test_resume_with_contradicting_settings_is_refused(tmp_path, capsys, flag, value, saved):
    train.main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--save-weights", "run"])
    argv = [*TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--save-weights", "run", "--resume"]
    i = argv.index(flag) if flag in argv else None
    argv = argv[:i] + argv[i + 2:] if i is not None else argv
    argv += [flag, value]
    if saved is None:  # the same value as saved: not a contradiction, the finished run says so
        train.main(argv)
        assert "already finished" in capsys.readouterr().out
        return
    with pytest.raises(SystemExit):
        train.main(argv)
    assert f"--{flag[2:]} {value} contradicts the saved run's" in capsys.readouterr().err.strip().splitlines()[-1]
