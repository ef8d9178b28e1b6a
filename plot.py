"""Plot one run from its metrics.jsonl: learning-rate curves and loss / error curves, as PNG.

    python plot.py runs/NAME            # writes runs/NAME/lr.png and runs/NAME/curves.png

lr.png: every unit's learning rate per optimizer step, drawn from the run's own schedule (its
t_i, T, base lr and scaling, as recorded in the config), with the values the epoch records
logged on top; an epoch axis runs along the top.

curves.png: the training and evaluation losses and the evaluation error at each epoch end, the
number of frozen units over the run, and the final test error (a star at the last epoch). The
frozen units are drawn at the optimizer step each unit froze (epoch = step / steps per epoch):
from the summary's `frozen_at` once the run has finished; before that, from the schedule's
rule (unit i freezes at the first step k >= t_i * T, k < T; the last unit never), up to the
last logged step and only where it agrees with every epoch record's count; where it does not,
the counts logged at epoch ends are drawn as they are. The legend says which.

Both figures read at any length, from 1 epoch to hundreds: whole epochs on the axes, markers
only where there are few enough points to tell apart.
"""
from __future__ import annotations

import argparse
import math
import shlex
from pathlib import Path
from typing import Optional

from figures import plot_lr_curves, pyplot, save_figure, schedule_of
from metrics_logger import WriteError, evaluation, read_records

EXIT_FAILED = 1  # as train.py's (cli.EXIT_FAILED): a file could not be written
MARKED_EPOCHS = 30  # up to this many epoch records, each is marked with a dot
X_PAD = 0.03  # room past the last epoch (of the axis's length), so that its markers are not cut in half


def steps_per_epoch(config: dict) -> float:
    """Optimizer steps per epoch (configs written before `steps_per_epoch` was recorded: T / epochs)."""
    return config.get("steps_per_epoch") or config["total_steps"] / config["epochs"]


def integer_ticks(axis) -> None:
    """Ticks at whole numbers only, 1, 2 or 5 times a power of ten apart (never 0.2 epoch or 40)."""
    from matplotlib.ticker import MaxNLocator
    axis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


def scheduled_frozen_at(config: dict, until_step: int) -> list[Optional[int]]:
    """Every unit's freeze step by the schedule's rule (FreezeOut._freeze_due_units): the first
    step k < T with k >= t_i * T; None for a unit not frozen by `until_step` (or ever)."""
    total = config["total_steps"]
    frozen_at = []
    for t_i in config["t_i"]:
        k = math.ceil(t_i * total)  # the first integer k >= t_i * T
        frozen_at.append(k if k < total and k <= until_step else None)
    return frozen_at


def frozen_units_curve(config: dict, epochs: list, summary: Optional[dict]) -> tuple[list, list, str]:
    """The number of frozen units against (fractional) epochs, as (xs, ys, label) for a
    step function drawn `where="post"`: ys[j] units are frozen from xs[j] to xs[j + 1]."""
    per_epoch = steps_per_epoch(config)
    if summary is not None and summary.get("frozen_at") is not None:
        frozen_at, end, label = summary["frozen_at"], summary["steps"], "frozen units"
    else:
        end = epochs[-1]["step"]
        frozen_at = scheduled_frozen_at(config, end) if "t_i" in config else None
        agrees = frozen_at is not None and all(
            sum(k is not None and k <= e["step"] for k in frozen_at) == e["frozen_units"] for e in epochs)
        if not agrees:  # the schedule cannot be read or disagrees with the run: its own counts
            xs = [0] + [e["epoch"] for e in epochs]
            return xs, [0] + [e["frozen_units"] for e in epochs], "frozen units (counted at epoch ends)"
        label = "frozen units (by the schedule; run unfinished)"
    freezes = sorted(k for k in frozen_at if k is not None)
    xs, ys = [0.0], [0]
    for k in sorted(set(freezes)):
        xs.append(k / per_epoch)
        ys.append(sum(f <= k for f in freezes))
    xs.append(end / per_epoch)
    ys.append(ys[-1])
    return xs, ys, label


