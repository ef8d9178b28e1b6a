"""torchrun with 2 CPU processes (gloo): the schedule, one writer, replicas in step, resume."""
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from metrics_logger import read_records

ROOT = Path(__file__).resolve().parents[1]
# Global batch 32 (16 per process), 128 images: 4 steps per epoch, 32 in all (enough epochs
# for a signal sent after the first to land before the end).
EPOCHS = 8
ARGS = ["--dataset", "synthetic", "--which_dataset", "10", "--subset", "128", "-L", "10", "-k", "4",
        "--epochs", str(EPOCHS), "--batch_size", "32", "--device", "cpu", "--t_0", "0.5", "--dropout", "0.1"]


def torchrun(out: Path, name: str, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "train.py", *ARGS, "--out-dir", str(out),
                             "--save-weights", name, *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    p = torchrun(out, "whole")
    stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, stderr[-3000:]
    return out, stdout


def test_two_processes_follow_the_schedule_with_one_writer(two_process_run):
    out, stdout = two_process_run
    run_dir = out / "whole"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]
    records = read_records(run_dir / "metrics.jsonl")
    assert [r["event"] for r in records] == ["config", *["epoch"] * EPOCHS, "summary"]
    assert stdout.count("done: test error") == 1  # rank 0 alone reports
    config = records[0]
    assert (config["world_size"], config["per_rank_batch_size"], config["batch_size"]) == (2, 16, 32)
    total = config["total_steps"]
    assert total == 4 * EPOCHS and config["steps_per_epoch"] == 4
    t = [(0.5 + 0.5 * i / 6) ** 3 for i in range(7)]
    for record in records[1:-1]:
        k = record["step"]
        expected = [0.0 if k >= t_i * total else 0.5 * (0.1 / t_i) * (1 + math.cos(math.pi * k / (t_i * total)))
                    for t_i in t]
        assert record["lr"] == expected
        assert record["frozen_units"] == sum(t_i * total <= min(k, total - 1) for t_i in t)
        assert 0 <= record["val_err"] <= 100
    # Every epoch ended with the ranks' weights compared (the run fails if they differ);
    # the frozen units froze on both ranks at the same step.
    assert records[-1]["frozen_at"][:5] == [next(k for k in range(total) if k >= t_i * total) for t_i in t[:5]]


def test_sigterm_to_torchrun_then_resume_matches_the_uninterrupted_run(tmp_path, two_process_run):
    out, _ = two_process_run
    p = torchrun(tmp_path, "cut")
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and read_records(metrics, "epoch")):
        assert p.poll() is None and time.time() < deadline, p.stderr.read()[-3000:]
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] < 4 * EPOCHS and len(ckpt["rng"]) == 2  # stopped early; both ranks' RNG
    p = torchrun(tmp_path, "cut", "--resume")
    _, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, stderr[-3000:]
    whole = torch.load(out / "whole" / "checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])
    assert [r["epoch"] for r in read_records(metrics, "epoch")] == list(range(1, EPOCHS + 1))
    assert len(read_records(metrics, "config")) == 1


def test_resuming_with_another_number_of_processes_is_refused(tmp_path, two_process_run, capsys):
    out, _ = two_process_run
    with pytest.raises(SystemExit) as refused:
        train.main([*ARGS, "--out-dir", str(out), "--save-weights", "whole", "--resume"])
    assert refused.value.code == 1
    assert "trained by 2 process(es); resume it with the same number" in capsys.readouterr().err
