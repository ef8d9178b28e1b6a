"""plot.py: what it draws (every unit's schedule from the paper's formula, the logged rates,
the loss, error and frozen-unit curves of the epoch records), not only that PNGs appear."""
import contextlib
import io
from pathlib import Path
from typing import Optional

import matplotlib.image
import pytest

import plot
from conftest import KeptFigures, closed_form_frozen_at, closed_form_lr, run_train
from metrics_logger import MetricsLogger, read_records, write_records


@pytest.fixture
def drawn(monkeypatch):
    kept = KeptFigures(plot.pyplot())
    monkeypatch.setattr(plot, "pyplot", lambda: kept)
    yield kept.figures
    for figure in kept.figures:  # kept open for the test: closed for good now
        kept.plt.close(figure)


def is_png(path: Path) -> bool:
    image = matplotlib.image.imread(path)
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 200 and image.shape[1] > 200


def fabricated_run(run_dir: Path, evaluated: bool = True, epochs: int = 4, per_epoch: int = 10,
                   logged: Optional[int] = None, finished: bool = False, test_err: float = 38.5) -> list[dict]:
    """A run's metrics: 5 units, linear unscaled t_0 = 0.5, T = epochs x per_epoch steps (by
    default 4 epochs of 10: the units freeze at steps 20, 25, 30, 35 and never). `logged` epoch
    records of the `epochs` (all by default); `finished`: the summary record last."""
    total, logged = epochs * per_epoch, epochs if logged is None else logged
    frozen_at = closed_form_frozen_at(5, total, 0.5, power=1)
    records = []
    with MetricsLogger(run_dir / "metrics.jsonl") as log:
        log.log("config", name="fab", epochs=epochs, steps_per_epoch=per_epoch, total_steps=total, n_units=5,
                t_0=0.5, how_scale="linear", scale_lr=False, lr=0.2, t_i=[0.5 + 0.5 * i / 4 for i in range(5)])
        for e in range(1, logged + 1):
            step = per_epoch * e
            record = {"epoch": e, "step": step, "train_loss": 2.5 * 0.9 ** e,
                      "frozen_units": sum(k is not None and k <= step for k in frozen_at),
                      "lr": [closed_form_lr(step, i, 5, total, 0.5, 1, False, 0.2) for i in range(5)]}
            if evaluated:
                record.update(val_loss=2.6 * 0.92 ** e, val_err=80.0 * 0.97 ** e)
            records.append(log.log("epoch", **record))
        if finished:
            log.log("summary", epochs=epochs, steps=total, test_err=test_err, frozen_at=frozen_at)
    return records


