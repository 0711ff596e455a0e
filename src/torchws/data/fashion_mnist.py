"""Fashion-MNIST (70,000 28x28 grayscale images, 10 classes) from its four IDX files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetFormatError
from .idx import read_idx
from .paths import candidate_dirs, find_dataset_dir, find_file
from .splits import TensorSplits, channel_stats

# Where Debian's package dataset-fashion-mnist installs the files; module-level so tests can point it elsewhere.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SUBDIR = "fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
HOW_TO_GET = (
    "Install it with `apt-get install dataset-fashion-mnist`, or download the four IDX .gz files from the "
    "Fashion-MNIST GitHub repository (zalandoresearch/fashion-mnist, folder data/fashion) into one of those dirs"
)


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the four Fashion-MNIST IDX files (``.gz`` or uncompressed).

    Search order: ``data_dir`` (and its ``fashion-mnist`` subfolder), ``$TORCHWS_DATA_DIR`` (same), the Debian path
    ``/usr/share/datasets/fashion-mnist``, ``~/.cache/torchws/fashion-mnist``. The first complete one wins.

    Raises:
        DatasetNotFoundError: none holds all four files.
    """
    candidates = candidate_dirs(data_dir, SUBDIR, system_dirs=[DEBIAN_DIR])
    required = [name for pair in FILES.values() for name in pair]
    return find_dataset_dir("Fashion-MNIST", candidates, required, HOW_TO_GET, allow_gz=True)


def _read_split(directory: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    image_name, label_name = FILES[split]
    image_path = find_file(directory, image_name, allow_gz=True)
    label_path = find_file(directory, label_name, allow_gz=True)
    assert image_path is not None and label_path is not None  # find_fashion_mnist checked them
    images = read_idx(image_path, dtype_code=0x08, shape=(None, 28, 28))  # (N, 28, 28) uint8
    labels = read_idx(label_path, dtype_code=0x08, shape=(None,))  # (N,) uint8
    if images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"{label_path}: {labels.shape[0]} labels but {image_path.name} holds {images.shape[0]} images"
        )
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise DatasetFormatError(f"{label_path}: label {int(labels.max())} outside 0..{len(CLASSES) - 1}")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> TensorSplits:
    """Load Fashion-MNIST as uint8 (N, 1, 28, 28) tensors (60,000 train / 10,000 test for the real files).

    Raises:
        DatasetNotFoundError: files not found (see ``find_fashion_mnist``).
        DatasetFormatError: a file is not uint8 IDX of the right shape, or counts/labels do not match.
    """
    directory = find_fashion_mnist(data_dir)
    train_images, train_labels = _read_split(directory, "train")
    test_images, test_labels = _read_split(directory, "test")
    mean, std = channel_stats(train_images)
    return TensorSplits(
        train_images, train_labels, test_images, test_labels, len(CLASSES), list(CLASSES), mean, std, "fashion_mnist"
    )
