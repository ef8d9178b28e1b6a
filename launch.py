"""Running a grid's runs: one after another in this process, N at once as separate processes
(GPUs shared out through CUDA_VISIBLE_DEVICES, CPU threads split between the runs), or as
Slurm jobs through submitit. Every launcher starts a run where its directory left it
(`start_argv`: a new start, or --resume) and reports a typed `Outcome` per run; reproduce.py
decides what the outcomes mean for the grid.

    python launch.py TRAIN_FLAGS...   # one grid run in this process (what a parallel run executes)
"""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from cli import EXIT_USAGE, is_stop_status, run_as_script
from messages import plural
from metrics_logger import read_records
from rundir import RunBusy, RunLock

ROOT = Path(__file__).resolve().parent
STATES = ("finished", "stopped", "failed", "busy")
LOG_TAIL_LINES = 8


@dataclass(frozen=True)
class GridRun:
    """One run of a grid: its directory and the train.py flags that make it (no --resume)."""
    name: str
    label: str
    argv: tuple
    run_dir: Path


@dataclass(frozen=True)
class Outcome:
    """How a run's launch ended: finished, stopped (by a signal, with a checkpoint), failed, or
    busy (another process owns its directory). `detail` says why, for the last three."""
    run: GridRun
    state: str
    seconds: float
    detail: str = ""


class GridStopped(Exception):
    """A stop signal ended the grid; every run it had started stopped with a checkpoint."""

    def __init__(self, signum: int, outcomes: list):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.outcomes = signum, outcomes


def run_state(run_dir: Path) -> str:
    """"finished" (a summary record), "interrupted" (a checkpoint, no summary) or "new"."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and read_records(metrics, "summary"):
        return "finished"
    if (run_dir / "checkpoint.pt").exists():
        return "interrupted"
    return "new"


def run_progress(run_dir: Path, epochs: int) -> str:
    """A run's state in words, for reports: finished, not started, or how far it got."""
    metrics = run_dir / "metrics.jsonl"
    records = read_records(metrics) if metrics.exists() else []
    if any(r["event"] == "summary" for r in records):
        return "finished"
    if not records and not (run_dir / "checkpoint.pt").exists():
        return "not started"
    done = sum(r["event"] == "epoch" for r in records)
    return f"interrupted ({done} of {plural(epochs, 'epoch')} done)"


def start_argv(run: GridRun) -> list[str] | None:
    """The train.py flags that take the run on from where its directory is: --resume after a
    checkpoint, a new start otherwise (clearing what a start that failed before its first
    checkpoint left); None for a run that has finished since the grid began (another grid on
    the same --out ran it). Under the directory's lock, taken and given back: RunBusy where
    another process owns it."""
    if run.run_dir.is_dir():
        lock = RunLock(run.run_dir)
        lock.acquire()
        try:
            state = run_state(run.run_dir)
            if state == "new":
                for leftover in run.run_dir.iterdir():
                    if leftover.name != ".lock" and leftover.is_file():
                        leftover.unlink()
        finally:
            lock.release()
        if state == "finished":
            return None
        if state == "interrupted":
            return [*run.argv, "--resume"]
    return list(run.argv)


def busy(run: GridRun, error: RunBusy) -> Outcome:
    """A run whose directory another process owns (another grid on the same --out): left alone."""
    return Outcome(run, "busy", 0.0, f"another process owns {run.run_dir} ({error.owner}): left alone; the same "
                                     "command, run again once it has ended, finds the run finished or goes on with it")


def finished_elsewhere(run: GridRun) -> Outcome:
    return Outcome(run, "finished", 0.0, "by another process")


def run_one(argv: list[str]) -> dict:
    """Train one grid run in this process; stopping, it raises SystemExit with train.py's
    codes. The hint train.py gives for continuing a run is not how a grid continues it: left out."""
    from train import main as train_main
    return train_main(argv, resume_hint=False)


# ---------------------------------------------------------------------------------------
# Parallel processes
# ---------------------------------------------------------------------------------------
def slots(jobs: int, gpus: list[str] | None, runs_per_gpu: int) -> list[dict]:
    """Where runs go: one environment per concurrent run (CUDA_VISIBLE_DEVICES on GPUs)."""
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in gpus for _ in range(runs_per_gpu)]
    return [{} for _ in range(jobs)]


