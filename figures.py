"""What plot.py and reproduce.py draw with: matplotlib without a display, number formats, and
the per-unit learning-rate curves, read from the `FreezeOut` scheduler itself."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from freezeout import FreezeOut, param_groups


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


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
