"""The settings (config.py) as a run sees them: every setting typed reaches the run and its
config record, which holds what the run used (and the settings as asked for, from which a
resume starts again); the default run name tells apart any two runs that compute different
things; --resume and grids compare result settings only, the continue command gives back the
runtime ones, a resume whose settings now resolve otherwise is refused; messages name each
setting by its flag where a script prints them, by its name elsewhere."""
import dataclasses

import pytest

import benchmark
import config
import reproduce
import rundir
from conftest import ROOT, run_train
from messages import DataError, render

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


def resolved(*flags) -> config.Config:
    return config.resolve(*config.parse([*flags, "--device", "cpu"])[1:])


def recorded(*flags) -> dict:
    """The settings' half of the config record of a run with these flags."""
    return config.record(resolved(*flags), list(flags))


def test_every_result_setting_has_a_changed_value_here():
    assert set(CHANGED) == config.RESULT


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_every_result_setting_that_differs_from_its_default_is_in_the_default_run_name(name):
    assert resolved(*CHANGED[name]).name != resolved().name


@pytest.mark.parametrize("name", sorted(set(config.NAMES) - config.RESULT - {"resume", "name", "out_dir"}))
def test_runtime_settings_leave_the_name_alone(name):
    value = {"device": "cpu", "workers": "2", "data_root": "/elsewhere", "loader": "tensor", "cuda_graphs": "off",
             "compile_backend": "aot_eager", "dist_timeout": "1"}.get(name)
    meta = config.FIELDS[name].metadata
    flags = [meta["switches"][0][0]] if meta["switches"] else [meta["flags"][-1], value]
    assert resolved(*flags).name == resolved().name


def test_every_setting_typed_reaches_the_run_and_its_record():
    """The record holds what the run uses (resolved), and beside it the settings as asked for."""
    flags = ["--model", "densenet", "-L", "22", "-k", "8", "--no-bottleneck", "--reduction", "0.4", "--dropout", "0.1",
             "--dataset", "synthetic", "--which_dataset", "10", "--data-root", "/d", "--subset", "512",
             "--no-augment", "--validate-test", "--loader", "tensor", "--workers", "2", "--epochs", "3",
             "--batch_size", "32", "--lr", "0.05", "--momentum", "0.8", "--weight-decay", "5e-4", "--seed", "7",
             "--how_scale", "linear", "--no_scale", "--const_time", "--target-speedup", "0.1", "--out-dir", "o",
             "--name", "n", "--device", "cpu", "--amp", "bf16", "--channels-last", "--cuda-graphs", "off",
             "--compile", "--compile-backend", "aot_eager", "--dist-timeout", "2"]
    _, request, typed = config.parse(flags)
    assert typed == set(config.NAMES) - {"t_0", "resume"}  # t_0 goes with no --target-speedup
    cfg = config.resolve(request, typed)
    record = config.record(cfg, flags)
    # what the run uses: classes, the t_0 solved for the target, the epochs --const_time gives
    assert (record["dataset"], record["synthetic_classes"], record["num_classes"]) == ("synthetic", 10, 10)
    assert record["t_0"] != 0.8 and record["epochs"] > 3 and record["requested_epochs"] == 3
    assert record["run_dir"] == "o/n" and record["paper_speedup"] is None  # a plain DenseNet: no paper formula
    # every setting as asked for, in args: what a resume starts again from
    parsed_again = config.from_requests(record["args"])
    assert parsed_again == request
    # each value typed is in the record, or in the plan's half (device, workers) or not recorded
    planned_or_not = {"workers", "device", "resume", "dist_timeout", "which_dataset"}
    for name in set(config.NAMES) - planned_or_not - {"t_0", "epochs", "dataset"}:
        assert record[name] == getattr(request, name), name


def test_the_config_is_immutable_and_resolving_fills_in_what_the_run_uses():
    _, request, typed = config.parse(["--epochs", "3"])
    assert typed == {"epochs"} and request.depth is None and request.run_dir is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.epochs = 4
    cfg = config.resolve(request, typed)
    assert (cfg.depth, cfg.growth_rate, cfg.dataset, cfg.num_classes) == (76, 12, "cifar100", 100)  # the defaults
    assert cfg.requested_dataset is None and cfg.requested_epochs == 3 and cfg.run_dir.startswith("runs/densenetBC")


