"""Writers for tiny dataset files in the real on-disk formats (IDX, CIFAR pickle batches, image folders).

They are written from the format specifications with struct/pickle/Pillow, independently of torchws.data's readers.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}  # fmt: skip
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")  # fmt: skip


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding: 00 00 <dtype code> <ndim>, big-endian uint32 dims, big-endian data."""
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_fashion_dir(directory: Path, n_train: int, n_test: int, seed: int = 0, gz: bool = True) -> dict:
    """The four Fashion-MNIST files with random content; returns the arrays written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        FASHION_FILES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        FASHION_FILES[1]: rng.integers(0, 10, (n_train,), dtype=np.uint8),
        FASHION_FILES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        FASHION_FILES[3]: rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(directory / (name + (".gz" if gz else "")), array, gz=gz)
    return arrays


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar_planes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Random R, G, B planes (n, 3, 32, 32) and the CIFAR rows built from them: R plane, then G, then B, each
    32x32 row-major, concatenated element by element."""
    planes = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    rows = np.empty((n, 3072), dtype=np.uint8)
    for i in range(n):
        flat = []
        for c in range(3):
            for y in range(32):
                for x in range(32):
                    flat.append(planes[i, c, y, x])
        rows[i] = flat
    return planes, rows


def write_cifar10_dir(directory: Path, per_batch: int, seed: int = 0) -> dict:
    """cifar-10-batches-py with 5 train batches + test batch of ``per_batch`` images; returns planes and labels."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_planes, train_labels = [], []
    for i in range(1, 6):
        planes, rows = cifar_planes(rng, per_batch)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        _dump(directory / f"data_batch_{i}", {b"batch_label": b"training batch", b"labels": labels, b"data": rows,
                                              b"filenames": [b"x.png"] * per_batch})  # fmt: skip
        train_planes.append(planes)
        train_labels += labels
    test_planes, test_rows = cifar_planes(rng, per_batch)
    test_labels = [int(v) for v in rng.integers(0, 10, per_batch)]
    _dump(directory / "test_batch", {b"labels": test_labels, b"data": test_rows})
    names = [f"class{i}".encode() for i in range(10)]
    _dump(directory / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch})
    return {"train_planes": np.concatenate(train_planes), "train_labels": train_labels,
            "test_planes": test_planes, "test_labels": test_labels}  # fmt: skip


def write_cifar100_dir(directory: Path, n_train: int, n_test: int, seed: int = 0) -> dict:
    """cifar-100-python with train/test/meta; fine labels 0..99, coarse labels 0..19 as in the real files."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        planes, rows = cifar_planes(rng, n)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        _dump(directory / name, {b"data": rows, b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]})
        out[f"{name}_planes"], out[f"{name}_labels"] = planes, fine
    _dump(directory / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                               b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})  # fmt: skip
    return out


def write_image(path: Path, width: int, height: int, color: tuple[int, int, int]) -> Path:
    """A solid-color RGB image; the format follows the suffix (.png lossless, .JPEG lossy)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.new("RGB", (width, height), color).save(path, format=fmt)
    return path
