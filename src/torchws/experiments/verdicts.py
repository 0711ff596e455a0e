"""Verdicts on the paper's claims (i)-(v), computed from a sweep's final test accuracies with the rules below, and
claim (vi) (smoothness) from the probe data of ``scripts/smoothness.py``. Each verdict is "reproduced", "partly
reproduced", "not reproduced", "inconclusive", or "not tested" when the cells it needs are missing (a partial
sweep).

Each claim is a set of paired comparisons (outcomes: :mod:`torchws.experiments.stats`), each judged for the claim
(yes), against it (no) or unclear (``inconclusive``). Reproduced: every comparison yes; partly: some yes; not
reproduced: no yes and at least one no; inconclusive: every comparison unclear.

* (i) GN+WS at 1 and at 2 images per step vs BN at the best of 32/64/128 (highest mean): yes when it beats or
  matches, no when it is worse.
* (ii) GN+WS vs GN at each batch size: yes when GN+WS beats GN, no when it matches or is worse.
* (iii) BN at 1 and 2 vs BN at its best large batch: yes (a collapse) when ``worse`` by at least COLLAPSE_POINTS,
  no when not worse or worse by less.
* (iv) BN+WS vs BN at each batch: as (ii).
* (v) BCN+WS (estimated statistics) vs GN+WS at each batch: as (i).
* (vi) GN+WS vs GN on the probes taken during training, paired by seed and probe: a metric supports the claim when
  GN+WS is lower at more than half the pairs with a sign-test p < ALPHA; reproduced when loss range, gradient
  predictiveness and effective beta all support it, partly when at least one is lower at a majority of pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .stats import ALPHA, MATCH_MARGIN, Paired, mean_std, paired

__all__ = ["COLLAPSE_POINTS", "SMOOTHNESS_CLAIM", "Verdict", "claim_verdicts", "smoothness_verdict"]

COLLAPSE_POINTS = 10.0
SMOOTHNESS_CLAIM = "WS smooths the loss landscape (lower loss variation, gradient predictiveness, effective beta)"
MIN_SEEDS = 2  # a comparison enters a verdict once both sides have this many common seeds
Cells = Mapping[str, Mapping[int, Mapping[int, float]]]  # setup -> batch -> seed -> final test accuracy (%)
LARGE, MICRO = (32, 64, 128), (1, 2)


@dataclass
class Verdict:
    """One claim's verdict with the comparisons behind it (label, paired comparison)."""

    claim: str
    text: str
    status: str
    detail: str
    comparisons: list[tuple[str, Paired]] = field(default_factory=list)


def _matches_or_beats(p: Paired) -> str:
    return "yes" if p.outcome in ("beats", "matches") else "no" if p.outcome == "worse" else "unclear"


def _beats(p: Paired) -> str:
    return "yes" if p.outcome == "beats" else "no" if p.outcome in ("worse", "matches") else "unclear"


def _collapses(p: Paired) -> str:
    if p.outcome == "inconclusive":
        return "unclear"
    return "yes" if p.outcome == "worse" and p.mean <= -COLLAPSE_POINTS else "no"


def _tally(claim: str, text: str, comps: list[tuple[str, Paired]], judge: Callable[[Paired], str],
           what: str, note: str = "") -> Verdict:  # fmt: skip
    """The verdict from per-comparison judgments: all yes -> reproduced, some yes -> partly, a no and no yes -> not
    reproduced, only unclear ones -> inconclusive."""
    marks = [(label, judge(p)) for label, p in comps]
    yes = [label for label, mark in marks if mark == "yes"]
    no = sum(mark == "no" for _, mark in marks)
    unclear = len(marks) - len(yes) - no
    status = ("reproduced" if len(yes) == len(marks) else "partly reproduced" if yes else "not reproduced" if no
              else "inconclusive")  # fmt: skip
    detail = (
        f"{note}{what} in {len(yes)} of {len(marks)} comparisons ({', '.join(yes) or 'none'}); "
        f"{no} against, {unclear} inconclusive (no significant difference beyond {MATCH_MARGIN:g} point)"
    )
    return Verdict(claim, text, status, detail, comps)


def _best_batch(cells: Cells, setup: str, batches: Sequence[int]) -> int | None:
    present = [b for b in batches if cells.get(setup, {}).get(b)]
    return max(present, key=lambda b: mean_std(list(cells[setup][b].values()))[0], default=None)


def _compare(cells: Cells, a: tuple[str, int], b: tuple[str, int]) -> Paired | None:
    """A vs B, or None while they share fewer than MIN_SEEDS seeds (no test possible: no verdict yet)."""
    result = paired(cells.get(a[0], {}).get(a[1], {}), cells.get(b[0], {}).get(b[1], {}))
    return result if result is not None and len(result.seeds) >= MIN_SEEDS else None


