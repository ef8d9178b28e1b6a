"""What a new user meets first (issue 29): the set-up for a CPU, how to open the notebook, and
the README's find_units example, run as written."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(heading: str) -> str:
    start = README.index(heading)
    return README[start:README.index("\n## ", start + len(heading))]


def test_the_set_up_gives_a_cpu_only_install_and_how_to_open_the_notebook():
    setup = section("## Set-up")
    blocks = re.findall(r"```sh\n(.*?)```", setup, re.S)
    cpu = next(b for b in blocks if "--index-url" in b).splitlines()
    assert cpu == ["pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu",
                   "pip install -r requirements.txt"]  # torch first, so that requirements.txt finds it there
    jupyter = next(b for b in blocks if "jupyter" in b).splitlines()
    assert jupyter == ["pip install jupyterlab", "jupyter lab notebooks/sizing_a_run.ipynb"]
    assert (ROOT / "notebooks" / "sizing_a_run.ipynb").is_file()
    for requirements in ("requirements.txt", "requirements-dev.txt"):  # "which neither requirements file installs"
        names = {re.split(r"[<>=\s#\[]", line.strip())[0].lower()
                 for line in (ROOT / requirements).read_text().splitlines() if line.strip() and line[0] != "#"}
        assert not names & {"jupyterlab", "notebook", "jupyter"}


def test_the_find_units_example_prints_what_the_readme_says(capsys):
    import torch
    import torchvision

    own = section("## FreezeOut for your own model")
    block = next(b for b in re.findall(r"```python\n(.*?)```", own, re.S) if "find_units(blocks" in b)
    assert "find_units(model, example_input, groups=None)" in own  # the signature, documented
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    exec(compile(block, "README.md", "exec"), {"torch": torch, "model": model, "x": torch.randn(1, 3, 32, 32)})
    printed = capsys.readouterr().out.split()
    expected = [n for line in block.splitlines() if line.startswith("print(")
                for n in line.split("# ")[1].split(":")[0].split()]
    assert printed == expected == ["6", "41", "6"]


# -- numbers in words (issue 29, item 7) -----------------------------------------------------------
def test_a_one_epoch_one_step_run_says_1_epoch_and_1_step(tmp_path, capsys):
    import conftest
    import train

    argv = [*conftest.TINY, "--subset", "16", "--epochs", "1", "--out-dir", str(tmp_path), "--name", "one"]
    train.main(argv)
    out = capsys.readouterr().out
    assert "1 step/epoch x 1 epoch = 1 step" in out
    assert "WARNING: in 1 step no unit freezes" in out
    assert not re.search(r"\b1 (epochs|steps|units|runs)\b", out)


def test_run_progress_says_1_epoch(tmp_path):
    from launch import run_progress
    from metrics_logger import MetricsLogger

    with MetricsLogger(tmp_path / "run" / "metrics.jsonl") as log:
        log.log("config", epochs=1)
    assert run_progress(tmp_path / "run", 1) == "interrupted (0 of 1 epoch done)"
    assert run_progress(tmp_path / "run", 3) == "interrupted (0 of 3 epochs done)"


def test_plural():
    from messages import plural

    assert [plural(n, "epoch") for n in (0, 1, 2, 1000)] == ["0 epochs", "1 epoch", "2 epochs", "1,000 epochs"]
    assert plural(1, "process", "processes") == "1 process" and plural(3, "process", "processes") == "3 processes"


def fabricated_rows(seeds: int) -> list:
    return [{"strategy": "baseline", "t_0": 1.0, "target_speedup": None, "seeds": seeds, "paper_speedup": 0.0,
             "flop_speedup": 0.0, "measured_speedup": 0.0, "train_time_s": 47.8, "val_err": 90.0,
             "val_err_std": 0.0, "test_err": 16.46, "test_err_std": 0.0, "delta_val_err": 0.0,
             "delta_test_err": 0.0, "device": "cpu", "host_load": 1.7, "busy_host": False}]


def test_one_seed_says_n_1_not_a_std_of_0(tmp_path):
    import reproduce

    settings = {"model": "densenet", "depth": 22, "growth_rate": 12, "dataset": "synthetic", "subset": 64,
                "epochs": 1, "batch_size": 32, "seeds": [0], "device": "cpu"}
    reproduce.write_markdown(fabricated_rows(1), settings, tmp_path / "one.md")
    md = (tmp_path / "one.md").read_text()
    assert "| 90.00 (n = 1) | +0.00 | 16.46 (n = 1) | +0.00 |" in md
    assert "± 0.00" not in md and "+- 0.00" not in md
    assert ", 1 epoch, batch 32" in md and "1 epochs" not in md
    reproduce.write_markdown(fabricated_rows(2), {**settings, "seeds": [0, 1], "epochs": 2}, tmp_path / "two.md")
    md = (tmp_path / "two.md").read_text()
    assert "| 90.00 ± 0.00 | +0.00 | 16.46 ± 0.00 | +0.00 |" in md  # two seeds that agree: a std of 0 it is
