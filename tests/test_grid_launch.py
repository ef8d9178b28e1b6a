"""reproduce.py's grid in parallel: --jobs N processes give the same runs as one process, bit
for bit; a run that fails is reported with its log's end and the others finish; Ctrl-C stops
every run with a checkpoint and the same command completes the grid as if never stopped; a
directory owned by another process is left alone; the Slurm path runs through submitit's
local executor; flags that cannot work together are refused in one line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import launch
import reproduce
from checkpoint import RunLock

ROOT = Path(__file__).resolve().parents[1]
# Three runs (the baseline, cubic-scaled at t_0 0.5 and 0.8) of a DenseNet L=10 on 512 synthetic
# images, 3 epochs each: a few seconds a run. One CPU thread per run, so that --jobs 1 and
# --jobs 2 compute alike (a thread count changes how CPU kernels sum).
GRID = ["-L", "10", "-k", "4", "--dataset", "synthetic", "--which_dataset", "10", "--subset", "512",
        "--batch_size", "32", "--epochs", "3", "--t0s", "0.5", "0.8", "--strategies", "cubic-scaled",
        "--seeds", "0", "--device", "cpu", "--threads-per-run", "1"]
RUNS = ["baseline_s0", "cubic-scaled_t0-0.5_s0", "cubic-scaled_t0-0.8_s0"]


def reproduce_py(out: Path, *flags, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "reproduce.py"), *GRID, "--out", str(out), *flags],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def results(out: Path) -> dict:
    """Every run's records but the config (which holds the host, the load and the argv): losses,
    errors, learning rates, frozen units, the summary's test error, exactly as written."""
    keep = ("train_loss", "val_loss", "val_err", "lr", "frozen_units", "test_loss", "test_err", "frozen_at")
    found = {}
    for name in RUNS:
        records = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        found[name] = [{k: r[k] for k in keep if k in r} for r in records if r["event"] != "config"]
    return found


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory) -> dict:
    """The grid run by one process, one run after another: what every other way must give."""
    out = tmp_path_factory.mktemp("jobs1")
    code, _, err = finish(reproduce_py(out))
    assert code == 0, err
    return results(out)


@pytest.mark.slow
def test_two_jobs_give_the_runs_of_one_bit_for_bit(tmp_path, one_at_a_time):
    code, out, err = finish(reproduce_py(tmp_path, "--jobs", "2"))
    assert code == 0, err
    assert results(tmp_path) == one_at_a_time
    lines = out.splitlines()
    assert sum(line.startswith("starting: ") for line in lines) == 3
    ended = [line for line in lines if line.startswith("done: ")]
    assert len(ended) == 3 and ended[-1].endswith("[3/3 ended]") and "[1/3 ended, about" in ended[0]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == sorted(f"{n}.log" for n in RUNS)


@pytest.mark.slow
def test_a_failed_run_is_reported_with_its_log_and_the_others_finish(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / RUNS[1]).write_text("not a directory")  # train.py cannot make the run there
    code, _, err = finish(reproduce_py(tmp_path, "--jobs", "2"))
    assert code == 1
    lines = err.strip().splitlines()
    failed = next(i for i, line in enumerate(lines) if "error: FAILED: cubic-scaled t_0 0.5, seed 0" in line)
    assert f"exit 1; the last lines of {tmp_path / 'logs' / (RUNS[1] + '.log')}" in lines[failed]
    assert lines[failed + 1].strip() == f"train.py: error: cannot create {tmp_path / 'runs' / RUNS[1]} (File exists)"
    assert lines[-1].endswith("1 run(s) did not finish (above); the table leaves them out. Fix the cause and "
                              "run the same command again: it runs only what is missing")
    for name in (RUNS[0], RUNS[2]):
        assert '"event": "summary"' in (tmp_path / "runs" / name / "metrics.jsonl").read_text()
    assert (tmp_path / "results.md").exists()


