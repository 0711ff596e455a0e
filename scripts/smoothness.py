"""Does WS smooth the loss landscape? Small CIFAR ResNets on Fashion-MNIST, GN vs GN+WS (and BN), CPU.

Trains each variant for one pass over a fixed train subset and, every ``--probe-every`` images, probes the training
objective on a fixed probe batch with :func:`torchws.analysis.loss_landscape_along_gradient` (Santurkar et al.
2018: loss range, gradient predictiveness and effective beta-smoothness along the gradient). WS variants also
record the paper's gradient identity (share of ``||dL/dW_hat||^2`` that WS's projection keeps). Writes
``<out>/smoothness.json`` and ``<out>/smoothness.png``; prints a summary table.

    .venv/bin/python scripts/smoothness.py --out docs/figures

Probing uses each variant's training objective: GN/GN+WS are per-sample, so the probe batch is evaluated whole;
BN variants are evaluated in train mode in micro-batches of their training batch size (batch statistics of that
size, as in training). Parameters and BN buffers are restored exactly after each probe.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from torchws.analysis import gradient_norm_identity, loss_landscape_along_gradient, track_standardized_grads
from torchws.data import TensorLoader, load_dataset
from torchws.models import create_model


@dataclass(frozen=True)
class Variant:
    """One training setup: registry model suffix, batch size and learning rate."""

    name: str
    norm: str  # "gn", "gn_ws", "bn"
    batch_size: int
    lr: float


VARIANTS = {
    "gn_b2": Variant("gn_b2", "gn", 2, 0.02),
    "gn_ws_b2": Variant("gn_ws_b2", "gn_ws", 2, 0.02),
    "bn_b2": Variant("bn_b2", "bn", 2, 0.02),
    "bn_b64": Variant("bn_b64", "bn", 64, 0.1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--arch", default="cifar_resnet20")
    p.add_argument("--train-size", type=int, default=2500, help="images in the (seeded) train subset")
    p.add_argument("--test-size", type=int, default=2000, help="first N test images")
    p.add_argument("--probe-every", type=int, default=500, help="probe every this many training images")
    p.add_argument("--probe-batch", type=int, default=64, help="fixed train images the probes evaluate")
    p.add_argument("--steps", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.4], help="probe step sizes eta")
    p.add_argument("--lr", type=float, default=None, help="override every chosen variant's learning rate")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("docs/figures"))
    return p.parse_args(argv)


def load_data(args: argparse.Namespace) -> dict:
    """Seeded train subset, probe batch (from the subset), first test images; normalization from the full train."""
    splits = load_dataset("fashion_mnist")
    pick = torch.randperm(splits.train_images.shape[0], generator=torch.Generator().manual_seed(1234))
    train = pick[: args.train_size]
    probe_loader = TensorLoader(
        splits.train_images[train[: args.probe_batch]],
        splits.train_labels[train[: args.probe_batch]],
        args.probe_batch,
        shuffle=False,
        mean=splits.mean,
        std=splits.std,
    )
    test_loader = TensorLoader(
        splits.test_images[: args.test_size],
        splits.test_labels[: args.test_size],
        500,
        shuffle=False,
        mean=splits.mean,
        std=splits.std,
    )
    return {
        "train_images": splits.train_images[train],
        "train_labels": splits.train_labels[train],
        "mean": splits.mean,
        "std": splits.std,
        "probe": next(iter(probe_loader)),
        "test": test_loader,
    }


def probe(model: nn.Module, variant: Variant, batch: tuple, steps: list[float]) -> dict:
    """Landscape probe of the training objective at the current parameters (+ WS gradient identity)."""
    micro = variant.batch_size if variant.norm == "bn" else None
    result = loss_landscape_along_gradient(model, F.cross_entropy, batch, steps, micro_batch_size=micro).to_dict()
    if variant.norm.endswith("_ws"):
        saved = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        with track_standardized_grads(model) as layers:
            F.cross_entropy(model(batch[0]), batch[1]).backward()
        checks = [gradient_norm_identity(layer) for layer in layers]
        result["ws_kept_fraction"] = statistics.fmean(float(c.kept_fraction.nanmean()) for c in checks)
        result["ws_identity_max_rel_error"] = max(c.max_relative_error() for c in checks)
        for p, g in zip(model.parameters(), saved):
            p.grad = g
    return result


@torch.no_grad()
def test_accuracy(model: nn.Module, loader: TensorLoader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += y.numel()
    model.train()
    return correct / total


def train_one(variant: Variant, seed: int, data: dict, args: argparse.Namespace) -> dict:
    """One pass over the train subset, probing every ``args.probe_every`` images. Returns the run record."""
    torch.manual_seed(seed)
    model = create_model(f"{args.arch}_{variant.norm}", in_chans=1, num_classes=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=variant.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    loader = TensorLoader(
        data["train_images"],
        data["train_labels"],
        variant.batch_size,
        shuffle=True,
        drop_last=True,
        seed=seed,
        mean=data["mean"],
        std=data["std"],
    )
    probes, losses, seen, next_probe, start = [], [], 0, 0, time.perf_counter()
    for x, y in loader:
        if seen >= next_probe:
            probes.append(
                {"images": seen, "train_loss": _mean_or_nan(losses), **probe(model, variant, data["probe"], args.steps)}
            )
            losses, next_probe = [], next_probe + args.probe_every
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        seen += y.numel()
    probes.append(
        {"images": seen, "train_loss": _mean_or_nan(losses), **probe(model, variant, data["probe"], args.steps)}
    )
    acc = test_accuracy(model, data["test"])
    seconds = time.perf_counter() - start
    print(
        f"{variant.name:9s} seed {seed}: test acc {acc:.4f}, final train loss {probes[-1]['train_loss']:.3f}, "
        f"{seconds:.0f} s",
        flush=True,
    )
    return {"variant": variant.name, "seed": seed, "test_accuracy": acc, "seconds": seconds, "probes": probes}


def _mean_or_nan(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


SUMMARY_KEYS = ("loss_range", "gradient_predictiveness", "effective_beta")


def summarize(runs: list[dict], variants: list[str]) -> dict:
    """Per variant, mean +- std over seeds of: test accuracy, and each probe metric averaged over the probes taken
    after training started (the probe at 0 images is the initialization, identical in kind for every variant)."""
    out = {}
    for name in variants:
        mine = [r for r in runs if r["variant"] == name]
        row = {"seeds": len(mine), "test_accuracy": _mean_std([r["test_accuracy"] for r in mine])}
        for key in (*SUMMARY_KEYS, "train_loss"):
            row[key] = _mean_std([statistics.fmean(p[key] for p in r["probes"][1:]) for r in mine])
        if "ws_kept_fraction" in mine[0]["probes"][0]:
            row["ws_kept_fraction"] = _mean_std(
                [statistics.fmean(p["ws_kept_fraction"] for p in r["probes"]) for r in mine]
            )
            row["ws_identity_max_rel_error"] = max(p["ws_identity_max_rel_error"] for r in mine for p in r["probes"])
        out[name] = row
    return out


def plot(runs: list[dict], variants: list[str], path: Path) -> None:
    """Probe metrics and train loss over training: mean over seeds, band = min..max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (*SUMMARY_KEYS, "train_loss")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6))
    for ax, key in zip(axes, keys):
        for name in variants:
            mine = [r for r in runs if r["variant"] == name]
            xs = [p["images"] for p in mine[0]["probes"]]
            table = [[p[key] for p in r["probes"]] for r in mine]
            cols = list(zip(*table))
            mean = [statistics.fmean(c) for c in cols]
            (line,) = ax.plot(xs, mean, marker="o", ms=3, label=name)
            ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols], color=line.get_color(), alpha=0.2)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("training images seen")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "commit": commit,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data, start = load_data(args), time.perf_counter()
    variants = {v: VARIANTS[v] if args.lr is None else replace(VARIANTS[v], lr=args.lr) for v in args.variants}
    runs = [train_one(variants[v], seed, data, args) for seed in args.seeds for v in args.variants]
    summary = summarize(runs, args.variants)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {
        "config": config,
        "variants": {v: asdict(variants[v]) for v in args.variants},
        "environment": environment(),
        "wall_seconds": time.perf_counter() - start,
        "summary": summary,
        "runs": runs,
    }
    (args.out / "smoothness.json").write_text(json.dumps(record, indent=1))
    plot(runs, args.variants, args.out / "smoothness.png")
    print(f"\n{'variant':9s} | test acc | " + " | ".join(SUMMARY_KEYS) + " | train loss   (mean +- std over seeds)")
    for name, row in summary.items():
        cells = [f"{row[k][0]:.4g} +- {row[k][1]:.2g}" for k in ("test_accuracy", *SUMMARY_KEYS, "train_loss")]
        print(f"{name:9s} | " + " | ".join(cells))
    print(f"wall {record['wall_seconds']:.0f} s; wrote {args.out / 'smoothness.json'} and smoothness.png")


if __name__ == "__main__":
    main()
