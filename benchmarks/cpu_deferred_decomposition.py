"""Where a deferred WS step's extra time goes on the CPU (CIFAR ResNet-20, 2 threads, batch 1 and 2).

Interleaved SGD steps of: the plain-conv GN model; the deferred pass (numba kernels); the same pass with its kernels
replaced by nothing (leaves never recomputed, gradients of a fixed buffer: the pass's Python alone); and WS layers fed
their own weight as a fixed supply (no pass at all: the WS layers' own Python). Paired ratios to GN. Not a test.
``python benchmarks/cpu_deferred_decomposition.py`` from the repo root.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ws import build_base, interleaved, make_variant, train_step_fn  # noqa: E402
from torchws.batched import find_handle  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    base = build_base("cifar_resnet20")
    for batch in (1, 2):
        torch.manual_seed(0)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        fns = {"gn": train_step_fn(make_variant("gn", base), x, y, None)}
        fns["deferred"] = train_step_fn(make_variant("deferred", base), x, y, None)
        bare = make_variant("deferred", base)
        fns["deferred_no_kernels"] = train_step_fn(bare, x, y, None)
        fns["deferred_no_kernels"]()  # builds the engine
        engine = find_handle(bare)._deferred
        fixed = [torch.zeros_like(p) for p in engine.inputs]
        engine._compute = lambda: None
        engine._backward = lambda grads, fixed=fixed: fixed
        layers_only = make_variant("torchws", base)
        for layer in layers_only.modules():
            if hasattr(layer, "set_standardized_weight"):
                layer.set_standardized_weight(layer.weight)
        fns["ws_layers_only"] = train_step_fn(layers_only, x, y, None)
        times, _, _ = interleaved(fns, 300, torch.device("cpu"), 70.0)
        g = times["gn"]
        for name, t in times.items():
            paired = statistics.median(a / b for a, b in zip(t, g))
            print(f"batch {batch}  {name:<22}{statistics.median(t) * 1e3:7.2f} ms  paired {paired:.3f}x")


if __name__ == "__main__":
    main()
