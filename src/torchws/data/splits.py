"""In-memory train/test tensors of a small dataset, with the channel statistics used to normalize them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TensorSplits:
    """Train and test images of one dataset, held as tensors.

    Attributes:
        train_images: uint8 (N, C, H, W). train_labels: int64 (N,). Same for test_*.
        num_classes: labels lie in ``[0, num_classes)``. classes: ``num_classes`` human-readable names.
        mean, std: per-channel statistics of the train images scaled to [0, 1] (normalize ``x / 255``).
        name: registry name of the dataset.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(
                    f"TensorSplits({self.name}).{split}_images must be uint8 (N, C, H, W), "
                    f"got {images.dtype} {tuple(images.shape)}"
                )
            if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
                raise ValueError(
                    f"TensorSplits({self.name}).{split}_labels must be int64 ({images.shape[0]},), "
                    f"got {labels.dtype} {tuple(labels.shape)}"
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"TensorSplits({self.name}): train images {tuple(self.train_images.shape[1:])} and test images "
                f"{tuple(self.test_images.shape[1:])} must have the same (C, H, W)"
            )
        channels = self.train_images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels or len(self.classes) != self.num_classes:
            raise ValueError(
                f"TensorSplits({self.name}): need {channels} mean/std values and {self.num_classes} class names, "
                f"got {len(self.mean)}/{len(self.std)} and {len(self.classes)}"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 images (N, C, H, W), on the [0, 1] scale.

    Uses a 256-bin histogram per channel, so memory stays O(1) in N and the result is exact in float64.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"channel_stats expects uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = np.bincount(images[:, c].reshape(-1).cpu().numpy(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float((counts * values).sum() / total)
        var = float((counts * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(var**0.5)
    return tuple(means), tuple(stds)
