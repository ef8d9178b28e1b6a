"""The paper's estimate, CIFAR in its real on-disk layout, splits, the synthetic set, loaders."""
import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar

from engine import resolve_device, seed_everything
from loaders import TorchvisionLoader
from utils import DataError, calc_speedup, load_cifar, load_splits, solve_t_0, synthetic_images


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


# -- CIFAR from files in the real layout ------------------------------------------------
def pattern(index):
    """A distinct, orientation-revealing (3, 32, 32) uint8 image for every index."""
    c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    image = ((index * 7 + c * 50 + y * 3 + x) % 256).astype(np.uint8)
    image[:, 0, 0] = [index % 256, index // 256 % 256, index // 65536]  # the index, spelled out
    return image


def write_cifar(root, name, n_train, n_test):
    """CIFAR's python-version files: pickled dicts of flat CHW rows, as the archives hold."""
    ten = name == "cifar10"
    folder = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    folder.mkdir(parents=True)
    classes = 10 if ten else 100
    label_key = "labels" if ten else "fine_labels"

    def batch(indices):
        data = np.stack([pattern(i).reshape(-1) for i in indices])
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
    with pytest.raises(DataError, match="could not be found under .* --dataset synthetic"):
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


# -- loaders, seeding, devices ----------------------------------------------------------
def test_loaders_augment_training_and_keep_evaluation_whole():
    s = load_splits("synthetic", subset=130, num_classes=10)
    train = TorchvisionLoader(s.train, s.mean, s.std, batch_size=32, train=True, seed=0)
    batches = list(train)
    assert len(batches) == 4 and all(x.shape == (32, 3, 32, 32) for x, _ in batches)  # drop_last
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and abs(x.mean()) < 0.5 and 0.5 < x.std() < 1.5
    evaluation = TorchvisionLoader(s.eval, s.mean, s.std, batch_size=32, train=False)
    xs, ys = zip(*evaluation)
    assert torch.equal(torch.cat(ys), s.eval.labels)  # every image, in order
    expected = (s.eval.images.float() / 255 - torch.tensor(s.mean)[:, None, None]) \
        / torch.tensor(s.std)[:, None, None]
    assert torch.allclose(torch.cat(xs), expected, atol=1e-5)


def test_seed_everything_seeds_every_generator():
    import random
    import numpy as np

    def draw():
        seed_everything(7)
        return random.random(), np.random.rand(), torch.rand(1).item()

    assert draw() == draw()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: no CUDA GPU"):
            resolve_device("cuda")
