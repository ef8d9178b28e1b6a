"""torchrun with 2 CPU processes (gloo): the schedule, one writer, replicas in step, resume."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import ROOT, closed_form_frozen_at, closed_form_lrs, tiny_argv
from metrics_logger import read_records

pytestmark = pytest.mark.slow  # torchrun
# Global batch 32 (16 per process), 128 images: 4 steps per epoch, 16 in all (every unit but
# the last frozen before the end; the signal and the stuck rank land in epoch 2, at a step the
# run waits at: tests/train_paused.py, tests/train_stuck.py).
EPOCHS = 4
ARGS = tiny_argv("--epochs", str(EPOCHS), "--t_0", "0.5", "--dropout", "0.1", subset=128, batch_size=32)


def torchrun(out: Path, name: str, *extra, pause_at: int = 0) -> subprocess.Popen:
    """train.py's main in 2 processes; with pause_at, both wait before that step until a
    signal has reached them (tests/train_paused.py)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "tests/train_paused.py", str(pause_at),
                             str(out / f"{name}.paused"), *ARGS, "--out-dir", str(out),
                             "--save-weights", name, *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def resume_and_compare(tmp_path: Path, out: Path) -> None:
    """Resume the stopped run `cut` under torchrun: its weights equal the uninterrupted run's."""
    p = torchrun(tmp_path, "cut", "--resume")
    _, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    whole = torch.load(out / "whole" / "checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    p = torchrun(out, "whole")
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    return out, stdout


def test_two_processes_follow_the_schedule_with_one_writer(two_process_run):
    out, stdout = two_process_run
    run_dir = out / "whole"
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoint.pt", "metrics.jsonl"]
    records = read_records(run_dir / "metrics.jsonl")
    assert [r["event"] for r in records] == ["config", *["epoch"] * EPOCHS, "summary"]
    assert stdout.count("done: test error") == 1  # rank 0 alone reports
    config = records[0]
    assert (config["world_size"], config["per_rank_batch_size"], config["batch_size"]) == (2, 16, 32)
    total = config["total_steps"]
    assert total == 4 * EPOCHS and config["steps_per_epoch"] == 4
    t = [(0.5 + 0.5 * i / 6) ** 3 for i in range(7)]
    for e, record in enumerate(records[1:-1], 1):
        k = record["step"]
        assert k == 4 * e and record["lr"] == closed_form_lrs(k, 7, total, 0.5, 3)
        assert record["frozen_units"] == sum(t_i * total <= min(k, total - 1) for t_i in t)
        # The two shards together: every one of the 128 validation images once, so the error
        # is a whole number of wrong answers out of 128 (a batch seen twice or missed would show).
        wrong = record["val_err"] * 128 / 100
        assert abs(wrong - round(wrong)) < 1e-9, record["val_err"]
    wrong = records[-1]["test_err"] * 128 / 100
    assert abs(wrong - round(wrong)) < 1e-9
    # Every epoch ended with the ranks' weights compared (the run fails if they differ);
    # the frozen units froze on both ranks at the same step.
    assert records[-1]["frozen_at"] == closed_form_frozen_at(7, total, 0.5, 3)


def test_sigterm_to_torchrun_then_a_stuck_rank_then_resume_matches_the_uninterrupted_run(tmp_path, two_process_run):
    """One run stopped twice, as a cluster's jobs are: SIGTERM to torchrun (the ranks agree to
    stop and write a checkpoint), then, resumed, a rank that stops answering (the other names it
    after --dist-timeout, the job ends with its last checkpoint kept); resumed again, its weights
    equal the uninterrupted run's."""
    out, _ = two_process_run
    p = torchrun(tmp_path, "cut", pause_at=6)  # epoch 2, its second step
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (tmp_path / "cut.paused").exists():
        assert p.poll() is None and time.time() < deadline, p.stderr.read()[-3000:]
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=600)
    assert p.returncode != 0
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    # The ranks agree to stop at the next progress read, epoch 2's last step: stopped after it.
    assert (ckpt["epoch"], ckpt["step"], ckpt["position"]) == (2, 8, None)
    assert len(ckpt["rng"]) == 2  # both ranks' generators

    # Resumed, rank 1 gets stuck before its 2nd step (step 10 of the run, in epoch 3).
    stuck = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "tests/train_stuck.py", "2", "1", *ARGS, "--out-dir", str(tmp_path), "--name", "cut",
                              "--dist-timeout", "0.1", "--resume"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.time()
    _, stderr = stuck.communicate(timeout=600)
    assert stuck.returncode != 0 and time.time() - started < 120  # not gloo's default 30 minutes
    line = next(x for x in stderr.splitlines() if ": error: rank 0 waited" in x)
    assert line.endswith(": error: rank 0 waited 0.1 min (--dist-timeout) at a collective: rank 1 stopped answering "
                         f"(stuck, stopped or dead); the job ends, its last checkpoint kept; continue with: torchrun "
                         f"--nproc_per_node=2 train.py --out-dir {tmp_path} --name cut --device cpu --dist-timeout 0.1 "
                         "--resume"), line
    kept = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (kept["epoch"], kept["step"]) == (2, 8)

    resume_and_compare(tmp_path, out)
    assert [r["epoch"] for r in read_records(metrics, "epoch")] == list(range(1, EPOCHS + 1))
    assert len(read_records(metrics, "config")) == 1


def test_resuming_with_another_number_of_processes_is_refused(tmp_path, two_process_run, capsys):
    out, _ = two_process_run
    with pytest.raises(SystemExit) as refused:
        train.main([*ARGS, "--out-dir", str(out), "--save-weights", "whole", "--resume"])
    assert refused.value.code == 1
    assert "trained by 2 process(es); resume it with the same number" in capsys.readouterr().err
