"""The smoothness measurements of ``torchws analyze`` on a sweep's own trained models: the final checkpoint of every
setup at one batch size, each on the first ``images`` training images of its run, in micro-batches of that batch."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .analyze import analyze_checkpoint
from .grid import SETUP_LABELS
from .stats import mean_std

__all__ = ["measure_trained", "trained_smoothness_table"]

METRICS = ("loss_range", "gradient_predictiveness", "effective_beta")


def measure_trained(records: Sequence[dict[str, Any]], runs_dir: str | os.PathLike, batch: int,
                    images: int = 64) -> dict[str, list[dict[str, float]]]:  # fmt: skip
    """{setup: one row per seed} for the grid runs at ``batch`` whose ``last.pt`` is under
    ``runs_dir/<grid>/<run id>/``: the probe's three summaries, mean kept fraction and mean ||dL/dW||/||dL/dW_hat||
    over the WS layers (NaN without WS layers)."""
    rows: dict[str, list[dict[str, float]]] = defaultdict(list)
    for r in records:
        checkpoint = Path(runs_dir) / r["grid"] / r["run_id"] / "last.pt"
        if r["kind"] != "grid" or r["batch"] != batch or not checkpoint.is_file():
            continue
        result = analyze_checkpoint(checkpoint, batch=images, micro_batch=batch)
        layers = result["layers"]
        row = {m: result["probe"][m] for m in METRICS}
        row["kept_fraction"] = mean_std([x["kept_fraction"] for x in layers])[0] if layers else math.nan
        row["grad_norm_ratio"] = mean_std([x["grad_norm_ratio"] for x in layers])[0] if layers else math.nan
        rows[r["setup"]].append(row)
    return rows


def trained_smoothness_table(rows: dict[str, list[dict[str, float]]], setups: Sequence[str]) -> str:
    """Markdown: mean ± std over seeds per setup."""
    keys = (*METRICS, "kept_fraction", "grad_norm_ratio")
    lines = ["| setup | seeds | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "|---" * (len(keys) + 2) + "|"]  # fmt: skip
    for setup in setups:
        if not rows.get(setup):
            continue
        cells = []
        for key in keys:
            values = [row[key] for row in rows[setup]]
            if not all(math.isfinite(v) for v in values):  # no WS layers (NaN), or a diverged probe
                cells.append("-")
                continue
            mean, std = mean_std(values)
            cells.append(f"{mean:.3g} ± {std:.2g}")
        lines.append(f"| {SETUP_LABELS.get(setup, setup)} | {len(rows[setup])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
