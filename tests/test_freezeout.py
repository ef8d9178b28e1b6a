"""The schedule and the freezing: learning rates, freezing times, frozen units left untouched."""
import copy
import gc
import math
import warnings
import weakref
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import closed_form_frozen_at, closed_form_lrs, closed_form_t
from densenet import DenseNet
from freezeout import FreezeOut, freeze, param_groups, unit_lr, unit_modules, unit_times

STRATEGIES = [("linear", 1), ("squared", 2), ("cubic", 3)]


class Small(nn.Module):
    """Four conv+BN+ReLU units and a classifier: a model FreezeOut knows nothing about."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            for i in range(4))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean((2, 3)))

    def units(self):
        return [*self.blocks, self.fc]


def make(model, units, total, t_0=0.8, how_scale="cubic", scale_lr=True, opt=torch.optim.SGD, **kw):
    if opt is torch.optim.SGD and not kw:
        kw = dict(momentum=0.9, nesterov=True, weight_decay=1e-4)
    optimizer = opt(param_groups(units), lr=0.1, **kw)
    return optimizer, FreezeOut(optimizer, units, total, t_0=t_0, how_scale=how_scale, scale_lr=scale_lr)


def train_step(model, optimizer, scheduler, k, batch=4):
    g = torch.Generator().manual_seed(1000 + k)
    x, y = torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 5, (batch,), generator=g)
    model.train()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
    optimizer.step()
    scheduler.step()


@pytest.mark.parametrize("how_scale,power", STRATEGIES)
def test_unit_times(how_scale, power):
    t = unit_times(5, 0.6, how_scale)
    assert t == [closed_form_t(i, 5, 0.6, power) for i in range(5)]
    assert t[-1] == 1.0 and t == sorted(t)
    assert unit_times(5, 1.0, how_scale) == [1.0] * 5
    assert unit_times(40, 0.8, "cubic")[0] == pytest.approx(0.512)


OPTIMIZERS = [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o.__name__)
@pytest.mark.parametrize("scale_lr", [True, False])
@pytest.mark.parametrize("how_scale,power", STRATEGIES)
def test_learning_rates_follow_the_formula_exactly(how_scale, power, scale_lr, opt):
    torch.manual_seed(0)
    model = Small()
    total, t_0 = 37, 0.3
    optimizer, scheduler = make(model, model.units(), total, t_0, how_scale, scale_lr, opt=opt)
    with pytest.warns(UserWarning, match="past the end"):
        for k in range(total + 3):  # a few steps past the end: everything stays at zero
            lrs = [g["lr"] for g in optimizer.param_groups]
            assert lrs == closed_form_lrs(k, 5, total, t_0, power, scale_lr), k
            assert scheduler.get_last_lr() == lrs
            train_step(model, optimizer, scheduler, k)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0] * 5


@pytest.mark.parametrize("how_scale,power", STRATEGIES)
def test_units_freeze_at_the_first_step_past_t_i_in_order_and_never_thaw(how_scale, power):
    torch.manual_seed(0)
    model = Small()
    total, t_0 = 50, 0.2
    optimizer, scheduler = make(model, model.units(), total, t_0, how_scale)
    t = [closed_form_t(i, 5, t_0, power) for i in range(5)]
    history = [scheduler.frozen]
    for k in range(total):
        train_step(model, optimizer, scheduler, k)
        history.append(scheduler.frozen)
    for k, frozen in enumerate(history):
        # Freezing is applied when preparing step k < T, for every unit with k >= t_i * T.
        assert frozen == [min(k, total - 1) >= t_i * total for t_i in t], k
    for before, after in pairwise(history):
        assert all(a or not b for b, a in zip(before, after, strict=True))  # once frozen, always frozen
    assert scheduler.frozen_at == closed_form_frozen_at(5, total, t_0, power)
    assert scheduler.frozen_at[-1] is None  # the output unit trains to the end


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o.__name__)
def test_frozen_units_stay_bit_identical_and_leave_autograd(opt):
    torch.manual_seed(0)
    model = DenseNet(depth=16, growth_rate=4, num_classes=5)  # 2 layers per block, 11 units
    units = model.freeze_units()
    total = 40
    optimizer, scheduler = make(model, units, total, t_0=0.1, how_scale="linear", opt=opt,
                                **({} if opt is torch.optim.SGD else {"weight_decay": 0.05}))
    k = 0
    while scheduler.num_frozen < 3:
        train_step(model, optimizer, scheduler, k, batch=6)
        k += 1
    frozen, active = units[:scheduler.num_frozen], units[scheduler.num_frozen:]
    snapshot = [copy.deepcopy(u.state_dict()) for u in frozen]  # weights and BN statistics
    for _ in range(5):
        model.train()
        train_step(model, optimizer, scheduler, k, batch=6)
        k += 1
    n = len(frozen)
    for unit, before in zip(frozen, snapshot, strict=True):
        after = unit.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[key], after[key]) for key in before)
        assert all(not m.training for m in unit.modules()), "model.train() woke a frozen unit"
        for p in unit.parameters():
            assert not p.requires_grad and p.grad is None and p not in optimizer.state
    for g in optimizer.param_groups[:n]:
        assert g["lr"] == 0.0
    assert any(p.grad is not None for u in active for p in u.parameters())

    # Autograd records nothing for the frozen prefix: no grad_fn on its outputs.
    outputs = []
    hooks = [u.register_forward_hook(lambda m, i, o: outputs.append(o)) for u in units]
    model.train()
    model(torch.randn(2, 3, 16, 16))
    for h in hooks:
        h.remove()
    assert scheduler.num_frozen >= n
    for i, out in enumerate(outputs):
        if i < scheduler.num_frozen:
            assert out.grad_fn is None and not out.requires_grad, i
        else:
            assert out.grad_fn is not None, i


def test_t0_of_one_is_plain_cosine_annealing_without_freezing():
    torch.manual_seed(0)
    model = Small()
    total = 20
    optimizer, scheduler = make(model, model.units(), total, t_0=1.0, how_scale="cubic")
    for k in range(total):
        cosine = 0.5 * 0.1 * (1 + math.cos(math.pi * k / total))
        assert [g["lr"] for g in optimizer.param_groups] == [cosine] * 5
        train_step(model, optimizer, scheduler, k)
    assert scheduler.num_frozen == 0 and scheduler.frozen_at == [None] * 5
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("opt,kw", [(torch.optim.SGD, dict(momentum=0.9, nesterov=True)),
                                    (torch.optim.Adam, dict(weight_decay=1e-4)),
                                    (torch.optim.AdamW, dict(weight_decay=1e-2))])
def test_state_dict_round_trip_continues_the_same_schedule(opt, kw):
    total, cut = 30, 17

    def fresh():
        torch.manual_seed(0)
        model = Small()
        return (model, *make(model, model.units(), total, t_0=0.3, how_scale="cubic", opt=opt, **kw))

    model_a, opt_a, sched_a = fresh()
    for k in range(total):
        train_step(model_a, opt_a, sched_a, k)

    model_b, opt_b, sched_b = fresh()
    for k in range(cut):
        train_step(model_b, opt_b, sched_b, k)
    assert 0 < sched_b.num_frozen < 5, "the cut should fall in the middle of the freezing"
    saved = copy.deepcopy({"model": model_b.state_dict(), "opt": opt_b.state_dict(),
                           "sched": sched_b.state_dict()})
    model_c, opt_c, sched_c = fresh()
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    sched_c.load_state_dict(saved["sched"])
    assert sched_c.frozen == sched_b.frozen and sched_c.frozen_at == sched_b.frozen_at
    # The resumed scheduler froze those units again: no gradients, no optimizer state,
    # inference mode through model.train().
    model_c.train()
    for unit in model_c.units()[:sched_c.num_frozen]:
        assert all(not p.requires_grad and p not in opt_c.state for p in unit.parameters())
        assert not any(m.training for m in unit.modules())
    for unit in model_c.units()[sched_c.num_frozen:]:
        assert all(p.requires_grad for p in unit.parameters()) and unit.training
    assert [g["lr"] for g in opt_c.param_groups] == [g["lr"] for g in opt_b.param_groups]
    for k in range(cut, total):
        train_step(model_c, opt_c, sched_c, k)
    assert sched_c.frozen_at == sched_a.frozen_at
    a, c = model_a.state_dict(), model_c.state_dict()
    assert all(torch.equal(a[key], c[key]) for key in a)


def test_misuse_is_refused_clearly():
    model = Small()
    units = model.units()
    with pytest.raises(ValueError, match="t_0 must be in"):
        make(model, units, 10, t_0=0.0)
    with pytest.raises(ValueError, match="t_0 must be in"):
        make(model, units, 10, t_0=1.5)
    with pytest.raises(ValueError, match="how_scale"):
        make(model, units, 10, how_scale="quartic")
    with pytest.raises(ValueError, match="total_steps"):
        make(model, units, 0)
    with pytest.raises(ValueError, match="param groups"):
        FreezeOut(torch.optim.SGD(model.parameters(), lr=0.1), units, 10)
    with pytest.raises(ValueError, match="shares parameters"):
        param_groups([model.blocks[0], model.blocks[0][0]])


def test_units_out_of_forward_order_are_caught_at_the_first_step():
    torch.manual_seed(0)
    model = Small()
    units = model.units()
    units[1], units[2] = units[2], units[1]
    optimizer, scheduler = make(model, units, 20)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    with pytest.raises(ValueError, match="not in forward order: unit 2 ran before unit 1"):
        scheduler.step()


def test_a_unit_outside_the_forward_pass_is_warned_about():
    torch.manual_seed(0)
    model = Small()
    spare = nn.Linear(3, 3)
    units = [*model.units()[:-1], spare, model.fc]
    optimizer, scheduler = make(model, units, 20)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    with pytest.warns(UserWarning, match=r"units \[4\] did not run"):
        scheduler.step()


def test_list_units_freeze_every_module_in_them():
    torch.manual_seed(0)
    model = Small()
    block = model.blocks[0]
    units = [[block[0], block[1]], *model.units()[1:]]  # a unit made of two modules
    optimizer, scheduler = make(model, units, 10, t_0=0.05, how_scale="linear")
    train_step(model, optimizer, scheduler, 0)
    train_step(model, optimizer, scheduler, 1)
    assert scheduler.frozen[0]
    model.train()
    assert not block[0].training and not block[1].training
    assert not any(p.requires_grad for p in block[:2].parameters())


def test_lr_at_is_the_schedule_the_scheduler_follows():
    torch.manual_seed(0)
    model = Small()
    total = 25
    optimizer, scheduler = make(model, model.units(), total, t_0=0.3, how_scale="squared")
    table = [scheduler.lr_at(k) for k in range(total)]  # ahead of time, from the formula alone
    for k in range(total):
        assert scheduler.get_last_lr() == table[k] == [g["lr"] for g in optimizer.param_groups], k
        train_step(model, optimizer, scheduler, k)
    assert scheduler.lr_at(total) == [0.0] * 5


def sequential_model(shared_relu=True):
    """Three conv+BN+ReLU stages and a classifier in one nn.Sequential; by default one ReLU
    module is reused by every stage, as models often do."""
    relus = [nn.ReLU()] * 3 if shared_relu else [nn.ReLU() for _ in range(3)]
    layers = []
    for i, relu in enumerate(relus):
        layers += [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8), relu]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


@pytest.mark.parametrize("shared_relu", [True, False])
def test_slices_of_a_sequential_are_units_in_forward_order(shared_relu):
    torch.manual_seed(0)
    model = sequential_model(shared_relu)
    units = [model[0:3], model[3:6], model[6:9], model[11]]  # new containers the model never calls
    optimizer, scheduler = make(model, units, 12, t_0=0.1, how_scale="linear")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no false "did not run" nor any other warning
        k = 0
        while scheduler.num_frozen < 2:
            train_step(model, optimizer, scheduler, k)
            k += 1
        snapshot = copy.deepcopy(model[0:6].state_dict())
        for _ in range(2):
            train_step(model, optimizer, scheduler, k)
            k += 1
    after = model[0:6].state_dict()
    assert all(torch.equal(snapshot[key], after[key]) for key in snapshot)
    assert not model[1].training and not model[4].training
    assert model[7].training is (scheduler.num_frozen < 3)
    assert not any(p.requires_grad for p in model[0:6].parameters())


def test_slices_of_a_sequential_out_of_order_are_caught():
    torch.manual_seed(0)
    model = sequential_model()
    units = [model[0:3], model[6:9], model[3:6], model[11]]
    optimizer, scheduler = make(model, units, 12)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    with pytest.raises(ValueError, match="not in forward order: unit 2 ran before unit 1"):
        scheduler.step()


def test_a_unit_resolves_to_the_models_own_modules():
    model = sequential_model(shared_relu=False)
    # A module of the model stays as it is, even a container (the model itself included).
    assert unit_modules(model[4], model) == [model[4]]
    assert unit_modules(model, model) == [model]
    # A container the model does not hold (a slice, a new ModuleList) stands for its modules,
    # down to the first ones the model holds.
    assert unit_modules(model[0:3], model) == [model[0], model[1], model[2]]
    nested = nn.ModuleList([model[0:2], nn.Sequential(model[2], model[3:5])])
    assert unit_modules(nested, model) == [model[0], model[1], model[2], model[3], model[4]]
    assert unit_modules([model[0:2], model[2]], model) == [model[0], model[1], model[2]]
    # Without the model, a unit is its modules as listed.
    assert unit_modules(model[0:3])[0] is not model[0] and unit_modules([model[0], model[1]]) == [model[0], model[1]]
    for stranger in (nn.Linear(8, 5), sequential_model()[0:3], nn.Sequential(model[0], nn.ReLU()), nn.Sequential()):
        with pytest.raises(ValueError, match="not a submodule of the model.*a unit is a module"):
            unit_modules(stranger, model)


@pytest.mark.parametrize("bad", ["conv", 3, None, [[nn.Linear(2, 2)]], [nn.Linear(2, 2), "fc"]])
def test_what_is_no_unit_is_refused_by_the_scheduler_and_the_helpers_alike(bad):
    model = Small()
    units = [*model.units()[:-1], bad]
    for use in (param_groups, lambda u: freeze(u[-1]), lambda u: unit_modules(u[-1], model),
                lambda u: FreezeOut(torch.optim.SGD(model.parameters(), lr=0.1), u, 10)):
        with pytest.raises(TypeError, match="a unit is a module, a list or tuple of modules"):
            use(units)


def test_a_frozen_slice_stays_frozen_through_train():
    torch.manual_seed(0)
    model = sequential_model(shared_relu=False)
    units = [model[0:3], model[3:6], model[6:9], model[11]]
    groups = param_groups(units)
    assert [len(g["params"]) for g in groups] == [4, 4, 4, 2]
    freeze(units[0])
    model.train()
    assert not any(m.training for m in model[0:3])
    assert all(m.training for m in model[3:])
    assert not any(p.requires_grad for p in model[0:3].parameters())
    assert all(p.requires_grad for p in model[3:].parameters())
    before = copy.deepcopy(model[0:3].state_dict())
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    assert all(p.grad is None for p in model[0:3].parameters())
    assert all(torch.equal(before[k], v) for k, v in model[0:3].state_dict().items())  # BN statistics too


def test_a_shared_relu_listed_only_in_a_later_unit_is_no_order_error():
    # The one ReLU first runs in unit 0's stage but only unit 2 (a slice) holds it: a
    # parameter-free module says nothing about which unit is running.
    torch.manual_seed(0)
    model = sequential_model()
    units = [[model[0], model[1]], [model[3], model[4]], model[6:9], model[11]]
    optimizer, scheduler = make(model, units, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(3):
            train_step(model, optimizer, scheduler, k)


def test_a_trainable_module_in_no_unit_is_named_in_a_warning():
    torch.manual_seed(0)
    model = Small()
    units = [*model.blocks[:3], model.fc]  # blocks[3] forgotten: never optimized, and never frozen
    optimizer, scheduler = make(model, units, 12)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    with pytest.warns(UserWarning, match=r"belong to no unit \(blocks\.3\.0\.weight, blocks\.3\.0\.bias, "
                                         r"blocks\.3\.1\.weight, blocks\.3\.1\.bias\)\. They are never optimized"
                                         r".*backward keeps running through the frozen units before them"):
        scheduler.step()


def test_another_network_trained_beside_the_model_is_not_warned_about():
    torch.manual_seed(0)
    model, critic = Small(), nn.Linear(5, 1)  # say a GAN's discriminator, with its own optimizer
    optimizer, scheduler = make(model, model.units(), 12)
    critic(model(torch.randn(2, 3, 8, 8))).sum().backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.step()


def test_stepping_past_total_steps_warns_once():
    torch.manual_seed(0)
    model = Small()
    total = 6
    optimizer, scheduler = make(model, model.units(), total)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(total):  # the whole run: no warning
            train_step(model, optimizer, scheduler, k)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(total, total + 3):
            train_step(model, optimizer, scheduler, k)
    assert len(caught) == 1 and caught[0].category is UserWarning
    message = str(caught[0].message)
    assert "after optimizer step 6" in message and "total_steps=6" in message
    assert [g["lr"] for g in optimizer.param_groups] == [0.0] * 5


def test_rates_reach_zero_at_the_boundary_step_not_one_later():
    # Linear, t_0 = 0.5, 5 units, T = 40: t_i * T = 20, 25, 30, 35, 40, whole numbers, so each
    # unit's last step with a rate is t_i * T - 1 and the next one freezes it.
    torch.manual_seed(0)
    model = Small()
    total = 40
    optimizer, scheduler = make(model, model.units(), total, t_0=0.5, how_scale="linear", scale_lr=True)
    ends = [20, 25, 30, 35, 40]
    seen = []
    for k in range(total):
        seen.append([g["lr"] for g in optimizer.param_groups])
        train_step(model, optimizer, scheduler, k)
    for i, end in enumerate(ends):
        alpha = 0.1 / (end / total)
        assert seen[0][i] == alpha  # cos(0) = 1: the full initial rate at step 0
        if end % 2 == 0:  # half-way: cos(pi / 2) = 0
            assert seen[end // 2][i] == pytest.approx(alpha / 2, rel=1e-12)
        if end < total:
            assert seen[end - 1][i] == pytest.approx(0.5 * alpha * (1 - math.cos(math.pi / end)), rel=1e-12)
            assert seen[end - 1][i] > 0 and seen[end][i] == 0.0
    assert scheduler.frozen_at == [20, 25, 30, 35, None]
    # The formula on its own, at a fractional end (t_i * T = 7.5): step 7 still trains, 8 does not.
    assert unit_lr(7, 0.75, 10, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 7.5)))
    assert unit_lr(7, 0.75, 10, 1.0) > 0 and unit_lr(8, 0.75, 10, 1.0) == 0.0


def test_a_single_unit_is_plain_cosine_annealing_and_never_freezes():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(param_groups([model]), lr=0.1, momentum=0.9)
    scheduler = FreezeOut(optimizer, [model], total_steps=8, t_0=0.3, how_scale="cubic")
    assert scheduler.t_i == [1.0] and unit_times(1, 0.3, "cubic") == [1.0]
    for k in range(8):
        assert optimizer.param_groups[0]["lr"] == 0.5 * 0.1 * (1 + math.cos(math.pi * k / 8)), k
        loss = model(torch.randn(2, 4)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    assert scheduler.frozen_at == [None] and scheduler.num_frozen == 0
    assert model.weight.requires_grad and model.weight in optimizer.state


def test_step_with_an_epoch_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    model = Small()
    optimizer, scheduler = make(model, model.units(), 10)
    train_step(model, optimizer, scheduler, 0)
    before = (scheduler.last_epoch, [g["lr"] for g in optimizer.param_groups])
    with pytest.raises(TypeError, match="takes no epoch"):
        scheduler.step(5)
    assert (scheduler.last_epoch, [g["lr"] for g in optimizer.param_groups]) == before == (1, before[1])


def test_a_state_with_another_number_of_units_is_refused():
    torch.manual_seed(0)
    model = Small()
    optimizer, scheduler = make(model, model.units(), 10)
    for k in range(3):
        train_step(model, optimizer, scheduler, k)
    state = scheduler.state_dict()
    other = Small()
    units = other.units()[1:]  # 4 units
    opt4, sched4 = make(other, units, 10)
    with pytest.raises(ValueError, match="scheduler state has 5 units, this model has 4"):
        sched4.load_state_dict(state)
    assert sched4.last_epoch == 0 and sched4.t_i == unit_times(4, 0.8, "cubic")


def _global_pre_hooks() -> int:
    return len(torch.nn.modules.module._global_forward_pre_hooks)


def _run_and_forget() -> weakref.ref:
    """A module run once and then dropped: a weak reference to it, dead unless something
    (a forgotten hook's record of the modules it saw) keeps it alive."""
    spare = nn.Linear(2, 2)
    spare(torch.zeros(1, 2))
    return weakref.ref(spare)


def _hooks_without_a_watch() -> int:
    """The number of process-wide pre-hooks once no order watch is left: watches of schedulers
    dropped unchecked (earlier tests) leave the hook to the next watch's stop, which this is."""
    gc.collect()
    model = Small()
    train_step(model, *make(model, model.units(), 10), 0)
    return _global_pre_hooks()


def test_the_process_wide_order_watch_is_removed_after_the_first_step():
    before = _hooks_without_a_watch()
    torch.manual_seed(0)
    model = Small()
    optimizer, scheduler = make(model, model.units(), 10)
    assert _global_pre_hooks() == before + 1
    train_step(model, optimizer, scheduler, 0)
    assert _global_pre_hooks() == before
    ref = _run_and_forget()
    gc.collect()
    assert ref() is None, "a module that ran after the first step is still held"


def test_the_order_watch_goes_with_a_scheduler_dropped_before_its_first_step():
    before = _hooks_without_a_watch()
    torch.manual_seed(0)
    model = Small()
    optimizer, scheduler = make(model, model.units(), 10)
    model(torch.randn(2, 3, 8, 8))  # a forward pass, never followed by a step
    ref = _run_and_forget()
    hooks = dict(torch.nn.modules.module._global_forward_pre_hooks)
    assert len(hooks) == before + 1
    del optimizer, scheduler
    gc.collect()
    assert ref() is None  # the dropped watch's record of the modules it saw is gone
    # ... but the garbage collector changed no hook: it may run in the middle of torch.compile's
    # tracing, which fails when the global hooks change under it. The next watch's stop removes it.
    assert dict(torch.nn.modules.module._global_forward_pre_hooks) == hooks
    assert _hooks_without_a_watch() == before


def test_a_resumed_scheduler_does_not_watch_the_order_again():
    torch.manual_seed(0)
    model = Small()
    optimizer, scheduler = make(model, model.units(), 10)
    train_step(model, optimizer, scheduler, 0)
    state = scheduler.state_dict()
    before = _global_pre_hooks()
    optimizer2, resumed = make(model, model.units(), 10)
    resumed.load_state_dict(state)
    assert _global_pre_hooks() == before
