"""The pre-registered lr search's decision: per setup, the candidate base lr with the best final test accuracy.

Rule: run every candidate of ``search_lrs``. While the best (ties: the smaller lr) is the largest lr tried, also try
twice it; while it is the smallest, half of it; at most ``search_extend`` extensions each way. The best lr tried
then is the setup's base lr. Every setup gets the same candidates and the same rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .grid import GridSpec

__all__ = ["choose_base_lrs", "search_accuracies", "search_decision", "search_ladder"]


def _score(record: dict[str, Any]) -> float:
    acc = record.get("final_test_acc")
    return acc if isinstance(acc, (int, float)) and math.isfinite(acc) else -math.inf  # a diverged run loses


def search_ladder(spec: GridSpec) -> tuple[float, ...]:
    """Every lr the search may try: the candidates and their extensions (halvings below, doublings above)."""
    low, high = min(spec.search_lrs), max(spec.search_lrs)
    below = [low / 2**k for k in range(spec.search_extend, 0, -1)]
    above = [high * 2**k for k in range(1, spec.search_extend + 1)]
    return tuple(below + sorted(spec.search_lrs) + above)


def search_accuracies(records: Sequence[dict[str, Any]], spec: GridSpec, setup: str) -> dict[float, float]:
    """{base lr: final test accuracy} of ``setup``'s search runs found in ``records`` (lrs of the ladder only)."""
    ladder, found = search_ladder(spec), {}
    for r in records:
        if (r["kind"] == "search" and r["setup"] == setup and r["batch"] == spec.search_batch
                and r["seed"] == spec.search_seed and r["base_lr"] in ladder):  # fmt: skip
            found[r["base_lr"]] = _score(r)
    return found


def _best(found: dict[float, float], tried: Sequence[float]) -> float:
    return max(sorted(tried), key=lambda lr: found[lr])  # max keeps the first (smallest) of ties


def search_decision(found: dict[float, float], spec: GridSpec) -> tuple[float | None, list[float]]:
    """(chosen base lr or None, lrs still to run) for one setup's search results ``found``."""
    missing = [lr for lr in spec.search_lrs if lr not in found]
    if missing:
        return None, missing
    ladder, tried = search_ladder(spec), sorted(spec.search_lrs)
    while True:
        best = _best(found, tried)
        index = ladder.index(best)
        step = 1 if best == tried[-1] else -1 if best == tried[0] else 0
        if step == 0 or not 0 <= index + step < len(ladder):
            return best, []
        nxt = ladder[index + step]
        if nxt not in found:
            return None, [nxt]
        tried = sorted([*tried, nxt])


def choose_base_lrs(records: Sequence[dict[str, Any]], spec: GridSpec) -> dict[str, float]:
    """{setup: chosen base lr} for every setup whose search is decided (see the module docstring)."""
    chosen = {}
    for setup in spec.setups:
        lr, _ = search_decision(search_accuracies(records, spec, setup), spec)
        if lr is not None:
            chosen[setup] = lr
    return chosen
