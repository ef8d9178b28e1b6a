"""tools/: train_speed.py compares runs honestly (unfinished runs marked, losses compared, -h),
and gpu_check.sh on a machine without a GPU says so in one line and writes nothing."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from metrics_logger import write_records


def load_tool():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "tools" / "train_speed.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def fake_run(path: Path, losses, epochs=3, finished=True, step="eager", seconds=2.0) -> Path:
    """A run directory as train.py leaves it: 10 steps of 5 images an epoch."""
    records = [{"event": "config", "epochs": epochs, "steps_per_epoch": 10, "batch_size": 5, "training_step": step}]
    records += [{"event": "epoch", "epoch": i + 1, "train_loss": loss, "train_time_s": seconds,
                 "captures": 2 if step == "graphed" else 0, "capture_time_s": 0.5 if step == "graphed" else 0.0}
                for i, loss in enumerate(losses)]
    if finished:
        records.append({"event": "summary"})
    path.mkdir()
    write_records(path / "metrics.jsonl", records)
    return path


def test_train_speed_marks_an_unfinished_run_and_compares_over_each_runs_epochs(tmp_path, capsys):
    tool = load_tool()
    a = fake_run(tmp_path / "off", [2.0, 1.5, 1.0], seconds=2.0)
    b = fake_run(tmp_path / "on", [2.0, 1.53], finished=False, step="graphed", seconds=1.0)
    rows = tool.main([str(a), str(b)])
    out = capsys.readouterr().out.splitlines()
    assert rows[1]["images_per_s"] == 2 * 50 / 2.0 and rows[0]["images_per_s"] == 3 * 50 / 6.0
    assert "[UNFINISHED: 2 of 3 epochs]" in out[1] and "UNFINISHED" not in out[0]
    assert "2.00x off" in out[1] and "4 captures in 1.00 s" in out[1]
    assert "largest difference from off: 2.00%" in out[1]
    assert out[2].startswith("note: the runs finished different numbers of epochs")


def test_train_speed_checks_that_runs_finished_with_close_losses(tmp_path, capsys):
    tool = load_tool()
    a = fake_run(tmp_path / "eager", [2.0, 1.5, 1.0])
    close = fake_run(tmp_path / "close", [2.01, 1.5, 1.005], step="graphed")
    far = fake_run(tmp_path / "far", [2.0, 1.5, 1.1], step="graphed")
    cut = fake_run(tmp_path / "cut", [2.0, 1.5], finished=False)
    assert len(tool.main([str(a), str(close), "--max-loss-diff", "0.01"])) == 2
    assert capsys.readouterr().out.splitlines()[-1].startswith("OK: every run finished")
    for other in (far, cut):
        with pytest.raises(SystemExit) as info:
            tool.main([str(a), str(other), "--max-loss-diff", "0.01"])
        assert info.value.code == 1
        assert capsys.readouterr().out.splitlines()[-1].startswith(f"FAILED: {other.name} unfinished, or losses")


def test_train_speed_answers_help_and_refuses_a_folder_that_holds_no_run(tmp_path, capsys):
    tool = load_tool()
    with pytest.raises(SystemExit) as info:
        tool.main(["-h"])
    assert info.value.code == 0 and "--max-loss-diff" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        tool.main([str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err == [f"train_speed.py: error: {tmp_path} holds no metrics.jsonl: "
                                            f"not a train.py run directory"]


@pytest.mark.slow  # a bash script and its interpreter
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the whole check")
def test_gpu_check_without_a_gpu_says_so_in_one_line_and_writes_nothing(tmp_path):
    before = sorted(p.name for p in ROOT.iterdir())
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    p = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [f"gpu_check: no CUDA GPU visible to {sys.executable} "
                                             f"(torch.cuda.is_available() is False, or no torch); nothing was run"]
    assert sorted(p.name for p in ROOT.iterdir()) == before and not (tmp_path / "out").exists()


def test_gpu_check_timeouts_fit_one_short_gpu_window():
    """The stages' time limits add up to under 9 minutes, and with the 5 s grace of each kill
    stay within the 10 minutes one command may run on a lent GPU machine."""
    script = (ROOT / "tools" / "gpu_check.sh").read_text()
    limits = [int(limit) for limit in re.findall(r'stage "[^"]+" (\d+) ', script)]
    limits += [int(limit) for limit in re.findall(r'^bench "[^"]+" (\d+) ', script, re.M)]  # a stage each
    assert len(limits) == 9
    assert sum(limits) < 540 and sum(limits) + 5 * len(limits) < 600, sum(limits)
