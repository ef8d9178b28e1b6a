"""A run can be continued at every moment: the step-0 checkpoint, --resume of a run that
stopped before any checkpoint, and messages that say what the run directory really holds."""
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import conftest
import engine
import plan
import rundir
import train
from conftest import ROOT, final_state, same_state
from messages import RunError
from metrics_logger import MetricsLogger, read_records

# 6 steps per epoch, 3 epochs, dropout: the RNG stream matters to the result.
TINY = [*conftest.TINY, "--epochs", "3", "--dropout", "0.1", "--t_0", "0.5"]


def events(run_dir: Path) -> list:
    return [r["event"] for r in read_records(run_dir / "metrics.jsonl")]


def last_err_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """An uninterrupted run of TINY."""
    out = tmp_path_factory.mktemp("whole")
    train.main([*TINY, "--out-dir", str(out), "--name", "whole"])
    return out / "whole"


def stop_after_step_0_checkpoint(monkeypatch, out: Path, name: str) -> SystemExit:
    """Start a run and stop it (as a second Ctrl-C would) right after its step-0 checkpoint."""
    real = checkpoint.save_checkpoint

    def save_then_stop(path, training, config, epoch, step, *rest):
        real(path, training, config, epoch, step, *rest)
        if step == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)
    with pytest.raises(SystemExit) as stopped:
        train.main([*TINY, "--out-dir", str(out), "--name", name])
    monkeypatch.setattr(checkpoint, "save_checkpoint", real)
    return stopped.value


# -- the step-0 checkpoint ----------------------------------------------------------------
@pytest.mark.slow  # whole train.py runs
def test_a_run_checkpoints_at_step_0_and_resumes_from_it_bit_for_bit(tmp_path, monkeypatch, capsys, whole):
    stopped = stop_after_step_0_checkpoint(monkeypatch, tmp_path, "cut")
    assert stopped.code == 128 + signal.SIGINT
    line = last_err_line(capsys)
    command = f"python train.py --out-dir {tmp_path} --name cut --device cpu --resume"
    assert line.endswith(f"interrupted (run directory {tmp_path / 'cut'}); continue with: {command}")
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["position"], ckpt["train_time_s"]) == (0, 0, None, 0.0)
    assert events(tmp_path / "cut") == ["config"]

    train.main(shlex.split(command)[2:])  # the command printed, as it is: the checkpoint holds the rest
    assert same_state(final_state(tmp_path / "cut"), final_state(whole))
    assert events(tmp_path / "cut") == ["config", "epoch", "epoch", "epoch", "summary"]
    cut, ref = (read_records(d / "metrics.jsonl", "epoch") for d in (tmp_path / "cut", whole))
    assert [r["train_loss"] for r in cut] == [r["train_loss"] for r in ref]


@pytest.mark.slow  # a whole train.py run
def test_records_carry_the_hosts_load_at_the_start_and_the_end(tmp_path, monkeypatch):
    loads = iter([1.25, 3.5])  # what the host reports at the run's start, then at its end
    monkeypatch.setattr(plan, "load_average", lambda: next(loads))  # the plan's, at the start
    monkeypatch.setattr(train, "load_average", lambda: next(loads))  # the summary's, at the end
    train.main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--name", "load"])
    config = read_records(tmp_path / "load" / "metrics.jsonl", "config")[0]
    summary = read_records(tmp_path / "load" / "metrics.jsonl", "summary")[0]
    assert (config["load_start"], summary["load_end"]) == (1.25, 3.5)
    assert config["cpu_count"] == os.cpu_count()


# -- a run that stopped before its first checkpoint ---------------------------------------
def only_config_left(monkeypatch, out: Path, name: str) -> Path:
    """A run directory as a kill -9 between the config record and the first checkpoint leaves it."""
    stop_after_step_0_checkpoint(monkeypatch, out, name)
    (out / name / "checkpoint.pt").unlink()
    return out / name


@pytest.mark.slow  # whole train.py runs
def test_resume_starts_a_run_with_no_checkpoint_again_from_step_0(tmp_path, monkeypatch, capsys, whole):
    run_dir = only_config_left(monkeypatch, tmp_path, "early")
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # a new run there would overwrite it: refused,
        train.main([*TINY, "--out-dir", str(tmp_path), "--name", "early"])
    assert refused.value.code == 1 and "continue it with --resume" in last_err_line(capsys)

    train.main(["--out-dir", str(tmp_path), "--name", "early", "--resume"])  # and that works
    out = capsys.readouterr().out
    assert (f"no checkpoint in {run_dir}: the run stopped before its first one; "
            f"starting it again from step 0") in out
    assert events(run_dir) == ["config", "epoch", "epoch", "epoch", "summary"]  # nothing stale
    assert same_state(final_state(run_dir), final_state(whole))


