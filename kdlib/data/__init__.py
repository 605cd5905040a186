"""Datasets: CIFAR-10/100 through torchvision, and ``shapes``, an embedded dataset with object masks.

- :func:`get_loaders` (kdlib.data.loaders): one interface for every dataset, returning a
  :class:`DataBundle` of train/test batch streams whose shuffle and augmentation are a pure
  function of ``(seed, epoch)``.
- kdlib.data.shapes: the procedurally generated 32×32 dataset (10 shape classes, a binary mask
  of the object that defines each label), deterministic in ``(seed, split, index)``.
- kdlib.data.cifar: torchvision's CIFAR datasets with CRD's augmentation and normalisation.
"""

from kdlib.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CifarSplit,
    DataNotFoundError,
    default_data_root,
)
from kdlib.data.loaders import (
    DATASETS,
    SHAPES_MEAN,
    SHAPES_STD,
    DataBundle,
    LoaderBatches,
    TensorBatches,
    augment_batch,
    get_loaders,
)
from kdlib.data.seeds import derive_seed
from kdlib.data.shapes import (
    BACKGROUNDS,
    CONFUSABLE_GROUPS,
    SHAPE_CLASSES,
    ShapeParams,
    ShapesDataset,
    generate_shapes,
)

__all__ = [
    "BACKGROUNDS", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "CONFUSABLE_GROUPS",
    "DATASETS", "SHAPES_MEAN", "SHAPES_STD", "SHAPE_CLASSES", "CifarSplit", "DataBundle",
    "DataNotFoundError", "LoaderBatches", "ShapeParams", "ShapesDataset", "TensorBatches", "augment_batch",
    "default_data_root", "derive_seed", "generate_shapes", "get_loaders",
]
