"""The run spec (spec.py) and the config train.py resolves from it: every setting declared once,
with its flag, default, help and check; the spec immutable once parsed; --resume and grids
compare result settings only; every result setting that differs from its default is in the
default run name; messages name the flag as the spec spells it."""
import argparse
import dataclasses

import pytest

import benchmark
import reproduce
import spec
import train
from spec import resolve_config

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
    _, args, explicit = train.parse_args([*flags, "--device", "cpu"])
    return resolve_config(args, explicit, list(flags), train.build_parser()[1])


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
    assert isinstance(parsed, spec.RunSpec) and parsed.epochs == 3 and explicit == {"epochs"}
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
    """engine, graphs, loaders, utils and checkpoint speak of settings; the command line's
    spelling of them comes from the spec, which installs it for their messages."""
    import re
    from pathlib import Path

    import utils
    root = Path(spec.__file__).parent
    for module in ("engine.py", "graphs.py", "loaders.py", "utils.py", "checkpoint.py"):
        assert not re.search(r"--[a-z]", (root / module).read_text()), module
    afile = tmp_path / "a-file"
    afile.write_text("")
    with pytest.raises(utils.DataError, match=r"^--data-root .* is not a directory$"):
        utils.check_data_root(afile)
    utils.name_settings(str)  # as the library reads without the command line
    try:
        with pytest.raises(utils.DataError, match=r"^data_root .* is not a directory$"):
            utils.check_data_root(afile)
    finally:
        utils.name_settings(spec.message_name)


def test_reproduce_builds_specs_and_their_flags_give_them_back(tmp_path):
    """reproduce.py builds each grid run's spec; the flags it hands train.py parse back to it."""
    for flags in (["--preset", "quick"], ["--preset", "paper", "--model", "vgg", "--target-speedups", "0.2"],
                  ["--model", "wrn", "--strategies", "linear-unscaled", "--t0s", "0.5", "--amp", "bf16"]):
        settings = reproduce.resolve_settings(reproduce.build_parser().parse_args(flags))
        for job in reproduce.make_grid(settings, tmp_path):
            _, parsed, explicit = train.parse_args(job.argv)
            assert isinstance(job.spec, spec.RunSpec) and parsed == job.spec and explicit == spec.given(job.spec)