def test_resume_checks_flags_against_the_config_record(tmp_path, monkeypatch, capsys):
    run_dir = only_config_left(monkeypatch, tmp_path, "early")
    before = (run_dir / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        train.main(["--out-dir", str(tmp_path), "--name", "early", "--resume", "--epochs", "5"])
    assert refused.value.code == 2
    line = last_err_line(capsys)
    assert "--resume: --epochs 5 contradicts the saved run's epochs = 3: FreezeOut's schedule is set by the " \
           "run's length" in line
    assert line.endswith("leave --epochs out to continue this run, or start a new run with it under another --name")
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_resume_with_nothing_to_continue_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        train.main([*TINY, "--out-dir", str(tmp_path), "--name", "none", "--resume"])
    assert refused.value.code == 1
    assert f"--resume: no checkpoint in {tmp_path / 'none'} and no run started there" in last_err_line(capsys)


@pytest.mark.slow  # whole train.py runs
def test_a_metrics_file_cut_before_its_first_record_holds_no_run(tmp_path):
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "metrics.jsonl").write_text('{"event": "config", "mod')  # killed mid-write
    train.main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--name", "torn"])
    assert events(tmp_path / "torn") == ["config", "epoch", "summary"]


# -- messages that say what exists --------------------------------------------------------
def test_an_interruption_before_the_run_started_says_nothing_was_written(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "load_data", interrupted)
    with pytest.raises(SystemExit) as stopped:
        train.main([*TINY, "--out-dir", str(tmp_path), "--name", "never"])
    assert stopped.value.code == 128 + signal.SIGINT
    line = last_err_line(capsys)
    assert "interrupted before the run started; nothing was written" in line and "--resume" not in line
    assert not (tmp_path / "never").exists()


@pytest.mark.slow  # whole train.py runs
def test_divergence_names_the_checkpoint_that_is_kept(tmp_path, monkeypatch, capsys):
    real_step, calls = engine.train_step, []

    def nan_from(first_bad):
        def step(*args):
            calls.append(1)
            loss = real_step(*args)
            return loss * float("nan") if len(calls) > first_bad else loss
        return step

    monkeypatch.setattr(engine, "train_step", nan_from(8))
    with pytest.raises(SystemExit):
        train.main([*TINY, "--out-dir", str(tmp_path), "--name", "late"])
    line = last_err_line(capsys)
    assert "not finite at step 8 (epoch 2, batch 2)" in line
    assert f"the last good checkpoint, after epoch 1 (step 6), is kept in {tmp_path / 'late'}" in line

    calls.clear()
    monkeypatch.setattr(engine, "train_step", nan_from(0))
    with pytest.raises(SystemExit) as failed:
        train.main([*TINY, "--out-dir", str(tmp_path), "--name", "early"])
    line = last_err_line(capsys)
    assert failed.value.code == 1 and "not finite at step 0 (epoch 1, batch 0)" in line
    assert f"the checkpoint kept in {tmp_path / 'early'} is the one of step 0, before any training" in line


def test_describe_checkpoint_when_there_is_none(tmp_path):
    assert checkpoint.describe_checkpoint(tmp_path) == f"no checkpoint was written in {tmp_path}"


# -- a real kill -9 in the first moments; a real divergence at the first step ------------------
def kill_after_config_record(out: Path, name: str) -> None:
    """SIGKILL a train.py process as soon as its config record is written: before or after its
    step-0 checkpoint, however the machine's load delays this process's look; the run waits
    before its first training step until killed (tests/train_paused.py), so it cannot have
    got further."""
    p = subprocess.Popen([sys.executable, "tests/train_paused.py", "1", str(out / f"{name}.paused"), *TINY,
                          "--out-dir", str(out), "--name", name],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / name / "metrics.jsonl", time.time() + 600
    while not (metrics.exists() and metrics.read_text().startswith('{"event": "config"')):
        assert p.poll() is None and time.time() < deadline, "the run ended before its config record"
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=600)
    assert p.returncode == -signal.SIGKILL


