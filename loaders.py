"""The data pipeline: a training epoch's stream as a pure function of (seed, epoch, position),
the on-device tensor loader with batched crop + flip, the torchvision DataLoader (the
reference), and the choice between them.

- `EpochStream`: order and augmentation seeds of an epoch, sharded by rank under torchrun.
- `TensorLoader`, `random_crop_flip`: the data set stays on the device, whole batches are
  augmented there; `TorchvisionLoader`: per-image torchvision transforms in a DataLoader.
- `make_loaders`: the train / per-epoch evaluation / test loaders of a run.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from data_sets import ImageSet, Splits, load_splits
from messages import DataError


def stream_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of some integers (seed, epoch, batch, ...)."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochStream:
    """What makes a training epoch's data a pure function of (seed, epoch, position): the
    order and every random augmentation are drawn from seeds derived from them, never from a
    generator's history. So an epoch can start at any batch (a resumed run skips what it has
    done) and gives what an uninterrupted run would, whatever the number of workers.

    Under torchrun every rank draws the same permutation and takes its own shard of it
    (DistributedSampler's semantics: the tail that does not divide evenly is dropped)."""

    def __init__(self, seed: int, rank: int = 0, world_size: int = 1):
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def shard_size(self, n: int) -> int:
        return n // self.world_size

    def order(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """This rank's share of the epoch's permutation of range(n)."""
        g = torch.Generator(device=device).manual_seed(stream_seed(self.seed, self.epoch))
        order = torch.randperm(n, device=device, generator=g)
        return order[:self.shard_size(n) * self.world_size][self.rank::self.world_size]


class AugmentedImages(Dataset):
    """An ImageSet served image by image through a torchvision transform; with a stream,
    image i of an epoch is augmented from its own seed (seed, epoch, i)."""

    def __init__(self, data: ImageSet, transform: Callable, stream: Optional[EpochStream] = None):
        self.data, self.transform, self.stream = data, transform, stream

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        if self.stream is None:
            return self.transform(self.data.images[i]), self.data.labels[i]
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator
            torch.manual_seed(stream_seed(self.stream.seed, self.stream.epoch, i))
            return self.transform(self.data.images[i]), self.data.labels[i]


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of the epoch's permutation, from the stream's start batch on."""

    def __init__(self, n: int, batch_size: int, stream: EpochStream):
        self.n, self.batch_size, self.stream = n, batch_size, stream

    def __len__(self) -> int:
        return self.stream.shard_size(self.n) - self.stream.start_batch * self.batch_size

    def __iter__(self):
        return iter(self.stream.order(self.n)[self.stream.start_batch * self.batch_size:].tolist())


def make_transform(mean, std, augment: bool) -> Callable:
    """Random crop (pad 4) and horizontal flip when augmenting, then normalisation."""
    from torchvision.transforms import v2  # torchvision takes a second to import: only if used

    steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if augment else []
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class TorchvisionLoader:
    """The reference loader: a DataLoader applying torchvision transforms image by image.

    Training shuffles (a permutation per epoch) and drops the last partial batch, so an epoch
    has floor(N / batch_size) steps; `set_epoch(epoch, start_batch)` before iterating picks
    the epoch and where it starts. Evaluation keeps every image, in order. With world_size > 1
    each rank serves its shard: together the ranks see every evaluation image once."""

    def __init__(self, data: ImageSet, mean, std, batch_size: int, train: bool, augment: bool = True,
                 workers: int = 0, seed: int = 0, pin_memory: bool = False,
                 rank: int = 0, world_size: int = 1):
        self.stream = EpochStream(seed, rank, world_size) if train else None
        dataset = AugmentedImages(data, make_transform(mean, std, augment and train), self.stream)
        sampler = (EpochSampler(len(data), batch_size, self.stream) if train
                   else list(range(rank, len(data), world_size)))
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
                                 num_workers=workers, pin_memory=pin_memory)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.stream.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def random_crop_flip(images: torch.Tensor, padding: int = 4,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Batched RandomCrop(size, padding, fill 0) + RandomHorizontalFlip on (B, C, H, W):
    each image gets its own offset and flip, applied as one gather on the images' device."""
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (2, b), device=device, generator=generator)
    flip = torch.rand(b, device=device, generator=generator) < 0.5
    rows = offsets[0, :, None] + torch.arange(h, device=device)
    cols = offsets[1, :, None] + torch.arange(w, device=device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    index = rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]
    index = index.view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, -1).gather(2, index).view(b, c, h, w)


