"""The tensor loader against the torchvision reference: same values, crops within the padding,
flips half the time, same batching contract."""
import pytest
import torch

from utils import ImageSet, TensorLoader, make_loader

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def coordinate_images(n):
    """Channel 0 holds row + 1, channel 1 column + 1, channel 2 the image index: after a
    crop (zero padding) every pixel tells where it came from."""
    rows = torch.arange(1, 33).view(1, 32, 1).expand(n, 32, 32)
    cols = torch.arange(1, 33).view(1, 1, 32).expand(n, 32, 32)
    idx = torch.arange(n).view(n, 1, 1).expand(n, 32, 32) % 256
    return ImageSet(torch.stack([rows, cols, idx], 1).to(torch.uint8), torch.arange(n) % 10)


def raw(x):
    """Undo the normalisation: back to the uint8 values."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return torch.round((x * std + mean) * 255).to(torch.int64)


def crops_and_flips(batch):
    """Per image: (row offset, column offset) in -4..4 and whether it was flipped, checking
    that every pixel taken from the image agrees with that one offset and direction."""
    rows = torch.arange(32).view(32, 1).expand(32, 32)
    cols = torch.arange(32).view(1, 32).expand(32, 32)
    out = []
    for img in raw(batch):
        valid = img[0] > 0  # pixels that came from the image, not the padding
        src_rows, src_cols = img[0][valid] - 1, img[1][valid] - 1
        flipped = bool(src_cols[0] > src_cols[-1])
        dy = src_rows - rows[valid]
        dx = src_cols - ((31 - cols) if flipped else cols)[valid]
        assert (dy == dy[0]).all() and (dx == dx[0]).all()
        out.append((dy[0].item(), dx[0].item(), flipped))
    return out


@pytest.mark.parametrize("kind", ["tensor", "torchvision"])
def test_crops_stay_within_the_padding_and_flip_half_the_time(kind):
    data = coordinate_images(1_000)
    g = torch.Generator().manual_seed(0)
    if kind == "tensor":
        loader = TensorLoader(data, MEAN, STD, 100, train=True, generator=g)
    else:
        torch.manual_seed(0)
        loader = make_loader(data, MEAN, STD, 100, train=True, generator=g)
    stats = [s for x, _ in loader for s in crops_and_flips(x)]
    assert len(stats) == 1_000
    dys = {dy for dy, _, _ in stats}
    dxs = {dx for _, dx, _ in stats}
    assert dys <= set(range(-4, 5)) and dxs <= set(range(-4, 5))
    assert len(dys) == 9 and len(dxs) == 9  # every offset occurs
    flips = sum(f for _, _, f in stats) / len(stats)
    assert 0.43 < flips < 0.57


def test_both_paths_give_the_same_values_and_batching():
    data = ImageSet(torch.randint(0, 256, (230, 3, 32, 32), dtype=torch.uint8), torch.arange(230) % 10)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    tensor = list(TensorLoader(data, MEAN, STD, 64, train=True, generator=g1))
    reference = list(make_loader(data, MEAN, STD, 64, train=True, generator=g2))
    assert [x.shape for x, _ in tensor] == [x.shape for x, _ in reference] == [(64, 3, 32, 32)] * 3
    t, r = torch.cat([x for x, _ in tensor]), torch.cat([x for x, _ in reference])
    assert t.dtype == r.dtype == torch.float32
    for c in range(3):  # the same range: padding (0) up to 255, normalised the same way
        lo, hi = (0 - MEAN[c]) / STD[c], (1 - MEAN[c]) / STD[c]
        for x in (t, r):
            assert x[:, c].min() >= lo - 1e-5 and x[:, c].max() <= hi + 1e-5
    assert torch.equal(raw(t).unique(), raw(r).unique())
    # A training epoch draws every image at most once.
    labels = torch.cat([y for _, y in tensor])
    assert len(labels) == 192

    # Evaluation: every image, in order, unaugmented, identical in both paths.
    te = list(TensorLoader(data, MEAN, STD, 64, train=False))
    re = list(make_loader(data, MEAN, STD, 64, train=False))
    assert [len(y) for _, y in te] == [len(y) for _, y in re] == [64, 64, 64, 38]
    assert torch.allclose(torch.cat([x for x, _ in te]), torch.cat([x for x, _ in re]), atol=1e-5)
    assert torch.equal(torch.cat([y for _, y in te]), data.labels)


def test_tensor_loader_order_is_a_function_of_the_generator_seed():
    data = coordinate_images(300)

    def epoch(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([x for x, _ in TensorLoader(data, MEAN, STD, 50, True, generator=g)])

    assert torch.equal(epoch(3), epoch(3)) and not torch.equal(epoch(3), epoch(4))
