"""reproduce.py's report says what it leaves out and flags busy hosts; a stopped grid says
how to continue it."""
import csv
import os
import signal
from pathlib import Path

import pytest

import engine
import reproduce
from conftest import tiny_argv
from metrics_logger import MetricsLogger

TINY = tiny_argv("--epochs", "2", "--t0s", "0.5", "--strategies", "cubic-scaled", "--seeds", "0", subset=64,
                 batch_size=32)
# The grid of these flags: the baseline, then linear-scaled and cubic-scaled at t_0 0.3 and 0.5.
GRID = ["-L", "10", "-k", "4", "--epochs", "2", "--t0s", "0.3", "0.5", "--strategies", "linear-scaled",
        "cubic-scaled", "--seeds", "0", "--device", "cpu"]
JOBS = ["baseline_s0", "linear-scaled_t0-0.3_s0", "linear-scaled_t0-0.5_s0", "cubic-scaled_t0-0.3_s0",
        "cubic-scaled_t0-0.5_s0"]


def grid_config(out: Path, name: str, *flags) -> dict:
    """The config train.py would write for the job `name` of the grid GRID (+ flags)."""
    settings = reproduce.resolve_settings(reproduce.build_parser().parse_args([*GRID, *flags, "--out", str(out)]))
    return reproduce.wanted_config(next(job for job in reproduce.make_grid(settings, out) if job.name == name))


def fabricate(out: Path, name: str, t_0: float, time_s: float, epochs_done: int = 2, finished: bool = True,
              load: tuple = (0.5, 0.5), cores: int = 2) -> None:
    """A run directory as train.py writes it for the grid's job `name`, by hand."""
    run_dir = out / "runs" / name
    with MetricsLogger(run_dir / "metrics.jsonl") as log:
        log.log("config", **{**grid_config(out, name), "t_0": t_0, "paper_speedup": 0.1, "flop_speedup": 0.12,
                             "device": "cpu", "load_start": load[0], "cpu_count": cores})
        for e in range(1, epochs_done + 1):
            log.log("epoch", epoch=e, train_time_s=time_s / 2, val_err=20.0 - e)
        if finished:
            log.log("summary", train_time_s=time_s, val_err=18.0, test_err=19.0, load_end=load[1])
    (run_dir / "checkpoint.pt").write_bytes(b"")


@pytest.fixture
def no_figures(monkeypatch):
    # The report's figures are another test file's concern; these tests read the table.
    for name in ("plot_lr_schedules", "plot_error_vs_speedup", "plot_error_vs_time"):
        monkeypatch.setattr(reproduce, name, lambda *args, **kwargs: None)


def test_report_only_lists_what_is_missing(tmp_path, capsys, no_figures):
    fabricate(tmp_path, JOBS[0], 1.0, 100.0)
    fabricate(tmp_path, JOBS[1], 0.3, 60.0)
    fabricate(tmp_path, JOBS[3], 0.3, 50.0, epochs_done=1, finished=False)  # interrupted in epoch 2
    # JOBS[2] and JOBS[4] were never started.
    rows = reproduce.main([*GRID, "--out", str(tmp_path), "--report-only"])
    assert [r["strategy"] for r in rows] == ["baseline", "linear-scaled"]
    printed = capsys.readouterr().out
    assert ("2 of 5 runs finished; the table leaves out 2 not started and 1 interrupted "
            f"(listed in {tmp_path / 'results.md'})") in printed
    md = (tmp_path / "results.md").read_text()
    missing = md[md.index("## Missing"):]
    assert "3 run(s) of the grid have not finished" in missing
    assert "- linear-scaled t_0 0.5, seed 0 (`runs/linear-scaled_t0-0.5_s0`): not started" in missing
    assert "- cubic-scaled t_0 0.3, seed 0 (`runs/cubic-scaled_t0-0.3_s0`): interrupted (1 of 2 epochs done)" \
        in missing
    assert "- cubic-scaled t_0 0.5, seed 0 (`runs/cubic-scaled_t0-0.5_s0`): not started" in missing
    assert JOBS[0] not in missing and JOBS[1] not in missing


