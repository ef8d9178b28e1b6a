"""`pip install .` installs the library, the package freezeout, and nothing else: the scripts'
generic module names (utils, train, models, ...) stay out of the user's site-packages; from
the installed copy, `import freezeout` gives the scheduler, the units helpers and the estimate."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a pip build and install: about 10 s

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_MODULES = ["utils", "train", "models", "engine", "checkpoint", "config", "cli", "rundir", "plan", "results",
                  "loaders", "densenet", "wrn",
                  "vgg", "layers", "metrics_logger", "distributed", "figures", "benchmark", "reproduce", "plot",
                  "compiled_step", "launch", "graphs", "data_sets", "messages", "timing"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The repository, copied (a build writes build/ and *.egg-info next to the sources), then
    installed with pip into a target directory: offline, with the setuptools already here."""
    tmp = tmp_path_factory.mktemp("package")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "runs", "data", "reproduction", "build", "*.egg-info", ".pytest_cache"))
    target = tmp / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                        "--no-index", "--disable-pip-version-check", "--target", str(target), str(source)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return target


def in_elsewhere(tmp_path: Path, target: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    """Run `code` (with `args`) from a directory of the user's own, with only the installed
    package added."""
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True)


# A user's scripts that use the installed package (the tests below), run one after another in
# one process started from a directory of the user's own (one start of Python and torch for all
# of them), each with globals of its own, its output and its error kept apart.
RUN_PARTS = """
import contextlib, io, json, sys, traceback
results = {}
for name, code in json.loads(sys.argv[1]).items():
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, name, "exec"), {"__name__": "__main__"})
        results[name] = {"stdout": out.getvalue(), "error": None}
    except BaseException:
        results[name] = {"stdout": out.getvalue(), "error": traceback.format_exc()}
print(json.dumps(results))
"""

IMPORT_FREEZEOUT = ("import freezeout, torch\n"
                    "from freezeout import FreezeOut, param_groups\n"
                    "units = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]\n"
                    "opt = torch.optim.SGD(param_groups(units), lr=0.1)\n"
                    "s = FreezeOut(opt, units, total_steps=4, t_0=0.5)\n"
                    "print(freezeout.__file__)")
# The units helpers, the scheduler and the estimate for a model of the user's own, at batch 1,
# with batch norm.
PUBLIC_API = ("import torch, freezeout\n"
              "from freezeout import (FreezeOut, estimate_speedup, find_units, freeze, param_groups,\n"
              "                       t_0_for_speedup, unit_times)\n"
              "model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),\n"
              "                            torch.nn.Conv2d(8, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4))\n"
              "x = torch.randn(1, 3, 8, 8)\n"
              "model(torch.randn(2, 3, 8, 8))\n"
              "units = find_units(model, x)\n"
              "s = estimate_speedup(model, units, x, t_0=0.5)\n"
              "t = t_0_for_speedup(model, units, x, s)\n"
              "slices = [model[0:3], model[3:5], model[5]]  # new containers of the model's modules\n"
              "same = (estimate_speedup(model, slices, x, t_0=0.5)\n"
              "        == estimate_speedup(model, [list(model[0:3]), list(model[3:5]), model[5]], x, t_0=0.5))\n"
              "print(len(units), round(s, 6), round(t, 6), same)\n"
              "print(sorted(freezeout.__all__))")
# torch.compile(model) after the scheduler was made (what used to fail at the first forward), 4
# units, so 4 freeze levels, past a recompile limit lowered to 2 (as the default 8 is passed
# with 9 units in tests/test_compile.py): the installed package makes the room too.
COMPILED = ("import torch, torch._dynamo, torch.nn.functional as F\n"
            "from torch._dynamo.utils import counters\n"
            "from freezeout import FreezeOut, param_groups\n"
            "torch._dynamo.config.recompile_limit = 2\n"
            "torch.manual_seed(0)\n"
            "model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))\n"
            "                              for _ in range(3)], torch.nn.Linear(8, 2))\n"
            "units = list(model)\n"
            "opt = torch.optim.SGD(param_groups(units), lr=0.05)\n"
            "scheduler = FreezeOut(opt, units, total_steps=8, t_0=0.05, how_scale='linear')\n"
            "compiled = torch.compile(model, backend='aot_eager')\n"
            "for step in range(8):\n"
            "    loss = F.cross_entropy(compiled(torch.randn(16, 8)), torch.randint(0, 2, (16,)))\n"
            "    opt.zero_grad(set_to_none=True)\n"
            "    loss.backward()\n"
            "    opt.step()\n"
            "    scheduler.step()\n"
            "print(scheduler.num_frozen, counters['stats']['unique_graphs'],\n"
            "      counters['frames']['total'] - counters['frames']['ok'], torch._dynamo.config.recompile_limit)")


