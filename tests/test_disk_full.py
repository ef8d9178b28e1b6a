"""A full disk or a read-only file system under a run (issue 27): every write that fails (the
config record, a checkpoint, an epoch record, the summary, a figure) ends the run with one line
naming the file and the cause, and the command that continues it; exit 1; no temporary file
left; the last good checkpoint kept; and `--resume`, once there is room again, ends the run as
if it had never stopped. A `--resume` on a read-only file system is refused before training.

On a real small file system (a tmpfs, mounted where the tests run as root; skipped with the
reason otherwise) and by fault injection (files whose writes fail with ENOSPC after a number of
writes, as a full disk's do) everywhere."""
from __future__ import annotations

import builtins
import contextlib
import errno
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import engine
import metrics_logger
import plot
import rundir
import train
from conftest import ROOT, TINY, epochs_logged, final_state, same_state, tiny_argv
from metrics_logger import read_records

pytestmark = pytest.mark.slow  # the tests below run train.py end to end

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
READ_ONLY = os.strerror(errno.EROFS)  # "Read-only file system"
RUN = [*TINY, "--epochs", "2", "--dropout", "0.1", "--t_0", "0.5"]  # 2 epochs of 6 steps


# -- what a run that stopped said, and what its records hold -----------------------------------
PROGRESS_BAR = re.compile(r"\s*epoch \d+/\d+:")  # tqdm's bar, on stderr while an epoch runs


def message_lines(err: str) -> list[str]:
    """The lines of stderr other than the progress bars' (drawn over each other with \\r)."""
    return [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS_BAR.match(line)]


def one_line(err: str, prog: str = "train.py") -> str:
    """stderr's one message line: there is exactly one, and no traceback. In this process the
    program is named after pytest's entry point: the line is given as `prog` would print it."""
    lines = message_lines(err)
    assert "Traceback" not in err and len(lines) == 1, err
    return re.sub(r"^\S+: error: ", f"{prog}: error: ", lines[0])


# Fields that differ between two runs of the same settings: times, the host's load, where the run is.
TIMING = {"train_time_s", "images_per_s", "eval_time_s", "capture_time_s", "load_start", "load_end",
          "host", "cpu_count", "time_split"}
PLACE = {"run_dir", "out_dir", "argv"}


def comparable(run_dir: Path) -> list[dict]:
    """A run's records without their timing fields and without where the run directory is."""
    records = []
    for r in read_records(run_dir / "metrics.jsonl"):
        r = {k: v for k, v in r.items() if k not in TIMING | PLACE}
        if "args" in r:
            r["args"] = {k: v for k, v in r["args"].items() if k != "out_dir"}
        records.append(r)
    return records


def differences(run_dir: Path, whole: Path) -> list[str]:
    """Where two runs' records differ (timing fields and the run directory aside), as
    'record index: field', for a failure to say which."""
    a, b = comparable(run_dir), comparable(whole)
    if len(a) != len(b):
        return [f"{len(a)} records against {len(b)}"]
    return [f"{i}: {k}" for i, (x, y) in enumerate(zip(a, b, strict=True)) for k in sorted(x.keys() | y.keys())
            if x.get(k) != y.get(k)]


