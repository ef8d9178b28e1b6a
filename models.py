"""The model registry: each architecture's paper defaults, `build_model` from plain
arguments, depth checks, display names, and the estimates for a model: the paper's where it
applies (`paper_speedup`), the FLOP-based one otherwise (`speedup_estimator`, `run_estimates`).

    model = build_model("densenet", depth=76, width=12, num_classes=100)

`width` is the architecture's k: DenseNet's growth rate, the Wide ResNet's widening factor;
VGG has none.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from densenet import DenseNet, layers_per_block
from freezeout import unit_times
from utils import (
    ESTIMATE_INPUT,
    densenet_bc_speedup,
    schedule_speedup,
    setting,
    training_flops_by_level,
    unit_flops,
)
from vgg import VGG, config_for_depth
from wrn import WideResNet, blocks_per_group

# Each architecture's paper default (depth L, width k).
DEFAULTS = {"densenet": (76, 12), "wrn": (40, 4), "vgg": (16, None)}
MODELS = tuple(DEFAULTS)


def resolve_size(model: str, depth: Optional[int], width: Optional[int]) -> tuple[int, Optional[int]]:
    """-L and -k as given, or the architecture's paper defaults (VGG has no k)."""
    default_depth, default_width = DEFAULTS[model]
    depth = default_depth if depth is None else depth
    width = default_width if width is None or model == "vgg" else width
    return depth, width


def check_depth(model: str, depth: int, bottleneck: bool = True) -> None:
    """Raise ValueError naming -L for a depth the architecture cannot have."""
    try:
        if model == "densenet":
            layers_per_block(depth, bottleneck)
        elif model == "wrn":
            blocks_per_group(depth)
        else:
            config_for_depth(depth)
    except ValueError as e:
        raise ValueError(f"{setting('depth')}: {e}") from None


def build_model(model: str, depth: int, width: Optional[int], num_classes: int,
                bottleneck: bool = True, reduction: float = 0.5, dropout: float = 0.0) -> nn.Module:
    """The architecture `model` ("densenet", "wrn", "vgg"); its `freeze_units()` lists its
    FreezeOut units in forward order."""
    if model == "wrn":
        return WideResNet(depth=depth, widen_factor=width, num_classes=num_classes, dropout=dropout)
    if model == "vgg":
        return VGG(depth=depth, num_classes=num_classes, dropout=dropout)
    return DenseNet(depth=depth, growth_rate=width, num_classes=num_classes, bottleneck=bottleneck,
                    reduction=reduction, dropout=dropout)


def model_name(model: str, depth: int, width: Optional[int], bottleneck: bool = True) -> str:
    if model == "wrn":
        return f"WRN-{depth}-{width}"
    if model == "vgg":
        return f"VGG-{depth} (BN)"
    return f"DenseNet{'-BC' if bottleneck else ''} L={depth} k={width}"


def paper_speedup(model: str, depth: int, width: Optional[int], t_0: float, how_scale: str,
                  bottleneck: bool = True) -> Optional[float]:
    """The paper's estimate (`calc_speedup`'s formula) where it applies, DenseNet-BC; else None."""
    if model != "densenet" or not bottleneck:
        return None
    return densenet_bc_speedup(width, layers_per_block(depth, bottleneck), t_0, how_scale)


def speedup_estimator(model: str, depth: int, width: Optional[int], how_scale: str,
                      bottleneck: bool = True, num_classes: int = 100):
    """The estimate, as a function of t_0, that drives --const_time and --target-speedup:
    the paper's for DenseNet-BC, the FLOP-based one (continuous limit) for any other model.
    Returns (function, what it is called)."""
    if model == "densenet" and bottleneck:
        return (lambda t_0: paper_speedup(model, depth, width, t_0, how_scale)), "the paper's estimate"
    net = build_model(model, depth, width, num_classes, bottleneck)
    units = net.freeze_units()
    levels = training_flops_by_level(unit_flops(net, units, ESTIMATE_INPUT))
    return (lambda t_0: schedule_speedup(levels, unit_times(len(units), t_0, how_scale))), \
        "the FLOP-based estimate"


def run_estimates(model: nn.Module, units, t_i, total_steps: int, paper: Optional[float]) -> dict:
    """A run's estimates: the paper's (None where it does not apply) and the FLOP-based one
    over the run's real steps; `estimated_speedup` is the first of them that exists."""
    per_unit = unit_flops(model, units, ESTIMATE_INPUT)
    flop = schedule_speedup(training_flops_by_level(per_unit), t_i, total_steps)
    return {"paper_speedup": paper, "flop_speedup": flop,
            "estimated_speedup": paper if paper is not None else flop, "unit_flops": per_unit}
