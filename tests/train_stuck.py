"""train.py's main in a torchrun process of its own, in which rank RANK stops answering before
training step STEP (counted from 1) as a stuck process would, until a stop signal ends it:
the other ranks then wait at their next collective.

    python tests/train_stuck.py STEP RANK [train.py arguments]
"""
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
import train  # noqa: E402


def main() -> None:
    stuck_at, stuck_rank = int(sys.argv[1]), int(sys.argv[2])
    real, calls = engine.train_step, []

    def step(*args):
        calls.append(1)
        if len(calls) == stuck_at and int(os.environ["RANK"]) == stuck_rank:
            while True:  # stuck, until torchrun ends it
                time.sleep(0.05)
                if getattr(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), "signum", None):
                    raise SystemExit(143)
        return real(*args)

    engine.train_step = step
    train.main(sys.argv[3:])


if __name__ == "__main__":
    main()
