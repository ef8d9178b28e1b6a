"""`--compile`: the eager training step with the model compiled by torch.compile.

FreezeOut recompiles the model once per freeze level (freezing changes what autograd must
record); the first step of each level compiles, and is counted and timed as a CUDA-graphed run
counts its captures: `captures` (compiles) and `capture_time_s` (that first step, its compile
included) in each epoch record. The very first step of a run is eager (`eager_steps` 1), so
that FreezeOut's check of the units' forward order sees the modules run. The library makes
room in dynamo's recompile limit for every level (freezeout/compile.py), so no level silently
runs eagerly. Only the model's forward (and through it the backward) is compiled; the loss,
the optimizer and the scheduler run as in the eager step. With CUDA graphs as well, the
graphed step captures the compiled forward (`compiled_forward`): each level is compiled in one
uncaptured step, then captured.
"""
from __future__ import annotations

import time

import torch

from engine import EagerStep, Training, train_step
from freezeout import compile_model


class CompiledStep(EagerStep):
    """The training step through `torch.compile(model)`: one compile per freeze level, timed."""

    def __init__(self, training: Training, **compile_options):
        super().__init__(training)
        self.compile_options = compile_options
        self._source, self._compiled = None, None  # the module the step runs, compiled
        self._level = None                          # the freeze level of the last step

    def _compiled_for(self, model: torch.nn.Module) -> torch.nn.Module:
        # The module the step runs is the same all run (the model, or its one DDP wrapper).
        if model is not self._source:
            self._source = model
            self._compiled = compile_model(model, self.training.units, **self.compile_options)
        return self._compiled

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = self.training
        x = x.to(t.device, non_blocking=True, memory_format=t.memory_format)
        y = y.to(t.device, non_blocking=True)
        if t.scheduler.checking_order:  # the first step of a run: eagerly, so that it is checked
            self.last_kind = "eager"
            return super().__call__(x, y)
        model = self._compiled_for(t.ddp.module_for(t.scheduler))
        if t.scheduler.num_frozen == self._level:
            self.last_kind = "compiled"
            return train_step(model, x, y, t.optimizer, t.scaler, self.autocast)
        self._level = t.scheduler.num_frozen  # a new level: this step compiles
        self.last_kind = "compile"
        started = time.perf_counter()
        loss = train_step(model, x, y, t.optimizer, t.scaler, self.autocast)
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
        self.captures += 1
        self.capture_time_s += time.perf_counter() - started
        return loss


def compiled_forward(training: Training, **compile_options):
    """The model's forward for the graphed step under --compile: eager while FreezeOut still
    checks the units' order (the run's first step), compiled from then on."""
    compiled = compile_model(training.model, training.units, **compile_options)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return (training.model if training.scheduler.checking_order else compiled)(x)

    return forward
