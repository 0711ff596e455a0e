"""Image transforms on tensors: RandomResizedCrop / resize+center-crop for single images (C, H, W), and the
vectorised pad-crop + flip used for whole batches (B, C, H, W) of small images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_resized_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Box (top, left, h, w) for RandomResizedCrop: area fraction in ``scale``, aspect w/h log-uniform in ``ratio``.

    Same algorithm as the usual reference: 10 tries, then a center crop clamped to ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of (C, H, W) to (C, *size); returns float32 in the input's value range."""
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    if not image.is_floating_point():
        out = out.clamp(0, 255)  # keep the uint8 range of the source
    return out


def resize_shorter_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (C, H, W) so its shorter side is ``size``, keeping the aspect ratio (longer side truncated)."""
    h, w = image.shape[-2:]
    if h <= w:
        return resize(image, (size, int(size * w / h)))
    return resize(image, (int(size * h / w), size))


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Central (C, size, size) window of (C, H, W); needs H, W >= size."""
    h, w = image.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"center_crop: image {h}x{w} is smaller than the crop {size}x{size}")
    top, left = (h - size) // 2, (w - size) // 2
    return image[..., top : top + size, left : left + size]


def normalize(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x / 255 - mean) / std per channel for images (..., C, H, W) holding 0..255 values; returns float32."""
    shape = (-1, 1, 1)
    m = torch.tensor(mean, dtype=torch.float32, device=image.device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=image.device).view(shape)
    return (image.float() / 255.0 - m) / s


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Zero-pad ``images`` (B, C, H, W) by ``pad``, take the (H, W) window at per-image ``offsets`` (B, 2) = (top,
    left) in the padded image, then mirror horizontally where ``flips`` (B,) is True. One gather for the batch.

    ``offsets == (pad, pad)`` with no flip returns the input unchanged.
    """
    b, _, h, w = images.shape
    if offsets.shape != (b, 2) or flips.shape != (b,):
        raise ValueError(f"crop_flip: offsets must be ({b}, 2) and flips ({b},), got {tuple(offsets.shape)}, "
                         f"{tuple(flips.shape)}")  # fmt: skip
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images  # (B, C, H+2p, W+2p), zeros outside
    device = images.device
    offsets = offsets.to(device=device, dtype=torch.long)
    rows = offsets[:, 0:1] + torch.arange(h, device=device)  # (B, H)
    cols = offsets[:, 1:2] + torch.arange(w, device=device)  # (B, W)
    # flipping = reading the window's columns right to left
    cols = torch.where(flips.to(device)[:, None], cols.flip(1), cols)
    batch_index = torch.arange(b, device=device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_crop_flip(images: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """``crop_flip`` with offsets uniform in [0, 2*pad] and flips with probability 1/2, drawn on the CPU from
    ``generator`` (so results do not depend on the device)."""
    b = images.shape[0]
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5
    return crop_flip(images, offsets, flips, pad)
