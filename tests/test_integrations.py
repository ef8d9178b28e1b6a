"""docs/integrations.md's examples run as written: the DDP ones (a plain loop, Lightning, the
Hugging Face Trainer) as a user runs them, in 2 CPU processes over gloo, watched from outside
(tests/hold: each step's all-reduce counted, each process's final weights kept), and the
timm ones printing what the page says they print."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "integrations.md").read_text()


def example(name: str) -> tuple[str, str, str]:
    """(code, command, what it prints or "") of the example whose first line names `name`."""
    for code in re.findall(r"```python\n(.*?)```", PAGE, re.S):
        first = code.splitlines()[0]
        if first.startswith(f"# {name}: "):
            after = PAGE[PAGE.index(code) + len(code):]
            printed = re.match(r"```\n\nprints\n\n```\n(.*?)```", after, re.S)
            return code, first.split(": ", 1)[1].split(" (")[0], printed.group(1) if printed else ""
    raise AssertionError(f"docs/integrations.md has no example {name}")


def run_watched(name: str, tmp_path: Path) -> list[dict]:
    """Run the example as its first line says, in tmp_path, watched; returns each process's record."""
    code, command, _ = example(name)
    (tmp_path / name).write_text(code)
    words = command.split()
    if words[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *words[1:]]
    else:
        argv = [sys.executable, *words[1:]]
    watch = tmp_path / "watch"
    watch.mkdir()
    env = {**os.environ, "FREEZEOUT_TEST_DDP_WATCH": str(watch), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "hold"), str(ROOT)])}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(watch / f"rank{r}.pt", weights_only=True) for r in range(2)]


def assert_only_what_trains_is_all_reduced(ranks: list[dict]) -> None:
    passes = ranks[0]["passes"]
    synced = [p for p in passes if p["sync"]]
    assert synced and all(p["all_reduced"] == p["training"] for p in synced), passes
    assert all(p["all_reduced"] == 0 for p in passes if not p["sync"])  # accumulation: no_sync
    assert len({p["training"] for p in synced}) >= 4  # units froze, level after level
    assert synced[-1]["training"] < synced[0]["training"] / 2
    a, b = (r["parameters"] for r in ranks)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same weights, bit for bit


@pytest.mark.slow  # torchrun
def test_the_plain_ddp_loop_all_reduces_only_what_still_trains(tmp_path):
    assert_only_what_trains_is_all_reduced(run_watched("ddp_loop.py", tmp_path))


@pytest.mark.slow  # two processes started by Lightning
def test_the_lightning_example_runs_ddp_without_find_unused_parameters(tmp_path):
    pytest.importorskip("lightning")
    ranks = run_watched("lightning_ddp.py", tmp_path)
    assert_only_what_trains_is_all_reduced(ranks)
    assert len([p for p in ranks[0]["passes"] if p["sync"]]) == 8  # 128 images a process, 16 a batch, 2 a step
    logged = (tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "freezeout/lr_unit_5" in logged and "freezeout/frozen_units" in logged


@pytest.mark.slow  # torchrun
def test_the_hugging_face_example_runs_ddp_without_find_unused_parameters(tmp_path):
    pytest.importorskip("transformers")
    ranks = run_watched("hf_trainer.py", tmp_path)
    assert_only_what_trains_is_all_reduced(ranks)
    assert len([p for p in ranks[0]["passes"] if p["sync"]]) == 8


@pytest.mark.parametrize("name", ["timm_vit.py", "timm_resnet.py"])
def test_the_timm_examples_print_what_the_page_says(name, capsys):
    pytest.importorskip("timm")
    code, _, printed = example(name)
    exec(compile(code, f"docs/integrations.md ({name})", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out == printed
