"""Holds a train.py run at a known step, in processes a test cannot start itself (a grid's runs,
started by reproduce.py): Python imports this module at the start of every process whose
PYTHONPATH holds this directory. With FREEZEOUT_TEST_HOLD_AT=STEP and
FREEZEOUT_TEST_HOLD_DIR=DIR in the environment, a run writes DIR/<its pid> before its training
step STEP (counted from 1) and waits there until a stop signal has reached its stop handler, as
tests/train_paused.py does, so that the test's signal lands at that step however loaded the
machine is. Without them it does nothing (but run any sitecustomize it hides, as Python would
have)."""
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
                while getattr(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), "signum", None) is None:
                    time.sleep(0.01)  # train.py's StopSignals has not heard of a signal yet
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
