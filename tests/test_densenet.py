"""DenseNet(-BC): the paper's parameter counts, shapes, units, gradients, bad depths."""
import pytest
import torch
import torch.nn.functional as F

from densenet import DenseNet, Transition, layers_per_block


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth,k,params", [(76, 12, 510_040), (100, 12, 800_032),
                                              pytest.param(190, 40, 25_821_620, marks=pytest.mark.slow)])
def test_parameter_counts_of_the_papers_architectures(depth, k, params):
    assert n_params(DenseNet(depth=depth, growth_rate=k, num_classes=100)) == params


def test_logits_shape_and_units_in_forward_order():
    torch.manual_seed(0)
    model = DenseNet(depth=76, growth_rate=12, num_classes=100).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()
    assert not torch.allclose(out.exp().sum(1), torch.ones(2))  # logits, not probabilities
    units = model.freeze_units()
    assert len(units) == 40  # stem + 36 dense layers + 2 transitions + head: N = 39
    assert units[0] is model.stem and units[-1] is model.head
    assert [i for i, u in enumerate(units) if isinstance(u, Transition)] == [13, 26]
    # Every parameter belongs to exactly one unit.
    ids = [id(p) for u in units for p in u.parameters()]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))

    # Running the units one after another is the model's forward pass.
    x = torch.randn(2, 3, 32, 32)
    y = x
    for unit in units:
        y = unit(y)
    assert torch.equal(y, model(x))


@pytest.mark.parametrize("bottleneck,depth", [(True, 16), (False, 13)])
def test_every_parameter_gets_a_gradient(bottleneck, depth):
    torch.manual_seed(0)
    model = DenseNet(depth=depth, growth_rate=6, num_classes=10, bottleneck=bottleneck, dropout=0.2)
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_non_bottleneck_variant_has_three_times_the_layers():
    assert layers_per_block(40, bottleneck=False) == 12
    assert layers_per_block(76, bottleneck=True) == 12
    model = DenseNet(depth=40, growth_rate=12, num_classes=10, bottleneck=False, reduction=1.0)
    assert len(model.freeze_units()) == 1 + 36 + 2 + 1
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("depth,bottleneck", [(75, True), (77, True), (4, True), (41, False), (3, False)])
def test_impossible_depths_are_refused(depth, bottleneck):
    with pytest.raises(ValueError, match=f"depth {depth} is not a valid"):
        DenseNet(depth=depth, bottleneck=bottleneck)