@pytest.mark.slow  # a train.py process, then a whole run
def test_sigkill_in_the_first_moments_then_resume_is_bit_identical(tmp_path, whole):
    # (A kill that lands before the step-0 checkpoint leaves what only_config_left leaves:
    # test_resume_starts_a_run_with_no_checkpoint_again_from_step_0.)
    kill_after_config_record(tmp_path, "killed")
    run_dir = tmp_path / "killed"
    train.main(["--out-dir", str(tmp_path), "--name", "killed", "--resume"])
    assert same_state(final_state(run_dir), final_state(whole))
    assert events(run_dir) == ["config", "epoch", "epoch", "epoch", "summary"]


@pytest.mark.slow  # two train.py runs
def test_a_divergence_at_the_first_step_leaves_a_run_that_can_be_continued(tmp_path, capsys):
    with pytest.raises(SystemExit) as failed:
        train.main([*TINY, "--out-dir", str(tmp_path), "--name", "nan", "--lr", "1e30"])
    line = last_err_line(capsys)
    assert failed.value.code == 1 and "training diverged: the loss was not finite at step" in line
    assert f"the checkpoint kept in {tmp_path / 'nan'} is the one of step 0, before any training" in line
    assert torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)["step"] == 0
    assert events(tmp_path / "nan") == ["config"]

    with pytest.raises(SystemExit) as failed:  # continues from step 0 (and diverges again)
        train.main([*TINY, "--out-dir", str(tmp_path), "--name", "nan", "--lr", "1e30", "--resume"])
    err = capsys.readouterr().err
    assert failed.value.code == 1 and "no checkpoint" not in err
    assert "training diverged" in err.strip().splitlines()[-1]


@pytest.mark.slow  # two train.py runs
def test_a_full_disk_stops_the_run_in_one_line_and_resume_finishes_it(tmp_path, monkeypatch, capsys, whole):
    import errno
    real_save = torch.save

    def disk_full_at_epoch_2(state, f):
        if state.get("epoch") == 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, f)

    monkeypatch.setattr(torch, "save", disk_full_at_epoch_2)
    with pytest.raises(SystemExit) as failed:
        train.main([*TINY, "--out-dir", str(tmp_path), "--name", "full"])
    run_dir = tmp_path / "full"
    command = f"python train.py --out-dir {tmp_path} --name full --device cpu --resume"
    assert failed.value.code == 1
    assert last_err_line(capsys).endswith(f"error: cannot write {run_dir / 'checkpoint.pt'}: No space left on "
                                     f"device; {run_dir / 'checkpoint.pt'} is kept as it was; once that is fixed, "
                                     f"continue with: {command}")
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoint.pt", "metrics.jsonl"]  # no .tmp
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    train.main(shlex.split(command)[2:])
    assert same_state(final_state(run_dir), final_state(whole))
    assert events(run_dir) == ["config", "epoch", "epoch", "epoch", "summary"]


def test_ctrl_c_before_the_first_record_leaves_no_run_directory(tmp_path, monkeypatch, capsys):
    def interrupted(path, records):
        raise KeyboardInterrupt  # Ctrl-C between making the run directory and its config record

    monkeypatch.setattr(rundir, "write_records", interrupted)
    with pytest.raises(SystemExit) as stopped:
        train.main([*TINY, "--out-dir", str(tmp_path), "--name", "early"])
    assert stopped.value.code == 128 + signal.SIGINT
    assert last_err_line(capsys).endswith("interrupted before the run started; nothing was written")
    assert list(tmp_path.iterdir()) == []


# -- one owner per run directory ------------------------------------------------------------
def test_a_run_directory_in_use_is_refused_at_once_in_one_line_and_left_as_it_is(tmp_path, capsys):
    import socket

    from rundir import RunLock
    run_dir = tmp_path / "busy"
    owner = RunLock(run_dir)
    owner.acquire()  # as another process running there would hold it
    try:
        for extra in ([], ["--resume"]):
            with pytest.raises(SystemExit) as refused:
                train.main([*TINY, "--out-dir", str(tmp_path), "--name", "busy", *extra])
            err = capsys.readouterr().err.strip().splitlines()
            assert refused.value.code == 2 and len(err) == 1
            assert err[0].endswith(f"error: {run_dir} is in use by another run (pid {os.getpid()} on "
                                   f"{socket.gethostname()}); wait for it to end, or give this one another --name")
            assert [p.name for p in run_dir.iterdir()] == [".lock"]  # nothing written, the owner's file kept
            assert (run_dir / ".lock").read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    finally:
        owner.release()
    assert not run_dir.exists()  # the owner wrote nothing: as if it never started
    train.main([*TINY, "--out-dir", str(tmp_path), "--name", "busy", "--epochs", "1"])
    assert events(run_dir) == ["config", "epoch", "summary"]


