"""``torchws report``: a sweep's results file -> Markdown (protocol first, then tables, figures, paired comparisons
and verdicts) and figures. A report of an unfinished sweep says so at the top, with how many runs are done."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ExperimentError
from .figures import plot_accuracy_vs_batch, plot_learning_curves
from .grid import BASE_BATCH, SETUP_LABELS, GridSpec
from .results import read_results
from .selection import search_accuracies, search_decision, search_ladder
from .stats import ALPHA, MATCH_MARGIN, mean_std
from .texts import caveats, protocol_text
from .trained_smoothness import measure_trained, trained_smoothness_table
from .verdicts import COLLAPSE_POINTS, SMOOTHNESS_CLAIM, Verdict, claim_verdicts, smoothness_verdict

__all__ = ["CURVE_BATCH", "grid_cells", "write_report"]

CURVE_BATCH = 2  # learning curves are drawn at this many images per step


def _latest(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per run id (the last one written)."""
    return list({r["run_id"]: r for r in records}.values())


def _plan(records: Sequence[dict[str, Any]]) -> dict[str, list]:
    """The union of the grid plans the records were written under, in first-seen order."""
    plan: dict[str, list] = {"setups": [], "batches": [], "seeds": []}
    for r in records:
        for key, values in r["plan"].items():
            plan[key] += [v for v in values if v not in plan[key]]
    plan["batches"].sort()
    return plan


def grid_cells(records: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[int, float]]]:
    """setup -> batch -> seed -> final test accuracy (%) of the grid runs."""
    cells: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r["kind"] == "grid":
            cells[r["setup"]][r["batch"]][r["seed"]] = r["final_test_acc"]
    return cells


def _cell_text(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f} ({len(values)})"