def test_help_states_every_setting_and_its_default():
    parser = config.parser()
    text = parser.format_help()
    for f in config.SETTINGS:
        for spelling in (f.metadata["flags"] or [sw[0] for sw in f.metadata["switches"]]):
            assert spelling in text, spelling
    for action in parser._actions:
        if action.dest != "help":
            assert action.nargs == 0 or "(default:" in action.help, action.dest


def test_flags_are_named_as_declared():
    assert config.flag("growth_rate") == "-k/--growth-rate" and config.flag("depth") == "-L/--depth"
    assert config.flag("t_0") == "--t_0" and config.flag("name") == "--name" and config.flag("other") == "other"
    assert config.flag("eval_mode") == "--validate/--validate-test/--no-validate"
    with pytest.raises(ValueError, match=r"^-k/--growth-rate must be a positive integer, got 0$"):
        resolved("-k", "0")


def test_resume_may_change_where_and_how_fast_a_run_goes_not_what_it_computes():
    saved = config.requests(resolved("--t_0", "0.8", "--epochs", "3", "--loader", "tensor"))
    now = resolved("--device", "cpu", "--workers", "0", "--data-root", "/elsewhere", "--cuda-graphs", "off",
                   "--t_0", "0.8", "--epochs", "3", "--loader", "tensor")
    config.refuse_changes(saved, now, {"device", "workers", "data_root", "cuda_graphs", "t_0", "epochs"})
    assert {"device", "workers", "data_root", "cuda_graphs", "compile", "dist_timeout"} <= config.RESUMABLE
    for name, flags, value in [("t_0", ["--t_0", "0.5"], 0.5), ("epochs", ["--epochs", "4"], 4),
                               ("amp", ["--amp", "bf16"], "bf16"),
                               ("loader", ["--loader", "torchvision"], "torchvision")]:
        with pytest.raises(ValueError, match=f"^--resume: --{name} {value} contradicts the saved run's {name} = "):
            config.refuse_changes(saved, resolved(*flags), {name})
    config.refuse_changes(saved, resolved("--epochs", "100"), set())  # not typed: not compared


def test_grids_compare_result_settings_and_nothing_else():
    base = recorded("--subset", "100")
    assert config.differences(base, recorded("--subset", "100", "--workers", "3", "--loader", "tensor")) == []
    assert config.differences(base, recorded("--subset", "100", "--epochs", "7")) == ["epochs = 100, not 7"]
    assert config.differences(base, recorded("--subset", "100", "--which_dataset", "10")) == \
        ["dataset = 'cifar100', not 'cifar10'"]


def test_the_scripts_share_train_pys_flags_and_defaults():
    """benchmark.py and reproduce.py take the settings they share with train.py from config.py:
    the same spellings, choices and defaults."""
    def actions(parser):
        return {a.dest: a for a in parser._actions}
    for parser, shared in ((benchmark.build_parser(), ("model", "t_0", "how_scale", "device", "amp", "seed",
                                                        "cuda_graphs", "compile_backend")),
                           (reproduce.build_parser(), ("device", "amp", "cuda_graphs", "data_root"))):
        own = actions(parser)
        for name in shared:
            meta = config.FIELDS[name].metadata
            assert set(config.flag_spellings(*meta["flags"])) <= set(own[name].option_strings), name
            assert (list(meta["choices"]) if meta["choices"] else None) == own[name].choices, name


def test_the_machinery_names_settings_and_the_scripts_render_their_flags(tmp_path, capsys):
    """engine, graphs, loaders, the data sets, the messages and checkpoint speak of settings; a
    message is rendered with the flags where a script prints it, with the names elsewhere."""
    import re

    import data_sets
    for module in ("engine.py", "graphs.py", "loaders.py", "utils.py", "data_sets.py", "messages.py",
                   "checkpoint.py"):
        assert not re.search(r"--[a-z]", (ROOT / module).read_text()), module
    afile = tmp_path / "a-file"
    afile.write_text("")
    with pytest.raises(DataError) as refused:
        data_sets.check_data_root(afile)
    assert str(refused.value) == f"data_root {afile} is not a directory"
    assert refused.value.render(config.flag) == f"--data-root {afile} is not a directory"
    assert render(refused.value.message) == str(refused.value)