def assert_same_run(run_dir: Path, whole: Path) -> None:
    assert differences(run_dir, whole) == []
    assert [r["event"] for r in read_records(run_dir / "metrics.jsonl")] == ["config", "epoch", "epoch", "summary"]
    assert same_state(final_state(run_dir), final_state(whole))


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*.tmp"))


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The tiny run, uninterrupted: what every run that was stopped by a full disk and resumed
    must equal."""
    out = tmp_path_factory.mktemp("whole")
    train.main([*RUN, "--out-dir", str(out), "--name", "run"])
    return out / "run"


# -- a full disk, by fault injection -------------------------------------------------------------
class FillsUp:
    """A file on a disk that fills up: its `fail_at`-th write writes half of what it is given,
    then fails with ENOSPC, and so does every write after it."""

    def __init__(self, file, fail_at: int):
        self._file, self.writes, self.fail_at = file, 0, fail_at

    def write(self, data) -> int:
        self.writes += 1
        if self.writes >= self.fail_at:
            data = bytes(data)
            if self.writes == self.fail_at and len(data) > 1:
                self._file.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, NO_SPACE)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def disk_fills(monkeypatch, file_name: str, opening: int, fail_at: int) -> list:
    """The disk fills while a file named `file_name` is written (through its temporary file, or
    appended to) the `opening`-th time: that opening's `fail_at`-th write fails with ENOSPC.
    Returns the paths opened, for the test to check the failure happened where it meant."""
    real_open, opened = builtins.open, []

    def opens(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if Path(path).name in (file_name, file_name + ".tmp") and ("w" in mode or "a" in mode):
            opened.append(path)
            if len(opened) == opening:
                return FillsUp(f, fail_at)
        return f

    monkeypatch.setattr(metrics_logger, "open", opens, raising=False)  # write_atomically's, MetricsLogger's
    return opened


# Which write fails: (file, its opening, the write of that opening, the checkpoint that stays as
# (epoch, step), or None for none). metrics.jsonl is opened once for the config record (replaced
# atomically) and once for appending: the epoch records are its writes 1 and 2, the summary 3.
# checkpoint.pt is written at step 0 (opening 1) and after each epoch (2, 3); its 3rd write is
# inside torch's zip writer, which raises RuntimeError.
CASES = {
    "step-0 checkpoint": ("checkpoint.pt", 1, 3, None),
    "epoch-1 checkpoint": ("checkpoint.pt", 2, 3, (0, 0)),
    "epoch-2 checkpoint": ("checkpoint.pt", 3, 3, (1, 6)),
    "epoch-2 record": ("metrics.jsonl", 2, 2, (1, 6)),
    "summary": ("metrics.jsonl", 2, 3, (2, 12)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_full_disk_stops_the_run_in_one_line_and_resume_finishes_it_bit_for_bit(tmp_path, monkeypatch, capsys,
                                                                                 whole, case):
    file_name, opening, fail_at, kept = CASES[case]
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        opened = disk_fills(m, file_name, opening, fail_at)
        with pytest.raises(SystemExit) as failed:
            train.main([*RUN, "--out-dir", str(tmp_path), "--name", "run"])
    assert len(opened) >= opening, "the write meant to fail never happened"
    assert failed.value.code == 1
    line = one_line(capsys.readouterr().err)
    # "cannot write FILE: CAUSE; ..." or "cannot append the epoch record to FILE: CAUSE; ..."
    assert line.startswith("train.py: error: cannot ") and f"{run_dir / file_name}: {NO_SPACE}; " in line
    assert "unexpected pos" not in line
    assert temporaries(tmp_path) == []
    command = f"python train.py --out-dir {tmp_path} --name run --device cpu --resume"
    assert line.endswith(f"; once that is fixed, continue with: {command}")
    if kept is None:
        assert not (run_dir / "checkpoint.pt").exists()
    else:
        saved = checkpoint.load_checkpoint(run_dir / "checkpoint.pt")  # still whole, and the last good one
        assert (saved["epoch"], saved["step"]) == kept
    train.main(shlex.split(command)[2:])  # room again: continue as the line says
    assert_same_run(run_dir, whole)
    assert temporaries(tmp_path) == []


def test_a_failed_step_0_checkpoint_offers_the_continue_command(tmp_path, monkeypatch, capsys):
    disk_fills(monkeypatch, "checkpoint.pt", 1, 3)
    with pytest.raises(SystemExit):
        train.main([*RUN, "--out-dir", str(tmp_path), "--name", "run"])
    line = one_line(capsys.readouterr().err)
    assert line.endswith(f"continue with: python train.py --out-dir {tmp_path} --name run --device cpu --resume")


def test_a_full_disk_at_the_config_record_leaves_nothing_and_the_same_command_starts_it(tmp_path, monkeypatch,
                                                                                      capsys, whole):
    argv = [*RUN, "--out-dir", str(tmp_path), "--name", "run"]
    with monkeypatch.context() as m:
        disk_fills(m, "metrics.jsonl", 1, 1)
        with pytest.raises(SystemExit) as failed:
            train.main(argv)
    assert failed.value.code == 1
    line = one_line(capsys.readouterr().err)
    assert line == f"train.py: error: cannot write {tmp_path / 'run' / 'metrics.jsonl'}: {NO_SPACE}; " \
                   f"no metrics.jsonl was written"
    assert list(tmp_path.iterdir()) == []  # not even the run directory: as if never started
    train.main(argv)
    assert_same_run(tmp_path / "run", whole)


def test_torch_zip_writer_error_is_one_write_error_even_without_the_oserror(tmp_path, monkeypatch, capsys, whole):
    """torch's writer may raise its RuntimeError with no OSError behind it: the file system
    says why (here: no space left)."""
    real_save, real_statvfs, saves = torch.save, os.statvfs, []

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        saves.append(Path(f.name).name)
        if len(saves) == 2:  # epoch 1's checkpoint
            f.write(b"PK\x03\x04 a part of the zip")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 247680 vs 247576")
        return real_save(obj, f, *args, **kwargs)

    def full(path):
        stat = real_statvfs(path)
        if Path(path) != tmp_path / "run":
            return stat
        return os.statvfs_result((stat.f_bsize, stat.f_frsize, stat.f_blocks, 0, 0, stat.f_files,
                                  stat.f_ffree, stat.f_favail, stat.f_flag, stat.f_namemax))

    with monkeypatch.context() as m:
        m.setattr(torch, "save", save_on_a_full_disk)
        m.setattr(os, "statvfs", full)
        with pytest.raises(SystemExit) as failed:
            train.main([*RUN, "--out-dir", str(tmp_path), "--name", "run"])
    assert failed.value.code == 1
    line = one_line(capsys.readouterr().err)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    assert line == (f"train.py: error: cannot write {ckpt}: {NO_SPACE}; {ckpt} is kept as it was; once that is "
                    f"fixed, continue with: python train.py --out-dir {tmp_path} --name run --device cpu --resume")
    assert temporaries(tmp_path) == [] and checkpoint.load_checkpoint(ckpt)["step"] == 0
    train.main(["--out-dir", str(tmp_path), "--name", "run", "--device", "cpu", "--resume"])
    assert_same_run(tmp_path / "run", whole)


def test_a_programming_error_inside_a_write_is_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    def bug(obj, f, *args, **kwargs):
        f.write(b"PK")
        raise RuntimeError("a bug, not a write that failed")

    monkeypatch.setattr(torch, "save", bug)
    with pytest.raises(RuntimeError, match="^a bug, not a write that failed$"):
        train.main([*RUN, "--out-dir", str(tmp_path), "--name", "run"])
    assert temporaries(tmp_path) == []


# -- a full disk, for real: a 600 KiB tmpfs ---------------------------------------------------------
def mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """A tmpfs of `size` mounted at `where` for the block (root only: skips the test with the
    reason where it cannot mount one), unmounted at its end whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount / umount command here")
    where.mkdir(exist_ok=True)
    done = mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of 600 KiB at tmp_path/fs."""
    with tmpfs(tmp_path / "fs", "600k") as fs:
        yield fs


def test_torch_save_on_a_real_full_file_system_is_one_write_error(tmp_path):
    """On a tmpfs filled up to a little room, whatever torch raises when the room runs out
    (RuntimeError "unexpected pos" from its zip writer or the OSError itself: it depends on
    where the last page ends; both are tried) is a WriteError naming the file and the cause,
    the old file is kept and no temporary file is left; a metrics record that does not fit is
    cut off."""
    from densenet import DenseNet
    from metrics_logger import MetricsLogger, WriteError, write_atomically
    state = DenseNet(22, 12, 10).state_dict()  # 290 KB, as the run's model
    raised = set()
    with tmpfs(tmp_path / "fs", "1m") as fs:
        path = fs / "checkpoint.pt"
        path.write_bytes(b"the last good one")
        for room in range(48 << 10, 200 << 10, 12 << 10):  # a little more room each time
            stat = os.statvfs(fs)
            filler = fs / "filler"
            filler.write_bytes(b"\0" * (stat.f_bfree * stat.f_frsize - room))
            with pytest.raises(WriteError) as failed:
                write_atomically(path, lambda f: torch.save(state, f))
            assert str(failed.value) == f"cannot write {path}: {NO_SPACE}; {path} is kept as it was"
            assert path.read_bytes() == b"the last good one"
            assert sorted(p.name for p in fs.iterdir()) == ["checkpoint.pt", "filler"]
            raised.add(type(failed.value.__context__).__name__)
            filler.unlink()
        assert "RuntimeError" in raised, f"torch's zip writer never raised its RuntimeError ({raised})"
        with MetricsLogger(fs / "metrics.jsonl") as log:
            log.log("epoch", epoch=1)
            before = (fs / "metrics.jsonl").read_bytes()
            stat = os.statvfs(fs)
            (fs / "filler").write_bytes(b"\0" * (stat.f_bfree * stat.f_frsize))
            with pytest.raises(WriteError, match=f"^cannot append the epoch record to {fs}/metrics.jsonl: "
                                                 f"{NO_SPACE}; the records before it are kept$"):
                log.log("epoch", epoch=2, pad="x" * 10_000)
        assert (fs / "metrics.jsonl").read_bytes() == before


# The run: DenseNet-BC L=22 k=12, whose checkpoint (345 KiB) fits once in 600 KiB, not twice.
BIGGER = tiny_argv("--epochs", "2", "--seed", "1", "--no-validate", subset=256, depth=22, k=12, batch_size=64)


def test_a_real_full_disk_stops_the_run_in_one_line_and_resume_finishes_it(tmp_path, small_fs):
    p = subprocess.run([sys.executable, "train.py", *BIGGER, "--out-dir", str(small_fs), "--name", "full"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    run_dir, ckpt = small_fs / "full", small_fs / "full" / "checkpoint.pt"
    assert p.returncode == 1, p.stderr
    line = one_line(p.stderr)
    command = f"python train.py --out-dir {small_fs} --name full --device cpu --resume"
    assert line == (f"train.py: error: cannot write {ckpt}: {NO_SPACE}; {ckpt} is kept as it was; once that is "
                    f"fixed, continue with: {command}")
    assert temporaries(small_fs) == []
    assert checkpoint.load_checkpoint(ckpt)["step"] == 0  # the step-0 one: epoch 1's did not fit
    whole = tmp_path / "whole"
    train.main([*BIGGER, "--out-dir", str(whole), "--name", "full"])
    assert mount("-o", "remount,size=8m", str(small_fs)).returncode == 0  # room again
    train.main(shlex.split(command)[2:])
    assert differences(run_dir, whole / "full") == []
    assert same_state(final_state(run_dir), final_state(whole / "full"))
    assert temporaries(small_fs) == []


# -- a read-only file system ---------------------------------------------------------------------
def stopped_after_epoch_1(monkeypatch, out: Path) -> Path:
    """The tiny run stopped (Ctrl-C) right after epoch 1's checkpoint: a run to resume."""
    real_save = checkpoint.save_checkpoint

    def save_then_stop(path, training, config, epoch, step, *rest):
        real_save(path, training, config, epoch, step, *rest)
        if step:  # not the step-0 checkpoint, written as the run starts
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_checkpoint", save_then_stop)
        with pytest.raises(SystemExit):
            train.main([*RUN, "--out-dir", str(out), "--name", "run"])
    assert epochs_logged(out / "run") == [1]
    return out / "run"


