"""The README's and the docs' code runs as written, and their links lead somewhere."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LIBRARY = (ROOT / "docs" / "library.md").read_text()


def python_block_after(heading: str) -> str:
    section = README[README.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow  # trains a ResNet-18 for 12 steps
def test_own_model_example_runs_and_freezes(capsys):
    namespace = {}
    exec(compile(python_block_after("## FreezeOut for your own model"), "README.md", "exec"), namespace)
    scheduler, units = namespace["scheduler"], namespace["units"]
    assert 0 < scheduler.num_frozen < len(units)
    assert scheduler.frozen_at[-1] is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 12 and out[-1].startswith("loss ")
    assert set(namespace["checkpoint"]) == {"model", "optimizer", "scheduler"}


def test_notebook_estimate_example_gives_the_papers_numbers():
    block = python_block_after("## Size a run")
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    calls = [line for line in block.splitlines() if line.startswith("calc_speedup(")]
    assert len(calls) == 2
    for line in calls:
        call, _, expected = line.partition("#")
        value = eval(call.strip(), namespace)
        assert f"{value:.4f}" == expected.split(":")[0].strip()


@pytest.mark.slow  # trains a ResNet-50 for 6 steps
def test_find_units_example_runs_and_prints_what_the_docs_say(capsys):
    section = LIBRARY[LIBRARY.index("### Any model, without listing units"):]
    blocks = re.findall(r"```(?:python)?\n(.*?)```", section, re.S)
    code, printed = blocks[0], blocks[1]
    namespace = {}
    exec(compile(code, "docs/library.md", "exec"), namespace)
    assert capsys.readouterr().out == printed
    assert len(namespace["units"]) == 8 and namespace["scheduler"].num_frozen == 6


@pytest.mark.slow  # trains a ResNet-18 for 12 steps
def test_the_library_blocks_run_in_order_as_one_file_print_what_the_readme_says(capsys):
    # As a reader runs them: the own-model example trains (5 of 6 units frozen by its end), then
    # the estimate and find_units blocks continue with its model and units.
    section = README[README.index("## FreezeOut for your own model"):README.index("## Reproduce the paper")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["scheduler"].num_frozen == 5
    capsys.readouterr()
    for block in blocks[1:]:
        exec(compile(block, "README.md", "exec"), namespace)
        printed = capsys.readouterr().out.split()
        expected = [word for line in block.splitlines() if line.startswith("print(")
                    for word in line.split("# ")[1].split(":")[0].split()]
        assert printed == expected


def test_every_relative_link_of_the_readme_and_the_docs_leads_to_a_file():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
    linked = set(re.findall(r"\]\(docs/([^)#]+\.md)", README))
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")}  # every page reachable from the README


def test_the_quick_start_is_the_run_the_readme_describes(tmp_path, monkeypatch):
    """The quick start's command, as written, resolves to the run its paragraph describes (the
    model, its units and its steps), up to the epoch loop; what it learns is measured by hand."""
    import shlex

    import train
    section = README[README.index("## Quick start"):]
    command = re.search(r"```sh\n(python train\.py [^\n]*)\n```", section).group(1)
    paragraph = section[section.index("```\n\n") + 5:].split("\n\n")[0]
    from metrics_logger import read_records

    class ReachedTheEpochLoop(Exception):
        pass

    def epoch_loop(*args):
        raise ReachedTheEpochLoop

    monkeypatch.setattr(train, "fit", epoch_loop)
    with pytest.raises(ReachedTheEpochLoop):
        train.main([*shlex.split(command)[2:], "--out-dir", str(tmp_path)])
    resolved = read_records(next(tmp_path.glob("*/metrics.jsonl")), "config")[0]  # as the run started
    depth, units, epochs, steps = resolved["depth"], resolved["n_units"], resolved["epochs"], resolved["total_steps"]
    assert f"DenseNet-BC (L={depth}, {units} units)" in paragraph
    assert f"for {['two', 'three', 'four', 'five'][epochs - 2]} epochs ({steps} steps)" in paragraph
    assert resolved["dataset"] == "synthetic" and resolved["num_classes"] == 10 and "10 classes" in paragraph


def test_train_py_help_shows_the_readmes_quick_start():
    import train
    command = re.search(r"```sh\n(python train\.py [^\n]*)\n```", README[README.index("## Quick start"):]).group(1)
    assert command in train.__doc__  # what `python train.py -h` lists as its example
