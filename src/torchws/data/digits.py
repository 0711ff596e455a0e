"""scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes): a tiny dataset for tests and smoke runs."""

from __future__ import annotations

import numpy as np
import torch

from .splits import TensorSplits, channel_stats

SPLIT_SEED = 0  # fixed: the 80/20 split must be identical on every machine and every call
TRAIN_FRACTION = 0.8


def load_digits_splits() -> TensorSplits:
    """Load ``sklearn.datasets.load_digits`` as uint8 (N, 1, 8, 8) tensors, split 80/20 by a fixed permutation.

    Pixel values 0..16 are scaled to 0..255 (``round(v * 255 / 16)``) so every dataset shares the uint8 convention.

    Raises:
        ImportError: scikit-learn is not installed (it ships with the ``dev`` extra).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_train = int(round(TRAIN_FRACTION * len(labels)))
    train, test = order[:n_train], order[n_train:]
    train_images = torch.from_numpy(images[train])
    mean, std = channel_stats(train_images)
    return TensorSplits(
        train_images,
        torch.from_numpy(labels[train]),
        torch.from_numpy(images[test]),
        torch.from_numpy(labels[test]),
        10,
        [str(d) for d in range(10)],
        mean,
        std,
        "digits",
    )
