"""Train a network with FreezeOut: layer-wise cosine annealing, then freezing.

    python train.py                         # the paper's job: DenseNet-BC k=12 L=76, CIFAR-100,
                                            # cubic, scaled, t_0 = 0.8, 100 epochs
    python train.py --dataset synthetic --which_dataset 10 --subset 5000 -L 16 --epochs 4 --device cpu
    python train.py --t_0 1                 # the baseline: plain cosine annealing, no freezing

Every run writes `OUT_DIR/NAME/metrics.jsonl` (a `config` record first, one `epoch` record per
epoch, a `summary` record last) and `OUT_DIR/NAME/checkpoint.pt` as it starts (step 0) and after
every epoch. SIGINT or SIGTERM stop it after the current step with a checkpoint (exit code
130 / 143); `--resume` continues it exactly where it stopped, whatever stopped it. `python
train.py -h` lists the flags with their defaults.

This file is the recipe: parse -> the run directory -> data -> model -> plan -> training and its
step -> start or resume -> the epoch loop -> summary. The settings are config.py's, the run directory
rundir.py's, the plan (what this process decides) plan.py's; the machinery lives in engine.py,
graphs.py, checkpoint.py, loaders.py, data_sets.py and models.py.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.distributed
from tqdm import tqdm

from cli import examples, run_as_script
from config import ignored_flags_note, parse, resolve
from engine import (
    NO_STEP,
    EpochPosition,
    StopSignals,
    build_training,
    evaluate,
    replicas_agree,
    resolve_device,
    seed_everything,
    start_process,
    stop_or_diverged,
    train_one_epoch,
)
from loaders import load_data, make_loaders
from models import build_model
from plan import epoch_line, header, make_plan, make_step
from rundir import RunDir
from timing import TimeSplit, describe_split, load_average


def main(argv=None, *, resume_hint: bool = True) -> dict:
    """Train as the command line says; return the run's summary record. A run that stops early
    raises SystemExit after one line on stderr ending, where it can be continued, with the
    command that continues it (a caller that continues runs its own way, as reproduce.py,
    passes resume_hint=False)."""
    clock = TimeSplit()  # where this process's time goes, from here to the summary
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, request, typed = parse(argv, "Train a network with FreezeOut (Brock et al. 2017).", examples(__doc__))
    try:
        cfg = resolve(request, typed)
        device = resolve_device(cfg.device)
    except ValueError as e:  # a flag value no run can use
        parser.error(str(e))
    dist, device = start_process(device, cfg.dist_timeout)
    note = ignored_flags_note(cfg.model, {name: getattr(cfg, name) for name in typed})
    if note and dist.is_main:
        parser.say(note, error=False)
    try:
        with RunDir(cfg, dist) as run, run.failures(parser, resume_hint):
            opened = run.open(cfg, typed, argv)
            run.cfg = cfg = opened.cfg  # a resumed run goes on with its own settings
            if opened.finished is not None:
                if dist.is_main:
                    print(f"{run.path} has already finished; nothing to resume")
                return opened.finished
            if opened.notice is not None and dist.is_main:
                print(opened.notice, flush=True)
            # data -> model -> plan -> training and its step
            seed_everything(cfg.seed)
            splits = load_data(dist, cfg.dataset, cfg.data_root, cfg.eval_mode, cfg.subset, cfg.synthetic_classes,
                               cfg.seed)
            model = build_model(cfg.model, cfg.depth, cfg.growth_rate, splits.num_classes, cfg.bottleneck,
                                cfg.reduction, cfg.dropout)
            try:
                plan = make_plan(cfg, model, splits, dist, device, opened.saved)  # what this process decides
            except ValueError as e:  # CUDA graphs asked for where they cannot run
                parser.error(str(e))
            run.per_epoch = plan.steps_per_epoch
            training = build_training(
                model, device, plan.total_steps, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                t_0=cfg.t_0, how_scale=cfg.how_scale, scale_lr=cfg.scale_lr, amp=plan.amp_effective,
                channels_last=cfg.channels_last, dist=dist, fused=True if plan.training_step == "graphed" else None)
            make_step(cfg, training, plan)
            record = run.config_record(cfg, opened.argv, plan)
            # start or resume -> the epoch loop -> the test set -> summary
            progress = run.begin(opened, record, training)
            loaders = make_loaders(splits, plan.loader_used, cfg.batch_size, device, augment=cfg.augment,
                                   eval_mode=cfg.eval_mode, workers=plan.workers, seed=cfg.seed, rank=dist.rank,
                                   world_size=dist.world_size)
            if dist.is_main:
                print(header(record, splits), flush=True)
            with run.records() as log:
                train_time, last_eval = fit(run, training, record, loaders, progress, log, clock)
                test_loss, test_err = test(run, training, loaders[2], last_eval, clock)
                summary = log.log(
                    "summary", epochs=cfg.epochs, steps=training.scheduler.total_steps, train_time_s=train_time,
                    val_err=run.val_err(last_eval), test_loss=test_loss, test_err=test_err,
                    estimated_speedup=plan.estimated_speedup, paper_speedup=cfg.paper_speedup,
                    flop_speedup=plan.flop_speedup, frozen_at=training.scheduler.frozen_at, load_end=load_average(),
                    time_split=clock.record())
            if dist.is_main:
                print(describe_split(summary["time_split"]))
                print(f"done: test error {test_err:.2f}%, training time {train_time:.1f} s; results in {run.path}")
            return summary
    finally:
        if dist.enabled:
            torch.distributed.destroy_process_group()


def fit(run: RunDir, training, record: dict, loaders, progress, log, clock: TimeSplit) -> tuple[float, tuple]:
    """The epoch loop: train, evaluate, log and checkpoint every epoch; a stop signal writes a
    checkpoint (inside the epoch if need be) and raises Stopped. Returns the training time and
    the last evaluation (loss, error), (None, None) without one. `clock` is charged each part."""
    train_loader, eval_loader, _ = loaders
    dist, scheduler, per_epoch, epochs = training.dist, training.scheduler, run.per_epoch, record["epochs"]
    last_eval, cuda = (None, None), training.device.type == "cuda"
    clock.training_starts()
    with StopSignals() as stop:
        train_time, position = progress.train_time_s, progress.position
        for epoch in range(progress.epochs_done + 1, epochs + 1):
            step_fn = training.step
            before = (step_fn.captures, step_fn.capture_time_s, step_fn.eager_steps)
            if cuda:
                torch.cuda.reset_peak_memory_stats(training.device)
            stopped = train_one_epoch(training, train_loader, position, per_epoch, stop,
                                      desc=f"epoch {epoch}/{epochs}", clock=clock)
            step = (epoch - 1) * per_epoch + position.batch
            if stopped:
                with clock.part("checkpoint"):
                    run.save(training, record, epoch - 1, step, train_time, position)
                raise run.stopped(stop.signum, f"in epoch {epoch} after step {step} of {scheduler.total_steps}")
            stats = position.stats()
            train_time += stats["train_time_s"]
            logged = {"epoch": epoch, "step": step, **stats, "training_step": record["training_step"],
                      "captures": step_fn.captures - before[0], "capture_time_s": step_fn.capture_time_s - before[1],
                      "eager_steps": step_fn.eager_steps - before[2]}
            if cuda:  # the epoch's training peaks: what the frozen units no longer need is given back
                logged.update(cuda_max_allocated=torch.cuda.max_memory_allocated(training.device),
                              cuda_max_reserved=torch.cuda.max_memory_reserved(training.device))
            if not replicas_agree(training):
                raise run.error("the processes' weights differ: the replicas fell out of step")
            if eval_loader is not None:
                started = time.perf_counter()
                with clock.part("eval"):
                    last_eval = evaluate(training, eval_loader)
                split = "val" if record["eval_mode"] == "val" else "test"  # the records name what they hold
                logged.update({f"{split}_loss": last_eval[0], f"{split}_err": last_eval[1],
                               "eval_time_s": time.perf_counter() - started})
            logged.update(frozen_units=scheduler.num_frozen, active_units=len(training.units) - scheduler.num_frozen,
                          lr=[float(lr) for lr in scheduler.get_last_lr()])
            with clock.part("checkpoint"):  # the epoch's writes: its record, then its checkpoint
                log.log("epoch", **logged)
                run.save(training, record, epoch, step, train_time, None)
            if dist.is_main:
                tqdm.write(epoch_line(logged, record))
            position = EpochPosition(epoch + 1)
            if epoch < epochs and stop_or_diverged(torch.tensor(NO_STEP, device=training.device), stop, dist):
                raise run.stopped(stop.signum, f"after epoch {epoch}")
    return train_time, last_eval


def test(run: RunDir, training, test_loader, last_eval: tuple, clock: TimeSplit) -> tuple[float, float]:
    """(loss, error) on the test set: the last evaluation where it was this same test pass."""
    with StopSignals() as stop:  # a stop now: the last checkpoint is the run's end
        if run.cfg.eval_mode == "test" and last_eval[0] is not None:
            result = last_eval
        else:
            with clock.part("eval"):
                result = evaluate(training, test_loader)
        if stop_or_diverged(torch.tensor(NO_STEP, device=training.device), stop, training.dist):
            raise run.stopped(stop.signum, "during the final evaluation (continuing it evaluates the test set and "
                                           "writes the summary)")
    return result


if __name__ == "__main__":
    run_as_script(main)
