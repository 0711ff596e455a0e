"""Image folders in the ImageNet layout (``root/train/<class>/*.JPEG``, ``root/val/<class>/...``) as a map-style
Dataset that decodes with Pillow and applies the standard transforms on tensors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DatasetFormatError, DatasetNotFoundError
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop,
    normalize,
    random_resized_crop_params,
    resize,
    resize_shorter_side,
)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm")


def find_classes(split_dir: Path) -> list[str]:
    """Sorted names of the class subfolders of ``split_dir``; raises if there are none."""
    if not split_dir.is_dir():
        raise DatasetNotFoundError(
            f"image folder split {split_dir} does not exist; expected <root>/train/<class>/*.JPEG and "
            "<root>/val/<class>/*.JPEG"
        )
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise DatasetFormatError(f"{split_dir}: no class subfolders; expected {split_dir}/<class>/<image files>")
    return classes


def list_images(split_dir: Path, classes: list[str], extensions: tuple[str, ...]) -> list[tuple[Path, int]]:
    """(path, class index) for every image file under ``split_dir/<class>`` (recursive), sorted per class."""
    samples: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        class_dir = split_dir / name
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        if not files:
            raise DatasetFormatError(
                f"{class_dir}: class folder holds no images with extensions {', '.join(extensions)}"
            )
        samples += [(p, index) for p in files]
    return samples


def decode_image(path: Path) -> torch.Tensor:
    """Decode an image file into uint8 RGB (3, H, W) with Pillow."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("ImageFolderDataset needs Pillow: pip install 'torchws[train]' (or pillow)") from e
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))  # (H, W, 3)
    except OSError as e:
        raise DatasetFormatError(f"{path}: Pillow cannot decode it ({e})") from e
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class ImageFolderDataset(Dataset):
    """Map-style dataset over ``root/<split>/<class>/<image>``; items are (float image (3, S, S), class index).

    Train transform (``train=True``): RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3)) + horizontal flip with
    probability 1/2. Eval transform: resize the shorter side to ``int(S * 256 / 224)``, then center crop S.
    Both normalize ``x / 255`` by ``mean`` / ``std`` (ImageNet statistics by default).

    Randomness of the train transform: with ``seed``, item ``i`` draws from its own generator seeded by (seed, epoch,
    i) (``set_epoch`` selects the epoch), so an item is the same whichever worker process loads it, in whatever order,
    and a resumed run sees the crops of an uninterrupted one. Else from ``generator`` if given, else from torch's
    global RNG (which DataLoader seeds per worker: results then depend on the worker count).

    Args:
        root: folder holding ``train/`` and ``val/``. split: subfolder name. image_size: S.
        train: which transform; defaults to ``split == "train"``.
        seed: makes the augmentation a function of (seed, epoch, index); not together with ``generator``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        image_size: int = 224,
        train: bool | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"ImageFolderDataset: image_size must be >= 1, got {image_size}")
        if seed is not None and generator is not None:
            raise ValueError("ImageFolderDataset: pass seed (one generator per item and epoch) or generator, not both")
        self.root = Path(root).expanduser()
        self.split_dir = self.root / split
        self.classes = find_classes(self.split_dir)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = list_images(self.split_dir, self.classes, tuple(e.lower() for e in extensions))
        self.targets = [label for _, label in self.samples]
        self.image_size = image_size
        self.train = split == "train" if train is None else train
        self.mean, self.std = tuple(mean), tuple(std)
        self.generator, self.seed = generator, seed
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation items draw (with ``seed``). DataLoader copies the dataset into its
        worker processes when an iteration starts, so call this before ``iter(loader)`` (not with persistent
        workers)."""
        self.epoch = epoch

    def transform(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (3, H, W) -> normalized float32 (3, S, S) with the train or eval transform.

        generator: the random stream of the train transform (default: ``self.generator``)."""
        size = self.image_size
        generator = self.generator if generator is None else generator
        if self.train:
            top, left, h, w = random_resized_crop_params(image.shape[1], image.shape[2], generator=generator)
            out = resize(image[:, top : top + h, left : left + w], (size, size))
            if float(torch.rand((), generator=generator)) < 0.5:
                out = out.flip(-1)
        else:
            out = center_crop(resize_shorter_side(image, int(size * 256 / 224)), size)
        return normalize(out, self.mean, self.std)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        generator = None
        if self.train and self.seed is not None:
            generator = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))
        return self.transform(decode_image(path), generator), label


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's output function: a bijection of 64-bit ints that spreads every input bit over the output."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed of item ``index`` in ``epoch``: fixed arithmetic, so the same on every machine and process."""
    mixed = 0x1F01DE7  # this stream's own start, apart from TensorLoader's
    for value in (seed, epoch, index):
        mixed = _splitmix64(mixed ^ (value & _MASK64))
    return mixed >> 1
