"""FreezeOut in the Hugging Face Trainer (`pip install "freezeout[hf]"`).

The scheduler is the Trainer's own (`optimizers=(optimizer, scheduler)`), stepped once per
optimizer step and saved in the Trainer's checkpoints (scheduler.pt); the callback does the rest:

    units = [model.bert.embeddings, *model.bert.encoder.layer, [model.bert.pooler, model.classifier]]
    optimizer = torch.optim.AdamW(freezeout.param_groups(units), lr=5e-4)
    scheduler = freezeout.FreezeOut(optimizer, units, total_steps=None, t_0=0.8)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      optimizers=(optimizer, scheduler), callbacks=[FreezeOutCallback()])

`FreezeOutCallback`:
- takes T from the Trainer (`state.max_steps`: optimizer steps after gradient accumulation and
  the split of the data across processes, from max_steps or num_train_epochs); a scheduler
  made with another T is refused in one line before the first step;
- under DDP (torchrun; `ddp_find_unused_parameters` False or True), takes each frozen unit out
  of the gradient all-reduce as it freezes (freezeout.ddp, on the DDP module the Trainer runs);
  DeepSpeed, FSDP and `ddp_static_graph=True` are refused;
- steps the scheduler where the Trainer skipped it (an fp16 step that overflowed), so that it
  stays at the Trainer's global step, as T counts;
- logs every unit's rate in the last optimizer step (`freezeout/lr_unit_<i>`) and the number of
  frozen units (`freezeout/frozen_units`), and makes `learning_rate` the output unit's rate
  (the Trainer logs the first param group's, unit 0's, 0 from its freeze on); these reach the
  Trainer's log history and every reporting integration (TensorBoard, W&B, ...);
- warns at the end of a run whose optimizer steps were not T.
"""
from __future__ import annotations

import sys
from typing import Optional

from .schedule import FreezeOut
from .trainers import follow_ddp, group_rates, rate_metrics, take_total_steps, warn_if_not_t

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler
except ImportError:
    raise ImportError('freezeout.hf needs the Hugging Face Trainer: pip install "freezeout[hf]"') from None

__all__ = ["FreezeOutCallback"]


class FreezeOutCallback(TrainerCallback):
    """Attaches the Trainer's FreezeOut scheduler: T, DDP, logging and the end-of-run check (see
    the module's docstring)."""

    def __init__(self) -> None:
        self.scheduler: Optional[FreezeOut] = None
        self._follower = None
        self._rates: Optional[list[float]] = None
        self._logged: Optional[list[float]] = None

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if not isinstance(lr_scheduler, FreezeOut):
            raise ValueError(f"FreezeOutCallback: the Trainer's scheduler is {type(lr_scheduler).__name__}, not "
                             "FreezeOut; give it one: Trainer(..., optimizers=(optimizer, FreezeOut(optimizer, units, "
                             "total_steps=None)))")
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise ValueError("FreezeOut with DeepSpeed or FSDP: they shard the model, and only DistributedDataParallel "
                             "is supported across several processes; train without deepspeed/fsdp")
        if getattr(args, "ddp_static_graph", None):
            raise ValueError("FreezeOut under DDP: ddp_static_graph=True tells DDP that the same parameters train in "
                             "every step, which freezing changes; set ddp_static_graph=False")
        take_total_steps(lr_scheduler, state.max_steps,
                         f"state.max_steps, with max_steps={args.max_steps}, num_train_epochs={args.num_train_epochs}, "
                         f"gradient_accumulation_steps={args.gradient_accumulation_steps}, {args.world_size} "
                         "processes")
        self.scheduler = lr_scheduler
        self._follower = follow_ddp(lr_scheduler)
        self._go_first()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.scheduler is not None:
            self._rates = group_rates(optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        if self.scheduler is None:
            return
        # The Trainer does not step the scheduler after an fp16 step that overflowed; T counts it.
        while self.scheduler.last_epoch < state.global_step:
            self.scheduler.step()
        self._logged, self._rates = self._rates, None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.scheduler is None or logs is None or "learning_rate" not in logs or self._logged is None:
            return  # not a training log
        metrics = rate_metrics(self.scheduler, self._logged)
        metrics["learning_rate"] = self._logged[-1]
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self.scheduler is not None and state.is_world_process_zero:
            warn_if_not_t(self.scheduler, state.global_step)
        if self._follower is not None:
            self._follower.remove()
            self._follower = None

    def _go_first(self) -> None:
        """Move this callback to the front of the Trainer's list: the Trainer puts the reporting
        integrations (TensorBoard, W&B, ...) before the callbacks it is given, and each reads the
        logs as they are when its turn comes. The list is the CallbackHandler's that is calling
        on_train_begin; where it cannot be found, the rates still reach the log history."""
        frame = sys._getframe(1)
        for _ in range(4):
            handler = frame.f_locals.get("self") if frame is not None else None
            if isinstance(handler, CallbackHandler) and self in handler.callbacks:
                handler.callbacks.remove(self)
                handler.callbacks.insert(0, self)
                return
            frame = frame.f_back if frame is not None else None
