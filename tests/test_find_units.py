"""find_units: a model's units found by running it once, for models that do not list them."""
import copy
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from freezeout import FreezeOut, find_units, param_groups, unit_modules


class Gated(nn.Module):
    """A module with a parameter of its own besides its submodule's: one unit with it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.gain * self.conv(x)


class Net(nn.Module):
    """Modules declared in another order than they run; a parameter-free ReLU reused; a layer
    called twice in a row; a gated block; a spare layer that never runs."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 5)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
                                  nn.Conv2d(4, 4, 1))
        self.stem = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.gated = Gated()
        self.spare = nn.Linear(4, 4)

    def forward(self, x):
        x = self.relu(self.stem(x))
        x = self.relu(self.body[1](self.body[0](x)))
        x = self.body[2](self.body[2](x))  # twice in a row: still one place in the pass
        x = self.gated(x)
        return self.head(x.mean((2, 3)))


def test_units_of_a_small_model_are_its_parameter_owners_in_running_order():
    torch.manual_seed(0)
    model = Net()
    with pytest.warns(UserWarning, match=r"did not run.*left out.*spare: Linear\(weight 4x4\)$"):
        units = find_units(model, torch.randn(2, 3, 8, 8))
    assert units == [model.stem, model.body[0], model.body[1], model.body[2], model.gated, model.head]
    assert all(u is e for u, e in zip(units, [model.stem, model.body[0], model.body[1], model.body[2],
                                               model.gated, model.head], strict=True))
    # What find_units returns are units by the one rule: modules of the model, as they are.
    assert all(unit_modules(u, model) == [u] for u in units)


def test_the_pass_leaves_no_trace():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.train()
    x = torch.randn(2, 3, 32, 32)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    find_units(model, x)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # batch-norm statistics too
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    """One ResNet-18 for the tests that only read it (finding units leaves no trace on it:
    test_the_pass_leaves_no_trace); building one takes longer than finding its units."""
    torch.manual_seed(0)
    return torchvision.models.resnet18()


def test_resnet18_every_conv_bn_and_fc_is_a_unit(resnet18):
    model = resnet18
    units = find_units(model, torch.randn(2, 3, 32, 32))
    # Counted from the architecture: the stem's conv and BN (2); 8 BasicBlocks of two convs and
    # two BNs (32); a 1x1 conv and a BN on the shortcut of the first block of layer2, 3 and 4 (6);
    # the fc (1). 20 convs + 20 BNs + 1 fc = 41.
    assert len(units) == 41
    assert Counter(type(u) for u in units) == {nn.Conv2d: 20, nn.BatchNorm2d: 20, nn.Linear: 1}
    assert units[:2] == [model.conv1, model.bn1] and units[-1] is model.fc
    block = model.layer2[0]  # the shortcut runs after the main path
    assert units[10:16] == [block.conv1, block.bn1, block.conv2, block.bn2, *block.downsample]
    assert len({id(u) for u in units}) == 41


@pytest.mark.parametrize("n", [1, 2, 5, 8, 40, 41])
def test_groups_are_contiguous_balanced_and_cover_every_parameter_once(n, resnet18):
    torch.manual_seed(0)
    model = resnet18
    x = torch.randn(2, 3, 32, 32)
    modules, groups = find_units(model, x), find_units(model, x, groups=n)
    assert len(groups) == n and all(groups)
    assert [m for group in groups for m in group] == modules  # contiguous, in running order
    assert all(unit_modules(group, model) == group for group in groups)  # the model's own modules
    sizes = [sum(p.numel() for m in group for p in m.parameters()) for group in groups]
    biggest = max(sum(p.numel() for p in m.parameters()) for m in modules)
    total = sum(p.numel() for p in model.parameters())
    # The best cut into n contiguous groups is never worse than total / n plus the biggest module.
    assert max(sizes) <= total / n + biggest
    counts = Counter(id(p) for group in param_groups(groups) for p in group["params"])
    assert counts == Counter(id(p) for p in model.parameters())  # each exactly once


