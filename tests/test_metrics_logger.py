"""JSONL metrics: whole lines, torn last line skipped on reading and cut before appending."""
import json

import pytest

from metrics_logger import MetricsLogger, evaluation, read_records, write_records


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


def test_a_failed_write_keeps_the_old_file_leaves_no_temporary_and_says_so_in_one_line(tmp_path):
    import errno

    from metrics_logger import WriteError, write_atomically
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"the last good one")

    def disk_full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    for target, kept in [(path, f"{path} is kept as it was"), (tmp_path / "new.pt", "no new.pt was written")]:
        with pytest.raises(WriteError) as failed:
            write_atomically(target, disk_full)
        assert str(failed.value) == f"cannot write {target}: No space left on device; {kept}"
    assert path.read_bytes() == b"the last good one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no .tmp left
    (tmp_path / "run").write_bytes(b"")  # a file where the run directory would be
    with pytest.raises(WriteError, match=f"^cannot write {tmp_path}/run/metrics.jsonl: File exists$"):
        MetricsLogger(tmp_path / "run" / "metrics.jsonl")


def test_an_epochs_evaluation_is_read_under_either_name():
    """Epoch records name their evaluation by its split (val_* or, under --validate-test,
    test_*); records written before that held the test set's under val_*, and the run's
    eval_mode tells them apart."""
    assert evaluation({"epoch": 1, "val_loss": 1.5, "val_err": 40.0}, "val") == ("val", 1.5, 40.0)
    assert evaluation({"epoch": 1, "test_loss": 1.5, "test_err": 40.0}, "test") == ("test", 1.5, 40.0)
    assert evaluation({"epoch": 1, "val_loss": 1.5, "val_err": 40.0}, "test") == ("test", 1.5, 40.0)  # old file
    assert evaluation({"epoch": 1, "train_loss": 2.0}, "none") is None
