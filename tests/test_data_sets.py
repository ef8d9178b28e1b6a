"""The data sets (data_sets.py): CIFAR in its real on-disk layout, the paper's splits and their sizes,
the synthetic set, steps per epoch. (The estimates: tests/test_estimates.py.)"""
import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar

import data_sets
from conftest import raises_flagged
from data_sets import ImageSet, load_cifar, load_splits, split_sizes, steps_per_epoch, synthetic_images
from messages import DataError


# -- CIFAR from files in the real layout ------------------------------------------------
def patterns(indices):
    """A distinct, orientation-revealing (3, 32, 32) uint8 image for every index."""
    index = np.asarray(indices).reshape(-1, 1, 1, 1)
    c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    # (index * 7 + c * 50 + y * 3 + x) mod 256, summed in uint8, whose addition wraps at 256
    images = (index * 7 % 256).astype(np.uint8) + ((c * 50 + y * 3 + x) % 256).astype(np.uint8)
    flat = index.reshape(-1)
    images[:, :, 0, 0] = np.stack([flat % 256, flat // 256 % 256, flat // 65536], 1)  # the index, spelled out
    return images


def pattern(index):
    return patterns([index])[0]


def write_cifar(root, name, n_train, n_test):
    """CIFAR's python-version files: pickled dicts of flat CHW rows, as the archives hold."""
    ten = name == "cifar10"
    folder = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    folder.mkdir(parents=True)
    classes = 10 if ten else 100
    label_key = "labels" if ten else "fine_labels"

    def batch(indices):
        data = patterns(indices).reshape(len(indices), -1)
        return {"data": data, label_key: [i % classes for i in indices]}

    if ten:
        chunks = np.array_split(np.arange(n_train), 5)
        for j, chunk in enumerate(chunks, 1):
            (folder / f"data_batch_{j}").write_bytes(pickle.dumps(batch(chunk.tolist())))
        (folder / "test_batch").write_bytes(pickle.dumps(batch(list(range(10**5, 10**5 + n_test)))))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    else:
        (folder / "train").write_bytes(pickle.dumps(batch(list(range(n_train)))))
        (folder / "test").write_bytes(pickle.dumps(batch(list(range(10**5, 10**5 + n_test)))))
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [str(i) for i in range(100)]}))
    return folder