def refused_as_read_only(monkeypatch, capsys, out: Path, cannot_write: Path) -> None:
    """--resume of out/run is refused in one line naming the file system read-only, before
    any training step, and changes nothing."""
    run_dir = out / "run"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    trained = []
    real_step = engine.train_step
    with monkeypatch.context() as m:
        m.setattr(engine, "train_step", lambda *args: trained.append(1) or real_step(*args))
        with pytest.raises(SystemExit) as refused:
            train.main(["--out-dir", str(out), "--name", "run", "--device", "cpu", "--resume"])
    assert refused.value.code == 1 and trained == []
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"train.py: error: cannot write {cannot_write}: {READ_ONLY} ({run_dir} is on a "
                           f"read-only file system")
    assert line.endswith(f"copy {run_dir} into a writable directory DIR and use --out-dir DIR")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


@pytest.fixture
def read_only_fs(tmp_path):
    """A 4 MiB tmpfs at tmp_path/fs, to be remounted read-only."""
    with tmpfs(tmp_path / "fs", "4m") as fs:
        yield fs


def test_resume_on_a_real_read_only_file_system_is_refused_before_training(monkeypatch, capsys, read_only_fs,
                                                                          whole):
    run_dir = stopped_after_epoch_1(monkeypatch, read_only_fs)
    capsys.readouterr()
    done = mount("-o", "remount,ro", str(read_only_fs))
    if done.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only: {done.stderr.strip()}")
    refused_as_read_only(monkeypatch, capsys, read_only_fs, run_dir / ".lock")
    assert mount("-o", "remount,rw", str(read_only_fs)).returncode == 0
    train.main(["--out-dir", str(read_only_fs), "--name", "run", "--device", "cpu", "--resume"])
    assert_same_run(run_dir, whole)