def test_a_complete_grid_has_no_missing_section(tmp_path, capsys, no_figures):
    for name, t_0 in zip(JOBS, (1.0, 0.3, 0.5, 0.3, 0.5), strict=True):
        fabricate(tmp_path, name, t_0, 100.0 * t_0)
    reproduce.main([*GRID, "--out", str(tmp_path), "--report-only"])
    assert "Missing" not in (tmp_path / "results.md").read_text()
    assert "leaves out" not in capsys.readouterr().out


def test_rows_from_a_busy_host_are_flagged(tmp_path, no_figures):
    fabricate(tmp_path, JOBS[0], 1.0, 100.0, load=(0.4, 1.9))
    fabricate(tmp_path, JOBS[1], 0.3, 60.0, load=(3.5, 1.0))  # more load than the 2 cores
    rows = reproduce.main([*GRID, "--out", str(tmp_path), "--report-only"])
    base, busy = rows
    assert (base["host_load"], base["busy_host"]) == (1.9, False)
    assert (busy["host_load"], busy["busy_host"]) == (3.5, True)
    md = (tmp_path / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].endswith("| host load |")
    assert table[1].startswith("| baseline |") and table[1].endswith("| 1.9 |")
    assert table[2].startswith("| linear-scaled |") and table[2].endswith("| 3.5 ⚠ busy host |")
    assert "⚠ busy host: the host's load average" in md and "exceeded its number of cores" in md
    with open(tmp_path / "results.csv") as f:
        assert [r["busy_host"] for r in csv.DictReader(f)] == ["False", "True"]


def test_a_run_that_keeps_every_core_busy_is_not_a_busy_host(tmp_path, no_figures):
    # Measured with the quick preset on 2 cores and nothing else running: the runs' own threads
    # put the load at 2.0 to 2.1. Only load beyond that, from other work, makes times unreliable.
    fabricate(tmp_path, JOBS[0], 1.0, 100.0, load=(1.1, 2.1))
    fabricate(tmp_path, JOBS[1], 0.3, 60.0, load=(2.6, 2.0))  # half a core of someone else's
    base, busy = reproduce.main([*GRID, "--out", str(tmp_path), "--report-only"])
    assert (base["host_load"], base["busy_host"]) == (2.1, False)
    assert (busy["host_load"], busy["busy_host"]) == (2.6, True)


def test_runs_without_load_records_show_na(tmp_path, no_figures):
    run_dir = tmp_path / "runs" / JOBS[0]
    with MetricsLogger(run_dir / "metrics.jsonl") as log:  # a run written before loads were recorded
        config = {k: v for k, v in grid_config(tmp_path, JOBS[0]).items() if k not in ("load_start", "cpu_count")}
        log.log("config", **{**config, "paper_speedup": 0.0, "flop_speedup": 0.0})
        log.log("summary", train_time_s=10.0, val_err=10.0, test_err=11.0)
    rows = reproduce.main([*GRID, "--out", str(tmp_path), "--report-only"])
    assert rows[0]["host_load"] is None and rows[0]["busy_host"] is False
    assert "| n/a |" in (tmp_path / "results.md").read_text()
    assert "⚠" not in (tmp_path / "results.md").read_text()


# -- a stopped grid: how to continue it --------------------------------------------------
@pytest.mark.parametrize("stop,code", [(SystemExit(130), 130), (SystemExit(143), 143),
                                       (KeyboardInterrupt(), 130)])
def test_a_stop_says_to_run_the_same_command_again(tmp_path, capsys, monkeypatch, stop, code):
    def stopped(argv, **kwargs):
        raise stop

    monkeypatch.setattr(reproduce, "run_one", stopped)
    with pytest.raises(SystemExit) as info:
        reproduce.main([*TINY, "--out", str(tmp_path)])
    assert info.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(": stopped; run the same command again to continue where it stopped "
                            "(finished runs are kept, interrupted ones resume)")  # after the prog name
    assert not any("--resume" in line for line in err)


