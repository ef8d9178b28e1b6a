"""reproduce.py's grid in parallel: --jobs N processes give the same runs as one process, bit
for bit; a run that fails is reported with its log's end and the others finish; Ctrl-C stops
every run with a checkpoint and the same command completes the grid as if never stopped; a
directory owned by another process is left alone; the Slurm path runs through submitit's
local executor; flags that cannot work together are refused in one line."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import launch
import reproduce
from conftest import tiny_argv
from rundir import RunLock

ROOT = Path(__file__).resolve().parents[1]
# Three runs (the baseline, cubic-scaled at t_0 0.5 and 0.8) of a DenseNet L=10 on 128 synthetic
# images, 3 epochs of 4 steps each (units freeze in both FreezeOut runs): most of a run's few
# seconds is its process starting. One CPU thread per run, so that --jobs 1 and --jobs 2 compute
# alike (a thread count changes how CPU kernels sum).
GRID = tiny_argv("--epochs", "3", "--t0s", "0.5", "0.8", "--strategies", "cubic-scaled", "--seeds", "0",
                 "--threads-per-run", "1", subset=128, batch_size=32)
RUNS = ["baseline_s0", "cubic-scaled_t0-0.5_s0", "cubic-scaled_t0-0.8_s0"]
LABELS = ["baseline, seed 0", "cubic-scaled t_0 0.5, seed 0", "cubic-scaled t_0 0.8, seed 0"]


def reproduce_py(out: Path, *flags, hold_at: int = 0, hold_until: Path | None = None, **popen) -> subprocess.Popen:
    """reproduce.py on GRID; with hold_at, each of its runs waits before that training step
    until a stop signal has reached it (or `hold_until` exists), after writing a file in
    out/held (tests/hold)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if hold_at:
        (out / "held").mkdir(parents=True)
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tests" / "hold"), env.get("PYTHONPATH")])),
                   FREEZEOUT_TEST_HOLD_AT=str(hold_at), FREEZEOUT_TEST_HOLD_DIR=str(out / "held"))
        if hold_until is not None:
            env["FREEZEOUT_TEST_HOLD_UNTIL"] = str(hold_until)
    return subprocess.Popen([sys.executable, str(ROOT / "reproduce.py"), *GRID, "--out", str(out), *flags],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def results(out: Path, names=RUNS) -> dict:
    """Every run's records but the config (which holds the host, the load and the argv): losses,
    errors, learning rates, frozen units, the summary's test error, exactly as written."""
    keep = ("train_loss", "val_loss", "val_err", "lr", "frozen_units", "test_loss", "test_err", "frozen_at")
    found = {}
    for name in names:
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
def test_two_jobs_report_a_failed_and_a_busy_run_finish_the_other_and_then_give_the_runs_of_one_bit_for_bit(
        tmp_path, one_at_a_time):
    """--jobs 2 with one run that cannot start and one whose directory another process owns
    (its lock held, nothing written: train.py's own lock refuses it): both are reported, the
    failed one with its log, the busy one left alone, and the third finishes; the same command,
    once the causes are gone, runs only those two; the three runs are then those of one process
    running them one after another, bit for bit."""
    owner = RunLock(tmp_path / "runs" / RUNS[0])
    owner.acquire()
    blocker = tmp_path / "runs" / RUNS[1]
    blocker.write_text("not a directory")  # train.py cannot make the run there
    try:
        code, out, err = finish(reproduce_py(tmp_path, "--jobs", "2"))
        left = sorted(p.name for p in owner.run_dir.iterdir())  # read while the lock is held
    finally:
        owner.release()  # the directory held only the lock: removed with it
    assert code == 1
    assert left == [".lock"]
    lines = err.strip().splitlines()
    busy = next(line for line in lines if f"error: BUSY: {LABELS[0]}" in line)
    assert f"another process owns {owner.run_dir} (pid {os.getpid()} on " in busy and "left alone" in busy
    failed = next(i for i, line in enumerate(lines) if f"error: FAILED: {LABELS[1]}" in line)
    assert f"exit 1; the last lines of {tmp_path / 'logs' / (RUNS[1] + '.log')}" in lines[failed]
    assert lines[failed + 1].strip() == f"train.py: error: cannot create {blocker} (File exists)"
    assert lines[-2].endswith("1 run(s) are running in another process (busy, above); the table leaves them out: "
                              "run the same command again once it has ended")
    assert lines[-1].endswith("1 run(s) did not finish (above); the table leaves them out. Fix the cause and "
                              "run the same command again: it runs only what is missing")
    assert '"event": "summary"' in (tmp_path / "runs" / RUNS[2] / "metrics.jsonl").read_text()
    assert (tmp_path / "results.md").exists()
    assert sum(line.startswith("starting: ") for line in out.splitlines()) == 2  # the busy one is not started
    assert sum(line.startswith("done: ") for line in out.splitlines()) == 1
    # Every ended run's line (finished on stdout, failed or busy on stderr) counts the runs
    # ended, with the time left while some are.
    counts = dict(re.findall(r"\[(\d)/3 ended(, about [^\]]+ left)?\]", out + err))
    assert sorted(counts) == ["1", "2", "3"] and not counts["3"]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == sorted(f"{n}.log" for n in RUNS[1:])

    blocker.unlink()
    code, out, err = finish(reproduce_py(tmp_path, "--jobs", "2"))
    assert code == 0, err
    assert "3 runs in the grid, 1 already finished" in out
    started = sorted(line.split(";")[0] for line in out.splitlines() if line.startswith("starting: "))
    assert started == [f"starting: {LABELS[0]}", f"starting: {LABELS[1]}"], out
    assert results(tmp_path) == one_at_a_time


@pytest.mark.slow
def test_ctrl_c_stops_every_run_with_a_checkpoint_and_the_same_command_completes(tmp_path, one_at_a_time):
    # Both runs wait before their 6th step (epoch 2) until the signal has reached them: it lands
    # there however fast or loaded the machine is.
    process = reproduce_py(tmp_path, "--jobs", "2", hold_at=6)
    deadline = time.monotonic() + 600
    while len(list((tmp_path / "held").iterdir())) < 2:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the runs never reached their 6th step: {process.communicate()}")
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C reaches the grid's process
    code, out, err = finish(process)
    assert code == 128 + signal.SIGINT, err
    # Both runs were started, and each stopped with a checkpoint.
    stopped = [line for line in out.splitlines() if line.startswith("STOPPED: ")]
    assert len(stopped) == 2 and not [line for line in out.splitlines() if line.startswith("done: ")], out
    assert all("stopped with a checkpoint (exit 130)" in line for line in stopped)
    assert err.strip().splitlines()[-1].endswith(": stopped; run the same command again to continue where it "
                                                 "stopped (finished runs are kept, interrupted ones resume)")
    assert not (tmp_path / "runs" / RUNS[2]).exists()  # not started after the stop

    code, out, err = finish(reproduce_py(tmp_path, "--jobs", "2"))
    assert code == 0, err
    assert sum(line.startswith("resuming: ") for line in out.splitlines()) == len(stopped)
    assert results(tmp_path) == one_at_a_time


@pytest.mark.slow
def test_a_started_run_owned_by_another_process_is_left_alone(tmp_path):
    """Found by the grid before the run starts (its owner has written a file), in the grid's own
    process (--jobs 1) as in --jobs N (below); the other run goes on."""
    lock = RunLock(tmp_path / "runs" / RUNS[0])
    lock.acquire()
    (lock.run_dir / "metrics.jsonl").write_text("")
    try:
        code, _, err = finish(reproduce_py(tmp_path, "--jobs", "1", "--t0s", "0.8"))
        left = sorted(p.name for p in lock.run_dir.iterdir())  # read while the lock is held
    finally:
        lock.release()
    assert code == 1
    busy = next(line for line in err.splitlines() if f"error: BUSY: {LABELS[0]}" in line)
    assert f"another process owns {lock.run_dir} (pid {os.getpid()} on " in busy
    assert left == [".lock", "metrics.jsonl"]
    assert '"event": "summary"' in (tmp_path / "runs" / RUNS[2] / "metrics.jsonl").read_text()


def test_parallel_runs_leave_a_started_run_owned_by_another_process_alone_without_starting_it(tmp_path,
                                                                                           monkeypatch):
    lock = RunLock(tmp_path / "runs" / RUNS[0])
    lock.acquire()
    (lock.run_dir / "metrics.jsonl").write_text("")
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    try:
        outcomes = launch.run_processes([launch.GridRun(RUNS[0], LABELS[0], ("--epochs", "1"), lock.run_dir)],
                                        [{}, {}], 1, tmp_path / "logs")
    finally:
        lock.release()
    assert [(o.state, o.seconds) for o in outcomes] == [("busy", 0.0)]
    assert f"another process owns {lock.run_dir} (pid {os.getpid()} on " in outcomes[0].detail


@pytest.mark.slow
def test_two_grids_on_one_out_leave_each_others_runs_alone_and_the_one_that_ends_with_all_finished_exits_0(
        tmp_path, one_at_a_time):
    """A first grid holds its first run (the baseline) at its second step; a second grid on the
    same --out leaves that run alone (busy: reproduce.py's word and advice, not a failure), runs
    the other two and says so; the first grid then goes on, finds the two finished by the other
    and ends with every run finished: exit 0, the runs those of one grid alone."""
    go = tmp_path / "go"
    first = reproduce_py(tmp_path, "--jobs", "1", hold_at=2, hold_until=go)
    deadline = time.monotonic() + 600
    while not list((tmp_path / "held").iterdir()):
        if first.poll() is not None or time.monotonic() > deadline:
            first.kill()
            pytest.fail(f"the first grid's run never reached its 2nd step: {first.communicate()}")
        time.sleep(0.02)
    code, out, err = finish(reproduce_py(tmp_path, "--jobs", "1"))
    assert code == 1 and "FAILED" not in out + err and "--resume" not in err and "--name" not in err
    busy = next(line for line in err.splitlines() if f"error: BUSY: {LABELS[0]}" in line)
    assert f"another process owns {tmp_path / 'runs' / RUNS[0]} (pid " in busy
    assert err.strip().splitlines()[-1].endswith("1 run(s) are running in another process (busy, above); the table "
                                                 "leaves them out: run the same command again once it has ended")
    go.touch()
    code, out, err = finish(first)
    assert code == 0, err
    for label in LABELS[1:]:
        assert f"done: {label}, by another process" in out
    assert results(tmp_path) == one_at_a_time


@pytest.mark.slow
def test_the_slurm_path_through_submitits_local_executor(tmp_path, one_at_a_time):
    pytest.importorskip("submitit")
    # Two of the grid's runs: the baseline and t_0 0.8.
    code, out, err = finish(reproduce_py(tmp_path, "--launcher", "submitit-local", "--slurm-cpus", "1",
                                         "--slurm-gpus", "0", "--t0s", "0.8"))
    assert code == 0, err
    assert sum(line.startswith("submitted: ") for line in out.splitlines()) == 2
    names = [RUNS[0], RUNS[2]]
    assert results(tmp_path, names) == {name: one_at_a_time[name] for name in names}


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
