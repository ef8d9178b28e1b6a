"""The tensor loader against the torchvision reference: same values, crops within the padding,
flips half the time, same batching contract."""
import pytest
import torch

from data_sets import ImageSet, Splits, load_splits
from loaders import EpochStream, TensorLoader, TorchvisionLoader, choose_loader, make_loaders

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
# The torchvision loader transforms image by image (about 1 ms each here): where a test serves
# many epochs or images, its torchvision case is left out of the quick subset.
KINDS_TORCHVISION_SLOW = ["tensor", pytest.param("torchvision", marks=pytest.mark.slow)]


def training_loader(kind: str, data: ImageSet, batch_size: int, seed: int):
    """The training loader of that kind ("tensor" or "torchvision") over `data`."""
    cls = TensorLoader if kind == "tensor" else TorchvisionLoader
    return cls(data, MEAN, STD, batch_size, train=True, seed=seed)


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


@pytest.mark.parametrize("kind", KINDS_TORCHVISION_SLOW)
def test_crops_stay_within_the_padding_and_flip_half_the_time(kind):
    data = coordinate_images(1_000)
    loader = training_loader(kind, data, 100, seed=0)
    loader.set_epoch(1)
    stats = [s for x, _ in loader for s in crops_and_flips(x)]
    assert len(stats) == 1_000
    dys = {dy for dy, _, _ in stats}
    dxs = {dx for _, dx, _ in stats}
    assert dys <= set(range(-4, 5)) and dxs <= set(range(-4, 5))
    assert len(dys) == 9 and len(dxs) == 9  # every offset occurs
    flips = sum(f for _, _, f in stats) / len(stats)
    assert 0.43 < flips < 0.57


def by_hand(image: torch.Tensor, dy: int, dx: int, flipped: bool) -> torch.Tensor:
    """RandomCrop(32, padding=4) at offset (dy, dx) from the centre, zero fill, then the flip."""
    padded = torch.nn.functional.pad(image.to(torch.int64), (4, 4, 4, 4))
    crop = padded[:, 4 + dy:36 + dy, 4 + dx:36 + dx]
    return crop.flip(2) if flipped else crop


def source_index(img: torch.Tensor) -> int:
    """The image an augmented coordinate image came from (channel 2 of any pixel off the padding)."""
    return int(img[2][img[0] > 0][0])


@pytest.mark.parametrize("kind", KINDS_TORCHVISION_SLOW)
def test_each_training_image_is_its_source_cropped_and_flipped_exactly(kind):
    data = coordinate_images(230)
    loader = training_loader(kind, data, 64, seed=1)
    loader.set_epoch(1)
    batches = list(loader)
    assert [x.shape for x, _ in batches] == [(64, 3, 32, 32)] * 3 and len(loader) == 3  # drop_last
    assert all(x.dtype == torch.float32 for x, _ in batches)
    sources = []
    for x, y in batches:
        for img, label, (dy, dx, flipped) in zip(raw(x), y, crops_and_flips(x), strict=True):
            i = source_index(img)
            assert torch.equal(img, by_hand(data.images[i], dy, dx, flipped)), i  # every pixel, padding too
            assert label == data.labels[i]
            sources.append(i)
    # A training epoch draws 192 different images: each at most once.
    assert len(sources) == 192 and len(set(sources)) == 192


def test_both_paths_normalise_the_same_way():
    data = ImageSet(torch.randint(0, 256, (230, 3, 32, 32), dtype=torch.uint8), torch.arange(230) % 10)
    # Evaluation: every image, in order, unaugmented, identical in both paths.
    te = list(TensorLoader(data, MEAN, STD, 64, train=False))
    re = list(TorchvisionLoader(data, MEAN, STD, 64, train=False))
    assert [len(y) for _, y in te] == [len(y) for _, y in re] == [64, 64, 64, 38]
    expected = (data.images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    for path in (te, re):
        assert torch.allclose(torch.cat([x for x, _ in path]), expected, atol=1e-5)
        assert torch.equal(torch.cat([y for _, y in path]), data.labels)
    assert torch.equal(raw(torch.cat([x for x, _ in te])), data.images.to(torch.int64))


@pytest.mark.parametrize("kind", ["tensor", "torchvision"])
def test_without_augmentation_training_serves_the_images_as_they_are(kind):
    data = coordinate_images(100)
    splits = Splits(data, None, data, 10, MEAN, STD)
    train, evaluation, test = make_loaders(splits, kind, 25, torch.device("cpu"), augment=False,
                                           eval_mode="none")
    assert evaluation is None
    train.set_epoch(1)
    sources = []
    for x, y in train:
        for img, label in zip(raw(x), y, strict=True):
            i = int(img[2, 0, 0])
            assert torch.equal(img, data.images[i].to(torch.int64)) and label == data.labels[i]
            sources.append(i)
    assert sorted(sources) == list(range(100)) and sources != list(range(100))  # shuffled, whole


@pytest.mark.parametrize("kind", KINDS_TORCHVISION_SLOW)
def test_an_epoch_does_not_depend_on_what_the_loader_served_before(kind):
    data = coordinate_images(120)
    loader = training_loader(kind, data, 40, seed=5)

    def epoch(e, start=0):
        loader.set_epoch(e, start)
        return list(loader)

    first = epoch(1)
    epoch(2)
    next(iter(loader))  # half an epoch 2 again
    torch.manual_seed(99)
    again = epoch(1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], epoch(2)[0][0])