def test_a_failed_run_in_this_process_is_reported_and_the_others_run(tmp_path, capsys, monkeypatch, no_figures):
    tried = []

    def second_fails(argv, **kwargs):  # train.py has printed its error and exits 1
        tried.append(argv[argv.index("--name") + 1])
        if len(tried) == 2:
            raise SystemExit(1)
        name = tried[-1]
        fabricate(tmp_path, name, float(name.split("t0-")[1].split("_")[0]) if "t0-" in name else 1.0, 10.0)

    monkeypatch.setattr(reproduce, "run_one", second_fails)
    with pytest.raises(SystemExit) as info:
        reproduce.main([*GRID, "--out", str(tmp_path)])
    assert info.value.code == 1 and tried == JOBS
    captured = capsys.readouterr()
    assert f"[2/5] FAILED: linear-scaled t_0 0.3, seed 0 ({tmp_path / 'runs' / JOBS[1]}): train.py exited 1; " \
           "its error is above" in captured.out
    err = captured.err.strip().splitlines()
    assert "error: FAILED: linear-scaled t_0 0.3, seed 0" in err[0] and "stopped;" not in captured.err
    assert err[-1].endswith("1 run(s) did not finish (above); the table leaves them out. Fix the cause and "
                            "run the same command again: it runs only what is missing")
    assert (tmp_path / "results.md").exists()


@pytest.mark.slow  # two whole train.py runs
def test_ctrl_c_inside_a_real_run_then_the_same_command_continues(tmp_path, capsys, monkeypatch, no_figures):
    real_step, calls = engine.train_step, []

    def step_then_sigint(*args):
        calls.append(1)
        if len(calls) == 3:  # the baseline's second epoch
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args)

    monkeypatch.setattr(engine, "train_step", step_then_sigint)
    with pytest.raises(SystemExit) as info:
        reproduce.main([*TINY, "--out", str(tmp_path)])
    assert info.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err.strip().splitlines()
    assert ": stopped; run the same command again" in err[-1]
    assert "stopped by SIGINT in epoch 2" in err[-2] and "checkpoint written" in err[-2]
    assert not any("--resume" in line for line in err), err

    monkeypatch.setattr(engine, "train_step", real_step)
    rows = reproduce.main([*TINY, "--out", str(tmp_path)])
    assert "baseline, seed 0: resuming" in capsys.readouterr().out
    assert [r["strategy"] for r in rows] == ["baseline", "cubic-scaled"]


# -- runs of another setup are never mixed in --------------------------------------------------
def test_runs_of_another_setup_are_refused_one_line_per_setting_then_rerun_on_request(tmp_path, capsys, no_figures,
                                                                                   monkeypatch):
    for name, t_0 in zip(JOBS, (1.0, 0.3, 0.5, 0.3, 0.5), strict=True):
        fabricate(tmp_path, name, t_0, 100.0 if t_0 == 1.0 else 60.0)
    # The same --out, asked for 3 epochs and 2 seeds... of which seed 0's runs exist with 2 epochs.
    trained = []
    monkeypatch.setattr(reproduce, "run_one", lambda argv, **kwargs: trained.append(argv))
    for flags in ([], ["--report-only"]):
        with pytest.raises(SystemExit) as refused:
            reproduce.main([*GRID, "--epochs", "3", "--out", str(tmp_path), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert refused.value.code == 2 and trained == [] and not (tmp_path / "results.md").exists()
        assert err[0].endswith(f": error: {tmp_path / 'runs' / JOBS[0]} was run with epochs = 2, not 3")
        assert len(err) == len(JOBS) + 1 and "5 run(s) in" in err[-1]
    reproduce.main([*GRID, "--epochs", "3", "--out", str(tmp_path), "--rerun-mismatched"])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(f"{n}.mismatched-1" for n in JOBS)
    assert len(trained) == len(JOBS) and all("--epochs" in a and a[a.index("--epochs") + 1] == "3" for a in trained)


def test_report_only_refuses_an_out_without_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        reproduce.main([*GRID, "--out", str(tmp_path / "missing"), "--report-only"])
    assert refused.value.code == 2 and not (tmp_path / "missing").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"--report-only: {tmp_path / 'missing'} holds no runs (nothing under {tmp_path / 'missing' / 'runs'}); "
        f"run the grid first")
