"""Checkpoints: written atomically (temp file in the same dir, fsync, os.replace), read back with typed errors.

A checkpoint is a dict: ``model`` (state dict of the unwrapped model), ``optimizer``, ``scheduler``, ``scaler``
(None unless a GradScaler is used), ``rng`` (python, numpy, torch, cuda), ``epoch`` (the epoch in progress or next),
``batch_in_epoch`` (optimizer steps already done in it), ``step`` (optimizer steps in total), ``best_acc``,
``history`` (epoch records), ``config`` (the resolved TrainConfig as a dict), ``nonfinite`` (skipped-step counts),
``format`` and ``checksum`` (CRC-32 of the rest, checked on load: corruption inside a tensor is otherwise silent).
Everything is stored as tensors and plain Python values, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write
from .errors import CheckpointError

__all__ = [
    "FORMAT",
    "REQUIRED_KEYS",
    "atomic_save",
    "capture_rng",
    "checksum",
    "load_checkpoint",
    "model_mismatch",
    "restore_model",
    "restore_rng",
    "save_checkpoint",
]

FORMAT = "torchws-train-1"
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "rng", "epoch", "batch_in_epoch", "step", "best_acc", "history")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file next to ``path``, fsync it, then ``os.replace``: a crash at any point leaves
    either the old file or the new one, never a partial file under ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def checksum(obj: Any) -> int:
    """CRC-32 of everything in ``obj`` (nested dicts, lists, tuples, tensors' dtype, shape and bytes, and the repr of
    plain values). A checkpoint's bytes can change without torch.load noticing (a flipped bit inside a tensor loads
    as another number), so checkpoints carry this and loading checks it."""

    def walk(value: Any, crc: int) -> int:
        if isinstance(value, dict):
            for key in sorted(value, key=repr):
                crc = walk(value[key], zlib.crc32(repr(key).encode(), crc))
            return crc
        if isinstance(value, (list, tuple)):
            for item in value:
                crc = walk(item, crc)
            return zlib.crc32(f"seq{len(value)}".encode(), crc)
        if isinstance(value, torch.Tensor):
            crc = zlib.crc32(f"{value.dtype}{tuple(value.shape)}".encode(), crc)
            data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            return zlib.crc32(data, crc)
        return zlib.crc32(repr(value).encode(), crc)

    return walk(obj, 0)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``atomic_save`` of a training checkpoint with its ``checksum`` added."""
    atomic_save({**state, "checksum": checksum(state)}, path)


def capture_rng() -> dict[str, Any]:
    """Global RNG states as tensors / plain values (numpy's key array becomes a tensor)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng`` (cuda states only when as many devices are visible)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (CPU tensors). Raises CheckpointError if missing, truncated, incomplete or not
    ours."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file; pass a .pt file such as <out-dir>/last.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = _unsupported_global(e)
        if named is not None:  # weights_only met a class or function to call: it never runs
            raise CheckpointError(f"checkpoint {path} holds Python objects other than tensors and plain values (such "
                                  f"as code to call), so it is refused; it was not written by torchws's trainer (it "
                                  f"names {named})") from None  # fmt: skip
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated, corrupt or not a checkpoint): "
                              f"{_unpickling_detail(e)}") from None  # fmt: skip
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for damaged files
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated, corrupt or not a checkpoint): "
                              f"{_first_line(e)}") from None  # fmt: skip
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a torchws training checkpoint (no format '{FORMAT}')")
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}")
    saved = ckpt.pop("checksum", None)  # (absent in checkpoints written before it was added)
    if saved is not None and saved != checksum(ckpt):
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the checksum written with it")
    return ckpt


def _unsupported_global(error: BaseException) -> str | None:
    """The class or function a weights_only load refused (torch's message says ``GLOBAL module.name``), or None."""
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    return match.group(1) if match else None


def _unpickling_detail(error: BaseException) -> str:
    """torch's weights_only message opens with advice about weights_only=False; the cause is further down."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = [line for line in lines if line.startswith(("Unsupported", "WeightsUnpickler"))]
    return detail[-1] if detail else (lines[0] if lines else type(error).__name__)


def model_mismatch(model: nn.Module, ckpt: dict[str, Any], path: str | os.PathLike) -> str | None:
    """Why the checkpoint ``ckpt`` (read from ``path``) does not fit ``model`` (keys or shapes), or None."""
    state, own = ckpt["model"], model.state_dict()
    if not isinstance(state, dict):
        return f"checkpoint {path} holds no model state dict"
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(getattr(state[k], "shape", ()))]
    if not (missing or unexpected or shapes):
        return None
    details = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", shapes)):
        if keys:
            details.append(f"{len(keys)} {label} keys (e.g. {keys[0]})")
    saved = ckpt.get("config", {}).get("model", "?") if isinstance(ckpt.get("config"), dict) else "?"
    return f"checkpoint {path} was saved from model '{saved}' and does not fit this model: {'; '.join(details)}"


def restore_model(model: nn.Module, ckpt: dict[str, Any], path: str | os.PathLike) -> None:
    """Load the checkpoint's model state into ``model`` strictly; mismatched keys or shapes raise one-line
    CheckpointError."""
    problem = model_mismatch(model, ckpt, path)
    if problem is not None:
        raise CheckpointError(problem)
    model.load_state_dict(ckpt["model"])
