"""Plot one run from its metrics.jsonl: learning-rate curves and loss / error curves, as PNG.

    python plot.py runs/NAME            # writes runs/NAME/lr.png and runs/NAME/curves.png

The learning rates are drawn per optimizer step from the run's own schedule (its t_i, T, base
lr and scaling, as recorded in the config), with the values the epoch records logged on top.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from figures import plot_lr_curves, pyplot, schedule_of
from metrics_logger import read_records


def plot_lr(config: dict, epochs: list, path: Path) -> None:
    plt = pyplot()
    total, t_i = config["total_steps"], config["t_i"]
    scheduler = schedule_of(len(t_i), total, config["t_0"], config["how_scale"], config["scale_lr"],
                            config["lr"])
    steps = list(range(0, total + 1, max(1, total // 1000)))
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(8, 4.8))
    plot_lr_curves(ax, scheduler, steps, steps, cmap)
    for i in range(len(t_i)):
        ax.plot([e["step"] for e in epochs], [e["lr"][i] for e in epochs], ".",
                color=cmap(i / max(len(t_i) - 1, 1)), ms=4)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(t_i) - 1))
    fig.colorbar(sm, ax=ax, label="unit (0 = first layer)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    scaling = "scaled" if config["scale_lr"] else "unscaled"
    ax.set_title(f"{config['how_scale']} {scaling}, t_0 = {config['t_0']:g}: per-unit learning rates "
                 f"(dots: logged at epoch ends)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(config: dict, epochs: list, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    x = [e["epoch"] for e in epochs]
    left.plot(x, [e["train_loss"] for e in epochs], marker=".", label="training loss")
    if "val_loss" in epochs[0]:
        left.plot(x, [e["val_loss"] for e in epochs], marker=".", label="evaluation loss")
    left.set_xlabel("epoch")
    left.set_ylabel("cross-entropy")
    left.legend()
    left.grid(alpha=0.3)
    if "val_err" in epochs[0]:
        right.plot(x, [e["val_err"] for e in epochs], marker=".", color="C3", label="evaluation error")
        right.set_ylabel("error (%)")
    frozen = right.twinx()
    frozen.step(x, [e["frozen_units"] for e in epochs], where="post", color="grey", alpha=0.6,
                label="frozen units")
    frozen.set_ylabel("frozen units")
    frozen.set_ylim(0, config["n_units"])
    right.set_xlabel("epoch")
    right.grid(alpha=0.3)
    handles = right.get_legend_handles_labels()[0] + frozen.get_legend_handles_labels()[0]
    right.legend(handles, [h.get_label() for h in handles], loc="upper right")
    fig.suptitle(f"{config.get('name', '')}: {config['epochs']} epochs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description="Plot a FreezeOut run's learning rates and curves.")
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")
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
    if not configs or not epochs:
        parser.error(f"{metrics} has no config or no epoch record yet: nothing to plot")
    paths = [run_dir / "lr.png", run_dir / "curves.png"]
    plot_lr(configs[0], epochs, paths[0])
    plot_curves(configs[0], epochs, paths[1])
    print(f"wrote {paths[0]} and {paths[1]}")
    return paths


if __name__ == "__main__":
    main()
