"""The batched pass hands each layer its standardized weight; a forward interrupted by KeyboardInterrupt skips the
pass's clearing hook (torch runs always_call hooks for Exception only), so the layers must notice stale supplies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchws.batched import enable_batched_ws
from torchws.layers.ws import WSConv2d


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(WSConv2d(3, 8, 3, padding=1), nn.ReLU(), WSConv2d(8, 8, 3, padding=1))
    enable_batched_ws(model, backend="torch")
    return model


def _interrupt(model, x, grad: bool):
    def stop(module, args, output):
        raise KeyboardInterrupt

    handle = model[2].register_forward_hook(stop)
    with torch.set_grad_enabled(grad), pytest.raises(KeyboardInterrupt):
        model(x)
    handle.remove()
    assert model[0]._ws_supplied is not None  # the clearing hook did not run


def test_stale_supply_after_an_in_place_update_is_ignored():
    model = _model()
    x = torch.randn(1, 3, 6, 6)
    _interrupt(model, x, grad=True)
    with torch.no_grad():
        model[0].weight.mul_(-1).add_(0.3)  # what an optimizer step does
    expected = model[0].compute_standardized_weight()
    torch.testing.assert_close(model[0].standardized_weight(), expected)
    torch.testing.assert_close(model[0](x), torch.nn.functional.conv2d(x, expected, model[0].bias, padding=1))


def test_supply_made_without_grad_is_not_used_for_a_grad_forward():
    model = _model()
    x = torch.randn(1, 3, 6, 6)
    _interrupt(model, x, grad=False)
    model[0](x).sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_valid_supply_is_used_and_user_supplies_are_not_second_guessed():
    model = _model()
    x = torch.randn(1, 3, 6, 6)
    _interrupt(model, x, grad=True)
    supplied = model[0]._ws_supplied
    assert model[0].standardized_weight() is supplied  # unchanged weights: the supply is still right
    mine = torch.zeros_like(model[0].weight)
    model[0].set_standardized_weight(mine)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert model[0].standardized_weight() is mine  # set by the user: their contract
    model(x)  # a full forward supplies afresh and clears afterwards
    assert model[0]._ws_supplied is None and model[2]._ws_supplied is None
