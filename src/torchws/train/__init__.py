"""Micro-batch training: ``TrainConfig`` (flags from a dataclass, YAML defaults), ``train()`` (single process or
torchrun/DDP), atomic checkpoints with exact resume, a clean stop on SIGTERM / SIGINT (``RunTerminated`` /
``RunInterrupted``), metrics (JSON lines), learning-curve plots.

``python -m torchws.train --help`` (or ``torchws train --help``) lists every option.
"""

from .checkpoint import atomic_save, load_checkpoint
from .config import TrainConfig, add_config_flags, config_from_args, load_yaml, parse_config, save_config
from .engine import Trainer, evaluate, train
from .errors import CheckpointError, ConfigError, RunDirError, TrainError
from .schedule import LRSchedule, scaled_lr
from .signals import RunInterrupted, RunTerminated

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LRSchedule",
    "RunDirError",
    "RunInterrupted",
    "RunTerminated",
    "TrainConfig",
    "TrainError",
    "Trainer",
    "add_config_flags",
    "atomic_save",
    "config_from_args",
    "evaluate",
    "load_checkpoint",
    "load_yaml",
    "parse_config",
    "save_config",
    "scaled_lr",
    "train",
]
