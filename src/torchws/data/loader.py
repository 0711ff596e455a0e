"""A loader for datasets held in memory as tensors: each epoch is gathered (and augmented) in one go, then batches
are views (no workers, no collate), so a batch-1 step is not loader-bound. Sharding follows DistributedSampler."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from .transforms import crop_flip

AUGMENTATIONS = (None, "crop_flip")
CROP_PAD = 4
_AUGMENT_STREAM = 0x5EED  # separates the augmentation RNG stream from the shuffling one


class TensorLoader:
    """Iterate over uint8 images (N, C, H, W) and labels (N,) in batches of normalized float images.

    Each epoch takes a permutation of 0..N-1 (``randperm`` seeded by ``seed + epoch`` if ``shuffle``, else identity),
    identical on all ranks; rank r gets positions ``r, r + world_size, ...`` of it. Like DistributedSampler, with
    ``drop_last=False`` the permutation is padded by repeating its start to a multiple of ``world_size``; with
    ``drop_last=True`` it is cut to one instead, and a final incomplete batch is dropped as well.
    Call ``set_epoch(e)`` before each epoch, or every epoch repeats the same order and augmentation.

    Args:
        augment: None, or "crop_flip" (zero-pad 4, random crop back to H x W, horizontal flip with p=1/2; vectorised
            over the epoch, random draws seeded by seed, epoch and rank, made on the CPU so any device gives the same).
        mean, std: per-channel statistics on the [0, 1] scale (e.g. ``TensorSplits.mean``); the yielded images are
            ``(x / 255 - mean) / std``. None: mean 0 / std 1 (images only scaled to [0, 1]).
        device: if given, images and labels are copied there once, and batches are built there. Iteration holds one
            more uint8 copy of this rank's shard (the epoch in order).

    Yields:
        (images float32 (B, C, H, W), labels int64 (B,)).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: str | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        channels = images.shape[1] if images.dim() == 4 else 0
        mean = (0.0,) * channels if mean is None else tuple(mean)
        std = (1.0,) * channels if std is None else tuple(std)
        _check_args(images, labels, batch_size, augment, mean, std, rank, world_size)
        self.images = images if device is None else images.to(device)
        self.labels = labels if device is None else labels.to(device)
        self.device = self.images.device
        mean_t = torch.tensor(mean, dtype=torch.float64).view(1, channels, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float64).view(1, channels, 1, 1)
        self._scale = (1.0 / (255.0 * std_t)).to(device=self.device, dtype=torch.float32)
        self._shift = (-mean_t / std_t).to(device=self.device, dtype=torch.float32)
        self.batch_size, self.shuffle, self.augment, self.drop_last = batch_size, shuffle, augment, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    @property
    def dataset_size(self) -> int:
        return self.images.shape[0]

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (after padding or cutting to a multiple of world_size)."""
        n, ws = self.dataset_size, self.world_size
        return n // ws if self.drop_last else math.ceil(n / ws)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, int64 (num_samples,) on the CPU."""
        n = self.dataset_size
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:
            repeats = math.ceil((total - n) / n)
            order = torch.cat([order, order.repeat(repeats)[: total - n]])
        return order[:total][self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices().to(self.device)
        # gather (and augment) the whole epoch at once, so each batch is a view plus one normalizing kernel: with
        # batch size 1 a per-batch gather/crop would cost more launches than the step itself. Memory: one more
        # uint8 copy of this rank's shard.
        images, labels = self.images[order], self.labels[order]  # (num_samples, C, H, W), (num_samples,)
        if self.augment == "crop_flip":
            # offsets and flips drawn on the CPU, so the result does not depend on the device
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, self.rank))
            offsets = torch.randint(0, 2 * CROP_PAD + 1, (len(order), 2), generator=generator)
            flips = torch.rand(len(order), generator=generator) < 0.5
            images = crop_flip(images, offsets, flips, pad=CROP_PAD)
        for b in range(len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            # (x / 255 - mean) / std as one fused multiply-add
            yield torch.addcmul(self._shift, images[batch].float(), self._scale), labels[batch]


def _mix_seed(seed: int, epoch: int, rank: int) -> int:
    """A 63-bit seed for the augmentation stream of (seed, epoch, rank); fixed arithmetic, so stable everywhere."""
    mixed = _AUGMENT_STREAM
    for value in (seed, epoch, rank):
        mixed = (mixed * 1_000_003 + value) % (1 << 63)
    return mixed


def _check_args(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    augment: str | None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    rank: int,
    world_size: int,
) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"TensorLoader: images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"TensorLoader: labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise ValueError("TensorLoader: the dataset is empty (0 images)")
    if batch_size < 1:
        raise ValueError(f"TensorLoader: batch_size must be >= 1, got {batch_size}")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"TensorLoader: augment must be one of {AUGMENTATIONS}, got {augment!r}")
    channels = images.shape[1]
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ValueError(
            f"TensorLoader: mean and std need {channels} values (one per channel, std > 0), got mean={mean}, std={std}"
        )
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"TensorLoader: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if images.shape[0] < world_size:
        raise ValueError(f"TensorLoader: {images.shape[0]} images cannot be sharded over {world_size} ranks")
