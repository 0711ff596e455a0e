"""Statistics of a sweep: mean +- std over seeds, and paired comparisons over seeds (paired t-test, scipy).

A paired comparison of setups A and B over the seeds both have: ``d_s = acc_A(s) - acc_B(s)``; the mean of ``d``,
its 95% t-interval and the two-sided paired t-test p-value. Its outcome, fixed before any data were seen:

* ``beats``: mean d > 0 and p < ALPHA;
* ``worse``: mean d < 0 and p < ALPHA;
* ``matches``: p >= ALPHA and |mean d| <= MATCH_MARGIN accuracy points;
* ``inconclusive``: p >= ALPHA and |mean d| > MATCH_MARGIN (too few seeds or too much noise to say).

With a single common seed there is no test: the outcome is ``inconclusive`` unless |d| <= MATCH_MARGIN.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["ALPHA", "MATCH_MARGIN", "Paired", "mean_std", "paired"]

ALPHA = 0.05
MATCH_MARGIN = 1.0  # accuracy points


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with n - 1; 0.0 for one value). NaN mean for no values."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Paired:
    """A paired comparison A - B over ``seeds`` (accuracy points)."""

    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    outcome: str

    def describe(self) -> str:
        """e.g. ``+3.10 points [95% CI +1.2, +5.0], p = 0.012, n = 3: beats``."""
        ci = "" if math.isnan(self.ci_low) else f" [95% CI {self.ci_low:+.2f}, {self.ci_high:+.2f}]"
        p = "no test" if math.isnan(self.p_value) else f"p = {self.p_value:.3g}"
        return f"{self.mean:+.2f} points{ci}, {p}, n = {len(self.seeds)}: {self.outcome}"


def _t_test(diffs: Sequence[float]) -> tuple[float, float, float]:
    """(p, ci_low, ci_high) of a one-sample t-test of diffs against 0 (the paired t-test of A and B)."""
    from scipy import stats

    n, mean = len(diffs), statistics.fmean(diffs)
    sd = statistics.stdev(diffs)
    if sd == 0.0:  # every seed gave the same difference: exact
        return (1.0 if mean == 0 else 0.0), mean, mean
    half = stats.t.ppf(1 - ALPHA / 2, n - 1) * sd / math.sqrt(n)
    p = 2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1)
    return float(p), mean - half, mean + half


def _outcome(mean: float, p: float) -> str:
    if not math.isnan(p) and p < ALPHA:
        return "beats" if mean > 0 else "worse"
    return "matches" if abs(mean) <= MATCH_MARGIN else "inconclusive"


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> Paired | None:
    """Compare A and B (``{seed: accuracy}``) over their common seeds; None when they share none."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        return None
    diffs = tuple(a[s] - b[s] for s in seeds)
    mean = statistics.fmean(diffs)
    p, low, high = _t_test(diffs) if len(diffs) > 1 else (math.nan, math.nan, math.nan)
    return Paired(seeds, diffs, mean, low, high, p, _outcome(mean, p))
