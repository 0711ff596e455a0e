"""Deployment path: a WS model, folded or not, exported with torch.onnx.export runs in onnxruntime with the same
outputs as in torch."""

from __future__ import annotations

import numpy as np
import onnxruntime.backend
import pytest
import torch
from torch import nn

import torchws
from torchws.models import create_model


def _onnxruntime_outputs(model: nn.Module, x: torch.Tensor, path) -> np.ndarray:
    torch.onnx.export(model, (x,), dynamo=True).save(str(path))
    (out,) = onnxruntime.backend.prepare(str(path), device="CPU").run(x.numpy())  # the ONNX backend API
    return out


def _small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.ConvTranspose2d(16, 8, 2, stride=2, groups=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_folded_zoo_model_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = create_model("cifar_resnet20_gn_ws", ws_preset="official").eval()
    folded = torchws.fold(model)
    assert not any(isinstance(m, torchws.WSMixin) for m in folded.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(
        _onnxruntime_outputs(folded, x, tmp_path / "resnet20.onnx"), expected, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("preset", ["paper", "official", "bcn"])
def test_converted_net_runs_in_onnxruntime_folded_and_unfolded(tmp_path, preset):
    torch.manual_seed(1)
    converted = torchws.convert(_small_net(), norm="gn", num_groups=4, preset=preset, linear=True).eval()
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        expected = converted(x).numpy()
    for name, model in (("folded", torchws.fold(converted)), ("ws", converted)):
        got = _onnxruntime_outputs(model, x, tmp_path / f"{name}.onnx")
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=name)
