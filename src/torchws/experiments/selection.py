"""The pre-registered lr search's decision: per setup, the candidate base lr with the best final test accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .grid import GridSpec

__all__ = ["choose_base_lrs", "search_accuracies"]


def _score(record: dict[str, Any]) -> float:
    acc = record.get("final_test_acc")
    return acc if isinstance(acc, (int, float)) and math.isfinite(acc) else -math.inf  # a diverged run loses


def search_accuracies(records: Sequence[dict[str, Any]], spec: GridSpec, setup: str) -> dict[float, float]:
    """{candidate base lr: final test accuracy} of ``setup``'s search runs found in ``records``."""
    found = {}
    for r in records:
        if (r["kind"] == "search" and r["setup"] == setup and r["batch"] == spec.search_batch
                and r["seed"] == spec.search_seed and r["base_lr"] in spec.search_lrs):  # fmt: skip
            found[r["base_lr"]] = _score(r)
    return found


def choose_base_lrs(records: Sequence[dict[str, Any]], spec: GridSpec) -> dict[str, float]:
    """{setup: chosen base lr} for every setup whose search is complete: the highest final test accuracy, ties to
    the smaller lr. Setups with a candidate still missing are left out."""
    chosen = {}
    for setup in spec.setups:
        found = search_accuracies(records, spec, setup)
        if len(found) == len(spec.search_lrs):
            chosen[setup] = max(sorted(found), key=lambda lr: found[lr])  # max keeps the first (smallest) of ties
    return chosen