@contextlib.contextmanager
def drawing_kept():
    """plot.py's figures, kept for the tests of a module-scoped fixture to read."""
    kept = KeptFigures(plot.pyplot())
    with pytest.MonkeyPatch.context() as m:
        m.setattr(plot, "pyplot", lambda: kept)
        yield kept.figures
    for figure in kept.figures:
        kept.plt.close(figure)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default fabricated run, drawn once: (its directory, its epoch records, the paths
    plot.py returned, what it printed, the two figures)."""
    run_dir = tmp_path_factory.mktemp("default")
    epochs = fabricated_run(run_dir)
    printed = io.StringIO()
    with drawing_kept() as figures, contextlib.redirect_stdout(printed):
        paths = plot.main([str(run_dir)])
        yield run_dir, epochs, paths, printed.getvalue(), figures


def test_the_learning_rate_figure_draws_every_units_schedule_and_the_logged_rates(default_run):
    run_dir, epochs, paths, printed, drawn = default_run
    assert paths == [run_dir / "lr.png", run_dir / "curves.png"] and all(map(is_png, paths))
    assert f"wrote {paths[0]} and {paths[1]}" in printed
    lr_figure, curves_figure = drawn
    ax = lr_figure.axes[0]
    curves, dots = ax.lines[:5], ax.lines[5:]
    assert len(dots) == 5
    for i, line in enumerate(curves):  # steps 0..T, the paper's formula
        assert list(line.get_xdata()) == list(range(41))
        assert list(line.get_ydata()) == [closed_form_lr(k, i, 5, 40, 0.5, 1, False, 0.2) for k in range(41)]
    for i, line in enumerate(dots):  # the rates logged at epoch ends, on top
        assert list(line.get_xdata()) == [10, 20, 30, 40]
        assert list(line.get_ydata()) == [e["lr"][i] for e in epochs]
    # Unit 0 (t_0 = 0.5) reaches zero at step 20, the output unit at the end.
    assert curves[0].get_ydata()[19] > 0 and curves[0].get_ydata()[20] == 0
    assert curves[4].get_ydata()[0] == 0.2 and curves[4].get_ydata()[39] > 0
    assert "linear unscaled, t_0 = 0.5" in ax.get_title()


def test_the_curves_figure_draws_the_epoch_records(default_run):
    _, epochs, _, _, drawn = default_run
    left, right, frozen = drawn[1].axes
    x = [1, 2, 3, 4]
    train_loss, val_loss = left.lines
    assert list(train_loss.get_xdata()) == x and list(train_loss.get_ydata()) == [e["train_loss"] for e in epochs]
    assert list(val_loss.get_ydata()) == [e["val_loss"] for e in epochs]
    (err,) = right.lines
    assert list(err.get_xdata()) == x and list(err.get_ydata()) == [e["val_err"] for e in epochs]
    (steps,) = frozen.lines  # unfinished (no summary): the freeze steps 20, 25, 30, 35 of the schedule
    assert list(steps.get_xdata()) == [0, 2, 2.5, 3, 3.5, 4] and list(steps.get_ydata()) == [0, 1, 2, 3, 4, 4]
    assert frozen.get_ylim() == (0, 5)


@pytest.mark.slow  # the figure's second case: kept out of the quick subset
def test_a_run_without_evaluation_draws_the_training_loss_only(tmp_path, drawn):
    fabricated_run(tmp_path, evaluated=False)
    plot.main([str(tmp_path)])
    left, right, frozen = drawn[1].axes
    assert len(left.lines) == 1 and len(right.lines) == 0 and len(frozen.lines) == 1


# -- any length: 1, 2 and 100 epochs ---------------------------------------------------------
LENGTHS = [(1, 2001), (2, 10), (100, 12)]  # (epochs, steps per epoch); 2001: every other step drawn


def visible_ticks(axis) -> list:
    lo, hi = sorted(axis.get_view_interval())
    return [t for t in axis.get_ticklocs() if lo - 1e-9 <= t <= hi + 1e-9]


def ends_a_little_past(limits, end) -> bool:
    """An axis from 0 to just past `end`: the markers at the end are drawn whole."""
    return limits[0] == 0 and end < limits[1] <= 1.05 * end


@pytest.fixture(scope="module", params=LENGTHS, ids=[f"{e}x{n}" for e, n in LENGTHS])
def finished_run(request, tmp_path_factory):
    """A finished fabricated run of each length (final test error 37.25%), drawn once:
    (epochs, steps per epoch, the two figures)."""
    epochs, per_epoch = request.param
    run_dir = tmp_path_factory.mktemp("finished")
    fabricated_run(run_dir, epochs=epochs, per_epoch=per_epoch, finished=True, test_err=37.25)
    with drawing_kept() as figures:
        plot.main([str(run_dir)])
        yield epochs, per_epoch, figures


def test_the_epoch_axes_show_whole_epochs_at_any_length(finished_run):
    epochs, per_epoch, drawn = finished_run
    lr_ax = drawn[0].axes[0]
    (epoch_axis,) = lr_ax.child_axes  # the learning rates' epoch axis, along the top
    left, right, frozen = drawn[1].axes
    assert left.get_xlim() == right.get_xlim() and ends_a_little_past(left.get_xlim(), epochs)
    assert ends_a_little_past(lr_ax.get_xlim(), epochs * per_epoch)
    for axis in (left.xaxis, right.xaxis, epoch_axis.xaxis, lr_ax.xaxis, frozen.yaxis):
        ticks = visible_ticks(axis)
        assert 2 <= len(ticks) <= 12 and all(t == int(t) for t in ticks), ticks
    assert visible_ticks(epoch_axis.xaxis)[-1] == visible_ticks(left.xaxis)[-1] == epochs
    assert epoch_axis.get_xlabel() == "epoch" and lr_ax.get_xlabel() == "optimizer step"
    assert all(line.get_xdata()[-1] == epochs * per_epoch for line in lr_ax.lines[:5])  # to the last step
    # Every epoch end marked while they can be told apart; a plain line for long runs.
    for line in left.lines + right.lines[:1] + lr_ax.lines[5:]:
        if epochs <= plot.MARKED_EPOCHS:
            assert line.get_marker() in ("o", ".") and line.get_markersize() >= 4
        else:
            assert line.get_marker() == "None" or line.get_markersize() < 2


def test_the_frozen_units_step_up_at_the_step_each_unit_froze(finished_run):
    epochs, per_epoch, drawn = finished_run
    frozen_at = closed_form_frozen_at(5, epochs * per_epoch, 0.5, power=1)
    assert frozen_at[4] is None and len(set(frozen_at[:4])) == 4  # the output unit never freezes
    (steps,) = drawn[1].axes[2].lines
    assert steps.get_drawstyle() == "steps-post" and steps.get_label() == "frozen units"
    assert list(steps.get_xdata()) == pytest.approx([0] + [k / per_epoch for k in frozen_at[:4]] + [epochs])
    assert list(steps.get_ydata()) == [0, 1, 2, 3, 4, 4]
    if epochs == 2:  # T = 20: steps 10, 13, 15, 18, not all at the end of epoch 2
        assert list(steps.get_xdata()) == [0, 1.0, 1.3, 1.5, 1.8, 2.0]


def test_the_final_test_error_is_marked_at_the_last_epoch(finished_run):
    epochs, per_epoch, drawn = finished_run
    left, right, frozen = drawn[1].axes
    err, star = right.lines
    assert list(star.get_xdata()) == [epochs] and list(star.get_ydata()) == [37.25] and star.get_marker() == "*"
    assert star.get_label() == "final test error 37.25%"
    assert "final test error 37.25%" in [t.get_text() for t in frozen.get_legend().get_texts()]
    assert drawn[1].get_suptitle() == {1: "fab: 1 epoch", 2: "fab: 2 epochs", 100: "fab: 100 epochs"}[epochs]


def test_an_unfinished_run_draws_the_schedules_freeze_steps_as_far_as_it_got(tmp_path, drawn):
    fabricated_run(tmp_path, logged=3)  # 3 of 4 epochs, no summary: freezes at 20, 25, 30 so far
    plot.main([str(tmp_path)])
    left, right, frozen = drawn[1].axes
    (err,) = right.lines  # no final test error
    (steps,) = frozen.lines
    assert list(steps.get_xdata()) == [0, 2, 2.5, 3, 3] and list(steps.get_ydata()) == [0, 1, 2, 3, 3]
    assert steps.get_label() == "frozen units (by the schedule; run unfinished)"
    assert ends_a_little_past(left.get_xlim(), 4) and drawn[1].get_suptitle() == "fab: epoch 3 of 4 (unfinished)"


def test_epoch_records_that_disagree_with_the_schedule_are_drawn_as_logged(tmp_path, drawn):
    fabricated_run(tmp_path, logged=3)
    records = read_records(tmp_path / "metrics.jsonl")
    records[2]["frozen_units"] = 2  # epoch 2 (step 20) logged one more than the schedule says
    write_records(tmp_path / "metrics.jsonl", records)
    plot.main([str(tmp_path)])
    (steps,) = drawn[1].axes[2].lines
    assert list(steps.get_xdata()) == [0, 1, 2, 3] and list(steps.get_ydata()) == [0, 0, 2, 3]
    assert steps.get_label() == "frozen units (counted at epoch ends)"


def test_help_says_what_plot_py_draws_with_an_example(capsys):
    with pytest.raises(SystemExit):
        plot.main(["-h"])
    text = capsys.readouterr().out
    assert "lr.png" in text and "curves.png" in text and "example:\n  python plot.py runs/" in text


def test_what_cannot_be_plotted_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as bad:
        plot.main([str(tmp_path / "nothing")])
    assert bad.value.code == 2 and "holds no metrics.jsonl" in capsys.readouterr().err
    with MetricsLogger(tmp_path / "metrics.jsonl") as log:
        log.log("config", total_steps=4)
    with pytest.raises(SystemExit) as bad:
        plot.main([str(tmp_path)])
    assert bad.value.code == 2 and "no config or no epoch record yet" in capsys.readouterr().err


@pytest.mark.slow
def test_plot_py_draws_a_real_run(tmp_path, drawn):
    run_train(tmp_path, "--epochs", "2")
    paths = plot.main([str(tmp_path / "run")])
    assert all(map(is_png, paths))
    ax = drawn[0].axes[0]
    # T = 12, 7 units, cubic scaled t_0 = 0.8 (train.py's defaults), base rate 0.1.
    for i, line in enumerate(ax.lines[:7]):
        assert list(line.get_ydata()) == [closed_form_lr(k, i, 7, 12, 0.8) for k in range(13)]
    for i, line in enumerate(ax.lines[7:]):
        assert list(line.get_xdata()) == [6, 12]
        assert list(line.get_ydata()) == [closed_form_lr(6, i, 7, 12, 0.8), 0.0]
