"""Experiments on normalization setups: ``run_sweep`` (a grid of setups x images per step x seeds, resumable),
``write_report`` (Markdown, figures, paired comparisons, verdicts on the paper's claims) and ``analyze_checkpoint``
(gradient identity, kept fraction, loss-landscape probes of a trained model)."""

from .errors import ExperimentError
from .grid import DEFAULT_SETUPS, GRIDS, SETUP_LABELS, GridSpec, RunSpec, grid_runs, resolve_grid, search_runs
from .results import append_record, read_results, repair_torn_tail
from .selection import choose_base_lrs
from .sweep import run_sweep

__all__ = [
    "DEFAULT_SETUPS",
    "GRIDS",
    "SETUP_LABELS",
    "ExperimentError",
    "GridSpec",
    "RunSpec",
    "append_record",
    "choose_base_lrs",
    "grid_runs",
    "read_results",
    "repair_torn_tail",
    "resolve_grid",
    "run_sweep",
    "search_runs",
]
