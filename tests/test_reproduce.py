"""reproduce.py and plot.py: grid bookkeeping, the table's numbers, the figures, --target-speedup."""
import csv
import statistics
from pathlib import Path

import matplotlib.image
import pytest

import checkpoint
import figures
import reproduce
import results
import train
from conftest import POWERS, KeptFigures, closed_form_lr, tiny_argv
from metrics_logger import MetricsLogger, read_records
from utils import calc_speedup

TINY = tiny_argv("--epochs", "2", "--t0s", "0.5", "--strategies", "cubic-scaled", "--seeds", "0", subset=64,
                 batch_size=32)


def is_png(path: Path) -> bool:
    image = matplotlib.image.imread(path)
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 200 and image.shape[1] > 200


@pytest.mark.slow
def test_grid_skips_finished_runs_and_resumes_interrupted_ones(tmp_path, monkeypatch, capsys):
    out = tmp_path / "rep"
    real_save, saves = checkpoint.save_checkpoint, []

    def die_after_third_save(path, training, config, epoch, step, *rest):  # baseline: 2; the strategy's epoch 1
        real_save(path, training, config, epoch, step, *rest)
        if step == 0:
            return  # each run's step-0 checkpoint, written as it starts
        saves.append(path)
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", die_after_third_save)
    with pytest.raises(SystemExit):
        reproduce.main([*TINY, "--out", str(out)])
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    cut = out / "runs" / "cubic-scaled_t0-0.5_s0"
    assert reproduce.run_state(out / "runs" / "baseline_s0") == "finished"
    assert reproduce.run_state(cut) == "interrupted"

    capsys.readouterr()
    rows = reproduce.main([*TINY, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "2 runs in the grid, 1 already finished" in printed
    assert "cubic-scaled t_0 0.5, seed 0: resuming" in printed and "about" in printed
    assert [r["epoch"] for r in read_records(cut / "metrics.jsonl", "epoch")] == [1, 2]
    assert [r["strategy"] for r in rows] == ["baseline", "cubic-scaled"]

    def must_not_train(argv):
        raise AssertionError(f"a finished run was trained again: {argv}")

    monkeypatch.setattr(train, "main", must_not_train)
    reproduce.main([*TINY, "--out", str(out)])
    assert "2 runs in the grid, 2 already finished" in capsys.readouterr().out
    assert all(is_png(out / name) for name in ("lr_schedules.png", "error_vs_speedup.png", "error_vs_time.png"))


def fabricate(out: Path, job: reproduce.Job, t_0: float, time_s: float, val: float, test: float) -> None:
    run_dir = out / "runs" / job.name
    with MetricsLogger(run_dir / "metrics.jsonl") as log:
        log.log("config", t_0=t_0, seed=job.seed, paper_speedup=0.1 if job.strategy else 0.0,
                flop_speedup=0.12 if job.strategy else 0.0)
        for e in (1, 2):
            log.log("epoch", epoch=e, train_time_s=time_s / 2, val_err=val + 10 * (2 - e))
        log.log("summary", train_time_s=time_s, val_err=val, test_err=test)


@pytest.mark.slow  # draws and checks the paper's three figures
def test_table_numbers_from_fabricated_runs(tmp_path, monkeypatch):
    out = tmp_path
    jobs = [reproduce.Job(None, 1.0, 0), reproduce.Job(None, 1.0, 1),
            reproduce.Job("cubic-scaled", 0.5, 0), reproduce.Job("cubic-scaled", 0.5, 1),
            reproduce.Job("linear-unscaled", 0.5, 0)]  # this one never finished
    fabricate(out, jobs[0], 1.0, 100.0, 10.0, 11.0)
    fabricate(out, jobs[1], 1.0, 110.0, 12.0, 13.0)
    fabricate(out, jobs[2], 0.5, 70.0, 11.0, 12.0)
    fabricate(out, jobs[3], 0.5, 80.0, 13.0, 12.0)
    rows = reproduce.summarize(jobs, out)
    assert [r["strategy"] for r in rows] == ["baseline", "cubic-scaled"]
    base, cubic = rows
    assert base["val_err"] == 11.0 and base["val_err_std"] == pytest.approx(statistics.stdev([10, 12]))
    assert cubic["measured_speedup"] == pytest.approx(1 - 75 / 105)
    assert cubic["val_err"] == 12.0 and cubic["delta_val_err"] == pytest.approx(1.0)
    assert cubic["test_err"] == 12.0 and cubic["test_err_std"] == 0.0 and cubic["delta_test_err"] == 0.0
    assert (cubic["paper_speedup"], cubic["flop_speedup"], cubic["seeds"]) == (0.1, 0.12, 2)

    reproduce.write_csv(rows, out / "results.csv")
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[1]["measured_speedup"]) == pytest.approx(1 - 75 / 105)
    settings = {"model": "densenet", "depth": 22, "growth_rate": 12, "dataset": "synthetic", "subset": 64,
                "epochs": 2, "batch_size": 32, "seeds": [0, 1], "device": "cpu"}
    reproduce.write_markdown(rows, settings, out / "results.md")
    md = (out / "results.md").read_text()
    assert "| cubic-scaled | 0.5 | 10.0% | 12.0% | 28.6% † | 75.0 | 12.00 ± 1.41 | +1.00 | 12.00 ± 0.00 | +0.00 |" in md
    assert md.count("\n| baseline |") == 1
    # What the table cannot say is said in it: the setting, and the caveats that follow from it.
    assert md.startswith("# FreezeOut: a small grid, not the paper's setting\n\nDenseNet-BC L=22 k=12 on synthetic "
                         "(first 64 images of each split), 2 epochs, batch 32, 2 seeds (0, 1), device cpu.")
    assert "- The synthetic set is not CIFAR: these errors say nothing of the paper's accuracy claims" in md
    assert "- 2 epochs against the paper's 100" in md and "One seed" not in md
    assert "† measured more than 10 points away from the FLOP estimate, either way" in md
    paper = {**settings, "dataset": "cifar10", "subset": None, "epochs": 100, "seeds": [0]}
    reproduce.write_markdown(rows, paper, out / "paper.md")
    md = (out / "paper.md").read_text()
    assert md.startswith("# FreezeOut: the paper's grid\n") and "synthetic" not in md and "- One seed" in md

    kept = KeptFigures(figures.pyplot())
    monkeypatch.setattr(figures, "pyplot", lambda: kept)
    about = results.setting_line(settings)
    for plot_fn, name in [(figures.plot_error_vs_speedup, "speed.png"), (figures.plot_error_vs_time, "time.png")]:
        plot_fn(rows, out / name, about=about)
        assert is_png(out / name)
    figures.plot_lr_schedules(13, 0.5, out / "lr.png")
    assert is_png(out / "lr.png")
    speed, time, lr = kept.figures
    # The figures name the grid they show: model, data, length, seeds.
    assert about in speed._suptitle.get_text() and about in time.axes[0].get_title()
    # Two seeds: the baseline's band is its spread over them.
    assert "baseline ± std (2 seeds)" in speed.axes[0].get_legend_handles_labels()[1]
    # Error against speedup: the cubic strategy's point at its estimate and its measured speedup.
    estimated, measured = speed.axes[:2]
    points = {ax: [(list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata())) for c in ax.containers]
              for ax in (estimated, measured)}
    assert points[estimated] == [([10.0], [12.0])]  # the paper's estimate 0.1, validation error 12
    assert points[measured] == [([pytest.approx(100 * (1 - 75 / 105))], [12.0])]
    # Error against time: the first seed of the baseline and of the best cubic run, epoch by epoch.
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in time.axes[0].lines}
    assert curves == {"baseline": ([50 / 60, 100 / 60], [20.0, 10.0]),
                      "cubic-scaled t_0=0.5": ([35 / 60, 70 / 60], [21.0, 11.0])}
    # The paper's Figure 1: every unit's schedule for the four strategies, over 400 steps.
    assert [ax.get_title() for ax in lr.axes[:4]] == [f"{name}, t_0 = 0.5" for name in figures.STRATEGIES]
    for ax, (how, scaled) in zip(lr.axes[:4], figures.STRATEGIES.values(), strict=True):
        assert len(ax.lines) == 13
        for i, line in enumerate(ax.lines):
            assert list(line.get_xdata()) == [k / 400 for k in range(401)]
            assert list(line.get_ydata()) == [closed_form_lr(k, i, 13, 400, 0.5, POWERS[how], scaled)
                                              for k in range(401)]