@pytest.mark.slow
def test_ctrl_c_stops_every_run_with_a_checkpoint_and_the_same_command_completes(tmp_path, one_at_a_time):
    process = reproduce_py(tmp_path, "--jobs", "2")
    checkpoints = [tmp_path / "runs" / name / "checkpoint.pt" for name in RUNS[:2]]
    deadline = time.monotonic() + 120
    while not all(p.exists() for p in checkpoints) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C reaches the grid's process
    code, out, err = finish(process)
    assert code == 128 + signal.SIGINT, err
    # Both runs were started; each either stopped with a checkpoint or (a fast one) had finished.
    stopped = [line for line in out.splitlines() if line.startswith("STOPPED: ")]
    finished = [line for line in out.splitlines() if line.startswith("done: ")]
    assert stopped and len(stopped) + len(finished) == 2, out
    assert all("stopped with a checkpoint (exit 130)" in line for line in stopped)
    assert err.strip().splitlines()[-1].endswith(": stopped; run the same command again to continue where it "
                                                 "stopped (finished runs are kept, interrupted ones resume)")
    assert not (tmp_path / "runs" / RUNS[2]).exists()  # not started after the stop

    code, out, err = finish(reproduce_py(tmp_path, "--jobs", "2"))
    assert code == 0, err
    assert sum(line.startswith("resuming: ") for line in out.splitlines()) == len(stopped)
    assert results(tmp_path) == one_at_a_time


@pytest.mark.slow
@pytest.mark.parametrize("jobs,started", [("1", True), ("2", False), ("2", True)])
def test_a_run_owned_by_another_process_is_left_alone(tmp_path, jobs, started):
    """Found by the grid before the run starts (its owner has written a file), or by train.py's
    own lock when the run's process starts."""
    lock = RunLock(tmp_path / "runs" / RUNS[0])
    lock.acquire()
    if started:
        (tmp_path / "runs" / RUNS[0] / "metrics.jsonl").write_text("")
    try:
        code, _, err = finish(reproduce_py(tmp_path, "--jobs", jobs, "--t0s", "0.8"))
        # untouched (read while the lock is held: releasing it removes a directory left empty)
        left = sorted(p.name for p in (tmp_path / "runs" / RUNS[0]).iterdir())
    finally:
        lock.release()
    assert code == 1
    busy = next(line for line in err.splitlines() if "error: BUSY: baseline, seed 0" in line)
    assert f"in use by another run (pid {os.getpid()}" in busy
    assert left == ([".lock", "metrics.jsonl"] if started else [".lock"])
    assert '"event": "summary"' in (tmp_path / "runs" / RUNS[2] / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_the_slurm_path_through_submitits_local_executor(tmp_path, one_at_a_time):
    pytest.importorskip("submitit")
    code, out, err = finish(reproduce_py(tmp_path, "--launcher", "submitit-local", "--slurm-cpus", "1",
                                         "--slurm-gpus", "0"))
    assert code == 0, err
    assert sum(line.startswith("submitted: ") for line in out.splitlines()) == 3
    assert results(tmp_path) == one_at_a_time


def test_without_submitit_the_slurm_launcher_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    with pytest.raises(SystemExit) as refused:
        reproduce.main([*GRID, "--out", str(tmp_path), "--launcher", "slurm"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        ": error: --launcher slurm needs submitit, which is not installed: pip install submitit")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flags,message", [
    (["--runs-per-gpu", "2"], "--runs-per-gpu needs --gpus (the GPUs to share out)"),
    (["--gpus", "0,1", "--jobs", "3", "--device", "auto"],
     "--jobs 3 contradicts --gpus 0,1 with --runs-per-gpu 1 (2 runs at once); give one of them"),
    (["--gpus", "0,,1"], "--gpus must list distinct GPUs separated by commas, such as 0,1, got '0,,1'"),
    (["--gpus", "0"], "--gpus places runs on CUDA GPUs; it cannot go with --device cpu"),
    (["--jobs", "0"], "--jobs must be a positive integer, got 0"),
    (["--launcher", "slurm", "--jobs", "2"], "--launcher slurm places every run as a job of its own: --jobs and "
                                             "--gpus are for --launcher local"),
])
def test_placement_flags_that_cannot_work_are_refused_in_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as refused:
        reproduce.main([*GRID, "--out", str(tmp_path / "out"), *flags])
    assert refused.value.code == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f": error: {message}")


def test_places_and_threads():
    assert launch.slots(3, None, 1) == [{}, {}, {}]
    assert launch.slots(1, ["0", "1"], 2) == [{"CUDA_VISIBLE_DEVICES": g} for g in ("0", "0", "1", "1")]
    cores = len(os.sched_getaffinity(0))
    assert launch.threads_per_run(2) == max(1, cores // 2) and launch.threads_per_run(4, 3) == 3
    assert launch.threads_per_run(cores * 2) == 1
