"""CIFAR-10 / CIFAR-100 from the standard "python version" pickle batches.

Each batch is a pickled dict with bytes keys: ``b'data'`` uint8 (N, 3072) whose rows hold the R, G, B planes one
after the other, each 32x32 row-major; labels under ``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DatasetFormatError
from .paths import candidate_dirs, find_dataset_dir
from .splits import TensorSplits, channel_stats


@dataclass(frozen=True)
class CifarLayout:
    """File names and keys of one CIFAR variant."""

    name: str
    display_name: str
    subdir: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    archive: str


CIFAR10 = CifarLayout(
    name="cifar10",
    display_name="CIFAR-10",
    subdir="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    meta_file="batches.meta",
    label_key=b"labels",
    names_key=b"label_names",
    num_classes=10,
    archive="cifar-10-python.tar.gz",
)
CIFAR100 = CifarLayout(
    name="cifar100",
    display_name="CIFAR-100",
    subdir="cifar-100-python",
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    label_key=b"fine_labels",
    names_key=b"fine_label_names",
    num_classes=100,
    archive="cifar-100-python.tar.gz",
)

# The original batches were pickled by Python 2 with numpy arrays (protocol 2); allow only what that needs.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, 'latin1')
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy array reconstruction, so a batch file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
                module = "numpy._core." + module[len("numpy.core.") :]  # numpy 2 renamed it; skip the shim's warning
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DatasetFormatError(f"{path}: not a readable CIFAR pickle batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path}: expected a pickled dict with bytes keys, got {type(obj).__name__}")
    return obj


def _read_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> images uint8 (N, 3, 32, 32), labels int64 (N,)."""
    batch = _load_pickle(path)
    for key in (b"data", layout.label_key):
        if key not in batch:
            found = sorted(k for k in batch if isinstance(k, bytes))
            raise DatasetFormatError(f"{path}: missing key {key!r} (found {found})")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(f"{path}: b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(batch[layout.label_key], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DatasetFormatError(f"{path}: {labels.shape} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DatasetFormatError(
            f"{path}: labels span {labels.min()}..{labels.max()}, expected 0..{layout.num_classes - 1}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _read_class_names(path: Path, layout: CifarLayout) -> list[str]:
    meta = _load_pickle(path)
    names = meta.get(layout.names_key)
    if names is None or len(names) != layout.num_classes:
        got = "missing" if names is None else f"{len(names)} names"
        raise DatasetFormatError(f"{path}: {layout.names_key!r} must list {layout.num_classes} class names ({got})")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def find_cifar(layout: CifarLayout, data_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding ``layout``'s batch files: ``data_dir`` itself or its ``layout.subdir``, then the same
    under ``$TORCHWS_DATA_DIR``, then ``~/.cache/torchws/<subdir>``.

    Raises:
        DatasetNotFoundError: no candidate holds all files.
    """
    required = [*layout.train_files, layout.test_file, layout.meta_file]
    how = f"Download the CIFAR python version ({layout.archive}) and extract it into one of those dirs"
    return find_dataset_dir(layout.display_name, candidate_dirs(data_dir, layout.subdir), required, how)


def load_cifar(layout: CifarLayout, data_dir: str | os.PathLike | None = None) -> TensorSplits:
    """Load a CIFAR variant as uint8 (N, 3, 32, 32) tensors with exact train-set channel statistics.

    Raises:
        DatasetNotFoundError: files not found. DatasetFormatError: a file is malformed (named in the message).
    """
    directory = find_cifar(layout, data_dir)
    parts = [_read_batch(directory / name, layout) for name in layout.train_files]
    train_images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    train_labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    test_images, test_labels = _read_batch(directory / layout.test_file, layout)
    classes = _read_class_names(directory / layout.meta_file, layout)
    mean, std = channel_stats(train_images)
    return TensorSplits(
        train_images, train_labels, torch.from_numpy(test_images), torch.from_numpy(test_labels),
        layout.num_classes, classes, mean, std, layout.name,
    )  # fmt: skip


def load_cifar10(data_dir: str | os.PathLike | None = None) -> TensorSplits:
    """CIFAR-10 from ``cifar-10-batches-py`` (``data_dir`` may be that folder or its parent)."""
    return load_cifar(CIFAR10, data_dir)


def load_cifar100(data_dir: str | os.PathLike | None = None) -> TensorSplits:
    """CIFAR-100 (fine labels) from ``cifar-100-python`` (``data_dir`` may be that folder or its parent)."""
    return load_cifar(CIFAR100, data_dir)
