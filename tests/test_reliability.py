"""Interruptions, crashes, hostile checkpoints and divergence: nothing lost, nothing run,
and a resumed run ends bit-identical to one that never stopped."""
import os
import pickle
import shutil
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
from conftest import ROOT, TINY, epochs_logged, final_state, same_state
from metrics_logger import read_records

pytestmark = pytest.mark.slow  # every test here runs train.py end to end

# 3 epochs of 6 steps; dropout draws from the generators a resume must restore.
RUN = [*TINY, "--epochs", "3", "--dropout", "0.1", "--t_0", "0.5"]


# -- a real train.py process stopped by SIGTERM or killed with SIGKILL -----------------
def start(out: Path, name: str, *extra, pause_at: int = 0) -> subprocess.Popen:
    """train.py's main in its own process, paused before step `pause_at` until signalled."""
    return subprocess.Popen([sys.executable, "tests/train_paused.py", str(pause_at), str(out / f"{name}.paused"),
                             *RUN, "--out-dir", str(out), "--name", name, *extra], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    # In this process: a run ends in the same state in any process (what the tests below
    # show, with the interrupted half in its own process and the resumed half in this one).
    out = tmp_path_factory.mktemp("runs")
    train.main([*RUN, "--out-dir", str(out), "--name", "whole"])
    return final_state(out / "whole")


def resume(out: Path, name: str) -> None:
    train.main(["--out-dir", str(out), "--name", name, "--resume"])


def signal_at_step(out: Path, name: str, signum: int, step: int) -> subprocess.Popen:
    """Start a run and send `signum` once it is about to take training step `step` (it waits
    there for the signal), so the signal lands at a known point, however fast the machine."""
    p = start(out, name, pause_at=step)
    marker = out / f"{name}.paused"
    deadline = time.time() + 600
    while not marker.exists():
        assert p.poll() is None and time.time() < deadline, f"the run never reached step {step}"
        time.sleep(0.02)
    p.send_signal(signum)
    p.communicate(timeout=600)
    return p


def test_sigterm_mid_epoch_then_resume_is_bit_identical(tmp_path, uninterrupted):
    p = signal_at_step(tmp_path, "cut", signal.SIGTERM, step=9)  # epoch 2, its third step
    assert p.returncode == 128 + signal.SIGTERM, "a stop by signal says so in the exit code"
    stopped = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    # Stopped right after the step it was signalled in: 9 steps, 3 of them in epoch 2.
    assert (stopped["epoch"], stopped["step"], stopped["position"]["batch"]) == (1, 9, 3)
    assert epochs_logged(tmp_path / "cut") == [1]
    resume(tmp_path, "cut")
    assert same_state(final_state(tmp_path / "cut"), uninterrupted)
    assert epochs_logged(tmp_path / "cut") == [1, 2, 3]


def test_sigkill_then_resume_is_bit_identical(tmp_path, uninterrupted):
    p = signal_at_step(tmp_path, "killed", signal.SIGKILL, step=9)
    assert p.returncode == -signal.SIGKILL
    killed = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)  # still loadable
    assert (killed["epoch"], killed["step"], killed["position"]) == (1, 6, None)  # epoch 1's
    resume(tmp_path, "killed")
    assert same_state(final_state(tmp_path / "killed"), uninterrupted)
    assert epochs_logged(tmp_path / "killed") == [1, 2, 3]


# -- in process: a stop at an exact step, torn metrics, divergence ---------------------
def test_stop_inside_an_epoch_resumes_inside_it(tmp_path, monkeypatch, capsys):
    train.main([*RUN, "--out-dir", str(tmp_path), "--save-weights", "whole"])
    real_step, calls = engine.train_step, []

    def step_then_sigint(*args):
        calls.append(1)
        if len(calls) == 8:  # epoch 2, batch 2 of 6
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args)

    monkeypatch.setattr(engine, "train_step", step_then_sigint)
    with pytest.raises(SystemExit) as stopped:
        train.main([*RUN, "--out-dir", str(tmp_path), "--save-weights", "cut"])
    assert stopped.value.code == 128 + signal.SIGINT
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stopped by SIGINT in epoch 2 after step 8 of 18" in line
    assert line.endswith(f"; continue with: python train.py --out-dir {tmp_path} --name cut --device cpu --resume")
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["position"]["batch"]) == (1, 8, 2)
    monkeypatch.setattr(engine, "train_step", real_step)

    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"event": "epoch", "epoch": 2, "tr')  # as if killed while writing a record
    summary = train.main([*RUN, "--out-dir", str(tmp_path), "--save-weights", "cut", "--resume"])
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
        train.main([*RUN, "--out-dir", str(tmp_path), "--save-weights", "nan"])
    err = capsys.readouterr().err.strip().splitlines()
    assert failed.value.code == 1 and "Traceback" not in "\n".join(err)
    assert "diverged: the loss was not finite at step 10 (epoch 2, batch 4)" in err[-1]
    assert err[-1].endswith(f"; python train.py --out-dir {tmp_path} --name nan --device cpu --resume continues "
                            f"from it, and the same settings diverge again at the same step: a new run "
                            f"(another --name) with a smaller --lr may not")
    assert torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert epochs_logged(tmp_path / "nan") == [1]


