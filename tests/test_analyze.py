"""torchws analyze: per-layer gradient measurements of a trained checkpoint against an independent computation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_train_engine import one_thread  # noqa: F401 (the autouse fixture, shared)
from torch.func import functional_call

from torchws.cli import main
from torchws.experiments.analyze import analyze_checkpoint, rebuild
from torchws.models import create_model
from torchws.train import TrainConfig, train
from torchws.train.checkpoint import save_checkpoint


def trained(tmp_path, model: str) -> str:
    cfg = TrainConfig(model=model, dataset="digits", batch_size=4, epochs=1, max_train_images=64, max_eval_images=32,
                      lr=0.4, out_dir=str(tmp_path / model), progress=False, tensorboard=False, plot=False,
                      device="cpu")  # fmt: skip
    train(cfg, echo=False)
    return str(tmp_path / model / "last.pt")


def independent_grads(checkpoint: str, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{conv name: (W_hat, dL/dW, dL/dW_hat)}: the GN+WS network run as the plain GN network with standardized
    weights written out here (population variance, eps 1e-5 inside the root), float64."""
    state = torch.load(checkpoint, weights_only=True)["model"]
    plain = create_model("cifar_resnet8_gn", num_classes=10, in_chans=1, batched_ws=False).double()
    params = {k: v.double() for k, v in state.items()}
    raw, hats = {}, {}
    for name, value in params.items():
        if value.ndim == 4:  # conv weights
            raw[name] = value.clone().requires_grad_()
            rows = raw[name].reshape(value.shape[0], -1)
            hat = (rows - rows.mean(1, keepdim=True)) / torch.sqrt(rows.var(1, correction=0, keepdim=True) + 1e-5)
            hats[name] = hat.reshape(value.shape)
            hats[name].retain_grad()
    images, labels = batch
    F.cross_entropy(functional_call(plain, {**params, **hats}, (images.double(),)), labels).backward()
    return {name[: -len(".weight")]: (hats[name].detach(), raw[name].grad, hats[name].grad) for name in raw}


def test_layers_match_an_independent_gradient_computation(tmp_path):
    checkpoint = trained(tmp_path, "cifar_resnet8_gn_ws")
    result = analyze_checkpoint(checkpoint, batch=8)
    _, batch, _ = rebuild(checkpoint, batch=8)
    want = independent_grads(checkpoint, batch)
    assert result["micro_batch"] == 4 and result["batch"] == 8
    assert [row["layer"] for row in result["layers"]] == list(want)
    for row in result["layers"]:
        w_hat, grad_w, grad_hat = want[row["layer"]]
        assert row["grad_norm_ratio"] == pytest.approx(float(grad_w.norm() / grad_hat.norm()), rel=2e-3)
        g, w = grad_hat.reshape(g_rows := grad_hat.shape[0], -1), w_hat.reshape(g_rows, -1)
        n = g.shape[1]
        kept = ((g * g).sum(1) - g.sum(1) ** 2 / n - (w * g).sum(1) ** 2 / n) / (g * g).sum(1)
        assert row["kept_fraction"] == pytest.approx(float(kept.mean()), rel=2e-3)
        assert row["fan_in"] == n and row["identity_max_rel_error"] < 0.05
    with torch.no_grad():
        fresh = create_model("cifar_resnet8_gn_ws", in_chans=1, batched_ws=False).eval()
        plain_loss = F.cross_entropy(fresh(batch[0]), batch[1])
    assert result["probe"]["loss"] != pytest.approx(float(plain_loss))  # the trained weights, not a fresh model
    assert result["probe"]["loss_range"] >= 0 and result["probe"]["effective_beta"] > 0


def test_cli_table_json_and_a_model_without_ws(tmp_path, capsys):
    checkpoint = trained(tmp_path, "cifar_resnet8_bn")
    assert main(["analyze", checkpoint, "--batch", "8", "--micro-batch", "2", "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "no WS layers" in out and "effective beta" in out
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["layers"] == [] and data["micro_batch"] == 2 and set(data["probe"]) >= {"loss_range", "losses"}


def test_bad_checkpoints_exit_2_with_one_line(tmp_path, capsys):
    checkpoint = trained(tmp_path, "cifar_resnet8_gn")
    state = torch.load(checkpoint, weights_only=True)
    del state["config"], state["checksum"]
    save_checkpoint(state, tmp_path / "no_config.pt")  # a consistent file, but without the config
    cases = {str(tmp_path / "no_config.pt"): "holds no config with the model and dataset to rebuild its model",
             str(tmp_path / "missing.pt"): "does not exist"}  # fmt: skip
    (tmp_path / "torn.pt").write_bytes(open(checkpoint, "rb").read()[:500])
    cases[str(tmp_path / "torn.pt")] = "is unreadable (truncated, corrupt or not a checkpoint)"
    for path, message in cases.items():
        assert main(["analyze", path]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and path in err
    assert main(["analyze", checkpoint, "--batch", "0"]) == 2
    assert "--batch and --micro-batch must be >= 1" in capsys.readouterr().err
