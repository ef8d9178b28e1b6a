"""The estimates: the paper's `calc_speedup` (utils.py), the t_0 solver, and the FLOP-based
estimate for any model (freezeout/estimate.py, imported by the scripts through utils.py):
per-unit counts, freeze levels, the schedule, against numbers counted by hand or counted on
the whole model; and that the estimate leaves the model as it was."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import PLAIN_L13_K4_FORWARD, continuous_speedup, stepped_speedup
from densenet import DenseNet
from freezeout import (
    estimate_speedup,
    first_frozen_steps,
    freeze,
    schedule_speedup,
    solve_t_0,
    t_0_for_speedup,
    training_flops_by_level,
    unit_flops,
    unit_times,
)
from utils import calc_speedup


# -- the paper's estimate ---------------------------------------------------------------
@pytest.mark.parametrize("t_0,how,value", [
    (0.8, "cubic", 0.177813), (0.8, "linear", 0.089955), (0.8, "squared", 0.127914),
    (0.5, "cubic", 0.348430), (0.5, "linear", 0.224888), (1.0, "cubic", 0.0), (1.0, "linear", 0.0)])
def test_calc_speedup_matches_the_paper(t_0, how, value):
    assert round(calc_speedup(12, 12, t_0, how), 6) == pytest.approx(value, abs=1e-12)


def test_calc_speedup_refuses_bad_strategy_and_t_0():
    with pytest.raises(ValueError, match="how_scale"):
        calc_speedup(12, 12, 0.8, "quadratic")
    with pytest.raises(ValueError, match="t_0"):
        calc_speedup(12, 12, 0.0, "cubic")


@pytest.mark.parametrize("how", ["linear", "cubic"])
def test_solve_t_0_inverts_the_estimate(how):
    estimate = lambda t: calc_speedup(12, 12, t, how)  # noqa: E731
    for target in (0.05, 0.1777, 0.25):
        t_0 = solve_t_0(target, estimate)
        assert 0 < t_0 <= 1 and estimate(t_0) == pytest.approx(target, abs=1e-9)
    assert solve_t_0(0.0, estimate) == 1.0
    with pytest.raises(ValueError, match="no t_0 in"):
        solve_t_0(0.9, estimate)


# -- the FLOP-based estimate --------------------------------------------------------------
B, D, C = 8, 16, 5



def linear_chain():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(D, D, bias=False) for _ in range(4)], nn.Linear(D, C, bias=False))


def test_per_unit_flops_of_a_linear_chain_are_the_textbook_numbers():
    model = linear_chain()
    per_unit = unit_flops(model, list(model), (B, D))
    mm = 2 * B * D * D  # one (B x D) @ (D x D) product
    head = 2 * B * D * C
    for u in per_unit[:4]:
        assert u == {"forward": mm, "backward": 2 * mm, "backward_no_input_grad": mm}
    assert per_unit[4] == {"forward": head, "backward": 2 * head, "backward_no_input_grad": head}

    levels = training_flops_by_level(per_unit)
    forward = 4 * mm + head
    # n frozen: all forward; unit n computes its weight gradient only; later units both.
    for n, cost in enumerate(levels):
        later = sum(2 * (mm if i < 4 else head) for i in range(n + 1, 5))
        assert cost == forward + (mm if n < 4 else head) + later
    assert levels == sorted(levels, reverse=True)


def test_levels_equal_counting_the_whole_model_with_units_frozen():
    model = DenseNet(depth=16, growth_rate=6, num_classes=10)
    units = model.freeze_units()
    levels = training_flops_by_level(unit_flops(model, units, (2, 3, 32, 32)))
    copy_ = copy.deepcopy(model)
    for n, unit in enumerate(copy_.freeze_units()):
        with FlopCounterMode(display=False) as counter:
            copy_(torch.randn(2, 3, 32, 32)).sum().backward()
        assert counter.get_total_flops() == levels[n], n
        freeze(unit)
    # The estimate works on a copy: the model itself is untouched.
    assert all(p.requires_grad for p in model.parameters()) and model.training


def test_schedule_speedup_counts_the_real_steps():
    levels = [10.0, 7.0, 5.0, 4.0]
    t = unit_times(4, 0.5, "linear")  # 0.5, 0.667, 0.833, 1
    total = 12
    first = first_frozen_steps(t, total)
    assert first == [6, 8, 10, 12]
    # 6 steps at level 0, 2 at level 1, 2 at level 2, 2 at level 3.
    assert schedule_speedup(levels, t, total) == pytest.approx(1 - (6 * 10 + 2 * 7 + 2 * 5 + 2 * 4) / 120)
    assert schedule_speedup(levels, [1.0] * 4, total) == 0.0
    # The continuous limit is the large-T limit.
    continuous = schedule_speedup(levels, t)
    assert continuous == pytest.approx(1 - (0.5 * 10 + (1 / 6) * (7 + 5 + 4)) / 10)
    assert schedule_speedup(levels, t, 10**6) == pytest.approx(continuous, abs=1e-5)


def test_per_unit_flops_of_a_plain_densenet_are_the_hand_counted_ones():
    model = DenseNet(depth=13, growth_rate=4, num_classes=10, bottleneck=False)
    per_unit = unit_flops(model, model.freeze_units(), (2, 3, 32, 32))
    assert [u["forward"] for u in per_unit] == [2 * f for f in PLAIN_L13_K4_FORWARD]  # batch 2
    # Backward: the weight gradient and the input gradient cost one forward each.
    assert [u["backward"] for u in per_unit] == [4 * f for f in PLAIN_L13_K4_FORWARD]
    # As the first active unit, only the stem (a convolution of the data) skips its input
    # gradient: every later unit starts with a batch norm whose weights need the gradient
    # through the convolution's input all the same.
    first, *rest = PLAIN_L13_K4_FORWARD
    assert [u["backward_no_input_grad"] for u in per_unit] == [2 * first, *(4 * f for f in rest)]


@pytest.mark.slow  # counts every unit of a DenseNet-BC L=40 k=12
def test_flop_estimate_for_densenet_bc_follows_the_schedule_and_is_above_the_papers():
    # The paper takes backward = forward and counts no transitions; real backward passes
    # cost twice the forward (FLOPs of convolutions and products), so counting them saves more.
    model = DenseNet(depth=40, growth_rate=12, num_classes=100)
    per_unit = unit_flops(model, model.freeze_units(), (2, 3, 32, 32))
    ratio = sum(u["backward"] for u in per_unit) / sum(u["forward"] for u in per_unit)
    assert ratio == pytest.approx(2.0)  # weight and input gradient: one forward each
    levels = training_flops_by_level(per_unit)
    flop = schedule_speedup(levels, unit_times(len(levels), 0.8, "cubic"))
    # The schedule combined with the levels by the closed forms (the levels themselves are the
    # whole model's counts: test_levels_equal_counting_the_whole_model_with_units_frozen).
    assert len(levels) == 22
    assert flop == pytest.approx(continuous_speedup(levels, 22, 0.8, 3), rel=1e-12)
    assert schedule_speedup(levels, unit_times(22, 0.8, "cubic"), 90) == \
        pytest.approx(stepped_speedup(levels, 22, 90, 0.8, 3), rel=1e-12)
    assert flop > calc_speedup(12, 6, 0.8, "cubic") + 0.03  # 0.230 against the paper's 0.181


def test_units_outside_the_model_are_refused():
    model = linear_chain()
    with pytest.raises(ValueError, match="submodule of the model"):
        unit_flops(model, [nn.Linear(2, 2)], (B, D))
    other = linear_chain()
    # A container of another model's modules, or one with a stranger among the model's own.
    for bad in ([other[0:2]], [[model[0], nn.Linear(D, D)]], [nn.Sequential(model[0], nn.Linear(D, D))],
                [nn.Sequential()]):
        with pytest.raises(ValueError, match=r"unit 0: .*not a submodule of the model.*a unit is a module"):
            estimate_speedup(model, bad, (B, D))


def test_what_is_no_unit_at_all_is_refused_with_a_type_error():
    model = linear_chain()
    for bad in (["0"], [3], [[[model[0]]]], [None]):
        with pytest.raises(TypeError, match="a unit is a module"):
            estimate_speedup(model, bad, (B, D))


def twelve_layer_sequential() -> nn.Module:
    """Three conv+BN+ReLU stages and a classifier: 12 layers in one nn.Sequential."""
    torch.manual_seed(0)
    layers = []
    for i in range(3):
        layers += [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def test_slices_of_a_sequential_give_the_estimate_of_the_lists_of_their_modules():
    # Slicing an nn.Sequential makes a new container the model does not hold, holding the
    # model's own modules: the scheduler takes such units, and so must the estimate.
    model = twelve_layer_sequential()
    slices = [model[0:3], model[3:6], model[6:9], model[11]]
    lists = [[model[0], model[1], model[2]], [model[3], model[4], model[5]],
             [model[6], model[7], model[8]], model[11]]
    module_list = [nn.ModuleList(model[0:3]), nn.ModuleList([model[3:5], model[5]]), model[6:9], model[11]]
    x = torch.randn(1, 3, 8, 8)
    before = snapshot(model)
    speedup = estimate_speedup(model, slices, x, t_0=0.8, how_scale="cubic")
    assert 0 < speedup < 0.5
    assert speedup == estimate_speedup(model, lists, x, t_0=0.8, how_scale="cubic")
    assert speedup == estimate_speedup(model, module_list, x, t_0=0.8, how_scale="cubic")
    assert unit_flops(model, slices, x) == unit_flops(model, lists, x)
    stepped = estimate_speedup(model, slices, x, t_0=0.5, how_scale="linear", total_steps=100)
    assert stepped == estimate_speedup(model, lists, x, t_0=0.5, how_scale="linear", total_steps=100)
    t_0 = t_0_for_speedup(model, slices, x, 0.1)
    assert t_0 == t_0_for_speedup(model, lists, x, 0.1) and 0 < t_0 < 1
    assert_same(before, snapshot(model))
    assert all(p.requires_grad for p in model.parameters()) and model.training


def test_slices_of_a_model_in_eval_mode_with_frozen_units_leave_it_as_it_was():
    model = twelve_layer_sequential()
    freeze(model[0:3])
    model.eval()
    before = snapshot(model)
    speedup = estimate_speedup(model, [model[0:3], model[3:6], model[6:9], model[11]], (2, 3, 8, 8))
    assert 0 < speedup < 0.5
    assert_same(before, snapshot(model))
    assert not any(p.requires_grad for p in model[0:3].parameters())
    assert all(p.requires_grad for p in model[3:].parameters())


def test_the_estimate_is_the_same_whatever_the_scheduler_has_frozen():
    # The README's order: train with the scheduler (5 of 6 units frozen by the end), then ask
    # for the estimate; it is the run's, as from the start, not that of a model half frozen.
    from freezeout import FreezeOut, param_groups

    model, units = resnet18_and_units()
    x = torch.randn(1, 3, 32, 32)
    fresh = (estimate_speedup(model, units, x, t_0=0.5), t_0_for_speedup(model, units, x, 0.2))
    optimizer = torch.optim.SGD(param_groups(units), lr=0.1)
    scheduler = FreezeOut(optimizer, units, total_steps=12, t_0=0.5)
    for _ in range(12):
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    assert scheduler.num_frozen == 5
    model.eval()
    before = snapshot(model)
    assert (estimate_speedup(model, units, x, t_0=0.5), t_0_for_speedup(model, units, x, 0.2)) == fresh
    assert_same(before, snapshot(model))


# -- the estimate for any model, from the library ----------------------------------------
def small_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.BatchNorm1d(8),
                         nn.Linear(8, 4))


def resnet18_and_units():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    return model, [[model.conv1, model.bn1], model.layer1, model.layer2, model.layer3,
                   model.layer4, model.fc]


def snapshot(model: nn.Module) -> dict:
    """All a model is: its tensors (with device and requires_grad), every module's mode and
    hooks, and the random number generator."""
    return {"tensors": {k: (v.clone(), v.device, v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()},
            "modes": [m.training for m in model.modules()],
            "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                      for m in model.modules()],
            "rng": torch.get_rng_state()}


def assert_same(before: dict, after: dict) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, (value, device, grad) in before["tensors"].items():
        now, now_device, now_grad = after["tensors"][key]
        assert torch.equal(value, now) and device == now_device and grad == now_grad, key
    assert before["modes"] == after["modes"]
    assert before["hooks"] == after["hooks"]
    assert torch.equal(before["rng"], after["rng"])


@pytest.mark.parametrize("train_mode", [True, False])
def test_the_estimate_at_batch_1_with_batch_norm_leaves_the_model_as_it_was(train_mode):
    # unit_flops at batch 1 used to raise batch norm's "Expected more than 1 value per channel".
    model = small_bn_net().train(train_mode)
    seen = []
    model[0].register_forward_hook(lambda m, args, out: seen.append(out.device.type))
    units = [list(model[0:3]), list(model[3:7]), list(model[9:11]), model[11]]
    x = torch.randn(1, 3, 8, 8)
    before = snapshot(model)
    speedup = estimate_speedup(model, units, x, t_0=0.5, how_scale="cubic")
    t_0 = t_0_for_speedup(model, units, x, speedup, how_scale="cubic")
    assert_same(before, snapshot(model))
    assert seen and set(seen) == {"meta"}  # the model's own hooks ran on the meta copy only
    assert 0 < speedup < 1 and t_0 == pytest.approx(0.5, abs=1e-9)
    # A batch of one costs half a batch of two, so the speedup is the same.
    one, two = unit_flops(model, units, x), unit_flops(model, units, (2, 3, 8, 8))
    assert [{k: 2 * v for k, v in u.items()} for u in one] == two
    assert speedup == estimate_speedup(model, units, (4, 3, 8, 8), t_0=0.5)


def test_the_estimate_for_a_torchvision_resnet18_at_batch_1():
    # At 32x32 layer4's batch norms see one value per channel of a batch of one.
    model, units = resnet18_and_units()
    x = torch.randn(1, 3, 32, 32)
    before = snapshot(model)
    speedup = estimate_speedup(model, units, x, t_0=0.8, how_scale="cubic")
    assert_same(before, snapshot(model))
    # The same numbers as the scripts' path (utils' functions on a batch of two).
    levels = training_flops_by_level(unit_flops(model, units, (2, 3, 32, 32)))
    assert speedup == pytest.approx(schedule_speedup(levels, unit_times(6, 0.8, "cubic")), rel=1e-12)
    target = 0.25
    t_0 = t_0_for_speedup(model, units, x, target, how_scale="linear", total_steps=1000)
    assert schedule_speedup(levels, unit_times(6, t_0, "linear"), 1000) >= target
    assert schedule_speedup(levels, unit_times(6, t_0 + 1e-3, "linear"), 1000) < target


def test_the_estimate_refuses_inputs_that_are_no_example():
    model = small_bn_net()
    units = [list(model[0:3]), list(model[3:7]), list(model[9:11]), model[11]]
    for bad in ("x", [2.5, 3], None):  # not an example input at all: a TypeError (issue 29, item 6)
        with pytest.raises(TypeError, match="example_input must be a tensor"):
            estimate_speedup(model, units, bad)
    for bad in ((2, 0, 8), (2.5, 3)):  # a shape that is no shape
        with pytest.raises(ValueError, match="example_input must be a tensor"):
            estimate_speedup(model, units, bad)
    with pytest.raises(ValueError, match="no t_0 in"):
        t_0_for_speedup(model, units, (2, 3, 8, 8), 0.99)
    with pytest.raises(TypeError, match="target speedup must be a number"):
        t_0_for_speedup(model, units, (2, 3, 8, 8), "0.2")


# -- what example_input may be (issue 29, item 6) ---------------------------------------------------
def test_a_list_is_no_example_input_and_the_error_says_what_is():
    model = small_bn_net()
    units = [list(model[0:3]), list(model[3:7]), list(model[9:11]), model[11]]
    for bad in ([1, 2, 3], [2, 3, 8, 8], {"x": torch.randn(2, 3, 8, 8)}):
        with pytest.raises(TypeError) as refused:
            estimate_speedup(model, units, bad)
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith("example_input must be a tensor, a tuple of the model's positional arguments, "
                                  "or a shape as a tuple or torch.Size, such as (1, 3, 32, 32)")
        assert f"got {type(bad).__name__} " in message
    with pytest.raises(TypeError, match=r"a list is not taken as a shape: write \(2, 3, 8, 8\)"):
        estimate_speedup(model, units, [2, 3, 8, 8])
    # What it meant, as a shape: a tuple or a torch.Size; the same figure as a tensor of that shape.
    expected = estimate_speedup(model, units, torch.randn(2, 3, 8, 8))
    assert estimate_speedup(model, units, (2, 3, 8, 8)) == expected
    assert estimate_speedup(model, units, torch.Size([2, 3, 8, 8])) == expected


@pytest.mark.parametrize("example", [(1, 2, 3), torch.randn(1, 5, 8, 8), (torch.randn(2, 3, 8, 8), torch.randn(2))])
def test_an_input_the_model_cannot_run_on_is_one_line_naming_it(example):
    model = small_bn_net()
    units = [list(model[0:3]), list(model[3:7]), list(model[9:11]), model[11]]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as refused:
        estimate_speedup(model, units, example)
    message = str(refused.value)
    assert "\n" not in message and refused.value.__cause__ is None and refused.value.__suppress_context__
    assert message.startswith("example_input: the model cannot run on ")
    assert ("a tensor of shape (1, 2, 3)" in message if isinstance(example, tuple) and len(example) == 3 else True)
    assert "example_input must be what the model is called with" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
