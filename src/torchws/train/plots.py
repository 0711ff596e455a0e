"""Learning-curve PNGs with matplotlib's Agg backend (no display needed). matplotlib is optional: without it the
functions return False and write nothing."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_write

__all__ = ["plot_curves"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike,
    *,
    x: str = "epoch",
    x_label: str = "epoch",
    title: str = "",
) -> bool:
    """Plot train loss, test loss and test accuracy (three panels) of each run against ``x``.

    runs: label -> evaluation records (dicts holding ``x`` and any of train_loss, test_loss, test_acc).
    Returns True when the PNG was written (atomically: a crash leaves the previous file).
    """
    plt = _pyplot()
    if plt is None:
        return False
    panels = (("train_loss", "train loss"), ("test_loss", "test loss"), ("test_acc", "test accuracy (%)"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, label) in zip(axes, panels):
        for name, records in runs.items():
            points = [(r[x], r[key]) for r in records if r.get(key) is not None and r.get(x) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[2].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    image_format = Path(path).suffix.lstrip(".") or "png"
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=image_format, dpi=110))
    finally:
        plt.close(fig)
    return True
