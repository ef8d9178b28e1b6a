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


class Tokens(nn.Module):
    """A model that owns parameters itself, ViT-style: a token and a position table used after
    the stem, a bias used after the head, a scale used before anything runs, one never used."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.stem = nn.Linear(3, 8)
        self.token, self.pos = nn.Parameter(torch.zeros(1, 1, 8)), nn.Parameter(torch.zeros(1, 3, 8))
        self.blocks = nn.Sequential(*[block(8) for _ in range(3)])
        self.head = nn.Linear(8, 4)
        self.bias = nn.Parameter(torch.zeros(4))
        self.spare = nn.Parameter(torch.zeros(2))

    def forward(self, x):  # x: (batch, 2, 3)
        x = self.stem(x * self.scale)
        x = torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.blocks(x.mean(1))
        return self.head(x) + self.bias


def test_parameters_a_model_owns_join_the_unit_that_ran_before_their_first_use():
    torch.manual_seed(0)
    model = Tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        units = find_units(model, torch.randn(4, 2, 3))
    stem_unit = [model.stem, model.scale, model.token, model.pos, model.spare]  # scale: before anything ran
    head_unit = [model.head, model.bias]
    members = [[id(x) for x in (u if isinstance(u, list) else [u])] for u in units]
    blocks = [[id(m)] for b in model.blocks for m in (b[0], b[1])]
    assert members[0] == [id(x) for x in (model.stem, model.scale, model.token, model.pos, model.spare)]
    assert members[1:-1] == blocks and members[-1] == [id(x) for x in head_unit]
    # Every parameter in exactly one unit, so the optimizer covers the model, and freezing the
    # stem's unit stops the gradients of the token and the table too.
    assert sorted(id(p) for u in param_groups(units) for p in u["params"]) == sorted(map(id, model.parameters()))
    assert {id(x) for x in stem_unit} <= {id(p) for p in param_groups(units)[0]["params"]} | {id(model.stem)}
    optimizer = torch.optim.SGD(param_groups(units), lr=0.1)
    scheduler = FreezeOut(optimizer, units, total_steps=4, t_0=0.2, how_scale="linear")
    for _ in range(2):
        loss = model(torch.randn(4, 2, 3)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    assert scheduler.num_frozen >= 1
    stem_params = (model.scale, model.token, model.pos, model.spare, *model.stem.parameters())
    assert not any(p.requires_grad for p in stem_params)
    # Cut into groups, the parameters stay with their unit.
    grouped = find_units(model, torch.randn(4, 2, 3), groups=2)
    assert [id(x) for x in grouped[0][:5]] == [id(x) for x in stem_unit]
    assert [id(x) for x in grouped[-1][-2:]] == [id(x) for x in head_unit]
    # A model that wraps it is cut the same way.
    wrapped = nn.Sequential(model)
    assert [[id(x) for x in (u if isinstance(u, list) else [u])] for u in find_units(wrapped, torch.randn(4, 2, 3))] \
        == members


def test_a_parameter_the_model_uses_before_its_only_layer_joins_that_layer():
    model = OwnParameters()
    assert find_units(model, torch.randn(2, 4)) == [[model.fc, model.token]]


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


# -- a model made of blocks; what the example input is (issue 29, item 5) ----------------------------
def block(width: int = 16) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU())


@pytest.mark.parametrize("head", [True, False])
def test_a_sequential_of_blocks_gives_its_blocks_whole(head):
    torch.manual_seed(0)
    model = nn.Sequential(*[block() for _ in range(6 - head)], *([nn.Linear(16, 10)] if head else []))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every block ran: none is said to be left out
        units = find_units(model, torch.randn(4, 16))
    assert len(units) == 6 and all(u is m for u, m in zip(units, model, strict=True))  # 6 units, not 11 or 12
    assert all(unit_modules(u, model) == [u] for u in units)
    grouped = find_units(model, torch.randn(4, 16), groups=3)
    assert [[id(m) for m in g] for g in grouped] == [[id(m) for m in model[i:i + 2]] for i in (0, 2, 4)]
    optimizer = torch.optim.SGD(param_groups(units), lr=0.1)
    scheduler = FreezeOut(optimizer, units, total_steps=6, t_0=0.1, how_scale="linear")
    for _ in range(6):
        loss = model(torch.randn(4, 16)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    assert scheduler.num_frozen == 5  # whole blocks froze: every Linear and BatchNorm of the first five
    assert all(not p.requires_grad for m in model[:5] for p in m.parameters())


def test_blocks_inside_a_sequential_that_wraps_them_are_found_and_flat_sequentials_keep_their_layers():
    torch.manual_seed(0)
    blocks = [block() for _ in range(3)]
    wrapped = nn.Sequential(nn.Sequential(*blocks, nn.Linear(16, 2)))
    assert find_units(wrapped, torch.randn(4, 16)) == [*blocks, wrapped[0][3]]
    flat = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    assert find_units(flat, torch.randn(4, 16)) == [flat[0], flat[1], flat[3]]  # its layers, as before
    # A backbone and a head are no blocks (of two makes): their layers, not two units.
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    two = nn.Sequential(backbone, head)
    assert find_units(two, torch.randn(2, 3, 8, 8)) == [*backbone[0:2], *backbone[3:5], *head[1:4]]
    # Blocks of one make, whatever their widths, with a stem and a head of other makes.
    torch.manual_seed(0)
    stem, head = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8)), nn.Linear(16, 2)
    mixed = nn.Sequential(stem, nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU()), nn.Dropout(0.1),
                          block(16), block(16), head)
    assert find_units(mixed, torch.randn(4, 3)) == [stem, mixed[1], mixed[3], mixed[4], head]


def test_find_units_without_an_example_input_says_what_it_needs():
    model = nn.Sequential(block(), nn.Linear(16, 2))
    with pytest.raises(TypeError) as refused:
        find_units(model)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("find_units(model, example_input, groups=None) needs an example input: it runs "
                              "the model once on it to see the order its modules run in")
    assert "a tensor such as torch.randn(2, 3, 32, 32)" in message
    with pytest.raises(TypeError, match=r"got int 8 \(groups=8\? the example input comes first"):
        find_units(model, 8)


def test_what_find_units_takes_as_an_example_input():
    torch.manual_seed(0)
    model = nn.Sequential(block(), nn.Linear(16, 2))
    rng = torch.get_rng_state()
    layers = [model[0][0], model[0][1], model[1]]  # one block is no model made of blocks
    assert find_units(model, (4, 16)) == find_units(model, torch.Size([4, 16])) == layers  # shapes
    assert torch.equal(torch.get_rng_state(), rng)  # the random input drew from no one's stream
    with pytest.raises(TypeError, match=r"^example_input must be a tensor, .*\(a list is not taken as a shape: "
                                        r"write \(4, 16\)\)$"):
        find_units(model, [4, 16])
    with pytest.raises(ValueError) as refused:
        find_units(model, torch.randn(4, 7))
    message = str(refused.value)
    assert "\n" not in message and refused.value.__suppress_context__
    assert message.startswith("example_input: the model cannot run on a tensor of shape (4, 7): RuntimeError: ")


def test_a_batch_of_one_will_do_as_for_the_estimate(resnet18):
    # In training mode layer4's batch norms see one value per channel of a batch of one (at 32x32).
    model = resnet18
    model.train()
    before = copy.deepcopy(model.state_dict())
    assert find_units(model, torch.randn(1, 3, 32, 32)) == find_units(model, torch.randn(2, 3, 32, 32))
    assert len(find_units(model, (1, 3, 32, 32))) == 41
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
