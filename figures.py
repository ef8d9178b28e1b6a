"""What plot.py and reproduce.py draw: matplotlib without a display, number formats, the
per-unit learning-rate curves read from the `FreezeOut` scheduler itself, `save_figure` (every
figure is written atomically: a full disk is one line, WriteError), and the paper's
figures from a grid's rows (Figure 1: the strategies' schedules; Figure 3: error against
speedup; Figure 4: error against training time)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from freezeout import FreezeOut, param_groups
from metrics_logger import evaluation, read_records, write_atomically

STRATEGIES = {  # the paper's four strategies: name -> (how_scale, scale_lr)
    "linear-scaled": ("linear", True), "linear-unscaled": ("linear", False),
    "cubic-scaled": ("cubic", True), "cubic-unscaled": ("cubic", False),
}


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(plt, fig, path: Path, dpi: int = 110) -> None:
    """Write `fig` to `path` (its format from the suffix) atomically, then close it: a write
    that fails (a full disk) raises metrics_logger.WriteError, one line, and leaves the old
    file as it was and no temporary one."""
    path = Path(path)
    try:
        write_atomically(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=dpi))
    finally:
        plt.close(fig)


def pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def mib(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x / 2 ** 20:.1f} MiB"


def schedule_of(n_units: int, total_steps: int, t_0: float, how_scale: str, scale_lr: bool,
                lr: float) -> FreezeOut:
    """A FreezeOut scheduler with the given schedule over n stand-in units (it is only asked
    for its rates, never stepped)."""
    units = [torch.nn.Linear(1, 1) for _ in range(n_units)]
    optimizer = torch.optim.SGD(param_groups(units), lr=lr)
    return FreezeOut(optimizer, units, total_steps, t_0=t_0, how_scale=how_scale, scale_lr=scale_lr)


def lr_curves(scheduler: FreezeOut, steps: Sequence[int]) -> list[list[float]]:
    """Every unit's learning rate at each of `steps`: curves[i][j] is unit i's rate at steps[j]."""
    rates = [scheduler.lr_at(k) for k in steps]
    return [[r[i] for r in rates] for i in range(len(scheduler.units))]


def plot_lr_curves(ax, scheduler: FreezeOut, steps: Sequence[int], xs: Sequence[float], cmap) -> None:
    """One line per unit, coloured from the first unit to the output unit."""
    n = len(scheduler.units)
    for i, curve in enumerate(lr_curves(scheduler, steps)):
        ax.plot(xs, curve, color=cmap(i / max(n - 1, 1)), lw=1)


def plot_lr_schedules(n_units: int, t_0: float, path: Path, base_lr: float = 0.1, model: str = "") -> None:
    """Every unit's learning rate over the run for the four strategies (the paper's Figure 1)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True, layout="constrained")
    steps = 400
    cmap = plt.get_cmap("viridis")
    for ax, (name, (how, scaled)) in zip(axes.flat, STRATEGIES.items(), strict=True):
        scheduler = schedule_of(n_units, steps, t_0, how, scaled, base_lr)
        plot_lr_curves(ax, scheduler, range(steps + 1), [k / steps for k in range(steps + 1)], cmap)
        ax.set_title(f"{name}, t_0 = {t_0:g}")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("learning rate")
    for ax in axes[1]:
        ax.set_xlabel("fraction of training")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, n_units - 1))
    fig.colorbar(sm, ax=axes, label="unit (0 = first layer)")
    fig.suptitle(f"FreezeOut per-unit learning rates ({n_units} units{' of ' + model if model else ''})")
    save_figure(plt, fig, path)


BUSY = "busy host: its time is not reliable"


