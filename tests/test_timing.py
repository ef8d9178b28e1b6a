"""timing.py: every second of a run charged to one part, nested parts apart, and train.py's
summary split adding up to the run's wall time."""
import time

import pytest

import train
from conftest import TINY_STEPS_PER_EPOCH, run_train
from metrics_logger import MetricsLogger, read_records
from timing import PARTS, TimeSplit, describe_split


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def tick(self, seconds):
        self.now += seconds


def test_nested_parts_are_charged_apart_and_add_up_to_the_wall_time():
    clock = FakeClock()
    split = TimeSplit(clock)
    clock.tick(2)                                # start-up
    with split.part("checkpoint"):
        clock.tick(0.5)                          # a checkpoint written during start-up
    split.training_starts()
    clock.tick(1)                                # rest
    with split.part("eval"):
        clock.tick(3)
        with split.part("checkpoint"):           # nested: charged to the inner part only
            clock.tick(0.25)
        split.add("data", 0.75)                  # measured by the caller, inside eval's time
        clock.tick(0.75)
    split.add("graphed", 4, steps=10)
    clock.tick(4)
    record = split.record()
    assert record["wall_s"] == 11.5
    assert record["parts"] == {**dict.fromkeys(PARTS, 0.0), "startup": 2, "checkpoint": 0.75, "rest": 1,
                               "eval": 3, "data": 0.75, "graphed": 4}
    assert record["steps"]["graphed"] == 10
    assert sum(record["parts"].values()) == record["wall_s"]


def test_a_split_taken_inside_open_parts_counts_them_up_to_now():
    clock = FakeClock()
    split = TimeSplit(clock)
    with split.part("eval"):
        clock.tick(1)
        with split.part("checkpoint"):
            clock.tick(2)
            record = split.record()
    assert record["parts"]["eval"] == 1 and record["parts"]["checkpoint"] == 2 and record["wall_s"] == 3
    assert sum(record["parts"].values()) == 3


def test_the_line_names_each_part_that_took_time_with_its_steps():
    line = describe_split({"wall_s": 10.0, "parts": {"startup": 1.0, "graphed": 6.0, "eager": 0.5, "capture": 0.25,
                                                     "compile": 0.0, "rest": 0.001},
                           "steps": {"graphed": 600, "eager": 1}})
    assert line == ("time 10.0 s: start-up 1.00 s (10%), eager steps 0.50 s (5%) [1 step, 500.0 ms each], "
                    "graphed steps 6.00 s (60%) [600 steps, 10.0 ms each], captures 0.25 s (2%)")


def test_a_runs_summary_splits_its_wall_time_into_parts_that_add_up(tmp_path, capsys, monkeypatch):
    events = []  # (what happened, when)

    class WatchedSplit(TimeSplit):
        def __init__(self):
            super().__init__()
            events.append(("clock starts", self.start))

        def record(self):
            split = super().record()
            events.append(("clock read", time.perf_counter()))
            return split

    real_parse, real_log = train.parse, MetricsLogger.log

    def parse(*args):
        events.append(("argv parsed", time.perf_counter()))
        return real_parse(*args)

    def log(self, event, **fields):
        record = real_log(self, event, **fields)
        events.append((f"{event} written", time.perf_counter()))
        return record

    monkeypatch.setattr(train, "TimeSplit", WatchedSplit)
    monkeypatch.setattr(train, "parse", parse)
    monkeypatch.setattr(MetricsLogger, "log", log)
    summary = run_train(tmp_path, "--epochs", "2")
    split = summary["time_split"]
    parts, wall = split["parts"], split["wall_s"]
    assert summary == read_records(tmp_path / "run" / "metrics.jsonl", "summary")[0]
    assert sum(parts.values()) == pytest.approx(wall, rel=0.02)
    # The split covers the whole of main, from before its command line is read, but for
    # writing the summary that holds it (an fsync, as long as the disk takes).
    names = [what for what, _ in events]
    assert names[:2] == ["clock starts", "argv parsed"] and names[-2:] == ["clock read", "summary written"]
    assert names.count("clock read") == 1
    started, read = events[0][1], events[-2][1]
    assert names[-3] == "epoch written" and events[-3][1] - started <= wall <= read - started
    assert split["steps"]["eager"] == 2 * TINY_STEPS_PER_EPOCH and split["steps"]["graphed"] == 0
    assert all(parts[p] > 0 for p in ("startup", "eager", "data", "eval", "checkpoint"))
    # What no part names stays small: a tenth of this short run, give or take the 0.2 s a
    # loaded machine may take the process away at any point.
    assert parts["rest"] < 0.1 * wall + 0.2
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == describe_split(split) and out[-2].startswith("time ")

