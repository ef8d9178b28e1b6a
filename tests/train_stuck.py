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

from train_paused import train_with  # noqa: E402  (this directory is on the path: a script's own)

from cli import run_as_script  # noqa: E402


def main() -> None:
    stuck_at, stuck_rank = int(sys.argv[1]), int(sys.argv[2])

    def get_stuck(n: int) -> None:
        if n == stuck_at and int(os.environ["RANK"]) == stuck_rank:
            while True:  # stuck, until torchrun ends it
                time.sleep(0.05)
                if getattr(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), "signum", None):
                    raise SystemExit(143)

    train_with(get_stuck, sys.argv[3:])


if __name__ == "__main__":
    run_as_script(main)