def threads_per_run(concurrent: int, threads: int | None = None) -> int:
    """CPU threads for each of `concurrent` runs: this process's cores shared out, so that
    runs side by side do not oversubscribe them (`threads` overrides)."""
    if threads is not None:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // concurrent)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join("    " + line for line in kept[-lines:])


def outcome_of(run: GridRun, code: int, seconds: float, log: Path) -> Outcome:
    """A train.py process's exit status as an outcome (train.py's codes: 0 done, 128 + signal
    stopped with a checkpoint, 2 refused, 1 failed)."""
    if code == 0:
        return Outcome(run, "finished", seconds)
    if is_stop_status(code):
        return Outcome(run, "stopped", seconds, f"stopped with a checkpoint (exit {code})")
    tail = log_tail(log)
    if code == EXIT_USAGE and "in use by another run" in tail:
        return Outcome(run, "busy", seconds, tail.strip())
    return Outcome(run, "failed", seconds, f"exit {code}; the last lines of {log}:\n{tail}")


class Progress:
    """The grid's progress: runs ended of all, with the time left at the rate so far, in every
    ended run's line, and an overall bar on a terminal."""

    def __init__(self, total: int):
        self.total, self.ended, self.started = total, 0, time.perf_counter()
        self.bar = tqdm(total=total, unit="run", desc="grid", dynamic_ncols=True, disable=None)

    def ended_run(self, outcome: Outcome, where: str = "") -> None:
        self.ended += 1
        self.bar.update()
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.ended * (self.total - self.ended)
        count = f" [{self.ended}/{self.total} ended" + (f", about {format_duration(left)} left]" if left else "]")
        tqdm.write(outcome_line(outcome, where) + count)

    def close(self) -> None:
        self.bar.close()


def outcome_line(outcome: Outcome, where: str = "") -> str:
    """What the console says of an ended run."""
    run = outcome.run
    if outcome.state == "finished":
        if outcome.detail:  # finished by another process
            return f"done: {run.label}{where}, {outcome.detail}"
        return f"done: {run.label} in {format_duration(outcome.seconds)}{where}"
    return f"{outcome.state.upper()}: {run.label} ({run.run_dir}){where}: {outcome.detail}"


def run_processes(runs: list[GridRun], places: list[dict], threads: int, logs: Path) -> list[Outcome]:
    """Run `runs`, len(places) at a time, each a `python launch.py` process with its place's
    environment and `threads` CPU threads, its output in LOGS/NAME.log. A run that fails is
    reported with its log's last lines and the others go on. SIGINT or SIGTERM is passed on to
    every running run (each stops with a checkpoint), no new run starts, and GridStopped is
    raised once they have all ended."""
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, outcomes = collections.deque(runs), {}, []
    free = list(range(len(places)))
    stop = {"signum": None}

    def forward(signum, frame):  # the runs are in sessions of their own: a terminal's Ctrl-C reaches only us
        stop["signum"] = stop["signum"] or signum
        for process in running:
            process.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    progress = Progress(len(runs))
    try:
        while running or (pending and stop["signum"] is None):
            while pending and free and stop["signum"] is None:
                run, place = pending.popleft(), free.pop(0)
                try:
                    argv = start_argv(run)
                except RunBusy as e:
                    argv, outcome = None, busy(run, e)
                else:
                    outcome = finished_elsewhere(run) if argv is None else None
                if outcome is not None:
                    free.insert(0, place)
                    outcomes.append(outcome)
                    progress.ended_run(outcomes[-1])
                    continue
                env = {**os.environ, **places[place], "OMP_NUM_THREADS": str(threads),
                       "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
                log = logs / f"{run.name}.log"
                with open(log, "a") as f:
                    process = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *argv], env=env,
                                               stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
                running[process] = (run, place, time.perf_counter(), log)
                where = describe_place(places[place])
                tqdm.write(f"{'resuming' if '--resume' in argv else 'starting'}: {run.label}{where}; log {log}")
            time.sleep(0.1)
            for process in [p for p in running if p.poll() is not None]:
                run, place, started, log = running.pop(process)
                free.append(place)
                outcomes.append(outcome_of(run, process.returncode, time.perf_counter() - started, log))
                progress.ended_run(outcomes[-1], describe_place(places[place]))
    finally:
        progress.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop["signum"] is not None:
        raise GridStopped(stop["signum"], outcomes)
    return outcomes


