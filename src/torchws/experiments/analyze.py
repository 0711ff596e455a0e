"""``torchws analyze CHECKPOINT``: the smoothness measurements of :mod:`torchws.analysis` on a trained model.

The checkpoint's saved config (written by ``torchws train``) rebuilds the model and its data. On one fixed batch of
training images (the first ``batch`` images of epoch 0's order, seed of the run), in train mode and cut into
micro-batches of the run's images per step (so BN sees the statistics it trained with):

* per WS layer: both sides of the paper's gradient identity (their largest relative gap), the kept fraction
  ``(||g||^2 - <1,g>^2/n - <W_hat,g>^2/n) / ||g||^2`` averaged over filters, and ``||dL/dW|| / ||dL/dW_hat||``;
* the loss-landscape probe along the gradient (loss range, gradient predictiveness, effective beta).

Parameters, buffers (BN running statistics) and ``.grad`` are left as they were.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchws.analysis import (
    gradient_norm_identity,
    loss_landscape_along_gradient,
    restored_state,
    track_standardized_grads,
)
from torchws.layers import WSMixin
from torchws.train import TrainConfig, load_checkpoint
from torchws.train.checkpoint import restore_model
from torchws.train.distributed import DistInfo
from torchws.train.inputs import build_inputs, build_model

from .errors import ExperimentError

__all__ = ["DEFAULT_PROBE_STEPS", "analyze_checkpoint", "format_analysis", "rebuild"]

DEFAULT_PROBE_STEPS = (0.05, 0.1, 0.2, 0.4)  # docs/science.md's step sizes


def _saved_config(state: dict[str, Any], path: Path) -> TrainConfig:
    saved = state.get("config")
    if not isinstance(saved, dict) or not saved.get("model") or not saved.get("dataset"):
        raise ExperimentError(f"checkpoint {path} holds no config with the model and dataset to rebuild its model; "
                              "analyze reads checkpoints written by `torchws train` (last.pt, best.pt)")  # fmt: skip
    return TrainConfig.from_dict(saved, source=f"config in checkpoint {path}")


def rebuild(path: str | os.PathLike, *, data_dir: str | None = None, batch: int = 64,
            seed: int | None = None) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], TrainConfig]:  # fmt: skip
    """(model with the checkpoint's weights, a fixed training batch, the saved config) on the CPU."""
    path = Path(path)
    state = load_checkpoint(path)
    saved = _saved_config(state, path)
    cfg = dataclasses.replace(
        saved,
        batch_size=batch,
        accum_steps=1,
        workers=0,
        device="cpu",
        ws_backend="off",
        data_dir=data_dir or saved.data_dir,
        seed=saved.seed if seed is None else seed,
    )
    inputs = build_inputs(cfg.validate(), DistInfo(), torch.device("cpu"))
    model = build_model(cfg, inputs.num_classes, inputs.channels)
    restore_model(model, state, path)
    inputs.train.set_epoch(0)  # type: ignore[attr-defined]
    images, labels = next(iter(inputs.train))  # type: ignore[call-overload]
    return model, (images, labels), saved


def _chunks(batch: tuple[torch.Tensor, torch.Tensor], size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(batch[0].split(size), batch[1].split(size)))


def _layer_rows(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], micro: int) -> list[dict[str, Any]]:
    names = {m: n for n, m in model.named_modules()}
    params = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    rows = []
    with restored_state(model, params), track_standardized_grads(model) as layers:
        for p in params:
            p.grad = None
        for x, y in _chunks(batch, micro):  # the gradient-accumulation objective: chunk losses weighted by size
            (F.cross_entropy(model(x), y) * (x.shape[0] / batch[0].shape[0])).backward()
        for layer in layers:
            check = gradient_norm_identity(layer)
            rows.append({"layer": names[layer], "filters": int(check.lhs.numel()),
                         "fan_in": int(layer.weight[0].numel()),
                         "kept_fraction": float(check.kept_fraction.nanmean()),
                         "grad_norm_ratio": check.grad_norm_ratio(),
                         "identity_max_rel_error": check.max_relative_error()})  # fmt: skip
    for p, g in zip(params, saved_grads):
        p.grad = g
    return rows


def analyze_checkpoint(
    path: str | os.PathLike,
    *,
    data_dir: str | None = None,
    batch: int = 64,
    micro_batch: int | None = None,
    steps: Sequence[float] = DEFAULT_PROBE_STEPS,
) -> dict[str, Any]:
    """Measure the checkpoint's model; returns a JSON-ready dict (``layers``: one row per WS layer, ``probe``).

    Raises CheckpointError (missing, damaged, other model), ExperimentError (no config to rebuild the model, bad
    sizes) and the data package's errors (dataset missing).
    """  # fmt: skip
    if batch < 1 or (micro_batch is not None and micro_batch < 1):
        raise ExperimentError(f"--batch and --micro-batch must be >= 1, got {batch} and {micro_batch}")
    model, data, cfg = rebuild(path, data_dir=data_dir, batch=batch)
    micro = micro_batch or cfg.batch_size
    model.train()  # the training objective: BN with batch statistics of `micro` images
    has_ws = any(isinstance(m, WSMixin) for m in model.modules())
    layers = _layer_rows(model, data, micro) if has_ws else []
    probe = loss_landscape_along_gradient(model, F.cross_entropy, data, steps, micro_batch_size=micro)
    return {"checkpoint": str(path), "model": cfg.model, "dataset": cfg.dataset, "batch": int(data[0].shape[0]),
            "micro_batch": micro, "layers": layers, "probe": probe.to_dict()}  # fmt: skip


def format_analysis(result: dict[str, Any]) -> str:
    """The analysis as text: a table of the WS layers, then the probe's summaries."""
    from torchws.train.metrics import format_table

    head = (f"{result['checkpoint']}: {result['model']} on {result['dataset']}, batch of {result['batch']} training "
            f"images in micro-batches of {result['micro_batch']} (train mode)")  # fmt: skip
    layers = format_table(result["layers"]) if result["layers"] else "no WS layers: no gradient identity to check"
    probe = result["probe"]
    summary = (f"loss-landscape probe (steps {', '.join(f'{s:g}' for s in probe['steps'])}): loss {probe['loss']:.4g}, "
               f"grad norm {probe['grad_norm']:.4g}, loss range {probe['loss_range']:.4g}, gradient predictiveness "
               f"{probe['gradient_predictiveness']:.4g}, effective beta {probe['effective_beta']:.4g}")  # fmt: skip
    return "\n".join([head, "", layers, "", summary])
