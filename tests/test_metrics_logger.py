"""JSONL metrics: whole lines, torn last line skipped on reading and cut before appending."""
import json

import pytest

from metrics_logger import MetricsLogger, read_records, write_records


def test_records_round_trip_and_filter(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsLogger(path) as log:
        log.log("config", lr=0.1, t_i=[0.5, 1.0])
        log.log("epoch", epoch=1, val_err=12.5)
    with MetricsLogger(path) as log:  # append, never truncate
        log.log("epoch", epoch=2, val_err=10.0)
    assert [r["event"] for r in read_records(path)] == ["config", "epoch", "epoch"]
    assert [r["epoch"] for r in read_records(path, "epoch")] == [1, 2]
    assert read_records(path, "config")[0]["t_i"] == [0.5, 1.0]
    assert path.read_text().endswith("\n")


def test_torn_last_line_is_skipped_then_cut_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path) as log:
        log.log("epoch", epoch=1)
    with open(path, "a") as f:
        f.write('{"event": "epoch", "epo')  # a write cut short by a crash
    assert read_records(path) == [{"event": "epoch", "epoch": 1}]
    with MetricsLogger(path) as log:
        log.log("epoch", epoch=2)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_damage_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "a"}\nnot json\n{"event": "b"}\n')
    with pytest.raises(ValueError, match=":2: not a JSON record"):
        read_records(path)


def test_write_records_replaces_atomically(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_records(path, [{"event": "config"}, {"event": "epoch", "epoch": 1}])
    write_records(path, [{"event": "config"}])
    assert read_records(path) == [{"event": "config"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