def test_reproduce_builds_configs_whose_flags_give_them_back(tmp_path):
    for flags in (["--preset", "quick"], ["--preset", "paper", "--model", "vgg", "--target-speedups", "0.2"],
                  ["--model", "wrn", "--strategies", "linear-unscaled", "--t0s", "0.5", "--amp", "bf16"]):
        settings = reproduce.resolve_settings(reproduce.build_parser().parse_args(flags))
        for job in reproduce.make_grid(settings, tmp_path):
            _, parsed, typed = config.parse(job.argv)
            assert parsed == job.cfg and typed == set(config.changed(job.cfg))


def test_a_record_of_an_older_version_reads():
    old = config.from_requests({"epochs": 3, "a_setting_since_removed": 1})
    assert old.epochs == 3 and old.compile is False and not hasattr(old, "a_setting_since_removed")


def test_the_continue_command_gives_every_setting_resume_may_change_and_parses_back():
    values = {"data_root": "/elsewhere", "workers": "2", "out_dir": "o", "device": "cpu", "cuda_graphs": "off",
              "compile": None, "compile_backend": "aot_eager", "dist_timeout": "1"}
    assert set(values) == config.RESUMABLE - {"resume", "name"}  # a new one needs a value here
    flags = [w for name, value in values.items() for w in
             ([config.FIELDS[name].metadata["switches"][0][0]] if value is None
              else [config.FIELDS[name].metadata["flags"][-1], value])]
    now = resolved(*flags, "--epochs", "3", "--channels-last", "--name", "the-run")
    argv = config.continue_argv(now)
    assert argv[-1] == "--resume" and argv[argv.index("--name") + 1] == "the-run"
    _, parsed, typed = config.parse(argv)
    assert typed == config.RESUMABLE and parsed.resume is True and parsed.name == "the-run"
    assert all(getattr(parsed, name) == getattr(now, name) for name in values)

    class TwoRanks:
        world_size, is_main = 2, True
    assert rundir.RunDir(now, TwoRanks()).continue_command(now).startswith("torchrun --nproc_per_node=2 train.py ")


def test_the_record_holds_the_settings_half_beside_the_plan(tmp_path):
    import plan
    from metrics_logger import read_records
    run_train(tmp_path, "--epochs", "1")
    record = read_records(tmp_path / "run" / "metrics.jsonl", "config")[0]
    half = recorded(*record["argv"])
    planned = [f.name for f in dataclasses.fields(plan.Plan)]
    assert not set(half) & set(planned)  # beside each other, never merged
    assert {k: record[k] for k in half} == half
    assert {"device", "workers"} <= set(planned) and {"resume", "dist_timeout"}.isdisjoint(record)
    assert record["device"] == "cpu" and record["workers"] == 0  # what the process decided


@pytest.mark.slow  # a fresh interpreter
def test_importing_config_decides_nothing(tmp_path):
    """config.py imports none of the modules that decide how a run executes or write files."""
    import subprocess
    import sys
    code = ("import sys, config\n"
            "print(sorted(m for m in ('engine', 'graphs', 'train', 'checkpoint', 'rundir') if m in sys.modules))")
    imported = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert imported.stdout.splitlines()[0] == "[]", imported.stdout + imported.stderr


def test_a_resume_refuses_a_run_this_version_resolves_otherwise(tmp_path, capsys):
    """The checkpoint's settings resolve, at every start, to what the run started with (here
    t_0 solved from a target speedup); where they no longer do, the run is not continued."""
    import torch

    run_train(tmp_path, "--epochs", "1", "--target-speedup", "0.2")
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    solved = state["config"]["t_0"]
    state["config"]["t_0"] = 0.75  # as if an earlier version had solved it otherwise, in both its records
    torch.save(state, path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace(f'"t_0": {solved!r}', '"t_0": 0.75', 1))
    with pytest.raises(SystemExit) as stopped:
        run_train(tmp_path, "--epochs", "1", "--target-speedup", "0.2", "--resume")
    assert stopped.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith(f": error: --resume: this version resolves the saved run's settings otherwise "
                         f"(t_0 = 0.75, not {solved!r}); continue it with the version of the code that started it")


def test_a_target_speedup_is_solved_on_the_model_the_run_trains():
    """A plain DenseNet's FLOP estimate, which t_0 is solved on, has the run's compression."""
    def t_0(*flags):
        return resolved("--no-bottleneck", "-L", "13", "-k", "4", "--dataset", "synthetic", "--which_dataset", "10",
                        "--target-speedup", "0.2", *flags).t_0
    assert t_0("--reduction", "0.25") != t_0()