def test_resume_on_a_read_only_file_system_is_refused_before_training(tmp_path, monkeypatch, capsys, whole):
    """The same by fault injection: the lock file cannot be opened for writing (EROFS), or it
    can (a lock kept elsewhere) but the file system says it is read-only."""
    run_dir = stopped_after_epoch_1(monkeypatch, tmp_path)
    capsys.readouterr()
    real_open = builtins.open

    def read_only_open(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, READ_ONLY, str(path))
        return real_open(path, mode, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(rundir, "open", read_only_open, raising=False)
        refused_as_read_only(monkeypatch, capsys, tmp_path, run_dir / ".lock")

    real_statvfs = os.statvfs

    def read_only(path):
        stat = real_statvfs(path)
        flag = stat.f_flag | os.ST_RDONLY if Path(path) == run_dir else stat.f_flag
        return os.statvfs_result((*stat[:8], flag, stat.f_namemax))

    with monkeypatch.context() as m:
        m.setattr(os, "statvfs", read_only)
        refused_as_read_only(monkeypatch, capsys, tmp_path, run_dir)
    train.main(["--out-dir", str(tmp_path), "--name", "run", "--device", "cpu", "--resume"])
    assert_same_run(run_dir, whole)


# -- figures ---------------------------------------------------------------------------------------
def test_a_full_disk_while_plotting_is_one_line_and_keeps_what_was_drawn(tmp_path, monkeypatch, capsys, whole):
    run_dir = tmp_path / "run"
    shutil.copytree(whole, run_dir)
    plot.main([str(run_dir)])
    before = (run_dir / "curves.png").read_bytes()
    capsys.readouterr()
    with monkeypatch.context() as m:
        disk_fills(m, "curves.png", 1, 1)
        with pytest.raises(SystemExit) as failed:
            plot.main([str(run_dir)])
    assert failed.value.code == 1
    curves = run_dir / "curves.png"
    assert one_line(capsys.readouterr().err, "plot.py") == (
        f"plot.py: error: cannot write {curves}: {NO_SPACE}; {curves} is kept as it was; once that is fixed, "
        f"run again: python plot.py {run_dir}")
    assert curves.read_bytes() == before and temporaries(run_dir) == []
    plot.main([str(run_dir)])
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