def _accuracy_table(cells: dict, plan: dict) -> str:
    head = "| setup | " + " | ".join(str(b) for b in plan["batches"]) + " |"
    lines = [head, "|---" * (len(plan["batches"]) + 1) + "|"]
    for setup in plan["setups"]:
        row = [_cell_text(list(cells.get(setup, {}).get(b, {}).values())) for b in plan["batches"]]
        lines.append(f"| {SETUP_LABELS.get(setup, setup)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _throughput_table(records: Sequence[dict[str, Any]], plan: dict) -> str:
    rates: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in records:
        if r["kind"] == "grid" and r.get("images_per_s"):
            rates[(r["setup"], r["batch"])].append(r["images_per_s"])
    lines = ["| setup | " + " | ".join(str(b) for b in plan["batches"]) + " |",
             "|---" * (len(plan["batches"]) + 1) + "|"]  # fmt: skip
    for setup in plan["setups"]:
        row = [f"{sorted(v)[len(v) // 2]:.0f}" if (v := rates.get((setup, b))) else "-" for b in plan["batches"]]
        lines.append(f"| {SETUP_LABELS.get(setup, setup)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _spec(protocol: dict) -> GridSpec:
    """The grid spec of a recorded protocol (enough for the lr-search rule; protocols recorded before the search
    could extend its candidates had no extension)."""
    values = {"search_extend": 0, **protocol}
    return GridSpec("report", **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _search_table(records: Sequence[dict[str, Any]], protocol: dict, plan: dict) -> str:
    spec = _spec(protocol)
    found = {setup: search_accuracies(records, spec, setup) for setup in plan["setups"]}
    lrs = sorted({lr for accs in found.values() for lr in accs} | set(spec.search_lrs))
    lines = ["| setup | " + " | ".join(f"{lr:g}" for lr in lrs) + " | chosen |", "|---" * (len(lrs) + 2) + "|"]
    for setup in plan["setups"]:
        chosen, todo = search_decision(found[setup], spec)
        note = f"**{chosen:g}**" if chosen is not None else f"search not finished (next: {todo[0]:g})"
        if chosen is not None and chosen in (search_ladder(spec)[0], search_ladder(spec)[-1]):
            note += " (end of the extended range)"
        row = [f"{found[setup][lr]:.2f}" if lr in found[setup] else "-" for lr in lrs]
        lines.append(f"| {SETUP_LABELS.get(setup, setup)} | " + " | ".join(row) + f" | {note} |")
    return "\n".join(lines)


def _comparison_table(verdicts: Sequence[Verdict]) -> str:
    if not any(v.comparisons for v in verdicts):
        return "No comparison has two common seeds yet."
    lines = ["| claim | comparison (A vs B) | seeds | A - B per seed | mean [95% CI] | p | outcome |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for v in verdicts:
        for label, p in v.comparisons:
            ci = "" if math.isnan(p.ci_low) else f" [{p.ci_low:+.2f}, {p.ci_high:+.2f}]"
            pv = "-" if math.isnan(p.p_value) else f"{p.p_value:.3g}"
            diffs = ", ".join(f"{d:+.2f}" for d in p.diffs)
            lines.append(f"| ({v.claim}) | {label} | {len(p.seeds)} | {diffs} | {p.mean:+.2f}{ci} | {pv} | "
                         f"{p.outcome} |")  # fmt: skip
    return "\n".join(lines)


def _status_line(records: Sequence[dict[str, Any]], plan: dict, protocol: dict) -> tuple[str, bool]:
    expected = len(plan["setups"]) * len(plan["batches"]) * len(plan["seeds"])
    grid = sum(r["kind"] == "grid" for r in records)
    search = sum(r["kind"] == "search" for r in records)
    spec = _spec(protocol)
    decided = sum(search_decision(search_accuracies(records, spec, s), spec)[0] is not None for s in plan["setups"])
    complete = grid >= expected
    state = "Complete" if complete else "**PARTIAL RESULTS: the sweep is still running**"
    return (f"{state}: {grid} of {expected} grid runs and {search} lr-search runs are done ({decided} of "
            f"{len(plan['setups'])} setups have their lr). "
            + ("" if complete else "Verdicts below use only the runs done so far; cells without runs say "
               "`not tested`.")), complete  # fmt: skip


def _provenance(records: Sequence[dict[str, Any]]) -> str:
    commands = sorted({r.get("command") or "?" for r in records})
    commits = sorted({f"{r.get('commit') or 'unknown'}{' (with uncommitted changes)' if r.get('dirty') else ''}"
                      for r in records})  # fmt: skip
    envs = sorted({f"torch {r.get('torch')}, Python {r.get('python')}, {r.get('machine')}, {r.get('jobs')} process(es)"
                   f" x {r.get('threads')} thread(s)" for r in records})  # fmt: skip
    wall = sum(r.get("wall_s") or 0.0 for r in records)
    return "\n".join([
        "Commands (the same command continues an unfinished sweep; finished runs are skipped):", "",
        *[f"    {c}" for c in commands], "", f"Commits: {', '.join(commits)}.", f"Environment: {'; '.join(envs)}.",
        f"Wall time: {wall / 3600:.2f} h in {len(records)} runs (sum of each run's process time, start-up included).",
    ])  # fmt: skip


def _parameters(records: Sequence[dict[str, Any]]) -> int | None:
    """Parameters of the GN+WS model (of the first setup's when GN+WS was not run), as the sweep recorded them."""
    counts = {r["setup"]: r.get("parameters") for r in records}
    return counts.get("gn_ws") or next(iter(counts.values()), None)


def _verdict_lines(verdicts: Sequence[Verdict]) -> str:
    return "\n".join(f"- **({v.claim}) {v.text}: {v.status}.** {v.detail}." for v in verdicts)


def _figures(records: Sequence[dict[str, Any]], cells: dict, figures_dir: Path, protocol: dict) -> dict[str, Path]:
    title = f"{protocol['arch']} on {protocol['dataset']}, {protocol['epochs']} epochs at every batch size"
    curves: dict[str, list] = defaultdict(list)
    for r in records:
        if r["kind"] == "grid" and r["batch"] == CURVE_BATCH:
            curves[r["setup"]].append(r["history"])
    out = {"accuracy": plot_accuracy_vs_batch(cells, figures_dir / "sweep_accuracy.png", title)}
    if curves:
        out["curves"] = plot_learning_curves(curves, figures_dir / f"sweep_curves_b{CURVE_BATCH}.png",
                                             f"{title}: learning curves at {CURVE_BATCH} images per step")  # fmt: skip
    return out


def _trained_section(records: Sequence[dict[str, Any]], runs_dir: str | os.PathLike | None, plan: dict,
                     protocol: dict) -> list[str]:  # fmt: skip
    if runs_dir is None:
        return []
    images = min(64, protocol["train_images"] or 64)
    rows = measure_trained(records, runs_dir, CURVE_BATCH, images)
    if not rows:
        return [f"## Smoothness of the trained models at {CURVE_BATCH} images per step", "",
                f"No final checkpoint at {CURVE_BATCH} images per step under {runs_dir} yet.", ""]  # fmt: skip
    return [
        f"## Smoothness of the trained models at {CURVE_BATCH} images per step", "",
        f"`torchws analyze` on each run's final checkpoint: {images} training images in micro-batches of "
        f"{CURVE_BATCH}, train mode; probe steps 0.05-0.4; kept fraction and ||dL/dW|| / ||dL/dW_hat|| averaged over "
        "the WS layers. Mean ± std over seeds. Measured at the end of training, where the runs stand at different "
        "losses, so this describes the trained models, not the claim (vi) verdict.", "",
        trained_smoothness_table(rows, plan["setups"]), "",
    ]  # fmt: skip


def write_report(results: str | os.PathLike, out: str | os.PathLike, figures_dir: str | os.PathLike, *,
                 smoothness: str | os.PathLike | None = None, title: str | None = None,
                 notes: str | os.PathLike | None = None,
                 runs_dir: str | os.PathLike | None = None) -> dict[str, Any]:  # fmt: skip
    """Write the Markdown report ``out`` and its figures; returns {"complete", "verdicts": {claim: status}}.

    smoothness: JSON of ``scripts/smoothness.py`` for claim (vi). notes: a Markdown file inserted after the protocol
    (e.g. why the grid has its size). runs_dir: the sweep's run dirs; when given, ``torchws analyze`` measures the
    final checkpoints at CURVE_BATCH images per step (a section of its own; the verdict on (vi) stays the one from
    ``smoothness``)."""
    records = _latest(read_results(results))
    protocol, plan = records[0]["protocol"], _plan(records)
    cells = grid_cells(records)
    verdicts = claim_verdicts(cells)
    if smoothness is not None:
        try:
            data = json.loads(Path(smoothness).read_text())
        except (OSError, ValueError) as e:
            raise ExperimentError(f"--smoothness {smoothness}: cannot read it as JSON ({e})") from None
        verdicts.append(smoothness_verdict(data, str(smoothness)))
    else:
        verdicts.append(Verdict("vi", SMOOTHNESS_CLAIM, "not tested", "no probe data given (--smoothness)"))
    try:
        extra = [Path(notes).read_text().strip(), ""] if notes is not None else []
    except OSError as e:
        raise ExperimentError(f"--notes {notes}: cannot read it ({e.strerror or e})") from None
    out = Path(out)
    figs = _figures(records, cells, Path(figures_dir), protocol)
    status, complete = _status_line(records, plan, protocol)
    rel = {k: os.path.relpath(v, out.parent) for k, v in figs.items()}
    parts = [
        f"# {title or 'Normalization setups across images per step'}", "", status, "", "## Reproduce", "",
        _provenance(records), "", "## Protocol (fixed before any run)", "", protocol_text(protocol, plan, BASE_BATCH),
        "", *extra, "## Learning-rate search", "", _search_table(records, protocol, plan), "",
        "## Final test accuracy (%), mean ± std over seeds (number of seeds)", "", "Columns: images per step.", "",
        _accuracy_table(cells, plan), "", f"![accuracy against images per step]({rel['accuracy']})", "",
    ]  # fmt: skip
    if "curves" in rel:
        parts += [f"![learning curves at {CURVE_BATCH} images per step]({rel['curves']})", ""]
    parts += [
        "## Training throughput (images/s, median over seeds)", "", _throughput_table(records, plan), "",
        "## Paired comparisons", "",
        f"Paired over seeds (same seed: same initial weights draw and data order). Outcome: `beats` / `worse` when the "
        f"two-sided paired t-test gives p < {ALPHA:g}; otherwise `matches` when |mean| <= {MATCH_MARGIN:g} point, "
        f"else `inconclusive`. A BN collapse (iii) is `worse` by >= {COLLAPSE_POINTS:g} points.", "",
        _comparison_table(verdicts), "", "## Verdicts", "", _verdict_lines(verdicts), "",
        *_trained_section(records, runs_dir, plan, protocol),
        "## What this setting may explain", "", caveats(protocol, _parameters(records)), "",
    ]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    return {"complete": complete, "verdicts": {v.claim: v.status for v in verdicts}, "figures": figs}
