"""Wide ResNet and VGG (and DenseNet beside them): counts, shapes, gradients, frozen prefixes."""
import copy

import pytest
import torch
import torch.nn.functional as F

from densenet import DenseNet
from freezeout import FreezeOut, param_groups
from vgg import VGG
from wrn import WideResNet


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_wide_resnet_40_4_has_the_papers_size():
    model = WideResNet(depth=40, widen_factor=4, num_classes=100)
    assert n_params(model) == 8_972_340  # "8.97M" in the paper
    assert len(model.freeze_units()) == 1 + 18 + 1  # stem, 3 x 6 blocks, head


@pytest.mark.parametrize("depth,convs", [(11, 8), (13, 10), (16, 13), (19, 16)])
def test_vgg_depths(depth, convs):
    model = VGG(depth=depth, num_classes=100)
    units = model.freeze_units()
    assert len(units) == convs + 1 and units[-1] is model.classifier
    if depth == 16:
        # 13 convolutions with biases and batch norms (14,714,688 + 8,448) and the classifier
        # 512 -> 512 -> 512 -> 100 (262,656 + 262,656 + 51,300)
        assert n_params(model) == 15_299_748
    pools = sum(isinstance(m, torch.nn.MaxPool2d) for u in units for m in u.modules())
    assert pools == 5


# Small models the end-to-end tests train, counted by hand (10 classes).
HAND_COUNTED = [
    # DenseNet-BC L=10 k=4: stem 3->8 (216); per block one layer BN(c) 1x1 c->16 BN(16) 3x3 16->4
    # for c = 8, 6, 5 (752, 716, 698); transitions BN(12) 12->6 (96), BN(10) 10->5 (70);
    # head BN(9) + 9->10 (118). Units: stem, 3 layers, 2 transitions, head.
    (lambda: DenseNet(depth=10, growth_rate=4, num_classes=10), 2_666, 7),
    # plain DenseNet L=13 k=4: stem 216; layers BN(c) + 3x3 c->4 = 38c for c = 8, 12, 16 | 10, 14,
    # 18 | 11, 15, 19 (1,368, 1,596, 1,710); transitions 20->10 (240), 22->11 (286); head 23->10 (286)
    (lambda: DenseNet(depth=13, growth_rate=4, num_classes=10, bottleneck=False), 5_702, 13),
    # WRN-10-1: stem 3->16 (432); blocks 16->16 (4,672), 16->32 with a 1x1 shortcut (14,432),
    # 32->64 with a shortcut (57,536); head BN(64) + 64->10 (778). Units: stem, 3 blocks, head.
    (lambda: WideResNet(depth=10, widen_factor=1, num_classes=10), 77_850, 5),
    # VGG-11 (BN): convolutions with bias and BN 3->64 (1,920), 64->128 (74,112), 128->256
    # (295,680), 256->256 (590,592), 256->512 (1,181,184), 3 x 512->512 (7,082,496); classifier
    # 512->512->512->10 (525,312 + 5,130). Units: 8 convolutions, the classifier.
    (lambda: VGG(depth=11, num_classes=10), 9_756_426, 9),
]


@pytest.mark.parametrize("make,params,units", HAND_COUNTED)
def test_small_models_have_their_hand_counted_size(make, params, units):
    model = make()
    assert n_params(model) == params and len(model.freeze_units()) == units


MODELS = {
    "densenet": lambda: DenseNet(depth=16, growth_rate=4, num_classes=10),
    "wrn": lambda: WideResNet(depth=10, widen_factor=2, num_classes=10, dropout=0.3),
    "vgg": lambda: VGG(depth=11, num_classes=10, dropout=0.3),
}


@pytest.mark.parametrize("name", MODELS)
def test_logits_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    ids = [id(p) for u in model.freeze_units() for p in u.parameters()]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg" else n for n in MODELS])
def test_frozen_prefix_is_untouched_and_outside_autograd(name):  # VGG-11's 512-wide layers: slow
    torch.manual_seed(0)
    model = MODELS[name]()
    units = model.freeze_units()
    optimizer = torch.optim.SGD(param_groups(units), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = FreezeOut(optimizer, units, total_steps=16, t_0=0.2, how_scale="linear")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))

    def step():
        model.train()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    while scheduler.num_frozen < 3:
        step()
    frozen = units[:scheduler.num_frozen]
    before = [copy.deepcopy(u.state_dict()) for u in frozen]
    for _ in range(4):
        step()
    for unit, snapshot in zip(frozen, before, strict=True):
        after = unit.state_dict()
        assert all(torch.equal(snapshot[k], after[k]) for k in snapshot)  # weights and BN stats
        assert all(p.grad is None and p not in optimizer.state for p in unit.parameters())
        assert all(not m.training for m in unit.modules())

    outputs = []
    hooks = [u.register_forward_hook(lambda m, i, o: outputs.append(o)) for u in units]
    model.train()
    model(x)
    for h in hooks:
        h.remove()
    n = scheduler.num_frozen
    assert all(o.grad_fn is None for o in outputs[:n]) and all(o.grad_fn is not None for o in outputs[n:])


@pytest.mark.parametrize("make,depth", [(lambda d: WideResNet(depth=d), 41), (lambda d: WideResNet(depth=d), 4),
                                        (lambda d: VGG(depth=d), 15)])
def test_impossible_depths_are_refused(make, depth):
    with pytest.raises(ValueError, match=f"depth {depth} is not a"):
        make(depth)


def test_an_architecture_is_counted_once_in_a_process_and_its_counts_are_copies(monkeypatch):
    import models
    calls = []
    real = models.unit_flops
    monkeypatch.setattr(models, "unit_flops", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(models, "_UNIT_FLOPS", {})
    architecture = ("densenet", 10, 4, 10, True, 0.5, 0.0)
    net = models.build_model(*architecture)
    first = models.architecture_unit_flops(architecture, net, net.freeze_units())
    first[0]["forward"] = -1  # a caller's change stays its own
    same = models.build_model(*architecture)
    again = models.architecture_unit_flops(architecture, same, same.freeze_units())
    assert calls == [1] and again[0]["forward"] > 0
    other = ("densenet", 10, 4, 10, True, 0.25, 0.0)
    net = models.build_model(*other)
    models.architecture_unit_flops(other, net, net.freeze_units())
    assert calls == [1, 1]


def test_the_flop_estimate_of_a_plain_densenet_is_that_of_its_reduction():
    """--target-speedup and --const_time solve on the model the run trains, compression included."""
    import models
    halved = models.speedup_estimator("densenet", 13, 4, "cubic", bottleneck=False, num_classes=10)[0](0.5)
    quarter = models.speedup_estimator("densenet", 13, 4, "cubic", bottleneck=False, num_classes=10,
                                       reduction=0.25)[0](0.5)
    assert 0 < halved < 1 and 0 < quarter < 1 and halved != quarter
