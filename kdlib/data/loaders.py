"""One loader interface for every dataset: :func:`get_loaders` returns a :class:`DataBundle`.

Both ``bundle.train`` and ``bundle.test`` iterate over ``(x, y)`` batches (x float, normalised,
B×3×32×32 on the requested device; y long), have ``len()`` (batches per epoch) and
``set_epoch(epoch)``. The shuffle and the augmentation of epoch ``e`` are a pure function of
``(seed, e)``, so a run resumed at epoch ``e`` sees exactly the batches it would have seen.
The last, partial batch of an epoch is kept in both splits: with the small ``shapes`` training
sets every image counts, and the test split must see every image. One exception: a last
*training* batch of a single image is dropped (BatchNorm cannot normalise one sample, and AFD's and
SAKD's BatchNorm1d over the batch fails on it); :func:`train_count` says how many images an epoch uses.

``shapes`` keeps its uint8 images on the device and augments whole batches with tensor ops
(pad-4 random crop and flip as one gather), far faster than a DataLoader on a CPU and the fast
path on a GPU. CIFAR uses a torch DataLoader over torchvision transforms (see kdlib.data.cifar).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from kdlib import KDLibError
from kdlib.config import DataConfig
from kdlib.data import cifar, shapes
from kdlib.data.seeds import derive_seed, generator_for

# ``shapes`` colours are uniform in the RGB cube, so the channels share statistics
# (measured on 20,480 training images: mean 0.500–0.503, std 0.268–0.269).
SHAPES_MEAN = (0.5, 0.5, 0.5)
SHAPES_STD = (0.268, 0.268, 0.268)
PAD = 4  # CRD's crop padding
DATASETS = ("shapes", "cifar10", "cifar100")


def train_count(n: int, batch_size: int) -> int:
    """Images one training epoch uses: all of them, unless the last batch would hold a single one."""
    return n - 1 if n > 1 and n % batch_size == 1 else n


class TensorBatches:
    """Batches of uint8 images held in memory, normalised (and, for training, augmented) on the fly.

    Augmentation is CRD's: zero-pad by 4, take a random 32×32 crop (offsets uniform in 0..8),
    flip horizontally with probability 1/2; all of it one ``gather`` per batch.
    """

    def __init__(
        self, images: Tensor, labels: Tensor, batch_size: int, mean, std, *, train: bool, seed: int = 0
    ):
        self.images, self.labels, self.batch_size = images, labels, int(batch_size)
        self.train, self.seed, self.epoch = train, int(seed), 0
        self.rank, self.world_size = 0, 1
        device = images.device
        std_t = torch.tensor(std, device=device)
        self._scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1)
        self._shift = (-torch.tensor(mean, device=device) / std_t).view(1, 3, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard(self, rank: int, world_size: int) -> None:
        """Yield only this rank's rows of every global batch (torchrun).

        The global batches are those of a single process, so N ranks together see exactly what one
        process sees: the role of DistributedSampler, for data already in memory.
        """
        self.rank, self.world_size = int(rank), int(world_size)

    def __len__(self) -> int:
        n = train_count(len(self.labels), self.batch_size) if self.train else len(self.labels)
        return math.ceil(n / self.batch_size)

    def _normalise(self, x: Tensor) -> Tensor:
        return x.float().mul_(self._scale).add_(self._shift)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, device = len(self.labels), self.images.device
        if not self.train:
            for lo in range(0, n, self.batch_size):
                batch = slice(lo, lo + self.batch_size)
                yield self._normalise(self.images[batch]), self.labels[batch]
            return
        # Every random number of the epoch, drawn up front on the CPU from (seed, epoch).
        g = generator_for("kdlib.loader", self.seed, self.epoch)
        order = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        order, offsets, flips = order.to(device), offsets.to(device), flips.to(device)
        for lo in range(0, train_count(n, self.batch_size), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            if self.world_size > 1:
                idx = idx[self.rank::self.world_size]
            x = augment_batch(self.images[idx], offsets[idx], flips[idx])
            yield self._normalise(x), self.labels[idx]


def augment_batch(images: Tensor, offsets: Tensor, flips: Tensor) -> Tensor:
    """Pad-4 random crop and horizontal flip of a uint8 batch B×C×H×W, as one gather.

    ``offsets`` (B×2, long, 0..8) are the crop's top-left corner (row, column) in the padded
    image, ``flips`` (B, bool) the images to mirror. Same result as torchvision's
    ``RandomCrop(32, padding=4)`` then ``RandomHorizontalFlip`` for those draws.
    """
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = offsets[:, :1] + ar_h  # B×H
    cols = offsets[:, 1:] + torch.where(flips[:, None], w - 1 - ar_w, ar_w)  # B×W
    flat = (rows[:, :, None] * (w + 2 * PAD) + cols[:, None, :]).view(b, 1, h * w)
    out = torch.gather(padded.view(b, c, -1), 2, flat.expand(b, c, h * w))
    return out.view(b, c, h, w)


class LoaderBatches:
    """A torch DataLoader rebuilt per epoch with a generator seeded from ``(seed, epoch)``.

    The generator drives the shuffle; the dataset (:class:`kdlib.data.cifar.CifarSplit`) seeds
    each sample's augmentation from ``(seed, epoch, index)``. Workers are not persistent, so a
    new epoch's workers see the new epoch number.
    """

    def __init__(self, dataset, batch_size: int, device, *, train: bool, seed: int = 0, num_workers: int = 0):
        self.dataset, self.batch_size, self.device = dataset, int(batch_size), torch.device(device)
        self.train, self.seed, self.epoch, self.num_workers = train, int(seed), 0, int(num_workers)
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        """Read this rank's part of every epoch through a DistributedSampler (torchrun)."""
        self.rank, self.world_size = int(rank), int(world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.epoch = self.epoch

    def __len__(self) -> int:
        n = train_count(len(self.dataset), self.batch_size) if self.train else len(self.dataset)
        return math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.dataset.epoch = self.epoch
        sampler = None
        if self.world_size > 1:
            sampler = torch.utils.data.DistributedSampler(
                self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=self.train,
                seed=derive_seed("kdlib.loader", self.seed),
            )
            sampler.set_epoch(self.epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=max(1, self.batch_size // self.world_size),
            shuffle=self.train and sampler is None, sampler=sampler,
            drop_last=self.train and len(self.dataset) % self.batch_size == 1,  # a last batch of one image
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            generator=generator_for("kdlib.loader", self.seed, self.epoch),
        )
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


@dataclass
class DataBundle:
    """Everything a run needs from a dataset (see the module docstring for the batch contract)."""

    name: str
    train: TensorBatches | LoaderBatches
    test: TensorBatches | LoaderBatches
    num_classes: int
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_set: torch.utils.data.Dataset
    test_set: torch.utils.data.Dataset

    def eval_set(self, max_images: int | None = None) -> torch.utils.data.TensorDataset:
        """The test split as normalised model inputs: ``(x, y, mask)`` triples (shapes) or ``(x, y)`` (CIFAR).

        What :func:`kdlib.explain.where_models_look` and the figures need: the images exactly as the
        test loader feeds them to the models (``test_set[i]`` is an RGB image in [0, 1], not a model input).
        """
        xs, ys = [], []
        for x, y in self.test:
            xs.append(x.cpu())
            ys.append(y.cpu())
            if max_images is not None and sum(len(b) for b in ys) >= max_images:
                break
        x, y = torch.cat(xs)[:max_images], torch.cat(ys)[:max_images]
        masks = getattr(self.test_set, "masks", None)
        if masks is None:
            return torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.TensorDataset(x, y, masks[: len(y)].cpu())

    def denormalize(self, x: Tensor) -> Tensor:
        """Undo the normalisation: RGB in [0, 1] (for figures), for a C×H×W image or a batch."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(3, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)


def get_loaders(cfg: DataConfig, device: str | torch.device = "cpu", seed: int = 0) -> DataBundle:
    """Train and test batches of ``cfg.name`` on ``device``; ``seed`` drives shuffle and augmentation.

    ``shapes`` is generated from ``cfg.data_seed`` (train and test are separate streams); the
    CIFAR files are read from ``cfg.root`` (default ``$KDLIB_DATA`` or ``~/.cache/kdlib/data``)
    and downloaded there first if ``cfg.download``.
    """
    if cfg.name not in DATASETS:
        raise KDLibError(f"unknown dataset {cfg.name!r}; choose one of {', '.join(DATASETS)}")
    if cfg.batch_size < 1:
        raise KDLibError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.eval_split not in ("test", "val"):
        raise KDLibError(f"eval_split must be 'test' or 'val', got {cfg.eval_split!r}")
    device = torch.device(device)
    if cfg.name == "shapes":
        return _shapes_bundle(cfg, device, seed)
    return _cifar_bundle(cfg, device, seed)


def _shapes_bundle(cfg: DataConfig, device: torch.device, seed: int) -> DataBundle:
    common = {"seed": cfg.data_seed, "num_classes": cfg.num_classes, "difficulty": cfg.difficulty}
    train_set = shapes.ShapesDataset(cfg.train_size, split="train", **common).to(device)
    # The evaluated split: the test images, or (calibration) the validation stream, of test_size images.
    test_set = shapes.ShapesDataset(cfg.test_size, split=cfg.eval_split, **common).to(device)

    def batches(ds: shapes.ShapesDataset, train: bool) -> TensorBatches:
        stats = (SHAPES_MEAN, SHAPES_STD)
        return TensorBatches(ds.images, ds.labels, cfg.batch_size, *stats, train=train, seed=seed)

    return DataBundle(
        name="shapes", train=batches(train_set, True), test=batches(test_set, False),
        num_classes=cfg.num_classes, classes=list(train_set.classes), mean=SHAPES_MEAN, std=SHAPES_STD,
        train_set=train_set, test_set=test_set,
    )


def _cifar_bundle(cfg: DataConfig, device: torch.device, seed: int) -> DataBundle:
    if cfg.eval_split != "test":
        raise KDLibError(f"eval_split={cfg.eval_split!r} exists for shapes only; CIFAR runs are scored on its test set")
    _, mean, std = cifar.CIFAR[cfg.name]
    splits = {}
    for train in (True, False):
        source = cifar.open_cifar(cfg.name, cfg.root, train=train, download=cfg.download)
        splits[train] = cifar.CifarSplit(source, cifar.crd_transform(mean, std, train), seed=seed)
    batches = {
        train: LoaderBatches(ds, cfg.batch_size, device, train=train, seed=seed, num_workers=cfg.num_workers)
        for train, ds in splits.items()
    }
    return DataBundle(
        name=cfg.name, train=batches[True], test=batches[False], num_classes=len(splits[True].classes),
        classes=splits[True].classes, mean=mean, std=std, train_set=splits[True], test_set=splits[False],
    )
