"""The report's figures (matplotlib, Agg): accuracy against images per step, and learning curves at one batch."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .grid import SETUP_LABELS
from .stats import mean_std

__all__ = ["plot_accuracy_vs_batch", "plot_learning_curves"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_batch(cells: Mapping[str, Mapping[int, Mapping[int, float]]], path: str | os.PathLike,
                           title: str) -> Path:  # fmt: skip
    """One line per setup: mean final test accuracy over seeds against images per step (log x), std error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setup, by_batch in cells.items():
        batches = sorted(b for b in by_batch if by_batch[b])
        stats = [mean_std(list(by_batch[b].values())) for b in batches]
        ax.errorbar(batches, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                    label=SETUP_LABELS.get(setup, setup))  # fmt: skip
    ax.set_xscale("log", base=2)
    ticks = sorted({b for by_batch in cells.values() for b in by_batch})
    ax.set_xticks(ticks, [str(b) for b in ticks])
    ax.set_xlabel("images per step (log scale)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_learning_curves(histories: Mapping[str, Sequence[Sequence[dict[str, Any]]]], path: str | os.PathLike,
                         title: str) -> Path:  # fmt: skip
    """Per setup, test accuracy and train loss per epoch: mean over seeds, band from min to max."""
    plt = _pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for setup, runs in histories.items():
        epochs = sorted({h["epoch"] for run in runs for h in run if "test_acc" in h})
        for ax, key in ((acc_ax, "test_acc"), (loss_ax, "train_loss")):
            values = [[h[key] for run in runs for h in run if h["epoch"] == e and key in h] for e in epochs]
            line = ax.plot(epochs, [mean_std(v)[0] for v in values], marker="o", label=SETUP_LABELS.get(setup, setup))
            ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], alpha=0.15,
                            color=line[0].get_color())  # fmt: skip
    acc_ax.set_ylabel("test accuracy (%)")
    loss_ax.set_ylabel("train loss (epoch mean)")
    loss_ax.set_yscale("log")
    for ax in (acc_ax, loss_ax):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    acc_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
