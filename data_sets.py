"""The data sets: CIFAR-10/100 (torchvision) or the synthetic CIFAR-shaped set, split as in the
paper, as uint8 tensors, and the steps an epoch of them makes; loaders.py turns them into
batches.

- `load_splits`, `split_sizes`, `Splits`, `ImageSet`: the paper's splits and their sizes.
- `load_cifar`: CIFAR in torchvision's on-disk layout, downloaded where missing; a failed
  download leaves the file system as it found it.
- `synthetic_images`: the synthetic set, any slice of it reproducible on its own.
- `steps_per_epoch`: optimizer steps in an epoch of a training set.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from messages import DataError, setting

DATASETS = ("cifar10", "cifar100", "synthetic")
TRAIN_SIZE, TEST_SIZE, VAL_SIZE = 50_000, 10_000, 5_000

# Per-channel statistics of the training images, in [0, 1] units.
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

EVAL_MODES = ("val", "test", "none")


@dataclass
class ImageSet:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,)."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: Optional[int]) -> "ImageSet":
        return self if n is None else ImageSet(self.images[:n], self.labels[:n])


@dataclass
class Splits:
    train: ImageSet
    eval: Optional[ImageSet]  # validation or test set evaluated each epoch; None: no evaluation
    test: ImageSet            # evaluated once at the end
    num_classes: int
    mean: tuple
    std: tuple


def check_data_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"{setting('data_root')} {root} is not a directory")
    if root.is_dir() and not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"{setting('data_root')} {root} is not readable")
    return root


def load_cifar(name: str, root: str | os.PathLike) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 or CIFAR-100 (train, test) from `root`, downloaded there if missing."""
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    pretty = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[name]
    root = check_data_root(root)
    try:
        train, test = cls(root, train=True), cls(root, train=False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        had_files = (root / cls.base_folder).exists()
        before = _download_traces(root, cls)
        try:
            # torchvision reports its progress on stdout; keep stdout for our own output.
            with contextlib.redirect_stdout(sys.stderr):
                train = cls(root, train=True, download=True)
                test = cls(root, train=False, download=True)
        except Exception as e:  # no network, a failed write, a checksum that still fails
            _remove_failed_download(root, cls, before)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if had_files:
                raise DataError(f"{pretty} files under {root} are missing or corrupted (checksum "
                                f"mismatch) and a fresh copy could not be downloaded ({reason}); "
                                f"replace them with a good copy or delete {root / cls.base_folder}") from None
            where, synthetic = setting("data_root"), setting("dataset")
            raise DataError(f"{pretty} could not be found under {root} or downloaded ({reason}); "
                            f"pass {where} with a copy of it, or use {synthetic} synthetic") from None
    return _to_imageset(train), _to_imageset(test)


def _download_traces(root: Path, cls) -> dict:
    """What a download may leave behind, noted before it starts: the directories up to the
    first existing ancestor of `root` (torchvision makes them all), and whether the archive
    and the extracted folder were already there."""
    missing, path = [], root.absolute()
    while not path.exists():
        missing.append(path)
        path = path.parent
    return {"missing_dirs": missing, "archive": (root / cls.filename).exists(),
            "folder": (root / cls.base_folder).exists()}


def _remove_failed_download(root: Path, cls, before: dict) -> None:
    """Undo what a failed download made, and only that: the partial archive and extracted
    folder if they are new, then the directories it created, each only if it is now empty.
    A failed start leaves the file system as it found it (no stray empty ./data)."""
    with contextlib.suppress(OSError):
        if not before["archive"] and (root / cls.filename).is_file():
            (root / cls.filename).unlink()
        if not before["folder"] and (root / cls.base_folder).is_dir():
            shutil.rmtree(root / cls.base_folder)
    for directory in before["missing_dirs"]:  # deepest first
        try:
            directory.rmdir()  # refuses a directory that is not empty
        except OSError:
            break


def _to_imageset(ds) -> ImageSet:
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.as_tensor(ds.targets, dtype=torch.int64))


SYNTHETIC_BLOCK = 1000


