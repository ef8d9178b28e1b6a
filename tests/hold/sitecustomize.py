"""Test instruments for processes a test cannot start itself (a grid's runs, started by
reproduce.py; the examples of docs/integrations.md, run as a user runs them): Python imports
this module at the start of every process whose PYTHONPATH holds this directory. Without the
variables below it does nothing (but run any sitecustomize it hides, as Python would have).

- FREEZEOUT_TEST_HOLD_AT=STEP and FREEZEOUT_TEST_HOLD_DIR=DIR hold a train.py run at a known
  step: it writes DIR/<its pid> before its training step STEP (counted from 1) and waits there
  until a stop signal has reached its stop handler, as tests/train_paused.py does, so that the
  test's signal lands at that step however loaded the machine is; with
  FREEZEOUT_TEST_HOLD_UNTIL=FILE, until FILE exists, then trains on.
- FREEZEOUT_TEST_DDP_WATCH=DIR watches the gradient all-reduce of DistributedDataParallel: each
  DDP training forward pass is recorded (whether it syncs gradients, the parameters that require
  them at that moment) with the elements the all-reduce of its backward pass carried (counted by
  a communication hook that then all-reduces as DDP's default does), and at exit each process
  saves those records and its model's parameters to DIR/rank<its rank>.pt."""
import importlib.machinery
import importlib.util
import os
import sys

_here = os.path.realpath(os.path.dirname(__file__))
for _entry in sys.path:
    if os.path.realpath(_entry or os.curdir) != _here:
        _spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [_entry])
        if _spec is not None and _spec.loader is not None:
            _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
            break

if os.environ.get("FREEZEOUT_TEST_HOLD_AT"):
    import importlib.abc
    import signal
    import time
    from pathlib import Path

    def _hold(engine) -> None:
        at, marker = int(os.environ["FREEZEOUT_TEST_HOLD_AT"]), Path(os.environ["FREEZEOUT_TEST_HOLD_DIR"])
        real, calls = engine.train_step, []

        def step(*args):
            calls.append(1)
            if len(calls) == at:
                (marker / str(os.getpid())).write_text(str(at))
                until = os.environ.get("FREEZEOUT_TEST_HOLD_UNTIL")
                while not os.path.exists(until) if until else \
                        getattr(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), "signum", None) is None:
                    time.sleep(0.01)  # the file is not there yet, or train.py's StopSignals has heard no signal
            return real(*args)

        engine.train_step = step

    class _HoldsEngine(importlib.abc.MetaPathFinder):
        """Finds the project's engine module as Python would, and wraps its train_step once
        it is loaded."""

        def find_spec(self, name, path=None, target=None):
            if name != "engine":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                _hold(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _HoldsEngine())

if os.environ.get("FREEZEOUT_TEST_DDP_WATCH"):
    import atexit

    import torch
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    _watched = {"ddp": None, "passes": []}

    def _count(state, bucket):
        if _watched["passes"]:
            _watched["passes"][-1]["all_reduced"] += bucket.buffer().numel()
        return allreduce_hook(None, bucket)

    def _record(module, args):
        if not isinstance(module, DistributedDataParallel) or not (module.training and torch.is_grad_enabled()):
            return
        if _watched["ddp"] is not module:
            _watched["ddp"], _watched["rank"] = module, torch.distributed.get_rank()
            module.register_comm_hook(None, _count)
        _watched["passes"].append({
            "sync": bool(module.require_backward_grad_sync), "all_reduced": 0,
            "training": sum(p.numel() for p in module.module.parameters() if p.requires_grad)})

    torch.nn.modules.module.register_module_forward_pre_hook(_record)

    @atexit.register
    def _save():
        ddp = _watched["ddp"]
        if ddp is None:
            return
        parameters = {name: p.detach().cpu() for name, p in ddp.module.named_parameters()}
        path = os.path.join(os.environ["FREEZEOUT_TEST_DDP_WATCH"], f"rank{_watched['rank']}.pt")
        torch.save({"passes": _watched["passes"], "parameters": parameters}, path)