def describe_place(place: dict) -> str:
    return f" (GPU {place['CUDA_VISIBLE_DEVICES']})" if "CUDA_VISIBLE_DEVICES" in place else ""


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


# ---------------------------------------------------------------------------------------
# Slurm, through submitit
# ---------------------------------------------------------------------------------------
class SubmittedRun:
    """What a Slurm job executes: the run from where its directory is. On preemption or at the
    time limit submitit calls `checkpoint`, which requeues the same run: it resumes from its
    last checkpoint (train.py writes one after every epoch)."""

    def __init__(self, run: GridRun, threads: int):
        self.run, self.threads = run, threads

    def __call__(self) -> int:
        """The run's exit status, train.py's codes (a SystemExit would end the job unreported)."""
        import torch
        torch.set_num_threads(self.threads)
        try:
            argv = start_argv(self.run)
            if argv is not None:
                run_one(argv)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
        except RunBusy:
            return 2
        return 0

    def checkpoint(self, *args, **kwargs):
        import submitit
        return submitit.helpers.DelayedSubmission(SubmittedRun(self.run, self.threads))


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise ValueError("--launcher slurm needs submitit, which is not installed: pip install submitit") from None
    return submitit


def run_submitit(runs: list[GridRun], cluster: str, folder: Path, options: dict, threads: int) -> list[Outcome]:
    """Submit every run as a job (cluster "slurm", or "local": submitit's local executor, the
    same path on this machine) and wait for them. `options`: submitit's parameters (timeout_min,
    slurm_partition, gpus_per_node, cpus_per_task, ...) and max_requeues (after time-outs);
    `threads`: each run's CPU threads. Ctrl-C stops the waiting: local jobs stop with a
    checkpoint, Slurm jobs go on (GridStopped either way)."""
    submitit = import_submitit()
    options = dict(options)
    requeues = options.pop("max_requeues", 3)
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=requeues)
    executor.update_parameters(name="freezeout", **options)
    # The jobs unpickle SubmittedRun, so they must import these modules wherever they start.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    started = time.perf_counter()
    with executor.batch():
        submitted = [(run, executor.submit(SubmittedRun(run, threads))) for run in runs]
    for run, job in submitted:
        tqdm.write(f"submitted: {run.label} (job {job.job_id}); logs in {folder}")
    outcomes, waiting = [], dict(submitted)
    progress = Progress(len(runs))
    try:
        while waiting:
            for run, job in [(r, j) for r, j in waiting.items() if j.done()]:
                del waiting[run]
                outcomes.append(job_outcome(run, job, time.perf_counter() - started))
                progress.ended_run(outcomes[-1])
            time.sleep(0.5)
    except KeyboardInterrupt:
        if cluster == "local":
            for job in waiting.values():
                job.cancel()  # SIGINT: the run stops with a checkpoint
            for job in waiting.values():
                while not job.done():
                    time.sleep(0.1)
        raise GridStopped(signal.SIGINT, outcomes) from None
    finally:
        progress.close()
    return outcomes


def job_outcome(run: GridRun, job, seconds: float) -> Outcome:
    """A finished job's outcome: its run's exit status, or the error that ended the job."""
    try:
        code = job.result()
    except Exception as e:  # the job died (killed, out of memory, an import failed on the node)
        code, error = None, str(e).strip().splitlines()
    if code == 0 or is_stop_status(code):
        return outcome_of(run, code, seconds, Path())
    lines = [line for line in (job.stderr() or "").splitlines() if line.strip()][-LOG_TAIL_LINES:]
    why = f"exit {code}" if code is not None else (error[0] if error else "the job ended without a result")
    busy = code == EXIT_USAGE and "in use by another run" in "".join(lines)
    return Outcome(run, "busy" if busy else "failed", seconds,
                   f"job {job.job_id}, {why}; the last lines of its log:\n" + "\n".join("    " + x for x in lines))


if __name__ == "__main__":
    sys.argv[0] = str(ROOT / "train.py")  # its messages name train.py, whose flags these are
    run_as_script(lambda: run_one(sys.argv[1:]))
