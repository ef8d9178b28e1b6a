"""train.py's main in a process of its own that pauses before training step STEP (counted from
1 over the whole run) until a signal has reached the run's stop handler, so that a test knows
exactly where its signal lands, without guessing how long anything takes. Before pausing it
writes MARKER; STEP 0 never pauses. With TRAIN_PAUSED_UNTIL=FILE in its environment it waits
instead until FILE exists, then trains on (a run held at a known point while a test checks
what others do meanwhile).

    python tests/train_paused.py STEP MARKER [train.py arguments]
"""
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
import train  # noqa: E402
from cli import run_as_script  # noqa: E402


def train_with(before_step, argv: list) -> None:
    """train.py's main on `argv`, calling before_step(n) before training step n (from 1)."""
    real, calls = engine.train_step, []

    def step(*args):
        calls.append(1)
        before_step(len(calls))
        return real(*args)

    engine.train_step = step
    train.main(argv)


def main() -> None:
    pause_at, marker = int(sys.argv[1]), Path(sys.argv[2])
    until = os.environ.get("TRAIN_PAUSED_UNTIL")

    def pause(n: int) -> None:
        if n == pause_at:
            marker.write_text(str(pause_at))
            while until and not Path(until).exists():
                time.sleep(0.01)
            if until:
                return
            handler = signal.getsignal(signal.SIGTERM)  # train.py's StopSignals while training
            while getattr(getattr(handler, "__self__", None), "signum", None) is None:
                time.sleep(0.01)  # until the signal has arrived (SIGKILL ends the process here)

    train_with(pause, sys.argv[3:])


if __name__ == "__main__":
    run_as_script(main)