def plot_lr(config: dict, epochs: list, path: Path) -> None:
    plt = pyplot()
    total, t_i = config["total_steps"], config["t_i"]
    scheduler = schedule_of(len(t_i), total, config["t_0"], config["how_scale"], config["scale_lr"],
                            config["lr"])
    steps = sorted(set(range(0, total + 1, max(1, total // 1000))) | {total})
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(8, 4.8))
    plot_lr_curves(ax, scheduler, steps, steps, cmap)
    dot_size = 4 if len(epochs) <= MARKED_EPOCHS else 1
    for i in range(len(t_i)):
        ax.plot([e["step"] for e in epochs], [e["lr"][i] for e in epochs], ".",
                color=cmap(i / max(len(t_i) - 1, 1)), ms=dot_size)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(t_i) - 1))
    colorbar = fig.colorbar(sm, ax=ax, label="unit (0 = first layer)")
    integer_ticks(colorbar.ax.yaxis)
    ax.set_xlim(0, total * (1 + X_PAD))
    integer_ticks(ax.xaxis)
    ax.set_xlabel("optimizer step")
    per_epoch = steps_per_epoch(config)
    top = ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
    integer_ticks(top.xaxis)
    top.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    scaling = "scaled" if config["scale_lr"] else "unscaled"
    ax.set_title(f"{config['how_scale']} {scaling}, t_0 = {config['t_0']:g}: per-unit learning rates "
                 f"(dots: logged at epoch ends)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(plt, fig, path)


def plot_curves(config: dict, epochs: list, path: Path, summary: Optional[dict] = None) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    marker = "o" if len(epochs) <= MARKED_EPOCHS else None
    ms = 4
    # An epoch record rebuilt from a checkpoint (its line was damaged) has no losses or errors.
    trained = [e for e in epochs if "train_loss" in e]
    left.plot([e["epoch"] for e in trained], [e["train_loss"] for e in trained], marker=marker, ms=ms,
              label="training loss")
    evaluated = [(e["epoch"], ev) for e in epochs if (ev := evaluation(e, config.get("eval_mode"))) is not None]
    x = [epoch for epoch, _ in evaluated]
    if evaluated and evaluated[0][1][1] is not None:
        left.plot(x, [ev[1] for _, ev in evaluated], marker=marker, ms=ms, label=f"{evaluated[0][1][0]} loss")
    left.set_ylabel("cross-entropy")
    if evaluated:
        right.plot(x, [ev[2] for _, ev in evaluated], marker=marker, ms=ms, color="C3",
                   label=f"{evaluated[0][1][0]} error")
    test_err = summary.get("test_err") if summary is not None else None
    if test_err is not None:
        right.plot([summary["epochs"]], [test_err], marker="*", ms=13, ls="none", color="C1",
                   mec="black", mew=0.6, zorder=3, label=f"final test error {test_err:.2f}%")
    if right.lines:
        right.set_ylabel("error (%)")
    frozen = right.twinx()
    xs, ys, label = frozen_units_curve(config, epochs, summary)
    frozen.step(xs, ys, where="post", color="grey", alpha=0.6, label=label)
    frozen.set_ylabel("frozen units")
    frozen.set_ylim(0, config["n_units"])
    integer_ticks(frozen.yaxis)
    for ax in (left, right):
        ax.set_xlim(0, config["epochs"] * (1 + X_PAD))
        integer_ticks(ax.xaxis)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    # The legends sit above the axes: no curve can run under them, whatever the run's length.
    above = dict(loc="lower left", bbox_to_anchor=(0, 1.01), borderaxespad=0, fontsize=9, frameon=False)
    left.legend(ncols=2, **above)
    handles = right.get_legend_handles_labels()[0] + frozen.get_legend_handles_labels()[0]
    frozen.legend(handles, [h.get_label() for h in handles], ncols=2, **above)
    done = summary is not None or epochs[-1]["epoch"] >= config["epochs"]
    n = config["epochs"]
    length = f"{n} epoch{'s' if n != 1 else ''}" if done else f"epoch {epochs[-1]['epoch']} of {n} (unfinished)"
    fig.suptitle(f"{config.get('name', '')}: {length}", fontsize=10)
    fig.tight_layout()
    save_figure(plt, fig, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Plot one FreezeOut run from its metrics.jsonl, into its run directory:\n"
                    "  lr.png      every unit's learning rate over the run, and the rates logged\n"
                    "  curves.png  losses, error and frozen units by epoch, the final test error\n"
                    "An unfinished run is plotted as far as it got.",
        epilog="example:\n  python plot.py runs/baseline_s0    # writes runs/baseline_s0/lr.png and curves.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl (train.py's OUT_DIR/NAME)")
    return parser


def main(argv=None) -> list[Path]:
    parser = build_parser()
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        parser.error(f"{run_dir} holds no metrics.jsonl")
    try:
        records = read_records(metrics)
    except (ValueError, UnicodeDecodeError) as e:
        parser.error(f"{metrics}: {e}")
    configs = [r for r in records if r.get("event") == "config"]
    epochs = [r for r in records if r.get("event") == "epoch"]
    summaries = [r for r in records if r.get("event") == "summary"]
    if not configs or not epochs:
        parser.error(f"{metrics} has no config or no epoch record yet: nothing to plot")
    paths = [run_dir / "lr.png", run_dir / "curves.png"]
    try:
        plot_lr(configs[0], epochs, paths[0])
        plot_curves(configs[0], epochs, paths[1], summaries[-1] if summaries else None)
    except WriteError as e:  # a full disk, a read-only run directory: one line, the command again
        parser.exit(EXIT_FAILED, f"{parser.prog}: error: {e}; once that is fixed, run again: "
                                 f"python plot.py {shlex.quote(str(run_dir))}\n")
    print(f"wrote {paths[0]} and {paths[1]}")
    return paths


if __name__ == "__main__":
    main()
