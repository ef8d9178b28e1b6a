"""The settings (spec.py) and the config record train.py makes of them: every setting declared
once, with its flag, default, help and check; the settings immutable once parsed, a dataclass
made from the table; the record their half beside the plan's, each decision made once; --resume
and grids compare result settings only, and the continue command gives the runtime ones; every
result setting that differs from its default is in the default run name; messages name the flag
as the spec spells it."""
import argparse
import dataclasses

import pytest

import benchmark
import reproduce
import spec
import train
from conftest import ROOT

# A non-default value of every result setting (with what else it needs to be valid).
CHANGED = {
    "model": ["--model", "wrn"], "depth": ["-L", "40"], "growth_rate": ["-k", "24"],
    "bottleneck": ["--no-bottleneck"], "reduction": ["--reduction", "0.4"], "dropout": ["--dropout", "0.2"],
    "dataset": ["--dataset", "cifar10"], "which_dataset": ["--which_dataset", "10"],
    "subset": ["--subset", "100"], "augment": ["--no-augment"], "eval_mode": ["--validate-test"],
    "epochs": ["--epochs", "5"], "batch_size": ["--batch_size", "64"], "lr": ["--lr", "0.05"],
    "momentum": ["--momentum", "0.8"], "weight_decay": ["--weight-decay", "5e-4"], "seed": ["--seed", "1"],
    "t_0": ["--t_0", "0.5"], "how_scale": ["--how_scale", "linear"], "scale_lr": ["--no_scale"],
    "const_time": ["--const_time"], "target_speedup": ["--target-speedup", "0.2"], "amp": ["--amp", "bf16"],
}


def resolved(*flags) -> dict:
    """The settings' half of the config record of a run with these flags."""
    _, args, explicit = train.parse_args([*flags, "--device", "cpu"])
    return spec.settings_record(args, spec.resolve(args, explicit, train.build_parser()[1]), list(flags))


def test_every_result_setting_has_a_changed_value_here():
    assert set(CHANGED) == spec.RESULT


@pytest.mark.parametrize("dest", sorted(CHANGED))
def test_every_result_setting_that_differs_from_its_default_is_in_the_default_run_name(dest):
    assert resolved(*CHANGED[dest])["name"] != resolved()["name"]


@pytest.mark.parametrize("dest", sorted(spec.RUNTIME - {"resume", "name", "out_dir"}))
def test_runtime_settings_leave_the_name_alone(dest):
    setting = spec.BY_DEST[dest]
    value = {"device": "cpu", "workers": "2", "data_root": "/elsewhere", "loader": "tensor", "cuda_graphs": "off",
             "compile_backend": "aot_eager", "dist_timeout": "1"}.get(dest)
    flags = [setting.switches[0][0]] if setting.switches else [setting.flags[-1], value]
    assert resolved(*flags)["name"] == resolved()["name"]


def test_help_states_every_setting_and_its_default():
    text = train.build_parser()[0].format_help()
    for s in spec.SETTINGS:
        for spelling in (s.flags or [sw[0] for sw in s.switches]):
            assert spelling in text, spelling
    parser = train.build_parser()[0]
    for action in parser._actions:
        if action.dest != "help":
            assert action.nargs == 0 or "(default:" in action.help, action.dest


