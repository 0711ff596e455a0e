"""The equivalence matrix of the model-level WS pass: every engine x every feature, against the per-layer path.

Two copies of one model train side by side for a few SGD steps (momentum, weight decay): one with the pass and the
engine under test, one with every layer computing its own weight. Outputs, gradients and weights must agree at
every step: bit for bit where the engine runs the layers' own ops (torch engine on a CPU), else to 1e-9 in float64
(float32 rounding differences grow over SGD steps in so small a net; bf16 autocast runs in float32). The
cuda_graph engine runs the same matrix on a GPU (marked ``gpu``).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from torchws.fast import enable_batched_ws, find_handle, ws_accumulation
from torchws.fast.engines import torch as torch_engine
from torchws.layers import WSConv2d, WSConvTranspose2d, WSLinear, weight_cache

CPU_ENGINES = ["torch", "torch_concat", "numba"]
FEATURES = ["plain", "autocast_bf16", "channels_last", "checkpoint", "checkpoint_reentrant", "accumulation",
            "accumulation_steps", "frozen", "weights_changed", "compile", "ddp"]  # fmt: skip


class Net(nn.Module):
    """Every kind of layer the engines treat differently: plain, 1x1, grouped, transposed, gain, shift, linear."""

    def __init__(self, checkpoint: str | None = None) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.stem = WSConv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(
            WSConv2d(8, 8, 3, padding=1, groups=2), nn.GroupNorm(4, 8), nn.ReLU(),
            WSConv2d(8, 16, 1, gain=True), nn.GroupNorm(4, 16), nn.ReLU(),
            WSConv2d(16, 16, 3, padding=1, preset="official"), nn.ReLU(),
        )  # fmt: skip
        self.up = WSConvTranspose2d(16, 8, 2, stride=2, groups=2, shift=True)
        self.head = WSConv2d(8, 8, 3, stride=2, padding=1, preset="nf")
        self.fc = WSLinear(8, 5, preset="timm")

    def forward(self, x):
        x = F.relu(self.stem(x))
        if self.checkpoint is None:
            x = self.block(x)
        else:
            x = cp.checkpoint(self.block, x, use_reentrant=self.checkpoint == "reentrant")
        x = F.relu(self.head(self.up(x)))
        return self.fc(x.mean((2, 3)))


def _pair(engine: str, checkpoint: str | None = None, dtype=torch.float64) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = Net(checkpoint).to(dtype)
    for p in ref.parameters():  # gains and shifts away from 1 and 0, so that their gradients matter
        if p.dim() == 1:
            p.data.add_(torch.randn_like(p) * 0.1)
    model = copy.deepcopy(ref)
    enable_batched_ws(model, backend="torch" if engine == "torch_concat" else engine)
    return ref, model


@pytest.fixture(autouse=True)
def _concat_on_cpu(request, monkeypatch):
    """The torch engine concatenates its groups on GPUs; ``torch_concat`` runs that path on the CPU."""
    if "torch_concat" in request.node.name:
        monkeypatch.setattr(torch_engine, "CONCAT_ON_CPU", True)


def _batches(n: int, seed: int = 1, device: str = "cpu", dtype=torch.float64) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 5, (2,), generator=g)) for _ in range(n)]
    return [(x.to(device, dtype), y.to(device)) for x, y in out]


def _tol(engine: str, feature: str) -> dict:
    if feature == "autocast_bf16":
        return {"rtol": 2e-2, "atol": 2e-3}
    if engine == "torch" and feature not in ("compile", "accumulation", "accumulation_steps"):
        return {"rtol": 0, "atol": 0}  # the layers' own ops, in the same order
    return {"rtol": 1e-9, "atol": 1e-11}


def _assert_same(ref: nn.Module, model: nn.Module, what: str, **tol) -> None:
    a, b = dict(ref.named_parameters()), dict(model.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        ga, gb = a[name].grad, b[name].grad
        assert (ga is None) == (gb is None), f"{what}: {name}.grad is None on one side only"
        if ga is not None:
            torch.testing.assert_close(gb, ga, **tol, msg=lambda m, n=name: f"{what}: {n}.grad: {m}")
        torch.testing.assert_close(b[name], a[name], **tol, msg=lambda m, n=name: f"{what}: {n}: {m}")


def _train(model: nn.Module, feature: str, steps: int = 3, forward=None, device: str = "cpu") -> list[torch.Tensor]:
    """``steps`` SGD steps of ``model`` under ``feature``; the logits of every step."""
    dtype = next(model.parameters()).dtype
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    forward = model if forward is None else forward
    outs = []
    for step, (x, y) in enumerate(_batches(steps, device=device, dtype=dtype)):
        opt.zero_grad()
        if feature == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        if feature in ("accumulation", "accumulation_steps"):
            micro = _batches(3, seed=10 + step, device=device, dtype=dtype)
            once = ws_accumulation(model, steps=3 if feature == "accumulation_steps" else None)
            with once if find_handle(model) is not None else contextlib.nullcontext():  # the reference: per layer
                for mx, my in micro:
                    logits = forward(mx)
                    (F.cross_entropy(logits, my) / 3).backward()
        else:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=feature == "autocast_bf16"):
                logits = forward(x)
            F.cross_entropy(logits.float(), y).backward()
        outs.append(logits.detach().float())
        opt.step()
        if feature == "weights_changed" and step == 0:  # surgery between steps: the plan must follow
            with torch.no_grad():
                model.stem.weight = nn.Parameter(model.stem.weight * 1.5)
                model.fc.weight.data = model.fc.weight.data.clone() - 0.01
                model.block[0].weight.copy_(model.block[0].weight.flip(0))
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    return outs


@pytest.fixture
def cache_hits(monkeypatch) -> list[int]:
    """How many times a layer's forward took its weight from a cache (a pass or accumulation) rather than
    computing it: the model with the pass must, or the comparison would be per layer against per layer."""
    hits = [0]
    lookup = weight_cache.lookup

    def counting(layer):
        w = lookup(layer)
        hits[0] += w is not None
        return w

    monkeypatch.setattr(weight_cache, "lookup", counting)
    return hits


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_engine_matches_per_layer(engine, feature, cache_hits, request):
    ckpt = {"checkpoint": "non_reentrant", "checkpoint_reentrant": "reentrant"}.get(feature)
    ref, model = _pair(engine, ckpt, torch.float32 if feature == "autocast_bf16" else torch.float64)
    handle = find_handle(model)
    assert handle.engine.name == ("torch" if engine == "torch_concat" else engine)
    if engine == "torch_concat":
        assert handle.engine.concat
    if feature == "channels_last":
        ref, model = ref.to(memory_format=torch.channels_last), model.to(memory_format=torch.channels_last)
    if feature == "frozen":
        for m in (ref, model):
            m.stem.weight.requires_grad_(False)
            m.block[3].weight.requires_grad_(False)
    tol = _tol(engine, feature)
    if feature == "compile":
        torch._dynamo.reset()
        outs_ref = _train(ref, feature)
        outs = _train(model, feature, forward=torch.compile(model, backend="aot_eager"))
    elif feature == "ddp":
        outs_ref = _train(ref, feature)
        request.getfixturevalue("gloo_group")
        outs = _train(model, feature, forward=nn.parallel.DistributedDataParallel(model))
    else:
        outs_ref = _train(ref, feature)
        before = cache_hits[0]
        assert before == 0  # the reference computes every weight itself
        outs = _train(model, feature)
        assert cache_hits[0] >= 3 * 6  # 3 steps, at least the 6 batchable layers of the first forward
    for i, (a, b) in enumerate(zip(outs_ref, outs)):
        torch.testing.assert_close(b, a, **tol, msg=lambda m, i=i: f"{engine}/{feature}: logits of step {i}: {m}")
    _assert_same(ref, model, f"{engine}/{feature}", **tol)
    if feature == "frozen":
        assert model.stem.weight.grad is None and model.block[3].weight.grad is None
    if feature == "weights_changed":
        assert handle.plan.sources[model.stem] is model.stem.weight  # re-planned on the replaced Parameter


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("error:The AccumulateGrad node's stream:UserWarning")
@pytest.mark.parametrize("feature", ["plain", "channels_last", "checkpoint", "checkpoint_reentrant", "accumulation",
                                     "accumulation_steps", "weights_changed"])  # fmt: skip
def test_cuda_graph_engine_matches_per_layer(feature):
    ckpt = {"checkpoint": "non_reentrant", "checkpoint_reentrant": "reentrant"}.get(feature)
    ref, model = _pair("torch", ckpt, torch.float32)
    ref, model = ref.cuda(), model.cuda()
    enable_batched_ws(model, backend="cuda_graph")
    if feature == "channels_last":
        ref, model = ref.to(memory_format=torch.channels_last), model.to(memory_format=torch.channels_last)
    outs_ref, outs = _train(ref, feature, device="cuda"), _train(model, feature, device="cuda")
    assert find_handle(model).engine.name == "cuda_graph"
    for a, b in zip(outs_ref, outs):  # the torch engine's concatenated groups: float32 rounding, grown over 3 steps
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-5)
    _assert_same(ref, model, f"cuda_graph/{feature}", rtol=2e-3, atol=2e-5)