def test_ranks_draw_disjoint_shards_of_one_permutation():
    n = 101
    whole = EpochStream(7)
    whole.set_epoch(3)
    perm = whole.order(n).tolist()
    assert sorted(perm) == list(range(n))
    shards = []
    for rank in range(2):
        s = EpochStream(7, rank=rank, world_size=2)
        s.set_epoch(3)
        shards.append(s.order(n).tolist())
    # DistributedSampler's semantics: the permutation cut to a multiple of the ranks, dealt out.
    assert shards == [perm[:100][0::2], perm[:100][1::2]]
    assert len(set(shards[0]) | set(shards[1])) == 100 and not set(shards[0]) & set(shards[1])


@pytest.mark.parametrize("kind", KINDS_TORCHVISION_SLOW)
def test_each_rank_trains_on_its_shard_and_evaluates_its_share(kind):
    data = coordinate_images(130)
    splits = Splits(data, data, data, 10, MEAN, STD)
    trained, evaluated = [], []
    for rank in range(2):
        train, evaluation, _ = make_loaders(splits, kind, 20, torch.device("cpu"), seed=3, rank=rank,
                                            world_size=2)
        train.set_epoch(2)
        batches = list(train)
        assert [len(y) for _, y in batches] == [10] * 6  # global batch 20: 10 a rank, 65 // 10 steps
        trained.append([source_index(img) for x, _ in batches for img in raw(x)])
        evaluated.append([int(img[2, 0, 0]) for x, _ in evaluation for img in raw(x)])
    assert not set(trained[0]) & set(trained[1]) and len(set(trained[0] + trained[1])) == 120
    assert sorted(evaluated[0] + evaluated[1]) == list(range(130))  # every image once, on one rank
    stream = EpochStream(3, rank=1, world_size=2)
    stream.set_epoch(2)
    assert trained[1] == stream.order(130).tolist()[:60]


def test_auto_loader_falls_back_to_torchvision_when_the_data_does_not_fit(monkeypatch):
    data = coordinate_images(100)  # 100 x 3,072 bytes of images + 100 x 8 of labels, per split
    splits = Splits(data, data, data, 10, MEAN, STD)
    need = 3 * (100 * 3 * 32 * 32 + 8 * 100)
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    for free, expected in [(4 * need, "tensor"), (4 * need - 1, "torchvision")]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 10 * free))
        assert choose_loader("auto", splits, cuda) == expected
    assert choose_loader("tensor", splits, cuda) == "tensor"
    assert choose_loader("auto", splits, torch.device("cpu")) == "tensor"  # a CPU holds it anyway


@pytest.mark.parametrize("kind", KINDS_TORCHVISION_SLOW)
def test_an_epoch_is_a_function_of_seed_and_epoch_and_can_start_at_any_batch(kind):
    data = coordinate_images(150)

    def epoch(seed, epoch, start=0):
        if kind == "tensor":
            loader = TensorLoader(data, MEAN, STD, 25, True, seed=seed)
        else:
            loader = TorchvisionLoader(data, MEAN, STD, 25, True, seed=seed)
        loader.set_epoch(epoch, start)
        torch.manual_seed(123)  # the global generator plays no part
        batches = list(loader)
        torch.manual_seed(456)
        return batches

    whole = epoch(3, 1)
    assert len(whole) == 6
    again = epoch(3, 1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole, again, strict=True))
    tail = epoch(3, 1, start=4)  # what a run resumed after 4 batches sees
    assert len(tail) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[4:], tail, strict=True))
    assert not torch.equal(whole[0][0], epoch(3, 2)[0][0]) and not torch.equal(whole[0][0], epoch(4, 1)[0][0])


@pytest.mark.slow  # starts worker processes
def test_worker_processes_do_not_change_the_stream():
    data = coordinate_images(300)

    def epoch(workers):
        loader = TorchvisionLoader(data, MEAN, STD, 50, True, workers=workers, seed=3)
        loader.set_epoch(1, 4)
        return list(loader)

    alone, with_workers = epoch(0), epoch(2)
    assert len(alone) == len(with_workers) == 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(alone, with_workers, strict=True))


def test_torchvision_loader_on_a_real_split_batches_and_normalises():
    s = load_splits("synthetic", subset=130, num_classes=10)
    train = TorchvisionLoader(s.train, s.mean, s.std, batch_size=32, train=True, seed=0)
    train.set_epoch(1)
    batches = list(train)
    assert len(batches) == 4 and all(x.shape == (32, 3, 32, 32) for x, _ in batches)  # drop_last
    evaluation = TorchvisionLoader(s.eval, s.mean, s.std, batch_size=32, train=False)
    xs, ys = zip(*evaluation, strict=True)
    assert torch.equal(torch.cat(ys), s.eval.labels)  # every image, in order
    expected = (s.eval.images.float() / 255 - torch.tensor(s.mean)[:, None, None]) \
        / torch.tensor(s.std)[:, None, None]
    assert torch.allclose(torch.cat(xs), expected, atol=1e-5)