def _per_batch(cells: Cells, claim: str, text: str, a: str, b: str, judge: Callable[[Paired], str],
               what: str) -> Verdict:  # fmt: skip
    """A vs B at every batch size both have."""
    batches = sorted(set(cells.get(a, {})) & set(cells.get(b, {})))
    comps = [(f"{a} vs {b} at {n}", p) for n in batches if (p := _compare(cells, (a, n), (b, n))) is not None]
    if not comps:
        return Verdict(claim, text, "not tested", f"no batch size has {MIN_SEEDS}+ common seeds for {a} and {b}")
    return _tally(claim, text, comps, judge, what)


def _claim_i(cells: Cells) -> Verdict:
    text = "GN+WS at 1-2 images per step matches or beats BN at 32-128"
    best = _best_batch(cells, "bn", LARGE)
    micro = [m for m in MICRO if cells.get("gn_ws", {}).get(m)]
    comps = [] if best is None else [(f"gn_ws at {m} vs bn at {best}", p) for m in micro
                                     if (p := _compare(cells, ("gn_ws", m), ("bn", best)))]  # fmt: skip
    if not comps:
        return Verdict("i", text, "not tested", f"needs GN+WS at 1 or 2 and BN at 32, 64 or 128 ({MIN_SEEDS}+ seeds)")
    return _tally("i", text, comps, _matches_or_beats, "GN+WS beats or matches it",
                  f"BN's best large batch (highest mean) is {best}; ")  # fmt: skip


def _claim_iii(cells: Cells) -> Verdict:
    text = "BN collapses at micro-batch (1-2 images per step)"
    best = _best_batch(cells, "bn", LARGE)
    micro = [m for m in MICRO if cells.get("bn", {}).get(m)]
    comps = [] if best is None else [(f"bn at {m} vs bn at {best}", p) for m in micro
                                     if (p := _compare(cells, ("bn", m), ("bn", best)))]  # fmt: skip
    if not comps:
        return Verdict("iii", text, "not tested", f"needs BN at 1 or 2 and at 32, 64 or 128 ({MIN_SEEDS}+ seeds)")
    return _tally(
        "iii",
        text,
        comps,
        _collapses,
        "BN collapses",
        f"a collapse is significantly worse than BN at {best} by >= {COLLAPSE_POINTS:g} points; ",
    )


def claim_verdicts(cells: Cells) -> list[Verdict]:
    """Verdicts (i)-(v) from ``cells`` (setup -> batch -> seed -> final test accuracy in %)."""
    return [
        _claim_i(cells),
        _per_batch(cells, "ii", "GN+WS beats GN at every batch size", "gn_ws", "gn", _beats, "GN+WS beats GN"),
        _claim_iii(cells),
        _per_batch(cells, "iv", "WS helps BN too (BN+WS beats BN)", "bn_ws", "bn", _beats, "BN+WS beats BN"),
        _per_batch(
            cells,
            "v",
            "BCN+WS matches or beats GN+WS",
            "bcn_est_ws",
            "gn_ws",
            _matches_or_beats,
            "BCN+WS beats or matches GN+WS",
        ),
    ]


def _paired_probes(runs: Sequence[dict[str, Any]], a: str, b: str, metric: str) -> list[tuple[float, float]]:
    by_key = {}
    for run in runs:
        for probe in run["probes"]:
            if probe["images"] > 0:  # in training (the init probe is reported apart)
                by_key[(run["variant"], run["seed"], probe["images"])] = probe[metric]
    return [(v, by_key[(b, s, i)]) for (var, s, i), v in sorted(by_key.items()) if var == a and (b, s, i) in by_key]


def smoothness_verdict(data: Mapping[str, Any], source: str) -> Verdict:
    """Claim (vi) from the JSON ``scripts/smoothness.py`` writes (variants ``gn_ws_b2`` and ``gn_b2``)."""
    from scipy import stats

    text = SMOOTHNESS_CLAIM
    metrics, rows, supported, majority = ("loss_range", "gradient_predictiveness", "effective_beta"), [], 0, 0
    for metric in metrics:
        pairs = _paired_probes(data["runs"], "gn_ws_b2", "gn_b2", metric)
        if not pairs:
            return Verdict("vi", text, "not tested", f"{source} holds no paired GN / GN+WS probes")
        lower = sum(ws < gn for ws, gn in pairs)
        p = stats.binomtest(lower, len(pairs), 0.5).pvalue
        supported += lower * 2 > len(pairs) and p < ALPHA
        majority += lower * 2 > len(pairs)
        rows.append(f"{metric}: GN+WS lower at {lower}/{len(pairs)} (sign test p = {p:.3g})")
    status = "reproduced" if supported == len(metrics) else "partly reproduced" if majority else "not reproduced"
    return Verdict("vi", text, status, f"from {source}, probes during training at batch 2: " + "; ".join(rows))
