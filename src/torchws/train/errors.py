"""Typed errors of the trainer: user mistakes the CLI turns into one line on stderr and exit code 2."""

from __future__ import annotations


class TrainError(ValueError):
    """Base class: a training run cannot start or continue because of its inputs (config, files, run dir)."""


class ConfigError(TrainError):
    """A config value, YAML key or flag is invalid; the message names the field (and file) and what is allowed."""


class CheckpointError(TrainError):
    """A checkpoint is missing, unreadable (truncated, corrupt) or belongs to another model."""


class RunDirError(TrainError):
    """The output dir already holds checkpoints and the run would overwrite them (pass --resume or --overwrite)."""


class NonFiniteError(TrainError):
    """A NaN or Inf loss or gradient stopped the run (``--nonfinite``); last.pt holds the weights of the step
    before. The message names the step and the first parameter whose gradient was not finite."""
