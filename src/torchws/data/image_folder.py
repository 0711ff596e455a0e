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
    Both normalize ``x / 255`` by ``mean`` / ``std`` (ImageNet statistics by default). Randomness comes from
    ``generator`` if given, else torch's global RNG (which DataLoader seeds per worker).

    Args:
        root: folder holding ``train/`` and ``val/``. split: subfolder name. image_size: S.
        train: which transform; defaults to ``split == "train"``.
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
    ) -> None:
        if image_size < 1:
            raise ValueError(f"ImageFolderDataset: image_size must be >= 1, got {image_size}")
        self.root = Path(root).expanduser()
        self.split_dir = self.root / split
        self.classes = find_classes(self.split_dir)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = list_images(self.split_dir, self.classes, tuple(e.lower() for e in extensions))
        self.targets = [label for _, label in self.samples]
        self.image_size = image_size
        self.train = split == "train" if train is None else train
        self.mean, self.std = tuple(mean), tuple(std)
        self.generator = generator

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) -> normalized float32 (3, S, S) with the train or eval transform."""
        size = self.image_size
        if self.train:
            top, left, h, w = random_resized_crop_params(image.shape[1], image.shape[2], generator=self.generator)
            out = resize(image[:, top : top + h, left : left + w], (size, size))
            if float(torch.rand((), generator=self.generator)) < 0.5:
                out = out.flip(-1)
        else:
            out = center_crop(resize_shorter_side(image, int(size * 256 / 224)), size)
        return normalize(out, self.mean, self.std)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(decode_image(path)), label
