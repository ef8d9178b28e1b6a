"""FreezeOut in PyTorch Lightning (`pip install "freezeout[lightning]"`).

The scheduler goes where Lightning keeps schedulers, stepped once per optimizer step and saved
in Lightning's checkpoints; the callback does the rest:

    class Net(L.LightningModule):
        def configure_optimizers(self):
            units = self.model.freeze_units()        # or find_units(self.model, example_input)
            optimizer = torch.optim.SGD(freezeout.param_groups(units), lr=0.1, momentum=0.9)
            scheduler = freezeout.FreezeOut(optimizer, units, total_steps=None, t_0=0.8)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    trainer = L.Trainer(max_epochs=100, strategy="ddp", callbacks=[FreezeOutCallback()])

`FreezeOutCallback`:
- takes T from the trainer (`trainer.estimated_stepping_batches`: optimizer steps after
  gradient accumulation and the split of the data across processes, max_steps or max_epochs),
  read once training starts, when the data and a resumed run's state are in place; a scheduler
  made with another T is refused in one line before the first step;
- under DDP (strategy="ddp", find_unused_parameters False or True), takes each frozen unit out
  of the gradient all-reduce as it freezes (freezeout.ddp); strategies that shard the model
  (FSDP, DeepSpeed) are refused;
- logs every unit's rate in each optimizer step (`freezeout/lr_unit_<i>`, what the optimizer
  used) and the number of frozen units (`freezeout/frozen_units`) to the trainer's loggers,
  every `log_every_n_steps` optimizer steps;
- warns at the end of a run whose optimizer steps were not T.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .schedule import FreezeOut
from .trainers import follow_ddp, group_rates, rate_metrics, take_total_steps, warn_if_not_t

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package of the same code
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise ImportError('freezeout.lightning needs Lightning: pip install "freezeout[lightning]"') from None

__all__ = ["FreezeOutCallback"]


class FreezeOutCallback(pl.Callback):
    """Attaches the FreezeOut scheduler that `configure_optimizers` returns to the trainer: T,
    DDP, logging and the end-of-run check (see the module's docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.scheduler: Optional[FreezeOut] = None
        self._follower = None
        self._rates: Optional[list[float]] = None

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # After configure_optimizers and the DDP wrapper, before a resumed run's states are
        # loaded: the follower then sees the resumed schedule freeze its units.
        self.scheduler = self._find_scheduler(trainer)
        model = trainer.strategy.model
        from torch.nn.parallel import DistributedDataParallel
        if trainer.world_size > 1 and not isinstance(model, DistributedDataParallel):
            raise ValueError(f"FreezeOut under {type(trainer.strategy).__name__}: across several processes only "
                             "DistributedDataParallel is supported (strategy='ddp'), not a strategy that shards "
                             "the model")
        self._follower = follow_ddp(self.scheduler, model if isinstance(model, DistributedDataParallel) else None)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # The data are set up by now (reading the estimate earlier would set them up before a
        # resumed run's loader state is restored).
        take_total_steps(self.scheduler, trainer.estimated_stepping_batches,
                         f"trainer.estimated_stepping_batches, with max_epochs={trainer.max_epochs}, "
                         f"max_steps={trainer.max_steps}, {trainer.num_training_batches} batches an epoch in each "
                         f"of {trainer.world_size} processes, "
                         f"accumulate_grad_batches={trainer.accumulate_grad_batches}")

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.scheduler is not None and _holds(optimizer, self.scheduler.optimizer):
            self._rates = group_rates(optimizer)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._rates is None:  # no optimizer step in this batch (gradient accumulation)
            return
        step, rates, self._rates = trainer.global_step - 1, self._rates, None
        if step % trainer.log_every_n_steps == 0 and trainer.is_global_zero:
            metrics = rate_metrics(self.scheduler, rates)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.scheduler is not None and trainer.is_global_zero:
            warn_if_not_t(self.scheduler, self.scheduler.last_epoch)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self._follower is not None:
            self._follower.remove()
            self._follower = None

    @staticmethod
    def _find_scheduler(trainer: "pl.Trainer") -> FreezeOut:
        configs = [c for c in trainer.lr_scheduler_configs if isinstance(c.scheduler, FreezeOut)]
        if len(configs) != 1:
            found = "two or more FreezeOut schedulers" if configs else "no FreezeOut scheduler"
            raise ValueError(f"FreezeOutCallback: configure_optimizers returned {found}; return one, "
                             "{'optimizer': optimizer, 'lr_scheduler': {'scheduler': FreezeOut(optimizer, units, "
                             "total_steps=None), 'interval': 'step'}}")
        config = configs[0]
        others = [type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs if c is not config
                  and _holds(c.scheduler.optimizer, config.scheduler.optimizer)]
        if others:
            raise ValueError(f"FreezeOutCallback: the FreezeOut scheduler's optimizer has another scheduler too "
                             f"({', '.join(others)}), which would overwrite its rates; return FreezeOut alone")
        if config.interval != "step" or config.frequency != 1:
            raise ValueError(f"FreezeOutCallback: the FreezeOut scheduler is stepped every {config.frequency} "
                             f"{config.interval}(s); FreezeOut steps once per optimizer step: return it with "
                             "'interval': 'step' (and 'frequency': 1)")
        return config.scheduler


def _holds(optimizer, inner: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` is `inner`, or a wrapper of it (Lightning's, accelerate's)."""
    return optimizer is inner or getattr(optimizer, "optimizer", None) is inner
