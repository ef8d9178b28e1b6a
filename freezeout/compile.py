"""FreezeOut under torch.compile: room for one compile per freeze level.

Freezing a unit changes what the compiled forward must do (its parameters stop requiring
gradients, its batch norms switch to running statistics), and dynamo guards on both, so every
freeze level is compiled once: that is the point, the new graph leaves the frozen prefix out
of autograd. A run with N units has up to N levels, and dynamo falls back to running a frame
eagerly, for good and with a log line only, once it was compiled more than
`torch._dynamo.config.recompile_limit` times (8 by default). FreezeOut therefore raises that
limit (never lowers it) to 2 * N + 8: a training and an evaluation graph per level, plus
dynamo's default margin for recompiles of the user's own (a last partial batch, ...). The
recompiles are bounded by the number of units and each one is wanted, which is not the storm
the limit exists to stop; grouping units into fewer levels would give up speed, and a warning
would leave every user to find the setting.
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch
from torch import nn

# Recompiles of the user's own allowed on top of FreezeOut's: dynamo's own default limit.
MARGIN = 8


def compiles_needed(n_units: int) -> int:
    """Compiles of one frame that a run with `n_units` units may need."""
    return 2 * n_units + MARGIN


def allow_a_compile_per_freeze_level(n_units: int) -> None:
    """Raise dynamo's recompile limits to `compiles_needed(n_units)` where they are lower.

    Does nothing while dynamo is not imported (nothing was compiled: a model compiled later
    gets here again at the first freeze, before its first recompile)."""
    config = sys.modules.get("torch._dynamo.config")
    if config is None:
        return
    needed = compiles_needed(n_units)
    # recompile_limit was called cache_size_limit before torch 2.6.
    for names in (("recompile_limit", "cache_size_limit"),
                  ("accumulated_recompile_limit", "accumulated_cache_size_limit")):
        name = next((n for n in names if hasattr(config, n)), None)
        if name is not None and getattr(config, name) < needed:
            setattr(config, name, needed)


def compile_model(model: nn.Module, units: Sequence, **compile_options) -> nn.Module:
    """`torch.compile(model, **compile_options)` with room for a compile per freeze level of
    `units`: for code that freezes units itself (with `freeze`) rather than through the
    FreezeOut scheduler, which makes the room on its own."""
    compiled = torch.compile(model, **compile_options)  # imports torch._dynamo
    allow_a_compile_per_freeze_level(len(units))
    return compiled
