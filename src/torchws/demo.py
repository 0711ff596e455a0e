"""The demo: does GN+WS at 2 images per step keep up with BN at 64? A short comparison on Fashion-MNIST.

Four runs of the same small-image ResNet-20 (``in_chans=1``): BN, GN and GN+WS at 2 images per step, and BN at 64
images per step. Every run sees the same number of training images (a fixed subset, several epochs) with the same
recipe: SGD momentum 0.9, weight decay 1e-4, lr scaled linearly by batch from ``BASE_LR`` at 256, linear warm-up,
cosine decay. Each epoch is evaluated on the same fixed slice of the test set (the first ``eval_images`` test
images). Writes ``results.json``, ``curves.png`` and one run dir per variant under ``out_dir``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchws.data import load_dataset
from torchws.train import ConfigError, TrainConfig, train
from torchws.train.metrics import format_table
from torchws.train.plots import plot_curves

__all__ = ["BUDGETS", "Budget", "VARIANTS", "resolve_budget", "run_demo"]

BASE_LR = 0.4  # at 256 images per step: 0.1 for BN at 64, 0.003125 at 2 (linear scaling)
VARIANTS = (  # (label, model, images per step)
    ("BN, 2/step", "cifar_resnet20_bn", 2),
    ("GN, 2/step", "cifar_resnet20_gn", 2),
    ("GN+WS, 2/step", "cifar_resnet20_gn_ws", 2),
    ("BN, 64/step", "cifar_resnet20_bn", 64),
)


@dataclass(frozen=True)
class Budget:
    """Per variant: ``train_images`` distinct images, seen ``epochs`` times; ``eval_images`` test images."""

    train_images: int
    epochs: int
    eval_images: int


BUDGETS = {
    "tiny": Budget(128, 1, 200),  # seconds: for tests and smoke checks
    "small": Budget(2048, 4, 2000),  # the default: about 6 minutes on 2 busy CPU cores
    "medium": Budget(16384, 3, 10000),
    "full": Budget(60000, 10, 10000),
}


def resolve_budget(budget: str) -> Budget:
    """A named budget, or an image count ``N`` (N training images, 2 epochs, the full test set)."""
    if budget in BUDGETS:
        return BUDGETS[budget]
    if budget.isdigit() and int(budget) >= 64:
        return Budget(int(budget), 2, 10000)
    raise ConfigError(f"--budget must be one of {', '.join(BUDGETS)} or a training-image count >= 64, got {budget!r}")


def _variant_config(model: str, batch: int, budget: Budget, out_dir: Path, seed: int) -> TrainConfig:
    return TrainConfig(
        model=model, dataset="fashion_mnist", batch_size=batch, epochs=budget.epochs, lr=BASE_LR, schedule="cosine",
        warmup_epochs=0.1, max_train_images=budget.train_images, max_eval_images=budget.eval_images, seed=seed,
        out_dir=str(out_dir), overwrite=True, save_checkpoints=False, progress=False, tensorboard=False, plot=False,
        device="cpu", log_every=10**9,
    ).validate()  # fmt: skip


def run_demo(
    out_dir: str = "runs/demo",
    budget: str = "small",
    *,
    data_dir: str | None = None,
    threads: int | None = None,
    seed: int = 0,
    echo: bool = True,
) -> dict[str, Any]:
    """Train the four variants, print a table, write ``results.json`` and ``curves.png``; returns the results.

    Raises:
        DatasetNotFoundError: Fashion-MNIST is not installed (the message says how to get it).
        ConfigError: a bad ``budget``.
    """
    spec = resolve_budget(budget)
    splits = load_dataset("fashion_mnist", data_dir)
    if threads is not None:
        torch.set_num_threads(threads)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rows, curves, start = [], {}, time.perf_counter()
    for label, model, batch in VARIANTS:
        if echo:
            print(f"[{label}] {model}, {spec.train_images} images x {spec.epochs} epochs ...", flush=True)
        slug = label.lower().replace("+", "_").replace(", ", "_b").replace("/step", "")
        cfg = _variant_config(model, batch, spec, root / slug, seed)
        t0 = time.perf_counter()
        summary = train(cfg, splits=splits, echo=False)
        rows.append({"variant": label, "model": model, "images/step": batch,
                     "test acc %": summary["final_test_acc"], "test loss": summary["final_test_loss"],
                     "train img/s": summary["images_per_s"], "time s": time.perf_counter() - t0})  # fmt: skip
        curves[label] = summary["history"]
        if echo:
            print(f"    test acc {summary['final_test_acc']:.2f}%, {summary['images_per_s']:.0f} img/s", flush=True)
    total = time.perf_counter() - start
    table = format_table(rows)
    results = {"budget": budget, "train_images": spec.train_images, "epochs": spec.epochs,
               "eval_images": spec.eval_images, "eval_set": f"first {spec.eval_images} Fashion-MNIST test images",
               "base_lr_at_256": BASE_LR, "seed": seed, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "machine": platform.machine(), "total_time_s": total,
               "variants": rows, "curves": curves}  # fmt: skip
    (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plotted = plot_curves(curves, root / "curves.png", x="images_seen", x_label="training images seen",
                          title=f"Fashion-MNIST, ResNet-20: micro-batch 2 vs 64 (budget {budget})")  # fmt: skip
    if echo:
        print(table)
        print(f"total {total:.0f} s; wrote {root / 'results.json'}" + (f", {root / 'curves.png'}" if plotted else ""))
    return results