@pytest.fixture
def no_checksums_no_network(monkeypatch):
    """Skip only the md5 comparison (the files still have to exist) and make downloads fail."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_from_the_real_layout_with_the_papers_split(tmp_path, name, no_checksums_no_network):
    write_cifar(tmp_path, name, n_train=5_600, n_test=300)
    train, test = load_cifar(name, tmp_path)
    assert train.images.shape == (5_600, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[1234], torch.from_numpy(pattern(1234)))  # CHW, not HWC
    assert torch.equal(test.images[5], torch.from_numpy(pattern(10**5 + 5)))
    assert train.labels[1234] == 1234 % (10 if name == "cifar10" else 100)

    splits = load_splits(name, tmp_path, "val")
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (600, 5_000, 300)
    assert splits.num_classes == (10 if name == "cifar10" else 100)
    # The validation set is the last 5,000 training images, disjoint from the training set.
    assert torch.equal(splits.eval.images, train.images[600:])
    train_ids = {bytes(x.numpy().tobytes()) for x in splits.train.images}
    assert not train_ids & {bytes(x.numpy().tobytes()) for x in splits.eval.images}

    full = load_splits(name, tmp_path, "test", subset=1_000)
    assert len(full.train) == 1_000 and full.eval is full.test and len(full.test) == 300
    assert load_splits(name, tmp_path, "none").eval is None
    assert len(load_splits(name, tmp_path, "none").train) == 5_600
    assert load_splits(name, tmp_path, "val", subset=50).eval.images.shape[0] == 50
    assert splits.mean == ((0.4914, 0.4822, 0.4465) if name == "cifar10" else (0.5071, 0.4865, 0.4409))


def test_corrupted_cifar_is_reported_as_such(tmp_path, monkeypatch, no_checksums_no_network):
    write_cifar(tmp_path, "cifar100", n_train=10, n_test=10)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: not path.endswith("train"))
    with pytest.raises(DataError, match="CIFAR-100 files under .* are missing or corrupted"):
        load_cifar("cifar100", tmp_path)


def test_missing_cifar_offline_says_how_to_continue(tmp_path, no_checksums_no_network):
    with raises_flagged(DataError, "could not be found under .* --dataset synthetic"):
        load_cifar("cifar10", tmp_path / "empty")


def test_data_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        load_cifar("cifar10", tmp_path / "file")


# -- synthetic data ---------------------------------------------------------------------
def test_synthetic_is_deterministic_and_sliceable():
    a = synthetic_images("train", 0, 2_500, num_classes=10, seed=3)
    b = synthetic_images("train", 1_500, 2_100, num_classes=10, seed=3)
    assert a.images.shape == (2_500, 3, 32, 32) and a.images.dtype == torch.uint8
    assert torch.equal(a.images[1_500:2_100], b.images) and torch.equal(a.labels[1_500:2_100], b.labels)
    assert set(a.labels.tolist()) == set(range(10))
    assert not torch.equal(a.images, synthetic_images("train", 0, 2_500, 10, seed=4).images)
    assert a.images.float().std() > 30  # not a blank image set
    # The blocks are kept for the next call (a grid's runs in one process share them): what a
    # caller does to its images does not reach them.
    a.images.zero_()
    assert torch.equal(synthetic_images("train", 1_500, 2_100, num_classes=10, seed=3).images, b.images)


def test_synthetic_splits_follow_the_cifar_layout():
    s = load_splits("synthetic", eval_mode="val", subset=300, num_classes=10, seed=0)
    assert (len(s.train), len(s.eval), len(s.test), s.num_classes) == (300, 300, 300, 10)
    assert torch.equal(s.eval.images, synthetic_images("train", 45_000, 45_300, 10, 0).images)
    whole = load_splits("synthetic", eval_mode="test", subset=300, num_classes=10, seed=0)
    assert torch.equal(whole.train.images, s.train.images) and whole.eval is whole.test


def test_synthetic_classes_are_learnable_by_a_linear_probe():
    # Nearest class mean on raw pixels already beats chance by far: the classes are real.
    train = synthetic_images("train", 0, 3_000, num_classes=10)
    test = synthetic_images("test", 0, 1_000, num_classes=10)
    x, xt = train.images.flatten(1).float(), test.images.flatten(1).float()
    means = torch.stack([x[train.labels == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(xt, means).argmin(1) == test.labels).float().mean()
    assert accuracy > 0.3


# -- the splits' sizes, as train.py checks them before loading anything --------------------
def test_split_sizes_are_the_papers():
    assert split_sizes("val") == (45_000, 5_000, 10_000)
    assert split_sizes("test") == (50_000, 10_000, 10_000)
    assert split_sizes("none") == (50_000, 0, 10_000)
    assert split_sizes("val", 6_000) == (6_000, 5_000, 6_000)
    assert split_sizes("test", 64) == (64, 64, 64)
    assert split_sizes("none", 20_000) == (20_000, 0, 10_000)


@pytest.fixture
def cheap_synthetic(monkeypatch):
    """synthetic_images without the pixels: blank images of the asked length, and every
    (part, start, stop) asked for; the split logic is what is under test."""
    asked = []

    def blank(part, start, stop, num_classes=100, seed=0):
        asked.append((part, start, stop))
        n = stop - start
        return ImageSet(torch.zeros((), dtype=torch.uint8).expand(n, 3, 32, 32),
                        torch.zeros(n, dtype=torch.int64))

    monkeypatch.setattr(data_sets, "synthetic_images", blank)
    monkeypatch.setattr(data_sets, "_channel_stats", lambda images: ((0.5,) * 3, (0.25,) * 3))
    return asked


@pytest.mark.parametrize("eval_mode", ["val", "test", "none"])
@pytest.mark.parametrize("subset", [None, 1, 999, 5_000, 6_000, 47_000])
def test_split_sizes_are_what_load_splits_gives(cheap_synthetic, eval_mode, subset):
    s = load_splits("synthetic", eval_mode=eval_mode, subset=subset, num_classes=10)
    sizes = (len(s.train), 0 if s.eval is None else len(s.eval), len(s.test))
    assert split_sizes(eval_mode, subset) == sizes
    cap = (lambda n: n) if subset is None else (lambda n: min(n, subset))
    # The images asked for: the training set's first images; the last 5,000 of the 50,000 as
    # the validation set; the test set's first images.
    expected = {"val": [("train", 0, cap(45_000)), ("train", 45_000, 45_000 + cap(5_000)), ("test", 0, cap(10_000))],
                "test": [("train", 0, cap(50_000)), ("test", 0, cap(10_000))],
                "none": [("train", 0, cap(50_000)), ("test", 0, cap(10_000))]}[eval_mode]
    assert cheap_synthetic == expected
    assert (s.eval is s.test) == (eval_mode == "test")


def test_steps_per_epoch_drop_the_last_partial_batch():
    assert steps_per_epoch(45_000, 50) == 900 and steps_per_epoch(96, 16) == 6 and steps_per_epoch(97, 16) == 6
    assert steps_per_epoch(95, 16) == 5
    assert steps_per_epoch(128, 32, world_size=2) == 4  # 64 images a rank, 16 a batch
    assert steps_per_epoch(130, 32, world_size=2) == 4
    with raises_flagged(ValueError, "--batch_size 50 is larger than the training set"):
        steps_per_epoch(49, 50)