def test_the_spec_is_immutable_once_parsed():
    _, parsed, explicit = train.parse_args(["--epochs", "3"])
    assert isinstance(parsed, spec.RunSettings) and parsed.epochs == 3 and explicit == {"epochs"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.epochs = 4
    assert parsed.depth == 76 and parsed.growth_rate == 12  # the model's defaults filled in


def test_flags_are_named_as_the_spec_spells_them():
    assert spec.flag("growth_rate") == "-k/--growth-rate" and spec.flag("depth") == "-L/--depth"
    assert spec.flag("t_0") == "--t_0" and spec.flag("name") == "--name"
    assert spec.flag("eval_mode") == "--validate/--validate-test/--no-validate"
    with pytest.raises(ValueError, match=r"^-k/--growth-rate must be a positive integer, got 0$"):
        resolved("-k", "0")


def test_resume_may_change_where_and_how_fast_a_run_goes_not_what_it_computes():
    saved = {"device": "cuda", "workers": 4, "data_root": "/data", "t_0": 0.8, "epochs": 3, "amp": "off",
             "loader": "tensor"}
    args = argparse.Namespace(device="cpu", workers=0, data_root="/elsewhere", out_dir="o", name="n",
                              resume=True, cuda_graphs="off", t_0=0.8, epochs=3, amp="off", loader="tensor")
    spec.check_resume_flags(saved, args, {"device", "workers", "data_root", "out_dir", "name", "resume",
                                          "cuda_graphs", "t_0", "epochs"})
    assert {"device", "workers", "data_root", "cuda_graphs", "compile", "dist_timeout"} <= spec.RESUMABLE
    for dest, value in [("t_0", 0.5), ("epochs", 4), ("amp", "bf16"), ("loader", "torchvision")]:
        changed = argparse.Namespace(**{**vars(args), dest: value})
        with pytest.raises(ValueError, match=f"^--resume: --{dest} {value} contradicts the saved run's {dest} = "):
            spec.check_resume_flags(saved, changed, {dest})
    # A flag not given on the command line is not compared, whatever its default.
    spec.check_resume_flags(saved, argparse.Namespace(**{**vars(args), "epochs": 100}), set())


def test_grids_compare_result_settings_and_nothing_else():
    base = resolved("--subset", "100")
    assert spec.setting_differences(base, resolved("--subset", "100", "--workers", "3", "--loader", "tensor")) == []
    assert spec.setting_differences(base, resolved("--subset", "100", "--epochs", "7")) == ["epochs = 100, not 7"]
    assert spec.setting_differences(base, resolved("--subset", "100", "--which_dataset", "10")) == \
        ["dataset = 'cifar100', not 'cifar10'"]


def test_the_scripts_share_the_specs_flags_and_defaults():
    """benchmark.py and reproduce.py take the settings they share with train.py from the spec:
    the same spellings, choices and defaults."""
    def actions(parser):
        return {a.dest: a for a in parser._actions}
    trained = {s.dest: s for s in spec.SETTINGS}
    for parser, shared in ((benchmark.build_parser(), ("model", "t_0", "how_scale", "device", "amp", "seed",
                                                        "cuda_graphs", "compile_backend")),
                           (reproduce.build_parser(), ("device", "amp", "cuda_graphs", "data_root"))):
        own = actions(parser)
        for dest in shared:
            s = trained[dest]
            assert set(spec.flag_spellings(*s.flags)) <= set(own[dest].option_strings), dest
            assert (list(s.choices) if s.choices else None) == own[dest].choices, dest


def test_the_machinery_names_settings_not_flags(tmp_path):
    """engine, graphs, loaders, the data sets, the messages and checkpoint speak of settings;
    the command line's spelling of them comes from the spec, which a script installs for their
    messages first thing (importing it changes nothing: the test below)."""
    import re
    from pathlib import Path

    import data_sets
    import messages
    root = Path(spec.__file__).parent
    for module in ("engine.py", "graphs.py", "loaders.py", "utils.py", "data_sets.py", "messages.py",
                   "checkpoint.py"):
        assert not re.search(r"--[a-z]", (root / module).read_text()), module
    afile = tmp_path / "a-file"
    afile.write_text("")
    spec.name_settings_by_flags()
    try:
        with pytest.raises(messages.DataError, match=r"^--data-root .* is not a directory$"):
            data_sets.check_data_root(afile)
    finally:
        messages.name_settings(str)  # as the library reads without the command line


def test_reproduce_builds_specs_and_their_flags_give_them_back(tmp_path):
    """reproduce.py builds each grid run's spec; the flags it hands train.py parse back to it."""
    for flags in (["--preset", "quick"], ["--preset", "paper", "--model", "vgg", "--target-speedups", "0.2"],
                  ["--model", "wrn", "--strategies", "linear-unscaled", "--t0s", "0.5", "--amp", "bf16"]):
        settings = reproduce.resolve_settings(reproduce.build_parser().parse_args(flags))
        for job in reproduce.make_grid(settings, tmp_path):
            _, parsed, explicit = train.parse_args(job.argv)
            assert isinstance(job.spec, spec.RunSettings) and parsed == job.spec and explicit == spec.given(job.spec)


# -- the settings typed, the plan beside them -------------------------------------------------
def test_the_settings_are_the_table_and_nothing_else():
    assert [f.name for f in dataclasses.fields(spec.RunSettings)] == [s.dest for s in spec.SETTINGS]
    assert spec.settings_from({}) == spec.RunSettings(**spec.SETTING_DEFAULTS)
    # A record made before a setting existed, or naming one since removed, still reads.
    old = spec.settings_from({"epochs": 3, "a_setting_since_removed": 1})
    assert old.epochs == 3 and old.compile is False and not hasattr(old, "a_setting_since_removed")


def test_the_continue_command_gives_every_setting_resume_may_change_and_parses_back():
    values = {"data_root": "/elsewhere", "workers": "2", "out_dir": "o", "device": "cpu", "cuda_graphs": "off",
              "compile": None, "compile_backend": "aot_eager", "dist_timeout": "1"}
    assert set(values) == spec.RESUMABLE - {"resume", "name"}  # a new one needs a value here
    flags = [w for dest, value in values.items() for w in
             ([spec.BY_DEST[dest].switches[0][0]] if value is None else [spec.BY_DEST[dest].flags[-1], value])]
    _, now, _ = train.parse_args([*flags, "--epochs", "3", "--channels-last", "--name", "given"])
    argv = spec.continue_argv(now, "the-run")
    assert argv[-1] == "--resume" and argv[argv.index("--name") + 1] == "the-run"
    _, parsed, explicit = train.parse_args(argv)
    assert explicit == spec.RESUMABLE and parsed.resume is True and parsed.name == "the-run"
    assert all(getattr(parsed, dest) == getattr(now, dest) for dest in values)
    assert train.continue_command(now, "the-run", world_size=2).startswith("torchrun --nproc_per_node=2 train.py ")


def test_the_config_record_is_the_settings_half_beside_the_plan(tmp_path):
    from conftest import run_train
    run_train(tmp_path, "--epochs", "1")
    record = train.read_records(tmp_path / "run" / "metrics.jsonl", "config")[0]
    _, settings, explicit = train.parse_args(record["argv"])
    half = spec.settings_record(settings, spec.resolve(settings, explicit), record["argv"])
    plan = [f.name for f in dataclasses.fields(train.Plan)]
    assert not set(half) & set(plan)  # beside each other, never merged
    assert list(record) == ["event", *half, *plan, "host"]
    assert {k: record[k] for k in half} == half
    assert {"device", "workers"} <= set(plan) and {"resume", "dist_timeout"}.isdisjoint(record)
    assert record["args"] == dataclasses.asdict(settings)


def test_each_decision_is_made_once_in_a_run_and_in_its_resume(tmp_path, monkeypatch):
    """The device, the precision and the training step are decided once per start, by the
    functions that decide them, and nowhere again (spec.py imports none of them: below)."""
    calls = {}

    def counted(name):
        real = getattr(train, name)

        def count(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)
        monkeypatch.setattr(train, name, count)
    for name in ("resolve_device", "effective_amp", "use_cuda_graphs", "choose_loader"):
        counted(name)
    from conftest import run_train
    run_train(tmp_path, "--epochs", "1")
    assert calls == {"resolve_device": 1, "effective_amp": 1, "use_cuda_graphs": 1, "choose_loader": 1}
    calls.clear()
    run_train(tmp_path, "--epochs", "1", "--resume")  # finished: decided, then nothing to do
    assert calls == {"resolve_device": 1, "effective_amp": 1, "use_cuda_graphs": 1}


@pytest.mark.slow  # a fresh interpreter
def test_importing_the_spec_decides_nothing_and_renames_nothing(tmp_path):
    """spec.py imports none of the modules that decide how a run executes, and importing it
    (or train.py) leaves the machinery's messages naming settings by their names."""
    import subprocess
    import sys
    afile = tmp_path / "a-file"
    afile.write_text("")
    code = ("import sys, spec\n"
            "print(sorted(m for m in ('engine', 'graphs', 'train', 'checkpoint') if m in sys.modules))\n"
            "import train, data_sets, messages\n"
            "try:\n    data_sets.check_data_root(sys.argv[1])\nexcept messages.DataError as e:\n    print(e)")
    imported = subprocess.run([sys.executable, "-c", code, str(afile)], cwd=ROOT, capture_output=True, text=True)
    lines = imported.stdout.splitlines()
    assert lines[0] == "[]" and lines[1].startswith(f"data_root {afile} "), imported.stdout + imported.stderr


def test_a_resume_refuses_a_run_this_version_resolves_otherwise(tmp_path, capsys):
    """The checkpoint's settings resolve, at every start, to what the run started with (here
    t_0 solved from a target speedup); where they no longer do, the run is not continued."""
    import torch

    from conftest import run_train
    run_train(tmp_path, "--epochs", "1", "--target-speedup", "0.2")
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    solved = state["config"]["t_0"]
    state["config"]["t_0"] = 0.75  # as if an earlier version had solved it otherwise
    torch.save(state, path)
    with pytest.raises(SystemExit) as stopped:
        run_train(tmp_path, "--epochs", "1", "--target-speedup", "0.2", "--resume")
    assert stopped.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith(f": error: --resume: this version resolves the saved run's settings otherwise "
                           f"(t_0 = 0.75, not {solved!r}); continue it with the version of the code that started it")


def test_a_target_speedup_is_solved_on_the_model_the_run_trains():
    """A plain DenseNet's FLOP estimate, which t_0 is solved on, has the run's compression."""
    def t_0(*flags):
        _, settings, explicit = train.parse_args(["--no-bottleneck", "-L", "13", "-k", "4", "--dataset", "synthetic",
                                                  "--which_dataset", "10", "--target-speedup", "0.2", *flags])
        return spec.resolve(settings, explicit).t_0
    assert t_0("--reduction", "0.25") != t_0()