# -- checkpoints that are not ours, or that carry code ---------------------------------
class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> Path:
    """A finished one-epoch run, trained once for the tests that each take a copy of it."""
    out = tmp_path_factory.mktemp("one_epoch")
    train.main([*RUN, "--epochs", "1", "--out-dir", str(out), "--save-weights", "run"])
    return out / "run"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["pickle", "torch.save", "foreign", "garbage"])
def test_hostile_or_foreign_checkpoints_are_refused_without_running_code(tmp_path, capsys, how, one_epoch_run):
    shutil.copytree(one_epoch_run, tmp_path / "run")
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
        train.main([*RUN, "--epochs", "1", "--out-dir", str(tmp_path), "--save-weights", "run", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 1 and "Traceback" not in "\n".join(err)
    assert str(ckpt) in err[-1] and ("not a loadable" in err[-1] or "not a FreezeOut checkpoint" in err[-1])
    assert not marker.exists(), "the checkpoint's code ran"
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.parametrize("flag,value,saved", [("--depth", "16", "10"), ("--dataset", "cifar10", "synthetic"),
                                              ("--model", "densenet", None), ("--t_0", "0.8", "0.5")])
def test_resume_with_contradicting_settings_is_refused(tmp_path, capsys, flag, value, saved, one_epoch_run):
    shutil.copytree(one_epoch_run, tmp_path / "run")
    argv = [*RUN, "--epochs", "1", "--out-dir", str(tmp_path), "--save-weights", "run", "--resume"]
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


# -- what --resume may change, and a crash in the middle of writing a checkpoint -------------
TWO = [*RUN, "--epochs", "2", "--loader", "torchvision"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("two_epochs")
    train.main([*TWO, "--out-dir", str(out), "--name", "whole"])
    return final_state(out / "whole")


def stop_after_first_checkpoint(monkeypatch, out: Path, *extra) -> None:
    real_save, saves = checkpoint.save_checkpoint, []

    def save_then_die(path, training, config, epoch, step, *rest):
        real_save(path, training, config, epoch, step, *rest)
        if step == 0:
            return  # the step-0 checkpoint, written as the run starts
        saves.append(1)
        raise KeyboardInterrupt  # as if stopped right after epoch 1's checkpoint

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(SystemExit):
        train.main([*TWO, "--out-dir", str(out), "--name", "cut", *extra])
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert len(saves) == 1


def test_resume_may_change_the_device_and_the_workers(tmp_path, monkeypatch, two_epochs):
    stop_after_first_checkpoint(monkeypatch, tmp_path, "--workers", "0")
    # Where and how fast a run goes may change on resume: the device named another way, a
    # worker process for the torchvision loader.
    train.main([*TWO, "--out-dir", str(tmp_path), "--name", "cut", "--resume", "--device", "auto",
                "--workers", "1"])
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (ckpt["config"]["workers"], ckpt["config"]["device"]) == (1, "cpu")
    assert same_state(final_state(tmp_path / "cut"), two_epochs)
    assert epochs_logged(tmp_path / "cut") == [1, 2]


def test_a_crash_while_writing_a_checkpoint_leaves_the_last_one_and_resume_continues(tmp_path, monkeypatch,
                                                                                     two_epochs):
    real_save, saves = torch.save, []

    def dies_in_the_second_save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 3:  # after step 0's and epoch 1's, epoch 2's: killed half-way through it
            f.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_in_the_second_save)
    with pytest.raises(SystemExit) as crashed:
        train.main([*TWO, "--out-dir", str(tmp_path), "--name", "cut"])
    monkeypatch.setattr(torch, "save", real_save)
    assert crashed.value.code == 130
    run_dir = tmp_path / "cut"
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoint.pt", "checkpoint.pt.tmp", "metrics.jsonl"]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1  # epoch 1's, whole
    train.main([*TWO, "--out-dir", str(tmp_path), "--name", "cut", "--resume"])
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoint.pt", "metrics.jsonl"]
    assert same_state(final_state(run_dir), two_epochs)
    assert epochs_logged(run_dir) == [1, 2]