@pytest.mark.slow  # two train.py processes
def test_two_runs_started_together_in_one_directory_one_runs_the_other_exits_2(tmp_path):
    # The one that gets the directory waits before its first training step until the other has
    # ended (however late the machine's load starts that one, the directory is still in use).
    go = tmp_path / "go"
    command = [sys.executable, "tests/train_paused.py", "1", str(tmp_path / "paused"), *TINY, "--epochs", "4",
               "--out-dir", str(tmp_path), "--name", "same"]
    runs = [subprocess.Popen([*command, "--t_0", t_0], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "TRAIN_PAUSED_UNTIL": str(go)}) for t_0 in ("0.5", "1")]
    deadline = time.time() + 600
    while all(p.poll() is None for p in runs):
        assert time.time() < deadline, "neither run ended"
        time.sleep(0.02)
    go.write_text("")
    errs = [p.communicate(timeout=600)[1] for p in runs]
    results = [(p.returncode, err) for p, err in zip(runs, errs, strict=True)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2).strip().splitlines()
    assert len(refused) == 1 and "is in use by another run (pid " in refused[0]
    records = read_records(tmp_path / "same" / "metrics.jsonl")
    assert [r["event"] for r in records] == ["config", *["epoch"] * 4, "summary"]  # one run's, nothing mixed
    winner = next(i for i, (code, _) in enumerate(results) if code == 0)
    assert records[0]["t_0"] == (0.5, 1.0)[winner]


def test_a_stop_during_the_final_evaluation_says_so_and_the_run_can_be_completed(tmp_path, monkeypatch, capsys):
    real_evaluate = train.evaluate

    def sigterm_then_evaluate(training, loader):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(training, loader)

    monkeypatch.setattr(train, "evaluate", sigterm_then_evaluate)
    args = [*TINY, "--no-validate", "--out-dir", str(tmp_path), "--name", "late"]
    with pytest.raises(SystemExit) as stopped:
        train.main(args)
    line = last_err_line(capsys)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM during the final evaluation (continuing it evaluates the test set and writes the " \
           "summary); checkpoint written" in line
    assert events(tmp_path / "late") == ["config", "epoch", "epoch", "epoch"]  # no summary yet
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    summary = train.main(shlex.split(line.split("continue with: ")[1])[2:])
    assert events(tmp_path / "late") == ["config", "epoch", "epoch", "epoch", "summary"]
    assert summary["test_err"] >= 0 and torch.load(tmp_path / "late" / "checkpoint.pt", weights_only=True)["epoch"] == 3


# -- records without a checkpoint (issue 29, item 2) --------------------------------------------
def records_but_no_checkpoint(out: Path, name: str, epochs: int, finished: bool = False) -> Path:
    """A run directory whose checkpoint.pt was removed after `epochs` epochs were recorded."""
    run_dir = out / name
    with MetricsLogger(run_dir / "metrics.jsonl") as log:
        log.log("config", epochs=3)
        for e in range(1, epochs + 1):
            log.log("epoch", epoch=e)
        if finished:
            log.log("summary", test_err=10.0)
    return run_dir


@pytest.mark.parametrize("epochs,finished,held", [(2, False, "records of 2 epochs"), (1, False, "records of 1 epoch"),
                                                  (3, True, "the records of a finished run (3 epochs)")])
def test_records_without_a_checkpoint_give_one_way_out_with_and_without_resume(tmp_path, epochs, finished, held):
    run_dir = records_but_no_checkpoint(tmp_path, "gone", epochs, finished)
    before = (run_dir / "metrics.jsonl").read_bytes()
    messages = []
    for resume in (True, False):
        with pytest.raises(RunError) as refused:
            rundir.examine(run_dir, resume, str(tmp_path))
        messages.append(str(refused.value))
    with_resume, without = messages
    way_out = (f"{run_dir} holds {held} but no checkpoint.pt (removed?): the run cannot be continued; move "
               f"{run_dir} aside (or delete it) and start it again, or start it under another")
    assert with_resume.startswith("resume: ")
    assert way_out in with_resume and way_out in without  # the same way out, whichever was tried
    for message in messages:  # neither sends the user to the other
        assert "start it without" not in message and "continue it with" not in message
        assert "\n" not in message
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_records_without_a_checkpoint_through_train_py(tmp_path, capsys):
    run_dir = records_but_no_checkpoint(tmp_path, "gone", 2)
    lines = []
    for extra in (["--resume"], []):
        with pytest.raises(SystemExit) as refused:
            train.main([*TINY, "--out-dir", str(tmp_path), "--name", "gone", *extra])
        assert refused.value.code == 1
        lines.append(last_err_line(capsys))
    for line in lines:
        assert f"{run_dir} holds records of 2 epochs but no checkpoint.pt (removed?)" in line
        assert line.endswith("or start it under another --name")
    assert ": error: --resume: " in lines[0] and ": error: --resume" not in lines[1]