class Bag(nn.Module):
    """Bias-free Linear(1, k) layers with k parameters each, all run in order on one input."""

    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(1, k, bias=False) for k in sizes)

    def forward(self, x):
        return sum(layer(x).sum() for layer in self.layers)


@pytest.mark.parametrize("sizes,n,expected", [
    ([1, 1, 1, 1, 8], 2, [[1, 1, 1, 1], [8]]),
    ([4, 4, 4, 4], 2, [[4, 4], [4, 4]]),
    ([5, 1, 1, 1, 1, 1, 5], 3, [[5], [1, 1, 1, 1, 1], [5]]),
    ([3, 3, 3], 3, [[3], [3], [3]]),
    ([9, 1, 1], 3, [[9], [1], [1]]),
])
def test_groups_make_the_largest_group_as_small_as_can_be(sizes, n, expected):
    model = Bag(sizes)
    groups = find_units(model, torch.ones(1, 1), groups=n)
    assert [[m.weight.numel() for m in group] for group in groups] == expected


@pytest.mark.parametrize("n", [0, -1, 42, 2.5, True])
def test_groups_out_of_range_are_refused(n, resnet18):
    model = resnet18
    with pytest.raises(ValueError, match="groups must be an integer between 1 and 41"):
        find_units(model, torch.randn(2, 3, 32, 32), groups=n)


class SharedAcross(nn.Module):
    """One layer at the start and again at the end (weight sharing across the network)."""

    def __init__(self):
        super().__init__()
        self.shared, self.middle = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.shared(self.middle(self.shared(x)))


class Tied(nn.Module):
    """An embedding and an output layer that hold one weight (tied weights)."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix = nn.Embedding(10, 4), nn.Linear(4, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(self.mix(self.embed(tokens)))


class OwnParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(4))
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x + self.token)


def test_what_no_frozen_prefix_can_hold_is_refused():
    with pytest.raises(ValueError, match=r"module 'shared' \(Linear\) runs at two places.*'middle'"):
        find_units(SharedAcross(), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"'embed.weight' \(held by 'embed', 'out'\) would be in 2"):
        find_units(Tied(), torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"'embed.weight' .* would be in 2 units"):
        find_units(Tied(), (torch.tensor([[1, 2, 3]]),), groups=1)  # a tuple of arguments too
    with pytest.raises(ValueError, match=r"OwnParameters owns parameters itself \(token\)"):
        find_units(OwnParameters(), torch.randn(2, 4))


@pytest.mark.slow  # trains a ResNet-50 for 6 steps
def test_freezeout_on_resnet50_grouped_into_8_units():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    total = 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning anywhere: finding, ordering, freezing
        units = find_units(model, torch.randn(2, 3, 32, 32), groups=8)
        optimizer = torch.optim.SGD(param_groups(units), lr=0.01, momentum=0.9)
        # t_i = 0.1 + 0.9 i / 7: units 0..5 freeze when preparing steps 1, 2, 3, 3, 4, 5.
        scheduler = FreezeOut(optimizer, units, total_steps=total, t_0=0.1, how_scale="linear")
        frozen, snapshot = [], None
        for k in range(total):  # batch 8: with 2, layer4's batch norm sees 2 values and blows up
            x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
            model.train()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            assert torch.isfinite(loss)  # or NaN != NaN would fail the comparisons below
            frozen.append(scheduler.num_frozen)
            if k == 2:
                snapshot = [copy.deepcopy([m.state_dict() for m in unit]) for unit in units[:4]]
    assert frozen == [1, 2, 4, 5, 6, 6]
    assert scheduler.frozen_at == [1, 2, 3, 3, 4, 5, None, None]
    for unit, before in zip(units[:4], snapshot, strict=True):  # frozen at step 3: untouched since
        for module, state in zip(unit, before, strict=True):
            assert all(torch.equal(state[key], module.state_dict()[key]) for key in state)
    assert all(not p.requires_grad for unit in units[:6] for m in unit for p in m.parameters())
