"""A stopped reproduce.py grid says how to continue it."""
import os
import signal

import pytest

import engine
import reproduce

TINY = ["-L", "10", "-k", "4", "--dataset", "synthetic", "--which_dataset", "10", "--subset", "64",
        "--batch_size", "32", "--epochs", "2", "--t0s", "0.5", "--strategies", "cubic-scaled",
        "--seeds", "0", "--device", "cpu"]

@pytest.fixture
def no_figures(monkeypatch):
    # The report's figures are another test file's concern; these tests read the table.
    for name in ("plot_lr_schedules", "plot_error_vs_speedup", "plot_error_vs_time"):
        monkeypatch.setattr(reproduce, name, lambda *args, **kwargs: None)


# -- a stopped grid: how to continue it --------------------------------------------------
@pytest.mark.parametrize("stop,code", [(SystemExit(130), 130), (SystemExit(143), 143),
                                       (KeyboardInterrupt(), 130)])
def test_a_stop_says_to_run_the_same_command_again(tmp_path, capsys, monkeypatch, stop, code):
    def stopped(argv, **kwargs):
        raise stop

    monkeypatch.setattr(reproduce, "train_main", stopped)
    with pytest.raises(SystemExit) as info:
        reproduce.main([*TINY, "--out", str(tmp_path)])
    assert info.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(": stopped; run the same command again to continue where it stopped "
                            "(finished runs are kept, the interrupted one resumes)")  # after the prog name
    assert not any("--resume" in line for line in err)


def test_errors_other_than_a_stop_keep_their_exit_code(tmp_path, capsys, monkeypatch):
    def data_error(argv, **kwargs):
        raise SystemExit(1)

    monkeypatch.setattr(reproduce, "train_main", data_error)
    with pytest.raises(SystemExit) as info:
        reproduce.main([*TINY, "--out", str(tmp_path)])
    assert info.value.code == 1 and "stopped;" not in capsys.readouterr().err


def test_ctrl_c_inside_a_real_run_then_the_same_command_continues(tmp_path, capsys, monkeypatch, no_figures):
    real_step, calls = engine.train_step, []

    def step_then_sigint(*args):
        calls.append(1)
        if len(calls) == 3:  # the baseline's second epoch
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args)

    monkeypatch.setattr(engine, "train_step", step_then_sigint)
    with pytest.raises(SystemExit) as info:
        reproduce.main([*TINY, "--out", str(tmp_path)])
    assert info.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err.strip().splitlines()
    assert ": stopped; run the same command again" in err[-1]
    assert "stopped by SIGINT in epoch 2" in err[-2] and "checkpoint written" in err[-2]
    assert not any("--resume" in line for line in err), err

    monkeypatch.setattr(engine, "train_step", real_step)
    rows = reproduce.main([*TINY, "--out", str(tmp_path)])
    assert "baseline, seed 0: resuming" in capsys.readouterr().out
    assert [r["strategy"] for r in rows] == ["baseline", "cubic-scaled"]
