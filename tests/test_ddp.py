"""freezeout.ddp: under DistributedDataParallel the frozen units leave the gradient all-reduce,
in a plain loop, in Lightning (strategy="ddp") and in the Hugging Face Trainer, 2 CPU
processes over gloo; the elements each step all-reduces are counted by a communication hook
(tests/ddp_count.py) and every rank ends with the same weights, bit for bit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import freezeout
from conftest import closed_form_frozen_at, closed_form_lrs
from freezeout.ddp import follow_freezing

ROOT = Path(__file__).resolve().parents[1]
# The runs below: 6 units (5 blocks and a head), 12 optimizer steps, linear, t_0 = 0.3.
FROZEN_AT = closed_form_frozen_at(6, 12, 0.3, power=1)


def launch(command: list, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def torchrun(script: str, *args, tmp_path: Path) -> subprocess.CompletedProcess:
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   str(ROOT / "tests" / script), *map(str, args)], tmp_path)


def assert_only_training_parameters_all_reduced(record: dict) -> None:
    assert record["world_size"] == 2 and record["ranks_identical"]
    assert record["frozen_at"] == FROZEN_AT
    levels = [step["frozen"] for step in record["steps"]]
    assert levels == [sum(at is not None and at <= k for at in FROZEN_AT) for k in range(12)]
    for step in record["steps"]:  # each freeze level all-reduces what still trains, no more
        assert step["all_reduced"] == step["training"], record["steps"]
    assert len({step["training"] for step in record["steps"]}) == 6  # a level for each unit frozen


@pytest.mark.slow  # torchrun
def test_a_plain_loop_all_reduces_only_the_parameters_still_training(tmp_path):
    torchrun("ddp_loop.py", f"{tmp_path}{os.sep}", tmp_path=tmp_path)
    for name in ("follow", "follow_find_unused"):  # find_unused_parameters False, then True
        assert_only_training_parameters_all_reduced(json.loads((tmp_path / f"{name}.json").read_text()))
    # Without follow_freezing, find_unused_parameters=True keeps all-reducing every parameter.
    plain = json.loads((tmp_path / "find_unused.json").read_text())
    assert plain["ranks_identical"] and all(s["all_reduced"] == plain["steps"][0]["training"] for s in plain["steps"])
    assert plain["steps"][-1]["training"] < plain["steps"][0]["training"]


@pytest.mark.slow  # two processes started by Lightning
def test_lightning_ddp_without_find_unused_parameters_runs_and_all_reduces_what_trains(tmp_path):
    pytest.importorskip("lightning")
    launch([sys.executable, str(ROOT / "tests" / "ddp_lightning.py"), str(tmp_path / "out.json")], tmp_path)
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["total_steps"] == 12 and record["last_step"] == 12  # 64 images a rank, batch 8, accumulate 2
    assert_only_training_parameters_all_reduced(record)


@pytest.mark.slow  # torchrun
def test_hugging_face_trainer_under_ddp_all_reduces_what_trains_and_logs_every_rate(tmp_path):
    pytest.importorskip("transformers")
    torchrun("ddp_hf.py", tmp_path / "out.json", 0, tmp_path=tmp_path)
    record = json.loads((tmp_path / "out.json").read_text())
    assert record["total_steps"] == 12 and record["last_step"] == 12 and record["freezeout_warnings"] == []
    assert_only_training_parameters_all_reduced(record)
    for log in record["rates"]:  # every logged rate: the formula's for the step it was used in
        k = log["step"] - 1
        expected = closed_form_lrs(k, 6, 12, 0.3, power=1, base=1e-3)
        assert [log[f"freezeout/lr_unit_{i}"] for i in range(6)] == pytest.approx(expected, rel=1e-12, abs=0)
        assert log["learning_rate"] == pytest.approx(expected[-1], rel=1e-12)
        assert log["freezeout/frozen_units"] == sum(at is not None and at <= k + 1 for at in FROZEN_AT)


# -- in one process: a DDP module over a process group of one -------------------------------
@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def blocks() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)], nn.Linear(8, 2))


def test_unsupported_ddp_settings_are_refused_in_one_line(one_process_group):
    model = blocks()
    optimizer = torch.optim.SGD(freezeout.param_groups(list(model)), lr=0.1)
    scheduler = freezeout.FreezeOut(optimizer, list(model), total_steps=4)
    with pytest.raises(ValueError, match=r"^FreezeOut under DDP: static_graph=True .* static_graph=False") as refused:
        follow_freezing(scheduler, DistributedDataParallel(model, static_graph=True))
    assert "\n" not in str(refused.value)
    with pytest.raises(TypeError, match="DistributedDataParallel module, got Sequential"):
        follow_freezing(scheduler, model)
    with pytest.raises(ValueError, match="does not hold the scheduler's units"):
        follow_freezing(scheduler, DistributedDataParallel(blocks()))


def test_a_resumed_schedule_rebuilds_the_reducer_before_the_first_step(one_process_group):
    # A run resumed with units frozen: the DDP module was made before the scheduler's state froze
    # them, and is found at its first forward (as a trainer's is): it must all-reduce only what
    # still trains from that very step, or DDP would wait for the frozen units' gradients.
    def make():
        model = blocks()
        optimizer = torch.optim.SGD(freezeout.param_groups(list(model)), lr=0.1, momentum=0.9)
        return model, optimizer, freezeout.FreezeOut(optimizer, list(model), total_steps=8, t_0=0.5)

    def step(ddp, optimizer, scheduler):
        ddp(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    model, optimizer, scheduler = make()
    ddp = DistributedDataParallel(model)
    follower = follow_freezing(scheduler, ddp)
    for _ in range(4):
        step(ddp, optimizer, scheduler)
    assert scheduler.num_frozen == 2 and follower.rebuilds == 2
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    follower.remove()

    model, optimizer, scheduler = make()
    ddp = DistributedDataParallel(model)  # over every parameter
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    follower = follow_freezing(scheduler)  # found at the first forward
    sizes = []
    ddp.register_comm_hook(sizes, lambda state, bucket: (state.append(bucket.buffer().numel()),
                                                         _all_reduced(bucket))[1])
    for _ in range(3):
        sizes.clear()
        step(ddp, optimizer, scheduler)
    assert follower.ddp is ddp and sum(sizes) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    follower.remove()


def _all_reduced(bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    return allreduce_hook(None, bucket)


def test_follow_freezing_needs_a_freezeout_scheduler():
    model = blocks()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="needs a FreezeOut scheduler, got StepLR"):
        follow_freezing(torch.optim.lr_scheduler.StepLR(optimizer, 1))