# -- what --resume finds that is not the run's own -------------------------------------------------
def stopped_after_epoch(monkeypatch, out: Path, name: str, argv: list, epoch: int) -> Path:
    """A run stopped (as by Ctrl-C) right after epoch `epoch`'s checkpoint."""
    real = checkpoint.save_checkpoint

    def save_then_stop(path, training, config, done, step, *rest):
        real(path, training, config, done, step, *rest)
        if done == epoch and step:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_checkpoint", save_then_stop)
        with pytest.raises(SystemExit):
            train.main([*argv, "--out-dir", str(out), "--name", name])
    return out / name


def contents(run_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


@pytest.mark.slow  # three train.py runs
def test_a_checkpoint_of_another_run_is_refused_in_one_line_naming_both_and_nothing_is_written(tmp_path, monkeypatch,
                                                                                                capsys):
    l10 = stopped_after_epoch(monkeypatch, tmp_path, "L10", TINY, 1)
    l16 = stopped_after_epoch(monkeypatch, tmp_path, "L16", [*TINY, "-L", "16"], 1)
    done = tmp_path / "done"
    train.main([*TINY, "--epochs", "1", "--out-dir", str(tmp_path), "--name", "done"])
    for run_dir in (l10, done):  # an interrupted run, and a finished one (not "nothing to resume")
        (run_dir / "checkpoint.pt").write_bytes((l16 / "checkpoint.pt").read_bytes())
        before = contents(run_dir)
        capsys.readouterr()
        with pytest.raises(SystemExit) as refused:
            train.main(["--out-dir", str(tmp_path), "--name", run_dir.name, "--device", "cpu", "--resume"])
        assert refused.value.code == 1
        line = last_err_line(capsys)
        epochs = ", epochs 3" if run_dir is done else ""
        assert line.endswith(f"error: {run_dir / 'checkpoint.pt'} is another run's checkpoint: it says name 'L16', "
                             f"depth 16{epochs}, where the run directory's config record ({run_dir / 'metrics.jsonl'}) "
                             f"says name '{run_dir.name}', depth 10{', epochs 1' if epochs else ''}; nothing was "
                             "changed: put this run's own checkpoint.pt back, or start the run again under another "
                             "--name")
        assert contents(run_dir) == before


@pytest.mark.slow  # two train.py runs
def test_an_epoch_record_cut_in_half_is_rebuilt_from_the_checkpoint_and_kept_aside(tmp_path, monkeypatch, capsys,
                                                                                    whole):
    """Outside damage (a copy cut short) to the last epoch record of a run stopped after that
    epoch: the resume says so in one line each, keeps the damaged line aside, rebuilds the record
    from what the checkpoint knows, and finishes as the uninterrupted run does."""
    run_dir = stopped_after_epoch(monkeypatch, tmp_path, "torn", TINY, 2)
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text()
    last = text.splitlines()[-1]
    assert '"epoch": 2' in last
    metrics.write_text(text[:len(text) - len(last) // 2 - 1])  # epoch 2's line cut in half
    capsys.readouterr()
    train.main([*TINY, "--out-dir", str(tmp_path), "--name", "torn", "--resume"])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {metrics}: 1 line (3) held no whole record (a write cut short, or damage from outside): "
                     "kept aside in metrics.jsonl.damaged-1",
                     "note: epoch 2's record was not whole: rebuilt from the checkpoint (its step, training time, "
                     "frozen units and learning rates; not its losses and errors)"]
    assert (run_dir / "metrics.jsonl.damaged-1").read_text() == last[:len(last) - len(last) // 2] + "\n"
    epochs, reference = read_records(metrics, "epoch"), read_records(whole / "metrics.jsonl", "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and epochs[1]["rebuilt_from"] == "checkpoint.pt"
    for key in ("step", "frozen_units", "active_units", "lr"):
        assert epochs[1][key] == reference[1][key], key
    assert "train_loss" not in epochs[1] and epochs[2]["train_loss"] == reference[2]["train_loss"]
    assert same_state(final_state(run_dir), final_state(whole))
    import plot
    plot.main([str(run_dir)])  # its figures are drawn from the records as they are
