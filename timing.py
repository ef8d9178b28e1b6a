"""Where a run's wall time goes: `TimeSplit`, a clock that charges every second of a process to
one part (start-up, the training steps by kind, waiting for data, evaluation, checkpoints,
captures and compiles, the rest), so that the parts add up to the wall time.

Parts nest: time spent in an inner part (a checkpoint written during start-up) is charged to
it, not to the part around it. On a GPU the host runs ahead of the device and waits for it
only at the loop's reads (the progress bar's, the epoch's end): a step's part is the host's
time from the end of its batch's fetch to the start of the next fetch, so the device time of
the queued steps is charged to the steps that were waiting for it (the same kind of step, but
where the kind changes). Reading the clock never waits for the device.
"""
from __future__ import annotations

import contextlib
import os
import time

# The parts, in the order the summary line names them. The step kinds: "eager" (PyTorch kernel
# by kernel, warm-up and short levels of the graphed step included), "graphed" (a CUDA graph
# replayed), "compiled" (torch.compile's code); "compile" is a step that compiled (its whole
# time), "capture" a graph's capture.
STEP_KINDS = ("eager", "graphed", "compiled")
PARTS = ("startup", *STEP_KINDS, "data", "eval", "checkpoint", "capture", "compile", "rest")
NAMES = {"startup": "start-up", **{kind: f"{kind} steps" for kind in STEP_KINDS}, "data": "data wait",
         "eval": "evaluation", "checkpoint": "checkpoints", "capture": "captures", "compile": "compiles",
         "rest": "rest"}


class TimeSplit:
    """Every second from construction to `record()`, charged to one part. The base part is
    "startup" until `training_starts()`, "rest" after it; `part(name)` charges a block to
    `name`; `add(name, seconds)` charges seconds measured by the caller (inside the current
    part: they are taken from it)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.steps = dict.fromkeys((*STEP_KINDS, "compile"), 0)
        self.start = clock()
        # The open parts, outermost first: [name, when it opened, seconds charged inside it].
        self.stack = [["startup", self.start, 0.0]]

    def _close(self, frame, now: float) -> float:
        name, opened, inner = frame
        self.seconds[name] += now - opened - inner
        return now - opened

    def training_starts(self) -> None:
        """Start-up ends: what the base part charges from now on is "rest"."""
        now = self.clock()
        base = self.stack[0]
        self._close(base, now)
        self.stack[0] = ["rest", now, 0.0]

    @contextlib.contextmanager
    def part(self, name: str):
        frame = [name, self.clock(), 0.0]
        self.stack.append(frame)
        try:
            yield
        finally:
            self.stack.pop()
            self.stack[-1][2] += self._close(frame, self.clock())

    def add(self, name: str, seconds: float, steps: int = 0) -> None:
        self.seconds[name] += seconds
        self.stack[-1][2] += seconds
        if steps:
            self.steps[name] += steps

    def wall_s(self) -> float:
        return self.clock() - self.start

    def record(self) -> dict:
        """The split so far, as the summary record holds it: `wall_s`, `parts` (seconds per
        part, the base part counted up to now) and `steps` (optimizer steps per kind)."""
        now = self.clock()
        parts, nested = dict(self.seconds), 0.0
        for name, opened, inner in reversed(self.stack):  # the open parts, up to now
            parts[name] += now - opened - inner - nested
            nested = now - opened
        return {"wall_s": now - self.start, "parts": parts, "steps": dict(self.steps)}


def describe_split(split: dict) -> str:
    """One line: the wall time and each part that took time, with the steps of each kind and
    their rate."""
    wall, parts, steps = split["wall_s"], split["parts"], split["steps"]
    words = []
    for name in PARTS:
        seconds = parts.get(name, 0.0)
        count = steps.get(name, 0)
        if seconds < 0.005 and not count:
            continue
        word = f"{NAMES[name]} {seconds:.2f} s" + (f" ({seconds / wall:.0%})" if wall > 0 else "")
        if count:
            rate = f", {1000 * seconds / count:.1f} ms each" if name != "compile" else ""
            word += f" [{count} step{'' if count == 1 else 's'}{rate}]"
        words.append(word)
    return f"time {wall:.1f} s: " + ", ".join(words)


def load_average() -> float | None:
    """The host's 1-minute load average (None where the OS has none): a busy host makes a
    run's times, and the speedups measured from them, unreliable."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
