"""Experiment (not a test): does WS on the CPU get cheaper if each fan-in group's weights live in one flat buffer?

Each group's weights are re-pointed into one contiguous buffer, so a group is standardized by ONE
``native_layer_norm`` over a free ``(sum O, n)`` view and ONE ``native_layer_norm_backward`` (plus one ``cat`` of
the incoming gradients) instead of one layer_norm per layer. CIFAR ResNet-20 GN+WS weights, forward + backward,
interleaved medians, 2 threads. Run: ``python benchmarks/experiment_cpu_flat_groups.py``.
"""

from __future__ import annotations

import statistics
import time

import torch

from torchws.layers.ws import WSMixin
from torchws.models import create_model


class FlatGroupWS(torch.autograd.Function):
    """Paper-preset WS of a group whose weights are consecutive views of ``flat``; outputs are views of one buffer."""

    @staticmethod
    def forward(ctx, flat, n, eps, shapes, *params):
        x = flat.view(-1, n)  # (sum O, n): the group's weights, no copy
        y, mean, rstd = torch.ops.aten.native_layer_norm(x, [n], None, None, eps)
        ctx.save_for_backward(x, mean, rstd)
        ctx.n, ctx.shapes = n, shapes
        return tuple(c.view(s) for c, s in zip(y.split([s[0] for s in shapes]), shapes))

    @staticmethod
    def backward(ctx, *grads):
        x, mean, rstd = ctx.saved_tensors
        g = torch.cat([gr.reshape(gr.shape[0], -1) for gr in grads])
        mask = [True, False, False]  # only the input's gradient
        dx, _, _ = torch.ops.aten.native_layer_norm_backward(g, x, [ctx.n], mean, rstd, None, None, mask)
        chunks = dx.split([s[0] for s in ctx.shapes])
        return (None, None, None, None, *[c.view(s) for c, s in zip(chunks, ctx.shapes)])


def flatten_groups(layers: list[WSMixin]) -> dict[int, tuple[torch.Tensor, list[WSMixin]]]:
    """Re-point each fan-in group's weights into one contiguous buffer."""
    groups: dict[int, list[WSMixin]] = {}
    for layer in layers:
        groups.setdefault(layer.ws_fan_in, []).append(layer)
    flats = {}
    for n, members in groups.items():
        flat = torch.empty(sum(m.weight.numel() for m in members))
        offset = 0
        for m in members:
            k = m.weight.numel()
            flat[offset : offset + k].copy_(m.weight.detach().reshape(-1))
            m.weight.data = flat[offset : offset + k].view_as(m.weight)
            offset += k
        flats[n] = (flat, members)
    return flats


def main() -> None:
    torch.set_num_threads(2)
    model = create_model("cifar_resnet20_gn_ws", batched_ws=False)
    layers = [m for m in model.modules() if isinstance(m, WSMixin)]
    flats = flatten_groups(layers)
    upstream = {m: torch.randn_like(m.weight) for m in layers}

    def per_layer() -> None:
        outs = [m.compute_standardized_weight() for m in layers]
        torch.autograd.backward(outs, [upstream[m] for m in layers])

    def flat_groups() -> None:
        outs, order = [], []
        for n, (flat, members) in flats.items():
            outs += FlatGroupWS.apply(flat, n, 1e-5, [m.weight.shape for m in members], *[m.weight for m in members])
            order += members
        torch.autograd.backward(outs, [upstream[m] for m in order])

    grads = []
    for fn in (per_layer, flat_groups):
        for m in layers:
            m.weight.grad = None
        fn()
        grads.append([m.weight.grad.clone() for m in layers])
    print("max |grad difference|:", max((a - b).abs().max().item() for a, b in zip(*grads)))
    times: dict[str, list[float]] = {"per_layer": [], "flat_groups": []}
    for _ in range(300):
        for name, fn in (("per_layer", per_layer), ("flat_groups", flat_groups)):
            for m in layers:
                m.weight.grad = None
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(f"{name:<12} {statistics.median(ts) * 1e3:.3f} ms (median of {len(ts)}, fwd+bwd, 21 weights)")


if __name__ == "__main__":
    main()
