"""One config source for training: the ``TrainConfig`` dataclass generates the argparse flags, a YAML file sets
defaults, flags override, and the resolved config is saved with the run (``config.yaml``) and in every checkpoint.

Precedence (lowest to highest): dataclass defaults < ``--config file.yaml`` < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import ConfigError

__all__ = ["TrainConfig", "add_config_flags", "config_from_args", "load_yaml", "parse_config", "save_config"]

SCHEDULES = ("step", "cosine", "constant")
AUGMENTS = ("auto", "crop_flip", "none")
DEVICES = ("auto", "cpu", "cuda")
NONFINITE = ("stop", "skip")
WS_BACKENDS = ("auto", "torch", "numba", "cuda_graph", "off")


def _f(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field whose metadata carries the flag's help (and choices)."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything a training run needs. Each field is one ``--flag`` (underscores become dashes)."""

    # what to train on
    model: str = _f("cifar_resnet20_gn_ws", "registered model name (`torchws models` lists them)")
    dataset: str = _f("fashion_mnist", "dataset name (`torchws datasets` lists them)")
    data_dir: str | None = _f(None, "where the dataset lives (default: the dataset's search path)")
    image_size: int | None = _f(None, "crop size for imagefolder (default: the model's input size)")
    augment: str = _f("auto", "train augmentation; auto: crop_flip for cifar*, none otherwise", choices=AUGMENTS)
    max_train_images: int | None = _f(None, "use only the first N training images (after a fixed shuffle)")
    max_eval_images: int | None = _f(None, "evaluate on the first N test images (default: all)")
    workers: int = _f(4, "DataLoader worker processes (imagefolder only)")
    # batch and length
    batch_size: int = _f(64, "images per micro-batch per process")
    accum_steps: int = _f(1, "micro-batches accumulated per optimizer step")
    epochs: int = _f(90, "training epochs")
    max_steps: int | None = _f(None, "stop after this many optimizer steps in total (default: no limit)")
    # optimizer and schedule (the paper's recipe: SGD 0.1 at batch 256, momentum 0.9, wd 1e-4, x0.1 at 30 and 60)
    lr: float = _f(0.1, "base learning rate at --base-batch images per step")
    base_batch: int = _f(256, "batch the base lr refers to; lr = lr * batch_size * accum_steps * world / base_batch")
    scale_lr: bool = _f(True, "scale the lr linearly by the total batch")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(1e-4, "SGD weight decay")
    nesterov: bool = _f(False, "Nesterov momentum")
    schedule: str = _f("step", "lr schedule after warm-up", choices=SCHEDULES)
    milestones: tuple[int, ...] = _f((30, 60), "epochs at which the step schedule multiplies the lr by gamma")
    gamma: float = _f(0.1, "step schedule factor")
    warmup_epochs: float = _f(0.0, "linear warm-up length in epochs (fractions allowed)")
    # numerics and speed
    bf16: bool = _f(False, "bfloat16 autocast for forward and loss")
    channels_last: bool = _f(False, "channels_last memory format for model and inputs")
    ws_accumulate_once: bool = _f(True, "with --accum-steps > 1, standardize the weights once per optimizer step")
    ws_backend: str = _f(
        "auto",
        "engine of the model-level WS pass: auto (numba for CPU models up to 2M WS weights "
        "when installed, cuda_graph on CUDA, else torch), torch (grouped torch ops), numba (CPU "
        "multi-tensor kernels), cuda_graph (replayed CUDA graphs), off (each layer on its own)",
        choices=WS_BACKENDS,
    )
    device: str = _f("auto", "auto: cuda when available (the local rank's GPU), else cpu", choices=DEVICES)
    threads: int = _f(
        0,
        "torch CPU threads per process (0: torch's default, all cores; on a shared or small "
        "machine, and with several processes per machine, set it to cores / processes)",
    )
    seed: int = _f(0, "seed for model init, data order and augmentation")
    deterministic: bool = _f(False, "deterministic algorithms (bit-exact resume; slower on GPU)")
    # output
    out_dir: str = _f("runs/train", "run dir: config.yaml, metrics.jsonl, curves.png, last.pt, best.pt")
    resume: str | None = _f(None, "checkpoint to continue from, or 'auto' for out_dir/last.pt if it exists")
    overwrite: bool = _f(False, "allow starting a fresh run in a dir that already holds checkpoints")
    save_checkpoints: bool = _f(True, "write last.pt each epoch and best.pt on a new best test accuracy")
    keep_checkpoints: int = _f(
        2,
        "checkpoints kept: last.pt and N-1 older ones (checkpoint-step<N>.pt), which "
        "--resume auto falls back to when last.pt is damaged",
    )
    nonfinite: str = _f(
        "stop",
        "a NaN/Inf loss or gradient (never applied to the weights): stop (write last.pt of "
        "the step before, name the step and the first parameter hit) or skip the step and count it",
        choices=NONFINITE,
    )
    max_skipped_steps: int = _f(5, "with --nonfinite skip: stop after this many skipped steps in a row")
    eval_every: int = _f(1, "evaluate every N epochs (and always after the last)")
    log_every: int = _f(50, "write a train-step record to metrics.jsonl every N optimizer steps")
    progress: bool = _f(
        True,
        "progress of each epoch (rank 0): a tqdm bar on a terminal, else a plain line every "
        "--log-every steps or --progress-seconds",
    )
    progress_seconds: float = _f(60.0, "when stderr is not a terminal: a progress line at least this often")
    tensorboard: bool = _f(True, "also log to TensorBoard when torch.utils.tensorboard is importable")
    plot: bool = _f(True, "write curves.png (needs matplotlib)")

    def validate(self) -> TrainConfig:
        """Check value ranges and choices; raises ConfigError naming the flag. Returns self."""
        positive = (
            "batch_size",
            "accum_steps",
            "epochs",
            "base_batch",
            "eval_every",
            "log_every",
            "keep_checkpoints",
            "max_skipped_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_train_images", "max_eval_images", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{_flag(name)} must be >= 1 (or unset), got {value}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                value = getattr(self, f.name)
                raise ConfigError(f"--{_flag(f.name)} must be one of {', '.join(choices)}, got {value!r}")
        for name, low, allowed in (("lr", 0.0, False), ("warmup_epochs", 0.0, True), ("workers", 0, True),
                                   ("threads", 0, True), ("progress_seconds", 0.0, False), ("momentum", 0.0, True),
                                   ("weight_decay", 0.0, True), ("gamma", 0.0, False)):  # fmt: skip
            value = getattr(self, name)
            if not math.isfinite(value) or value < low or (value == low and not allowed):
                raise ConfigError(f"--{_flag(name)} must be {'>=' if allowed else '>'} {low}, got {value}")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"--milestones must be increasing, got {list(self.milestones)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists) for YAML, JSON and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "<dict>") -> TrainConfig:
        """Build from a saved config (a run's config.yaml, a checkpoint's ``config``); unknown keys raise ConfigError,
        keys of earlier versions (:data:`RETIRED_KEYS`) are dropped."""
        return dataclasses.replace(cls(), **_coerce_mapping(values, source, saved=True)).validate()


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a YAML/JSON value to the field's type; raises ConfigError naming the key and source."""
    tp, optional = _unwrap_optional(_field_types()[name])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: key '{name}' cannot be null")
    try:
        if typing.get_origin(tp) is tuple:
            items = value if isinstance(value, (list, tuple)) else [value]
            return tuple(typing.get_args(tp)[0](v) for v in items)
        if tp is bool:
            if not isinstance(value, bool):
                raise TypeError("expected true or false")
            return value
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise TypeError("expected an integer")
        if tp in (int, float) and isinstance(value, bool):
            raise TypeError("expected a number")
        return tp(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: key '{name}' has invalid value {value!r} ({e})") from None


# keys that earlier versions wrote into config.yaml and checkpoints, and why they are gone: a saved config that holds
# one still loads (the key is dropped); a config file written by hand that sets one is refused, naming the reason
RETIRED_KEYS = {
    "ws_deferred": "the deferred WS backward was removed; --ws-backend picks the engine of the WS pass",
}


def _coerce_mapping(values: dict[str, Any], source: str, saved: bool = False) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in RETIRED_KEYS:
            if saved:
                continue
            raise ConfigError(f"{source}: key '{key}' is no longer used ({RETIRED_KEYS[name]}); remove it")
        if name not in known:
            raise ConfigError(f"{source}: unknown key '{key}' (valid keys: {', '.join(sorted(known))})")
        out[name] = _coerce(name, value, source)
    return out


def load_yaml(path: str | os.PathLike, saved: bool = False) -> dict[str, Any]:
    """Read a YAML config file into field values (checked and converted); raises ConfigError on any problem.
    ``saved``: the file is a run's own config.yaml, whose keys of earlier versions are dropped."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"--config {path}: reading YAML needs pyyaml (pip install 'torchws[train]')") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values, got {type(data).__name__}")
    return _coerce_mapping(data, str(path), saved)


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (as JSON, which is valid YAML, when pyyaml is missing), atomically."""
    try:
        import yaml

        text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    except ImportError:
        text = json.dumps(config.to_dict(), indent=2) + "\n"
    atomic_write_text(path, text)


def _parse_optional(inner: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else inner(text)

    parse.__name__ = getattr(inner, "__name__", "value")  # argparse names the type in its error message
    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per TrainConfig field plus ``--config``. Defaults are SUPPRESSed so that only flags given on the
    command line appear in the namespace (they override the YAML file, which overrides the dataclass)."""
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS, help="YAML file of defaults")
    hints = _field_types()
    for f in dataclasses.fields(TrainConfig):
        tp, optional = _unwrap_optional(hints[f.name])
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name}
        help_text = f.metadata.get("help", "")
        if "(default:" not in help_text:  # a help that explains its default already says it in words
            help_text += f" (default: {f.default})"
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple:
            kwargs.update(nargs="*", type=typing.get_args(tp)[0], metavar="N")
        else:
            kwargs["type"] = _parse_optional(tp) if optional else tp
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{_flag(f.name)}", help=help_text.replace("%", "%%"), **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Resolve dataclass defaults < YAML (``args.config``) < flags present in ``args``; validated."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, value in vars(args).items():
        if name in names:
            values[name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(TrainConfig(), **values).validate()


def parse_config(argv: Sequence[str] | None = None, prog: str = "torchws train") -> TrainConfig:
    """Parse command-line style arguments into a TrainConfig (argparse exits with code 2 on malformed flags)."""
    parser = argparse.ArgumentParser(prog=prog, description="Train a model (single process or under torchrun).")
    add_config_flags(parser)
    return config_from_args(parser.parse_args(argv))
