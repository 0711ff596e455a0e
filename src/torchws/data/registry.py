"""Datasets by name: ``list_datasets()``, ``load_dataset(name)``, ``dataset_info(name)``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .cifar import load_cifar10, load_cifar100
from .digits import load_digits_splits
from .fashion_mnist import load_fashion_mnist
from .image_folder import find_classes
from .splits import TensorSplits


class DatasetInfo(NamedTuple):
    """Shape facts of a dataset, known without loading its images."""

    channels: int
    image_size: int
    num_classes: int


# name -> (loader into memory or None for streamed datasets, info)
_IN_MEMORY: dict[str, tuple[Callable[[str | os.PathLike | None], TensorSplits], DatasetInfo]] = {
    "cifar10": (load_cifar10, DatasetInfo(3, 32, 10)),
    "cifar100": (load_cifar100, DatasetInfo(3, 32, 100)),
    "digits": (lambda data_dir: load_digits_splits(), DatasetInfo(1, 8, 10)),
    "fashion_mnist": (load_fashion_mnist, DatasetInfo(1, 28, 10)),
}
IMAGEFOLDER = "imagefolder"
IMAGEFOLDER_SIZE = 224  # default crop of ImageFolderDataset


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted([*_IN_MEMORY, IMAGEFOLDER])


def _check_name(name: str) -> str:
    key = name.lower().replace("-", "_")
    if key not in _IN_MEMORY and key != IMAGEFOLDER:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}")
    return key


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> TensorSplits:
    """Load an in-memory dataset by name (``digits`` ignores ``data_dir``).

    ``imagefolder`` is streamed from disk, not held in memory: build ``ImageFolderDataset(root, "train")`` and
    ``ImageFolderDataset(root, "val")`` instead; asking for it here raises ValueError saying so.

    Raises:
        ValueError: unknown name or ``imagefolder``. DatasetNotFoundError / DatasetFormatError: from the loader.
    """
    key = _check_name(name)
    if key == IMAGEFOLDER:
        raise ValueError(
            "dataset 'imagefolder' is read from disk per item, not loaded into memory: use "
            "torchws.data.ImageFolderDataset(root, 'train') and ImageFolderDataset(root, 'val') with a DataLoader"
        )
    loader, _ = _IN_MEMORY[key]
    return loader(data_dir)


def dataset_info(
    name: str, data_dir: str | os.PathLike | None = None, *, image_size: int = IMAGEFOLDER_SIZE
) -> DatasetInfo:
    """(channels, image_size, num_classes) of a dataset without loading its images.

    For ``imagefolder`` the class count is the number of class folders under ``data_dir/train`` (so ``data_dir`` is
    required) and ``image_size`` is the crop size the caller will use.

    Raises:
        ValueError: unknown name, or ``imagefolder`` without ``data_dir``.
    """
    key = _check_name(name)
    if key != IMAGEFOLDER:
        return _IN_MEMORY[key][1]
    if data_dir is None:
        raise ValueError(
            "dataset_info('imagefolder') needs data_dir (the folder holding train/<class>/) to count classes"
        )
    return DatasetInfo(3, image_size, len(find_classes(Path(data_dir).expanduser() / "train")))
