"""The tensor loader against the torchvision reference: same values, crops within the padding,
flips half the time, same batching contract."""
import pytest
import torch

from loaders import TensorLoader, TorchvisionLoader
from utils import ImageSet

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
    cls = TensorLoader if kind == "tensor" else TorchvisionLoader
    loader = cls(data, MEAN, STD, 100, train=True, seed=0)
    loader.set_epoch(1)
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
    tensor_loader = TensorLoader(data, MEAN, STD, 64, train=True, seed=1)
    reference_loader = TorchvisionLoader(data, MEAN, STD, 64, train=True, seed=1)
    tensor, reference = list(tensor_loader), list(reference_loader)
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
    re = list(TorchvisionLoader(data, MEAN, STD, 64, train=False))
    assert [len(y) for _, y in te] == [len(y) for _, y in re] == [64, 64, 64, 38]
    assert torch.allclose(torch.cat([x for x, _ in te]), torch.cat([x for x, _ in re]), atol=1e-5)
    assert torch.equal(torch.cat([y for _, y in te]), data.labels)


@pytest.mark.parametrize("kind", ["tensor", "torchvision"])
def test_an_epoch_is_a_function_of_seed_and_epoch_and_can_start_at_any_batch(kind):
    data = coordinate_images(300)

    def epoch(seed, epoch, start=0, workers=0):
        if kind == "tensor":
            loader = TensorLoader(data, MEAN, STD, 50, True, seed=seed)
        else:
            loader = TorchvisionLoader(data, MEAN, STD, 50, True, workers=workers, seed=seed)
        loader.set_epoch(epoch, start)
        torch.manual_seed(123)  # the global generator plays no part
        batches = list(loader)
        torch.manual_seed(456)
        return batches

    whole = epoch(3, 1)
    assert len(whole) == 6
    again = epoch(3, 1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole, again))
    tail = epoch(3, 1, start=4)  # what a run resumed after 4 batches sees
    assert len(tail) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[4:], tail))
    assert not torch.equal(whole[0][0], epoch(3, 2)[0][0]) and not torch.equal(whole[0][0], epoch(4, 1)[0][0])
    if kind == "torchvision":  # worker processes do not change the stream
        with_workers = epoch(3, 1, start=4, workers=2)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(tail, with_workers))