@pytest.mark.slow
def test_target_speedups_solve_t0_per_strategy(tmp_path):
    settings = reproduce.resolve_settings(reproduce.build_parser().parse_args(
        ["--target-speedups", "0.2", "--strategies", "linear-unscaled"]))
    jobs = reproduce.make_grid(settings, tmp_path)
    assert [j.name for j in jobs] == ["baseline_s0", "linear-unscaled_ts-0.2_s0"]
    argv = jobs[1].argv
    assert argv[argv.index("--target-speedup") + 1] == "0.2" and "--no_scale" in argv and "--t_0" not in argv

    # The train.py acceptance run: the recorded t_0 gives the paper's estimate asked for.
    train.main(["--target-speedup", "0.25", "--dataset", "synthetic", "--subset", "64", "--epochs", "1",
                "--device", "cpu", "--out-dir", str(tmp_path), "--save-weights", "target"])
    config = read_records(tmp_path / "target" / "metrics.jsonl", "config")[0]
    assert abs(calc_speedup(12, 12, config["t_0"], "cubic") - 0.25) < 0.002
    assert config["target_speedup"] == 0.25


def test_bad_grid_flags_are_refused(tmp_path, capsys):
    for argv, message in [(["--t0s", "0"], "every t_0 must be in (0, 1]"),
                          (["--t0s", "0.5", "--target-speedups", "0.2"], "not both"),
                          (["--epochs", "0"], "--epochs must be a positive integer")]:
        with pytest.raises(SystemExit) as bad:
            reproduce.main([*argv, "--out", str(tmp_path / "x")])
        assert bad.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_speedup_figure_rings_busy_host_points_and_shows_one_seed_as_a_line(tmp_path, monkeypatch):
    row = {"strategy": "cubic-scaled", "t_0": 0.8, "seeds": 1, "paper_speedup": 0.18, "flop_speedup": 0.243,
           "measured_speedup": 0.525, "val_err": 30.0, "val_err_std": 0.0, "busy_host": True}
    base = {**row, "strategy": "baseline", "t_0": 1.0, "paper_speedup": 0.0, "flop_speedup": 0.0,
            "measured_speedup": 0.0, "val_err": 20.0, "busy_host": False}
    kept = KeptFigures(figures.pyplot())
    monkeypatch.setattr(figures, "pyplot", lambda: kept)
    figures.plot_error_vs_speedup([base, row], tmp_path / "speed.png")
    estimated, measured = kept.figures[0].axes[:2]
    labels = measured.get_legend_handles_labels()[1]
    assert figures.BUSY in labels and figures.BUSY not in estimated.get_legend_handles_labels()[1]
    ring = next(line for line in measured.lines if line.get_label() == figures.BUSY)
    assert list(ring.get_xdata()) == [pytest.approx(52.5)]  # the busy run's measured point, ringed
    assert "baseline (1 seed)" in labels and not any("±" in label for label in labels)  # no band for one seed
    assert not measured.patches  # no baseline band
