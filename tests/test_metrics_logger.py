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


# -- a full disk under torch.save, and errors that are not the disk's (issue 27) -----------------
class FillsUp:
    """A file on a disk that fills up: writes after the first `room` fail with ENOSPC."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data):
        import errno
        import os
        if self.room == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= 1
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_torch_save_on_a_full_disk_is_a_write_error_naming_the_file_and_the_cause(tmp_path):
    """torch's zip writer turns the ENOSPC of a write into RuntimeError ("[enforce fail at
    inline_container.cc:...] . unexpected pos ..."): it is a WriteError all the same."""
    import torch

    from metrics_logger import WriteError, write_atomically
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"the last good one")
    state = {"w": torch.zeros(100_000)}
    with pytest.raises(WriteError) as failed:
        write_atomically(path, lambda f: torch.save(state, FillsUp(f, 3)))
    assert str(failed.value) == f"cannot write {path}: No space left on device; {path} is kept as it was"
    assert isinstance(failed.value.__context__, RuntimeError)  # what torch raised
    assert path.read_bytes() == b"the last good one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


TORCH_FAILED = "[enforce fail at inline_container.cc:672] . unexpected pos 247680 vs 247576"


@pytest.mark.parametrize("file_system,cause", [
    ("full", "No space left on device"), ("read-only", "Read-only file system"),
    ("fine", f"torch's writer failed ({TORCH_FAILED})")])
def test_torch_writer_error_without_an_oserror_asks_the_file_system(tmp_path, monkeypatch, file_system, cause):
    import os

    from metrics_logger import WriteError, write_atomically
    real_statvfs = os.statvfs

    def statvfs(path):
        s = real_statvfs(path)
        free = 0 if file_system == "full" else max(s.f_bfree, 1 << 20)
        flag = s.f_flag | os.ST_RDONLY if file_system == "read-only" else s.f_flag & ~os.ST_RDONLY
        return os.statvfs_result((s.f_bsize, 4096, s.f_blocks, free, free, *s[5:8], flag, s.f_namemax))

    def torch_fails(f):
        f.write(b"PK\x03\x04")
        raise RuntimeError(TORCH_FAILED)

    monkeypatch.setattr(os, "statvfs", statvfs)
    with pytest.raises(WriteError) as failed:
        write_atomically(tmp_path / "checkpoint.pt", torch_fails)
    assert str(failed.value) == f"cannot write {tmp_path / 'checkpoint.pt'}: {cause}; no checkpoint.pt was written"
    assert list(tmp_path.iterdir()) == []


def test_the_oserror_behind_torchs_error_is_the_cause_as_cause_or_context(tmp_path):
    import errno

    from metrics_logger import io_cause
    try:
        raise OSError(errno.EROFS, "Read-only file system")
    except OSError as e:
        error = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        error.__cause__ = e
    assert io_cause(error, tmp_path) == "Read-only file system"
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError:
            raise RuntimeError(TORCH_FAILED)  # noqa: B904 (the context alone, as torch leaves it)
    except RuntimeError as e:
        assert io_cause(e, tmp_path) == "Disk quota exceeded"


@pytest.mark.parametrize("bug", [ValueError("a bad value"), TypeError("not a tensor"),
                                 RuntimeError("a RuntimeError of the caller's own")])
def test_an_error_that_is_not_a_failed_write_is_raised_as_it_is(tmp_path, bug):
    from metrics_logger import write_atomically
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"the last good one")

    def fails(f):
        f.write(b"half")
        raise bug

    with pytest.raises(type(bug)) as raised:
        write_atomically(path, fails)
    assert raised.value is bug
    assert path.read_bytes() == b"the last good one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left


def test_a_record_that_does_not_fit_is_cut_off_and_the_records_before_it_kept(tmp_path):
    from metrics_logger import WriteError
    path = tmp_path / "metrics.jsonl"
    log = MetricsLogger(path)
    log.log("epoch", epoch=1)
    before = path.read_bytes()
    real = log._file

    class HalfThenFull:  # the disk takes half the line, then nothing
        def __init__(self):
            self.calls = 0

        def write(self, data):
            import errno
            self.calls += 1
            if self.calls == 1:
                return real.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(real, name)

    log._file = HalfThenFull()
    with pytest.raises(WriteError) as failed:
        log.log("epoch", epoch=2, train_loss=1.0)
    assert str(failed.value) == (f"cannot append the epoch record to {path}: No space left on device; the records "
                                 f"before it are kept")
    assert path.read_bytes() == before  # no torn line
    log._file = real
    log.close()  # nothing buffered to flush again
    with MetricsLogger(path) as log:
        log.log("epoch", epoch=2)
    assert [r["epoch"] for r in read_records(path)] == [1, 2]
