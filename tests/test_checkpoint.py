"""checkpoint.py: what a checkpoint holds and gives back (model, optimizer, scheduler, scaler,
every RNG), and atomic saving when a save is cut short."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

import checkpoint
import rundir
from checkpoint import (
    load_checkpoint,
    restore,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from conftest import same_state, tiny_training
from engine import EpochPosition
from messages import RunError

CPU = torch.device("cpu")


def training(seed: int, amp: str = "fp16"):
    return tiny_training(seed, total=12, t_0=0.3, how_scale="linear", dropout=0.1, amp=amp)


def steps(t, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    t.model.train()
    for _ in range(n):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        t.step(x, y)
        t.scheduler.step()


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_a_checkpoint_gives_back_every_state_and_every_generator(tmp_path):
    saved = training(0)
    steps(saved, 5)
    assert saved.scheduler.num_frozen >= 2, "the cut should come after some units froze"
    saved.scaler.update(1024.0)  # a scale of its own, not the default a fresh scaler has
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    np.random.randn()  # numpy's cached Gaussian is part of its state too
    save_checkpoint(tmp_path / "checkpoint.pt", saved, {"seed": 0}, 1, 5, 3.5, EpochPosition(2, batch=2, seen=64))
    expected = draws()

    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["train_time_s"]) == (1, 5, 3.5)
    assert ckpt["position"] == {"epoch": 2, "batch": 2, "loss_sum": 0.0, "seen": 64, "time_s": 0.0}  # plain data
    resumed = training(123)  # other weights, a fresh scaler, no frozen unit
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    restore(ckpt, resumed)
    assert draws() == expected  # torch, numpy and Python generators where they were
    assert same_state(resumed.model.state_dict(), saved.model.state_dict())
    assert same_state(resumed.optimizer.state_dict(), saved.optimizer.state_dict())
    assert resumed.scheduler.state_dict() == saved.scheduler.state_dict()
    assert resumed.scaler.state_dict() == saved.scaler.state_dict() and resumed.scaler.get_scale() == 1024.0
    # The scheduler froze the saved run's frozen units again.
    n = saved.scheduler.num_frozen
    assert resumed.scheduler.num_frozen == n
    resumed.model.train()
    for unit in resumed.units[:n]:
        assert not any(p.requires_grad for p in unit.parameters()) and not any(m.training for m in unit.modules())
    assert all(p.requires_grad for u in resumed.units[n:] for p in u.parameters())

    # And both continue alike (dropout drawing the same numbers in both).
    torch.manual_seed(5)
    steps(saved, 4, seed=2)
    torch.manual_seed(5)
    steps(resumed, 4, seed=2)
    assert same_state(resumed.model.state_dict(), saved.model.state_dict())


def test_rng_state_round_trips_through_weights_only_loading(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = draws()
    draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_a_save_cut_short_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    t = training(0, amp="off")
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, t, {}, 1, 6, 1.0, None)
    before = path.read_bytes()
    steps(t, 2)
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # what a killed writer leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, t, {}, 2, 12, 2.0, None)
    assert path.read_bytes() == before and load_checkpoint(path)["epoch"] == 1
    leftover = tmp_path / "checkpoint.pt.tmp"
    assert leftover.exists()  # the crash's temporary file ...
    with pytest.raises(RunError, match="not a loadable FreezeOut checkpoint"):
        load_checkpoint(leftover)
    monkeypatch.setattr(torch, "save", real_save)
    save_checkpoint(path, t, {}, 2, 12, 2.0, None)  # ... is replaced by the next save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(path)["epoch"] == 2


def test_a_checkpoint_of_another_kind_is_refused(tmp_path):
    torch.save({"format": "something-else", "model": {}}, tmp_path / "other.pt")
    with pytest.raises(RunError, match="is not a FreezeOut checkpoint of this project"):
        load_checkpoint(tmp_path / "other.pt")
    assert checkpoint.CHECKPOINT_FORMAT == "freezeout-checkpoint-v1"


# -- what an unloadable checkpoint is, and what to do (issue 29, item 3) -------------------------
class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def refusal(path) -> str:
    with pytest.raises(RunError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{path} is not a loadable FreezeOut checkpoint: ")
    return message


def start_again(run_dir) -> str:
    return (f"the run cannot be continued from it: move {run_dir} aside (or delete it) and start it again, "
            "or start it under another name")


def a_checkpoint(run_dir):
    run_dir.mkdir()
    torch.save({"format": "freezeout-checkpoint-v1", "model": {"w": torch.zeros(100_000)}}, run_dir / "checkpoint.pt")
    return (run_dir / "checkpoint.pt").read_bytes()


@pytest.mark.parametrize("keep", [10, 100, 5_000, 200_000, -10])
def test_a_checkpoint_cut_short_is_called_so_with_what_to_do(tmp_path, keep):
    # Cut at 5,000 bytes torch says "[Errno 22] Invalid argument", elsewhere "failed finding central directory".
    run_dir = tmp_path / "run"
    whole = a_checkpoint(run_dir)
    (run_dir / "checkpoint.pt").write_bytes(whole[:keep])
    message = refusal(run_dir / "checkpoint.pt")
    size = len(whole[:keep])
    assert f"it is cut short: {size:,} bytes of a zip archive (what torch.save writes) whose end is missing" in message
    assert "Errno" not in message and "miniz" not in message and "pickled" not in message
    assert message.endswith(f"copy it again from where it came from if it is whole there; "
                            f"otherwise {start_again(run_dir)}")


@pytest.mark.parametrize("content,what", [
    (b"", "it is empty (0 bytes), not a checkpoint at all"),
    (b"checkpoint moved to /data/run7\n",
     "it is not a checkpoint at all but text, beginning 'checkpoint moved to /data/run7'"),
    (b'{"epoch": 3}', "it is not a checkpoint at all but text, beginning '{\"epoch\": 3}'"),
    (b"hello this is text\n", "it is not a checkpoint at all but text, beginning 'hello this is text'"),
    (bytes(range(7, 107)), "it is not a checkpoint at all (neither a zip archive, what torch.save writes, nor a "
                           "pickle): its first bytes are 07 08 09 0a 0b 0c 0d 0e"),
])
def test_a_file_that_is_no_checkpoint_at_all_is_called_so(tmp_path, content, what):
    run_dir = tmp_path / "run"
    a_checkpoint(run_dir)
    (run_dir / "checkpoint.pt").write_bytes(content)  # overwritten by something else
    message = refusal(run_dir / "checkpoint.pt")
    assert what in message
    assert "pickled objects" not in message and "code" not in message
    assert message.endswith(f"something wrote over it: put the run's own checkpoint.pt back if you have a copy; "
                            f"otherwise {start_again(run_dir)}")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_checkpoint_that_holds_pickled_code_is_called_unsafe_and_nothing_runs(tmp_path, how):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    run_dir.mkdir()
    state = {"format": "freezeout-checkpoint-v1", "x": RunsCode(marker)}
    if how == "torch.save":
        torch.save(state, run_dir / "checkpoint.pt")
    else:
        (run_dir / "checkpoint.pt").write_bytes(pickle.dumps(state, protocol=2))
    message = refusal(run_dir / "checkpoint.pt")
    assert "it is unsafe: it holds pickled code (it calls posix.system" in message
    assert "none of it was run" in message and not marker.exists()
    assert message.endswith(f"it was not written by this project: put the run's own checkpoint.pt back if you have a "
                            f"copy; otherwise {start_again(run_dir)}")


def test_a_checkpoint_damaged_inside_keeps_torchs_explanation(tmp_path):
    run_dir = tmp_path / "run"
    whole = bytearray(a_checkpoint(run_dir))
    at = whole.find(b"data.pkl") + 60
    whole[at:at + 20] = bytes(20)  # bytes of the pickle inside the archive overwritten
    (run_dir / "checkpoint.pt").write_bytes(bytes(whole))
    message = refusal(run_dir / "checkpoint.pt")
    assert "it is damaged: its zip archive is whole, but what it holds cannot be read (torch.load: " in message
    assert "unsafe" not in message
    assert message.endswith(f"copy it again from where it came from if it is whole there; "
                            f"otherwise {start_again(run_dir)}")


# -- a run directory that cannot be written (issue 27) ---------------------------------------------
def test_a_lock_on_a_read_only_file_system_is_refused_in_one_line_naming_it(tmp_path, monkeypatch):
    import builtins
    import errno
    import os
    real_open = builtins.open
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def opens(code):
        def fake(path, mode="r", *args, **kwargs):
            if "a" in mode:
                raise OSError(code, os.strerror(code), str(path))
            return real_open(path, mode, *args, **kwargs)
        return fake

    monkeypatch.setattr(rundir, "open", opens(errno.EROFS), raising=False)
    lock = rundir.RunLock(run_dir)
    with pytest.raises(RunError) as refused:
        lock.acquire()
    assert str(refused.value) == (
        f"cannot write {run_dir / '.lock'}: Read-only file system ({run_dir} is on a read-only file system: a run "
        f"writes its checkpoint and records there; nothing was changed): make it writable, or copy {run_dir} into "
        "a writable directory DIR and use out_dir DIR")  # --out-dir as the scripts print it
    monkeypatch.setattr(rundir, "open", opens(errno.EACCES), raising=False)
    with pytest.raises(RunError, match=fr"^cannot write {run_dir / '.lock'}: Permission denied \({run_dir} is not "
                                       r"writable: "):
        lock.acquire()
    assert not lock.held and list(run_dir.iterdir()) == []


def test_a_lock_that_cannot_be_written_for_want_of_space_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import os

    class FullDisk:  # os, but its writes fail
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def write(fd, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir, "os", FullDisk())
    lock = rundir.RunLock(tmp_path / "out" / "run")
    with pytest.raises(RunError, match=f"^cannot write {tmp_path}/out/run/.lock: No space left on device$"):
        lock.acquire()
    assert not lock.held and list(tmp_path.iterdir()) == []  # the directories it made are gone


def test_resume_on_a_read_only_file_system_is_refused_before_reading_the_checkpoint(tmp_path, monkeypatch):
    import os
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"never read")
    real_statvfs = os.statvfs

    def read_only(path):
        s = real_statvfs(path)
        return os.statvfs_result((*s[:8], s.f_flag | os.ST_RDONLY, s.f_namemax))

    monkeypatch.setattr(os, "statvfs", read_only)
    with pytest.raises(RunError, match=fr"^cannot write {run_dir}: Read-only file system \({run_dir} is on a "
                                       r"read-only file system: "):
        rundir.examine(run_dir, True, str(tmp_path))
