"""The one error type of the experiment tools: a user mistake the CLI turns into one line and exit code 2."""

from __future__ import annotations


class ExperimentError(ValueError):
    """Bad input to sweep, report or analyze: an unknown setup, a model that does not fit the data, a results file
    that is empty, torn or mixes grids, a checkpoint that cannot rebuild its model. The message names what and where."""