def plot_error_vs_speedup(rows: list[dict], path: Path, metric: str = "val_err", about: str = "") -> None:
    """Error against speedup per strategy, estimated and measured (the paper's Figure 3); `about`:
    the grid's model, data and length, for the title. Measured points from a busy host are ringed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    base = next((r for r in rows if r["strategy"] == "baseline"), None)
    if rows and rows[0][metric] is None:
        metric = "test_err"
    for ax, (key, title) in zip(axes, [("estimated", "estimated speedup (paper; FLOPs where n/a)"),
                                       ("measured_speedup", "measured wall-clock speedup")], strict=True):
        for name in STRATEGIES:
            # Without a finished baseline there is no measured speedup: that panel stays empty.
            own = sorted((r for r in rows if r["strategy"] == name
                          and (key != "measured_speedup" or r["measured_speedup"] is not None)),
                         key=lambda r: r["t_0"])
            if not own:
                continue
            xs = [100 * (r["measured_speedup"] if key == "measured_speedup" else
                         (r["paper_speedup"] if r["paper_speedup"] is not None else r["flop_speedup"]))
                  for r in own]
            ys = [r[metric] for r in own]
            errs = [r[metric + "_std"] for r in own]
            ax.errorbar(xs, ys, yerr=errs if any(r["seeds"] > 1 for r in own) else None, marker="o", capsize=3,
                        label=name)
            for x, y, r in zip(xs, ys, own, strict=True):
                ax.annotate(f"{r['t_0']:.2g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            busy = [i for i, r in enumerate(own) if key == "measured_speedup" and r.get("busy_host")]
            if busy:
                first = BUSY not in ax.get_legend_handles_labels()[1]
                ax.plot([xs[i] for i in busy], [ys[i] for i in busy], "o", ms=13, mfc="none", mec="red", mew=1.5,
                        label=BUSY if first else None)
        if base is not None and base[metric] is not None:
            if base["seeds"] > 1:
                lo, hi = base[metric] - base[metric + "_std"], base[metric] + base[metric + "_std"]
                ax.axhspan(lo, hi, color="grey", alpha=0.25, label=f"baseline ± std ({base['seeds']} seeds)")
                ax.axhline(base[metric], color="grey", lw=1)
            else:  # one seed: no spread to show
                ax.axhline(base[metric], color="grey", lw=1, label="baseline (1 seed)")
        ax.set_xlabel(f"{title} (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{'validation' if metric == 'val_err' else 'test'} error (%)")
    axes[0].legend(fontsize=8)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    fig.suptitle("Error against speedup (points labelled with t_0)" + (f"\n{about}" if about else ""), fontsize=10)
    fig.tight_layout()
    save_figure(plt, fig, path)


def plot_error_vs_time(rows: list[dict], path: Path, about: str = "") -> None:
    """Validation error against training time for the baseline and each strategy's best run
    (lowest final error): the paper's Figure 4; `about`: the grid, for the title."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    picks = [r for r in rows if r["strategy"] == "baseline"]
    for name in STRATEGIES:
        own = [r for r in rows if r["strategy"] == name and r["val_err"] is not None]
        if own:
            picks.append(min(own, key=lambda r: r["val_err"]))
    for r in picks:
        metrics = Path(r["run_dirs"][0]) / "metrics.jsonl"
        epochs, config = read_records(metrics, "epoch"), read_records(metrics, "config")[0]
        errors = [evaluation(e, config.get("eval_mode")) for e in epochs]
        if not epochs or errors[0] is None or errors[0][0] != "val":
            continue
        elapsed, xs = 0.0, []
        for e in epochs:
            elapsed += e["train_time_s"]
            xs.append(elapsed / 60)
        label = r["strategy"] if r["strategy"] == "baseline" else f"{r['strategy']} t_0={r['t_0']:.2g}"
        ax.plot(xs, [ev[2] for ev in errors], marker=".",
                lw=2 if r["strategy"] == "baseline" else 1.2, label=label)
    ax.set_xlabel("training time (min, evaluation excluded)")
    ax.set_ylabel("validation error (%)")
    ax.set_title("Validation error against wall-clock time (first seed)" + (f"\n{about}" if about else ""),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(plt, fig, path)


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
