"""CIFAR-10 and CIFAR-100 through ``torchvision.datasets``, with the CRD protocol's augmentation.

CRD (Tian et al., 2020; RepDistiller) trains with a random 32×32 crop of the image padded by 4
zero pixels, a horizontal flip with probability 1/2, and per-channel normalisation; the test
split is only normalised. The files are the standard python-pickle archives that torchvision
downloads; kdlib never writes them itself.

Reproducible augmentation: torchvision's transforms draw from torch's global generator. Each
sample is transformed with that generator reseeded from ``(seed, epoch, index)`` (and restored
afterwards), so an epoch's augmented batches are a pure function of ``(seed, epoch)`` whatever
the number of DataLoader workers, which the engine needs to resume mid-run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import Tensor
from torchvision import transforms

from kdlib import KDLibError
from kdlib.data.seeds import derive_seed

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
# Per-pixel std over the training set; the (0.2023, 0.1994, 0.2010) that also circulates is not.
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # CRD / RepDistiller
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

CIFAR = {
    "cifar10": (torchvision.datasets.CIFAR10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (torchvision.datasets.CIFAR100, CIFAR100_MEAN, CIFAR100_STD),
}


class DataNotFoundError(KDLibError):
    """A dataset's files are not where kdlib was told to look, and downloading is off."""


def default_data_root() -> Path:
    """``$KDLIB_DATA`` if set, else ``~/.cache/kdlib/data``."""
    return Path(os.environ.get("KDLIB_DATA") or Path.home() / ".cache" / "kdlib" / "data").expanduser()


def crd_transform(mean: tuple[float, ...], std: tuple[float, ...], train: bool) -> transforms.Compose:
    """CRD's torchvision pipeline: (pad-4 random crop, flip,) to tensor, normalise."""
    augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if train else []
    return transforms.Compose([*augment, transforms.ToTensor(), transforms.Normalize(mean, std)])


def open_cifar(name: str, root: str | Path | None, *, train: bool, download: bool):
    """The torchvision dataset (no transform) of one split; a clear error when its files are missing."""
    if name not in CIFAR:
        raise KDLibError(f"unknown CIFAR dataset {name!r}; choose one of {', '.join(CIFAR)}")
    cls = CIFAR[name][0]
    root = Path(root).expanduser() if root is not None else default_data_root()
    folder = root / cls.base_folder
    try:
        return cls(str(root), train=train, download=download)
    except RuntimeError as err:
        if download:
            raise KDLibError(f"{name} in {folder} is unreadable after download: {err}") from err
        raise DataNotFoundError(
            f"{name} not found (or corrupted) in {folder}: download it with "
            f"DataConfig(download=True) or `kdlib train --download`, or put the extracted "
            f"{cls.base_folder}/ folder under $KDLIB_DATA (or DataConfig.root)"
        ) from err
    except OSError as err:  # network errors (URLError is an OSError) and unwritable folders
        raise KDLibError(f"downloading {name} to {root} failed: {err}") from err


class CifarSplit(torch.utils.data.Dataset):
    """One CIFAR split whose random augmentation is a pure function of ``(seed, epoch, index)``.

    ``source`` is the torchvision dataset. For symmetry with ``shapes``: ``images`` (uint8
    N×3×32×32, a view of the pickled array), ``labels`` (long N), ``classes``, and ``masks``
    (None: CIFAR has no object masks). ``dataset[i]`` is ``(normalised float 3×32×32, label)``.
    """

    masks = None

    def __init__(self, source, transform, seed: int = 0):
        self.source, self.transform, self.seed, self.epoch = source, transform, int(seed), 0
        self.images = torch.from_numpy(np.asarray(source.data)).permute(0, 3, 1, 2)
        self.labels = torch.as_tensor(source.targets, dtype=torch.long)
        self.classes = list(source.classes)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.source[index]  # a PIL image: torchvision's transforms expect one
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed("kdlib.cifar", self.seed, self.epoch, int(index)))
            return self.transform(image), int(label)
