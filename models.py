"""The model registry: each architecture's paper defaults, `build_model` from plain
arguments, depth checks, display names, and the estimates for a model: the paper's where it
applies (`paper_speedup`), the FLOP-based one otherwise (`speedup_estimator`, `run_estimates`).

    model = build_model("densenet", depth=76, width=12, num_classes=100)

`width` is the architecture's k: DenseNet's growth rate, the Wide ResNet's widening factor;
VGG has none.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from densenet import DenseNet, layers_per_block
from freezeout import ESTIMATE_INPUT, schedule_speedup, training_flops_by_level, unit_flops, unit_times
from messages import setting
from utils import densenet_bc_speedup
from vgg import VGG, config_for_depth
from wrn import WideResNet, blocks_per_group


@dataclass(frozen=True)
class Architecture:
    """One architecture: its paper defaults (depth L, width k; VGG has no k), how its depth is
    checked (ValueError), built and named, its part of a default run name, and the settings
    beyond depth that mean something to it."""
    depth: int
    width: Optional[int]
    check: Callable[[int, bool], None]
    build: Callable[..., nn.Module]
    display: Callable[[int, Optional[int], bool], str]
    run_label: Callable[[int, Optional[int], bool], str]
    settings: tuple = ()


REGISTRY = {
    "densenet": Architecture(
        76, 12, check=lambda depth, bottleneck: layers_per_block(depth, bottleneck),
        build=lambda depth, width, num_classes, bottleneck, reduction, dropout: DenseNet(
            depth=depth, growth_rate=width, num_classes=num_classes, bottleneck=bottleneck, reduction=reduction,
            dropout=dropout),
        display=lambda depth, width, bottleneck: f"DenseNet{'-BC' if bottleneck else ''} L={depth} k={width}",
        run_label=lambda depth, width, bottleneck: f"densenet{'BC' if bottleneck else ''}-L{depth}-k{width}",
        settings=("growth_rate", "bottleneck", "reduction")),
    "wrn": Architecture(
        40, 4, check=lambda depth, bottleneck: blocks_per_group(depth),
        build=lambda depth, width, num_classes, bottleneck, reduction, dropout: WideResNet(
            depth=depth, widen_factor=width, num_classes=num_classes, dropout=dropout),
        display=lambda depth, width, bottleneck: f"WRN-{depth}-{width}",
        run_label=lambda depth, width, bottleneck: f"wrn-{depth}-{width}",
        settings=("growth_rate",)),
    "vgg": Architecture(
        16, None, check=lambda depth, bottleneck: config_for_depth(depth),
        build=lambda depth, width, num_classes, bottleneck, reduction, dropout: VGG(
            depth=depth, num_classes=num_classes, dropout=dropout),
        display=lambda depth, width, bottleneck: f"VGG-{depth} (BN)",
        run_label=lambda depth, width, bottleneck: f"vgg{depth}"),
}
MODELS = tuple(REGISTRY)
DEFAULTS = {name: (a.depth, a.width) for name, a in REGISTRY.items()}  # (depth L, width k)


def resolve_size(model: str, depth: Optional[int], width: Optional[int]) -> tuple[int, Optional[int]]:
    """-L and -k as given, or the architecture's paper defaults (VGG has no k)."""
    default_depth, default_width = DEFAULTS[model]
    depth = default_depth if depth is None else depth
    width = default_width if width is None or REGISTRY[model].width is None else width
    return depth, width


def check_depth(model: str, depth: int, bottleneck: bool = True) -> None:
    """Raise ValueError naming the depth setting for a depth the architecture cannot have."""
    try:
        REGISTRY[model].check(depth, bottleneck)
    except ValueError as e:
        raise ValueError(f"{setting('depth')}: {e}") from None


def build_model(model: str, depth: int, width: Optional[int], num_classes: int,
                bottleneck: bool = True, reduction: float = 0.5, dropout: float = 0.0) -> nn.Module:
    """The architecture `model` ("densenet", "wrn", "vgg"); its `freeze_units()` lists its
    FreezeOut units in forward order."""
    return REGISTRY[model].build(depth, width, num_classes, bottleneck, reduction, dropout)


def model_name(model: str, depth: int, width: Optional[int], bottleneck: bool = True) -> str:
    return REGISTRY[model].display(depth, width, bottleneck)


def applies(setting_name: str, model: str) -> bool:
    """Whether a setting means something to `model` (one that shapes some architecture only)."""
    shaping = {name for a in REGISTRY.values() for name in a.settings}
    return setting_name not in shaping or setting_name in REGISTRY[model].settings


def paper_speedup(model: str, depth: int, width: Optional[int], t_0: float, how_scale: str,
                  bottleneck: bool = True) -> Optional[float]:
    """The paper's estimate (`calc_speedup`'s formula) where it applies, DenseNet-BC; else None."""
    if model != "densenet" or not bottleneck:
        return None
    return densenet_bc_speedup(width, layers_per_block(depth, bottleneck), t_0, how_scale)


def speedup_estimator(model: str, depth: int, width: Optional[int], how_scale: str,
                      bottleneck: bool = True, num_classes: int = 100, reduction: float = 0.5):
    """The estimate, as a function of t_0, that drives --const_time and --target-speedup:
    the paper's for DenseNet-BC, the FLOP-based one (continuous limit) for any other model.
    Returns (function, what it is called)."""
    if model == "densenet" and bottleneck:
        return (lambda t_0: paper_speedup(model, depth, width, t_0, how_scale)), "the paper's estimate"
    architecture = (model, depth, width, num_classes, bottleneck, reduction, 0.0)
    net = build_model(*architecture)
    units = net.freeze_units()
    levels = training_flops_by_level(architecture_unit_flops(architecture, net, units))
    return (lambda t_0: schedule_speedup(levels, unit_times(len(units), t_0, how_scale))), \
        "the FLOP-based estimate"


# Each architecture's units counted once in a process (3.5 s for DenseNet-BC L=76 on a CPU): a
# run's estimate for --target-speedup or --const_time and its own, and the runs of a grid run
# in one process (reproduce.py --jobs 1), count the same model. Keyed by the arguments
# build_model builds it from (FLOPs depend on them alone, not on the weights).
_UNIT_FLOPS: dict[tuple, list] = {}


def architecture_unit_flops(architecture: tuple, model: nn.Module, units) -> list[dict]:
    """`unit_flops` of a model built by `build_model(*architecture)`, counted the first time
    it is asked for."""
    if architecture not in _UNIT_FLOPS:
        _UNIT_FLOPS[architecture] = unit_flops(model, units, ESTIMATE_INPUT)
    return copy.deepcopy(_UNIT_FLOPS[architecture])


def run_estimates(model: nn.Module, units, t_i, total_steps: int, paper: Optional[float],
                  architecture: tuple) -> dict:
    """A run's estimates: the paper's (None where it does not apply) and the FLOP-based one
    over the run's real steps; `estimated_speedup` is the first of them that exists.
    `architecture`: build_model's arguments that made `model`."""
    per_unit = architecture_unit_flops(architecture, model, units)
    flop = schedule_speedup(training_flops_by_level(per_unit), t_i, total_steps)
    return {"paper_speedup": paper, "flop_speedup": flop,
            "estimated_speedup": paper if paper is not None else flop, "unit_flops": per_unit}