def synthetic_images(part: str, start: int, stop: int, num_classes: int = 100,
                     seed: int = 0) -> ImageSet:
    """Images start..stop-1 of the synthetic set's `part` ("train": 50,000, "test": 10,000).

    A class is a smooth colour field plus an oriented grating of its own; every image shows
    its class's pattern shifted, with random contrast, grating phase and pixel noise. Images
    are generated in blocks of 1,000 seeded by (seed, part, block), so any slice is the same
    whichever other slices are asked for, and a small subset costs little.
    """
    size = {"train": TRAIN_SIZE, "test": TEST_SIZE}[part]
    if not 0 <= start <= stop <= size:
        raise ValueError(f"synthetic {part} images {start}..{stop} out of range 0..{size}")
    blocks = range(start // SYNTHETIC_BLOCK, -(-stop // SYNTHETIC_BLOCK))
    parts = [_synthetic_block(part, b, num_classes, seed) for b in blocks]
    if not parts:
        return ImageSet(torch.empty(0, 3, 32, 32, dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    offset = blocks.start * SYNTHETIC_BLOCK
    sl = slice(start - offset, stop - offset)
    return ImageSet(torch.from_numpy(images[sl].copy()), torch.from_numpy(labels[sl].copy()))


def _synthetic_classes(num_classes: int, seed: int):
    rng = np.random.default_rng([seed, num_classes, 0xC1A55])
    coarse = rng.uniform(0.0, 1.0, size=(num_classes, 3, 4, 4)).astype(np.float32)
    colour = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(32, 32),
                                             mode="bilinear", align_corners=False).numpy()
    angle = rng.uniform(0, np.pi, size=num_classes).astype(np.float32)
    freq = rng.uniform(1.5, 5.0, size=num_classes).astype(np.float32)  # cycles per image
    return colour, angle, freq


# The blocks a small run uses, kept: the runs of a grid run in the grid's own process
# share their data, 3 MB a block. Read-only: every slice of them is copied.
@functools.lru_cache(maxsize=16)
def _synthetic_block(part: str, block: int, num_classes: int, seed: int):
    colour, angle, freq = _synthetic_classes(num_classes, seed)
    size = {"train": TRAIN_SIZE, "test": TEST_SIZE}[part]
    n = min(SYNTHETIC_BLOCK, size - block * SYNTHETIC_BLOCK)
    rng = np.random.default_rng([seed, len(angle), {"train": 1, "test": 2}[part], block])
    labels = rng.integers(0, len(angle), size=n)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1)).astype(np.float32)
    grid = np.arange(32, dtype=np.float32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    a, f = angle[labels][:, None, None], freq[labels][:, None, None]
    grating = np.sin(2 * np.pi * f * (xx * np.cos(a) + yy * np.sin(a)) / 32 + phase)
    # A weaker copy of another class's pattern, a random tint and strong noise keep the
    # task from being solved in a few steps: errors stay informative for a few epochs.
    other = rng.integers(0, len(angle), size=n)
    img = (0.25 * colour[labels] + 0.12 * grating[:, None] + 0.12 * colour[other]
           + rng.uniform(0.0, 0.4, size=(n, 3, 1, 1)).astype(np.float32))
    img *= rng.uniform(0.7, 1.3, size=(n, 1, 1, 1)).astype(np.float32)  # contrast
    # Shift the pattern by up to 4 pixels (wrapping around), so position is not the class.
    dy, dx = rng.integers(-4, 5, size=(2, n))
    rows = (np.arange(32)[None, :] - dy[:, None]) % 32
    cols = (np.arange(32)[None, :] - dx[:, None]) % 32
    img = img[np.arange(n)[:, None, None, None], np.arange(3)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]
    img += rng.normal(0.0, 0.2, size=img.shape).astype(np.float32)
    images, labels = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), labels.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_splits(dataset: str, data_root: str | os.PathLike = "./data", eval_mode: str = "val",
                subset: Optional[int] = None, num_classes: Optional[int] = None,
                seed: int = 0) -> Splits:
    """The paper's splits of a data set.

    eval_mode "val": train on the first 45,000 training images, evaluate on the last 5,000;
    "test": train on all 50,000 and evaluate on the test set; "none": train on all 50,000,
    no per-epoch evaluation. `subset` caps every split at its first N images, after splitting.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r} (choose from {', '.join(DATASETS)})")
    if eval_mode not in EVAL_MODES:
        raise ValueError(f"unknown eval_mode {eval_mode!r} (choose from {', '.join(EVAL_MODES)})")
    if dataset == "synthetic":
        num_classes = num_classes or 100
        n_train, n_eval, n_test = split_sizes(eval_mode, subset)
        val_start = TRAIN_SIZE - VAL_SIZE
        train = synthetic_images("train", 0, n_train, num_classes, seed)
        val = (synthetic_images("train", val_start, val_start + n_eval, num_classes, seed)
               if eval_mode == "val" else None)
        test = synthetic_images("test", 0, n_test, num_classes, seed)
        mean, std = _channel_stats(train.images)
    else:
        full_train, full_test = load_cifar(dataset, data_root)
        num_classes = 10 if dataset == "cifar10" else 100
        # The validation set is the last 5,000 training images (of 50,000 in CIFAR).
        n_train = len(full_train) - VAL_SIZE if eval_mode == "val" else len(full_train)
        train = ImageSet(full_train.images[:n_train], full_train.labels[:n_train]).head(subset)
        val = (ImageSet(full_train.images[n_train:], full_train.labels[n_train:]).head(subset)
               if eval_mode == "val" else None)
        test = full_test.head(subset)
        mean, std = MEAN_STD[dataset]
    evaluated = {"val": val, "test": test, "none": None}[eval_mode]
    return Splits(train, evaluated, test, num_classes, mean, std)


def split_sizes(eval_mode: str, subset: Optional[int] = None) -> tuple[int, int, int]:
    """(train, per-epoch evaluation, test) sizes of `load_splits` for CIFAR-sized data."""
    cap = (lambda n: n) if subset is None else (lambda n: min(n, subset))
    train = TRAIN_SIZE - VAL_SIZE if eval_mode == "val" else TRAIN_SIZE
    evaluated = {"val": cap(VAL_SIZE), "test": cap(TEST_SIZE), "none": 0}[eval_mode]
    return cap(train), evaluated, cap(TEST_SIZE)

def steps_per_epoch(train_images: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in an epoch: the last partial batch is dropped (per rank under
    torchrun, where `batch_size` is the global batch). ValueError when there is none."""
    steps = (train_images // world_size) // (batch_size // world_size)
    if steps == 0:
        raise ValueError(f"{setting('batch_size')} {batch_size} is larger than the training set "
                         f"({train_images} images)")
    return steps


def _channel_stats(images: torch.Tensor) -> tuple[tuple, tuple]:
    """Per-channel mean and std in [0, 1] units, summed exactly in integers, chunk by chunk."""
    total = torch.zeros(3, dtype=torch.int64)
    squares = torch.zeros(3, dtype=torch.int64)
    for chunk in images.split(4096):
        x = chunk.to(torch.int64)
        total += x.sum((0, 2, 3))
        squares += (x * x).sum((0, 2, 3))
    n = images.numel() // 3
    mean = total.double() / n
    std = (squares.double() / n - mean ** 2).clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())
