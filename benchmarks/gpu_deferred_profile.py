"""Where a deferred WS step's extra time goes on a GPU (ResNet-50 GN+WS, fp32, batch 1 and 2).

For each deferred engine (triton; graph, what ``deferred`` runs on CUDA) it prints:
    * host time per step of the engine's forward part (``supply``: checks, kernel launches, handing out the leaves)
      and of its push at the end of backward (perf_counter, no synchronisation: what the host spends);
    * GPU time of the engine's forward and backward work alone (CUDA events around ``_compute`` / ``_backward``);
    * SGD step medians, interleaved with the plain-conv GN model and with the same engine whose kernels are
      replaced by nothing (``*_no_kernels``: leaves never recomputed, gradients of a fixed buffer): the difference
      between the two deferred rows is what the WS kernels cost in a step, the rest is orchestration.
Not a test. ``python benchmarks/gpu_deferred_profile.py`` on a CUDA machine, from the repo root.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ws import build_base, interleaved, make_variant, train_step_fn  # noqa: E402
from torchws.batched import find_handle  # noqa: E402


def _engine(model):
    handle = find_handle(model)
    model(torch.randn(1, 3, 224, 224, device="cuda")).sum().backward()  # builds the engine
    model.zero_grad(set_to_none=True)
    return handle._deferred


def _instrument(engine, acc: dict[str, float]) -> None:
    supply, push = engine.supply, engine._push

    def timed_supply(*args, **kwargs):
        t = time.perf_counter()
        supply(*args, **kwargs)
        acc["supply"] += time.perf_counter() - t

    def timed_push():
        t = time.perf_counter()
        push()
        acc["push"] += time.perf_counter() - t

    engine.supply, engine._push = timed_supply, timed_push


def _gpu_ms(fn, reps: int = 50) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _profile_push(engine, reps: int = 200) -> None:
    """The push called directly (leaf gradients set by hand), timed and profiled: where its host time goes."""
    import cProfile
    import io
    import pstats

    grads = [torch.randn_like(leaf) for leaf in engine.leaves]

    def once() -> None:
        for leaf, g in zip(engine.leaves, grads):
            leaf.grad = g
        engine._push()
        for p in engine.inputs:
            p.grad = None

    for _ in range(5):
        once()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        once()
    host = (time.perf_counter() - t) / reps
    torch.cuda.synchronize()
    print(f"  push called directly: {host * 1e3:.3f} ms host per call (incl. setting {len(grads)} leaf grads)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        once()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(8)
    print("\n".join("    " + line for line in out.getvalue().splitlines() if line.strip())[:3000])


def main() -> None:
    base = build_base("resnet50").cuda()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for kind in ("deferred_triton", "deferred"):
        model = make_variant(kind, base)
        engine = _engine(model)
        grads = [torch.randn_like(leaf) for leaf in engine.leaves]
        fwd = _gpu_ms(engine._compute)
        bwd = _gpu_ms(lambda engine=engine, grads=grads: engine._backward(grads))
        print(f"\n{kind} ({type(engine).__name__}): GPU time alone: forward {fwd:.3f} ms, backward {bwd:.3f} ms; "
              f"capture error: {getattr(engine, 'capture_error', None)}")  # fmt: skip
        _profile_push(engine)
        for batch in (1, 2):
            torch.manual_seed(0)
            x = torch.randn(batch, 3, 224, 224, device="cuda")
            y = torch.randint(0, 1000, (batch,), device="cuda")
            acc = {"supply": 0.0, "push": 0.0}
            measured = make_variant(kind, base)
            _instrument(_engine(measured), acc)
            bare = make_variant(kind, base)
            bare_engine = _engine(bare)
            fixed = [torch.zeros_like(p) for p in bare_engine.inputs]
            bare_engine._compute = lambda: None
            bare_engine._backward = lambda gs, fixed=fixed: fixed
            fns = {
                "gn": train_step_fn(make_variant("gn", base), x, y, None),
                kind: train_step_fn(measured, x, y, None),
                f"{kind}_no_kernels": train_step_fn(bare, x, y, None),
            }
            times, _, errors = interleaved(fns, 60, torch.device("cuda"), 12.0)
            rounds = len(times[kind]) + 4  # + 3 warm-up calls and 1 sizing round, which the accumulators saw too
            g = times["gn"]
            print(f"  batch {batch}: host per step: supply {acc['supply'] / rounds * 1e3:.3f} ms, "
                  f"push {acc['push'] / rounds * 1e3:.3f} ms; {errors or ''}")  # fmt: skip
            for name, t in times.items():
                paired = statistics.median(a / b for a, b in zip(t, g))
                print(f"    {name:<26}{statistics.median(t) * 1e3:8.2f} ms  paired {paired:.3f}x")


if __name__ == "__main__":
    main()