class TensorLoader:
    """Serves an ImageSet kept whole (uint8) on `device`, augmenting and normalising whole
    batches there: no per-image Python, no worker processes, no host-to-device copies.

    Same contract as `TorchvisionLoader`: training shuffles and drops the last partial batch,
    batch b of an epoch augmented from its own seed (seed, epoch, b, rank); evaluation keeps
    every image (of this rank's shard), in order.
    """

    def __init__(self, data: ImageSet, mean, std, batch_size: int, train: bool, augment: bool = True,
                 device: torch.device | str = "cpu", seed: int = 0, rank: int = 0, world_size: int = 1):
        self.device = torch.device(device)
        if not train:  # evaluation: this rank's strided share, each image on exactly one rank
            data = ImageSet(data.images[rank::world_size], data.labels[rank::world_size])
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.batch_size, self.train, self.augment = batch_size, train, augment and train
        self.stream = EpochStream(seed, rank, world_size) if train else None
        self.generator = torch.Generator(device=self.device)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.stream.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        n = len(self.labels)
        if self.train:
            return self.stream.shard_size(n) // self.batch_size
        return -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        order = self.stream.order(n, self.device) if self.train else torch.arange(n, device=self.device)
        first = self.stream.start_batch if self.train else 0
        for i in range(first, len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[index]
            if self.augment:
                s = self.stream
                self.generator.manual_seed(stream_seed(s.seed, s.epoch, i, s.rank))
                x = random_crop_flip(x, 4, self.generator)
            yield (x.float() - self.mean) / self.std, self.labels[index]


def fits_on_device(data: Sequence[ImageSet], device: torch.device, fraction: float = 0.25) -> bool:
    """Whether the uint8 images take at most `fraction` of the device's free memory."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return sum(d.images.numel() + 8 * d.labels.numel() for d in data) <= fraction * free


def choose_loader(kind: str, splits: Splits, device: torch.device) -> str:
    """The loader "auto": the tensor loader when the data fits on the device, else torchvision."""
    if kind != "auto":
        return kind
    data = [d for d in (splits.train, splits.eval, splits.test) if d is not None]
    return "tensor" if fits_on_device(data, device) else "torchvision"


def make_loaders(splits: Splits, kind: str, batch_size: int, device: torch.device, *,
                 augment: bool = True, eval_mode: str = "val", workers: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
    """(train loader, per-epoch evaluation loader or None, test loader), each serving this
    process's shard: training batches of batch_size / world_size."""
    batch = batch_size // world_size
    # Evaluation batches: larger on a GPU; on a CPU the training size runs fastest (cache).
    eval_batch = batch if device.type == "cpu" else max(batch, 500)
    shard = {"seed": seed, "rank": rank, "world_size": world_size}
    if kind == "tensor":
        def make(data, size, train):
            return TensorLoader(data, splits.mean, splits.std, size, train, augment, device, **shard)
    else:
        def make(data, size, train):
            return TorchvisionLoader(data, splits.mean, splits.std, size, train, augment, workers,
                                     pin_memory=device.type == "cuda", **shard)
    evaluated = make(splits.eval, eval_batch, False) if splits.eval is not None else None
    test = evaluated if eval_mode == "test" else make(splits.test, eval_batch, False)
    return make(splits.train, batch, True), evaluated, test


def load_data(dist, dataset: str, data_root, eval_mode: str, subset, synthetic_classes, seed: int) -> Splits:
    """`load_splits`; under torchrun rank 0 loads (and downloads) first, then the others, and
    every rank learns whether rank 0 could (`dist`: a distributed.Distributed)."""
    def load():
        return load_splits(dataset, data_root, eval_mode, subset, synthetic_classes, seed)
    if not dist.enabled:
        return load()
    error, splits = None, None
    if dist.is_main:
        try:
            splits = load()
        except DataError as e:
            error = str(e)
    error = dist.broadcast(error)
    if error is not None:
        raise DataError(error)
    return splits if dist.is_main else load()
