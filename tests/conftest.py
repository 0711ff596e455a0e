"""Fixtures shared by several test files (pytest injects them; test files never import each other)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchws.layers.ws import WSConv2d, WSConvTranspose2d, WSLinear, WSMixin


class MixedWS(nn.Module):
    """WS layers of every kind a model-level pass groups differently: presets, gains, a shift, equal fan-ins with
    different shapes, a grouped transposed conv.

    Groups (preset, eps, dtype, device, fan-in, gain, shift): {c1} {c2, c3} {c2b, fc_a} {c4} {c5} {t1, c6} {fc_b}.
    The numba kernels take the layers without gain or shift that are not transposed: c1, c2b, c6, fc_a (paper) and
    c4 (official).
    """

    def __init__(self) -> None:
        super().__init__()
        self.c1 = WSConv2d(3, 8, 3, padding=1)  # fan-in 27
        self.c2 = WSConv2d(8, 8, 3, padding=1, gain=True)  # fan-in 72, gain: one group with c3
        self.c3 = WSConv2d(8, 8, 3, padding=1, gain=True)
        self.c2b = WSConv2d(8, 8, 3, padding=1, bias=True)  # fan-in 72, no gain: with fc_a (other trailing shape)
        self.c4 = WSConv2d(8, 16, 3, padding=1, preset="official")
        self.c5 = WSConv2d(16, 8, 1, preset="timm", shift=True)  # fan-in 16
        self.t1 = WSConvTranspose2d(8, 6, 3, padding=1, groups=2)  # rows of fan-in 4 * 9 = 36
        self.c6 = WSConv2d(6, 8, (2, 3), padding=1)  # fan-in 36: t1's group, not natural
        self.fc_a = WSLinear(72, 10)
        self.fc_b = WSLinear(10, 5, preset="nf")  # learnable gain by default
        with torch.no_grad():  # gains and shifts away from 1 and 0, so that their gradients matter
            for m in self.modules():
                if isinstance(m, WSMixin):
                    if m.gain is not None:
                        m.gain.normal_(1.0, 0.3)
                    if m.shift is not None:
                        m.shift.normal_(0.0, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def f(layer, h):  # keeps activations O(1): a standardized row has norm sqrt(fan-in)
            return layer(h) * layer.ws_fan_in**-0.5

        h = F.relu(f(self.c1, x))
        h = F.relu(f(self.c3, F.relu(f(self.c2, h))) + f(self.c2b, h))
        h = f(self.t1, F.relu(f(self.c5, F.relu(f(self.c4, h)))))
        h = F.relu(f(self.c6, h))
        return f(self.fc_b, F.relu(f(self.fc_a, F.adaptive_avg_pool2d(h, 3).flatten(1))))


@pytest.fixture
def mixed_pair():
    """``make(dtype=float32, seed=0) -> (ref, model)``: two equal :class:`MixedWS` models without a pass (input
    ``(N, 3, H, W)``); enable one on ``model`` and compare with ``ref``, computed per layer."""

    def make(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(seed)
        ref = MixedWS().to(dtype)
        return ref, copy.deepcopy(ref)

    return make


@pytest.fixture
def backprop():
    """``run(model, x) -> (output, {name: grad})``: a forward and a backward of a loss that weights every output
    differently (a plain sum gives every row of the last layer the same gradient)."""

    def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        model.zero_grad(set_to_none=True)
        y = model(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        return y.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}

    return run


@pytest.fixture
def assert_grads_close():
    """``check(got, want, rtol, atol)`` on two :func:`backprop` results (or two ``{name: grad}`` dicts): the same
    parameters have gradients, all close (``atol`` relative to each reference gradient's largest element)."""

    def check(got, want, rtol: float = 1e-5, atol: float = 1e-5) -> None:
        if isinstance(got, tuple):
            torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=atol)
            got, want = got[1], want[1]
        assert got.keys() == want.keys()
        for name, g in want.items():
            assert (got[name] is None) == (g is None), f"{name}: a gradient on one side only"
            if g is not None:
                scale = max(1e-3, float(g.abs().max()))
                torch.testing.assert_close(got[name], g, rtol=rtol, atol=atol * scale,
                                           msg=lambda m, n=name: f"grad of {n}: {m}")  # fmt: skip

    return check


@pytest.fixture(scope="session")
def gloo_group(tmp_path_factory):
    """A single-process gloo group (rank 0 of 1) for wrapping models in DistributedDataParallel, created once and
    destroyed when the test run ends.

    Destroying a gloo group right after a DDP backward can deadlock (torch 2.13): each backward keeps a Python object
    in its thread state, the group's worker thread needs the GIL to free the all-reduce that captured it, and the
    group's destructor joins that thread while the main thread holds the GIL (about 1 run in 10 of the DDP tests
    hung there). The group lives until the test run ends, and before it is destroyed the main thread gives up the GIL
    for a moment, so that a worker still freeing the last test's all-reduce can finish.
    """
    import time

    import torch.distributed as dist

    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield dist.group.WORLD
    time.sleep(0.2)
    dist.destroy_process_group()
