"""plot.py: what it draws (every unit's schedule from the paper's formula, the logged rates,
the loss, error and frozen-unit curves of the epoch records), not only that PNGs appear."""
from pathlib import Path

import matplotlib.image
import pytest

import plot
from conftest import KeptFigures, closed_form_lr, run_train
from metrics_logger import MetricsLogger


@pytest.fixture
def drawn(monkeypatch):
    kept = KeptFigures(plot.pyplot())
    monkeypatch.setattr(plot, "pyplot", lambda: kept)
    return kept.figures


def is_png(path: Path) -> bool:
    image = matplotlib.image.imread(path)
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 200 and image.shape[1] > 200


def fabricated_run(run_dir: Path, evaluated: bool = True) -> list[dict]:
    """A run's metrics: 5 units, T = 40 (4 epochs of 10 steps), linear unscaled t_0 = 0.5."""
    epochs = []
    with MetricsLogger(run_dir / "metrics.jsonl") as log:
        log.log("config", name="fab", epochs=4, total_steps=40, n_units=5, t_0=0.5, how_scale="linear",
                scale_lr=False, lr=0.2, t_i=[0.5 + 0.5 * i / 4 for i in range(5)])
        for e in range(1, 5):
            record = {"epoch": e, "step": 10 * e, "train_loss": 2.5 - 0.4 * e, "frozen_units": e - 1,
                      "lr": [closed_form_lr(10 * e, i, 5, 40, 0.5, 1, False, 0.2) for i in range(5)]}
            if evaluated:
                record.update(val_loss=2.6 - 0.3 * e, val_err=80.0 - 10 * e)
            epochs.append(log.log("epoch", **record))
    return epochs


def test_the_learning_rate_figure_draws_every_units_schedule_and_the_logged_rates(tmp_path, drawn, capsys):
    epochs = fabricated_run(tmp_path)
    paths = plot.main([str(tmp_path)])
    assert paths == [tmp_path / "lr.png", tmp_path / "curves.png"] and all(map(is_png, paths))
    assert f"wrote {paths[0]} and {paths[1]}" in capsys.readouterr().out
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


def test_the_curves_figure_draws_the_epoch_records(tmp_path, drawn):
    epochs = fabricated_run(tmp_path)
    plot.main([str(tmp_path)])
    left, right, frozen = drawn[1].axes
    x = [1, 2, 3, 4]
    train_loss, val_loss = left.lines
    assert list(train_loss.get_xdata()) == x and list(train_loss.get_ydata()) == [e["train_loss"] for e in epochs]
    assert list(val_loss.get_ydata()) == [e["val_loss"] for e in epochs]
    (err,) = right.lines
    assert list(err.get_xdata()) == x and list(err.get_ydata()) == [70.0, 60.0, 50.0, 40.0]
    (steps,) = frozen.lines
    assert list(steps.get_ydata()) == [0, 1, 2, 3] and frozen.get_ylim() == (0, 5)


@pytest.mark.slow  # the figure's second case: kept out of the quick subset
def test_a_run_without_evaluation_draws_the_training_loss_only(tmp_path, drawn):
    fabricated_run(tmp_path, evaluated=False)
    plot.main([str(tmp_path)])
    left, right, frozen = drawn[1].axes
    assert len(left.lines) == 1 and len(right.lines) == 0 and len(frozen.lines) == 1


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