@pytest.fixture(scope="module")
def ran_elsewhere(tmp_path_factory, installed) -> dict:
    """What each of the scripts above printed, and its error (None if it ran through)."""
    parts = {"import": IMPORT_FREEZEOUT, "api": PUBLIC_API, "compiled": COMPILED}
    p = in_elsewhere(tmp_path_factory.mktemp("elsewhere"), installed, RUN_PARTS, json.dumps(parts))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])


def output_of(ran_elsewhere: dict, part: str) -> str:
    assert ran_elsewhere[part]["error"] is None, ran_elsewhere[part]["error"]
    return ran_elsewhere[part]["stdout"]


LIBRARY_MODULES = {"__init__.py", "schedule.py", "units.py", "order.py", "estimate.py", "compile.py", "ddp.py",
                   "trainers.py", "lightning.py", "hf.py"}


def test_only_freezeout_is_installed(installed):
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    names = {p.name for p in installed.iterdir()} - {"__pycache__"}
    assert names == {"freezeout", f"freezeout-{version}.dist-info"}, names
    assert {p.name for p in (installed / "freezeout").glob("*.py")} == LIBRARY_MODULES
    metadata = (installed / f"freezeout-{version}.dist-info" / "METADATA").read_text()
    assert "Name: freezeout" in metadata and "Requires-Python: >=3.10" in metadata
    # torch alone, whatever is asked for; the frameworks only with their extra.
    required = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert [r for r in required if "extra ==" not in r] == ["Requires-Dist: torch>=2.1"]
    assert {"Provides-Extra: lightning", "Provides-Extra: hf"} <= set(metadata.splitlines())
    assert any(r.startswith("Requires-Dist: lightning>=2.2") and 'extra == "lightning"' in r for r in required)


def test_import_freezeout_from_another_directory(ran_elsewhere, installed):
    out = output_of(ran_elsewhere, "import")
    assert Path(out.strip()) == installed / "freezeout" / "__init__.py"


def test_the_scripts_modules_are_not_importable_from_the_install(tmp_path, installed):
    code = ("import importlib.util, sys\n"
            f"target = {str(installed)!r}\n"
            f"for name in {SCRIPT_MODULES!r}:\n"
            "    spec = importlib.util.find_spec(name)\n"
            "    if spec is not None and spec.origin and spec.origin.startswith(target):\n"
            "        print(name)\n")
    p = in_elsewhere(tmp_path, installed, code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == []


def test_the_installed_package_gives_the_public_api(ran_elsewhere):
    counts, api = output_of(ran_elsewhere, "api").splitlines()
    n_units, speedup, t_0, slices_as_lists = counts.split()
    assert n_units == "4" and 0 < float(speedup) < 1 and float(t_0) == 0.5
    assert slices_as_lists == "True"  # a slice of an nn.Sequential is a unit to the estimate too
    for name in ("FreezeOut", "param_groups", "freeze", "find_units", "unit_times", "unit_lr",
                 "estimate_speedup", "t_0_for_speedup", "unit_flops", "schedule_speedup", "compile_model"):
        assert repr(name) in api, name


def test_the_installed_package_trains_a_compiled_model_past_the_recompile_limit(ran_elsewhere):
    frozen, graphs, failed, limit = map(int, output_of(ran_elsewhere, "compiled").split())
    assert frozen == 3 and graphs >= 4 and failed == 0 and limit > 2
