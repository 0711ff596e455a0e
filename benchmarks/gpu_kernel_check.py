"""Check and time the multi-tensor WS kernel on the 53 conv weights of ResNet-50.

What it does, in one process:
1. max abs error of ``torchws.kernels.multi_standardize`` (forward and backward, every mode, mixed gains) against
   the formulas in float64;
2. interleaved medians (CUDA events, warm-up first) of: a device copy of the same bytes (the memory floor),
   per-layer timm-style WS (``F.batch_norm`` on ``w.reshape(1, O, -1)``), the multi-tensor path (autograd Function,
   packing included) and the bare kernels for a few chunk widths; plus the host time of one call;
3. prints a table and ratios, writes JSON (device, versions, commit, numbers) to ``--out``.

Usage (GPU, < 2 minutes on an H100)::

    python benchmarks/gpu_kernel_check.py --out results/gpu_kernel_check.json

CPU smoke test of the logic (Triton interpreter, tiny shapes)::

    python benchmarks/gpu_kernel_check.py --device cpu --small --out /tmp/check.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

EPS = {"inside_sqrt": 1e-5, "added_to_std": 1e-5, "clamp_fan_in_var": 1e-4}


def resnet50_conv_shapes() -> list[tuple[int, int, int, int]]:
    """(out, in, kh, kw) of the 53 convs of torchvision's resnet50, in module order (1 stem + 16 x 3 + 4 downsample)."""
    shapes = [(64, 3, 7, 7)]
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)]
            if b == 0:
                shapes.append((planes * 4, inplanes, 1, 1))
            inplanes = planes * 4
    return shapes


def small_conv_shapes() -> list[tuple[int, int, int, int]]:
    return [(8, 3, 3, 3), (16, 8, 1, 1), (4, 16, 3, 3), (3, 2, 1, 1), (5, 130, 3, 3)]


def reference_formula(weights, mode: str, eps: float, gains=None):
    """The WS formulas per layer in float64 (independent of the kernel)."""
    import torch

    outs = []
    for i, w in enumerate(weights):
        rows = w.reshape(w.shape[0], -1).double()
        n = rows.shape[1]
        centered = rows - rows.mean(dim=1, keepdim=True)
        var = (centered * centered).sum(dim=1, keepdim=True) / (n - 1 if mode == "added_to_std" else n)
        if mode == "inside_sqrt":
            rstd = 1.0 / torch.sqrt(var + eps)
        elif mode == "added_to_std":
            rstd = 1.0 / (torch.sqrt(var) + eps)
        else:
            rstd = 1.0 / torch.sqrt(torch.clamp(n * var, min=eps))
        y = centered * rstd
        if gains is not None and gains[i] is not None:
            y = y * gains[i].double().reshape(-1, 1)
        outs.append(y.reshape(w.shape))
    return outs


def timm_style(weights, eps: float):
    """Per-layer WS as timm does it: one F.batch_norm per weight."""
    import torch.nn.functional as F

    return [
        F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=eps).reshape_as(w)
        for w in weights
    ]


def max_errors(weights, dtype, device) -> dict[str, dict[str, float]]:
    """Max abs error of outputs and of input/gain grads vs the float64 formulas, per mode."""
    import torch
    from torchws.kernels import multi_standardize

    gen = torch.Generator().manual_seed(1)
    errors = {}
    for mode, eps in EPS.items():
        ws = [w.detach().to(dtype).requires_grad_() for w in weights]
        gains = [torch.randn(w.shape[0], generator=gen).to(device).requires_grad_() if i % 3 == 0 else None
                 for i, w in enumerate(ws)]  # fmt: skip
        inputs = ws + [g for g in gains if g is not None]
        outs = multi_standardize(ws, mode=mode, eps=eps, gains=gains)
        grads = [torch.randn(o.shape, generator=gen).to(device, dtype) for o in outs]
        got = torch.autograd.grad(outs, inputs, grads)
        ref_outs = reference_formula(ws, mode, eps, gains)
        ref = torch.autograd.grad(ref_outs, inputs, grads)
        errors[mode] = {
            "forward": max((a.double() - b).abs().max().item() for a, b in zip(outs, ref_outs)),
            "backward_weights": max((a.double() - b.double()).abs().max().item() for a, b in zip(got[: len(ws)], ref)),
            "backward_gains": max(
                (a.double() - b.double()).abs().max().item() for a, b in zip(got[len(ws) :], ref[len(ws) :])
            ),
            "max_abs_grad": max(b.abs().max().item() for b in ref[: len(ws)]),
        }
    return errors


def time_interleaved(fns: dict[str, Callable[[], object]], device, reps: int, warmup: int, inner: int) -> dict:
    """Median ms per call of each fn; the fns take turns (order rotated every rep) so drift hits all alike."""
    import torch

    cuda = device.type == "cuda"
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if cuda:
        torch.cuda.synchronize()
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fns[name]()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fns[name]()
                samples[name].append((time.perf_counter() - t0) * 1e3 / inner)
    return {n: statistics.median(v) for n, v in samples.items()}


def host_ms(fn: Callable[[], object], device, reps: int) -> float:
    """Median wall time of issuing one call (no sync inside; the GPU may still be running)."""
    import torch

    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(out)


def build_cases(weights, dtype, blocks) -> dict[str, Callable[[], object]]:
    """The timed callables for one dtype (mode inside_sqrt, eps 1e-5, no gains)."""
    import torch
    from torchws.kernels import get_plan, multi_standardize
    from torchws.kernels.packing import pack
    from torchws.kernels.triton_ws import standardize_packed, standardize_packed_backward

    ws = [w.detach().to(dtype).requires_grad_() for w in weights]
    grads = [torch.randn_like(w) for w in ws]
    plan = get_plan(ws)
    flat = pack(ws, plan).detach()
    flat_grad = pack(grads, plan)
    dst = torch.empty_like(flat)
    _, stats = standardize_packed(flat, plan, mode="inside_sqrt", eps=1e-5, unbiased=False)

    def multi_fwd():
        with torch.no_grad():
            return multi_standardize(ws, mode="inside_sqrt", eps=1e-5)

    def ref_fwd():
        with torch.no_grad():
            return timm_style(ws, 1e-5)

    cases = {
        "copy (floor)": lambda: dst.copy_(flat),
        "per-layer fwd": ref_fwd,
        "per-layer fwd+bwd": lambda: torch.autograd.grad(timm_style(ws, 1e-5), ws, grads),
        "multi fwd": multi_fwd,
        "multi fwd+bwd": lambda: torch.autograd.grad(multi_standardize(ws, mode="inside_sqrt", eps=1e-5), ws, grads),
    }
    for b in blocks:
        cases[f"kernel fwd B={b}"] = lambda b=b: standardize_packed(
            flat, plan, mode="inside_sqrt", eps=1e-5, unbiased=False, block=b
        )
        cases[f"kernel bwd B={b}"] = lambda b=b: standardize_packed_backward(flat, flat_grad, stats, plan, block=b)
    return cases


def git_commit() -> str:
    """HEAD of the checkout this script lives in, or "unknown" (e.g. a copied tree without git history)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else "unknown"


def print_table(dtype_name: str, timings: dict[str, float], host: dict[str, float]) -> dict[str, float]:
    copy = timings["copy (floor)"]
    print(f"\n{dtype_name}: median ms per call (interleaved)")
    print(f"{'case':<22}{'ms':>10}{'x copy':>10}")
    for name, ms in timings.items():
        print(f"{name:<22}{ms:>10.4f}{ms / copy:>10.2f}")
    ratios = {
        "multi_fwd_bwd / per_layer_fwd_bwd": timings["multi fwd+bwd"] / timings["per-layer fwd+bwd"],
        "multi_fwd / per_layer_fwd": timings["multi fwd"] / timings["per-layer fwd"],
        "multi_fwd / copy": timings["multi fwd"] / copy,
    }
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}")
    for k, v in host.items():
        print(f"  host ms per call, {k}: {v:.3f}")
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results file")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (Triton interpreter; use --small)")
    parser.add_argument("--small", action="store_true", help="tiny shapes and few reps (smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="timed reps per case (default 50, --small 3)")
    parser.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    parser.add_argument("--blocks", default="256,512,1024", help="chunk widths to time the bare kernels with")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

    import torch
    import triton
    from torchws.kernels import is_available

    device = torch.device(args.device)
    if not is_available(device):
        print(f"gpu_kernel_check: no Triton kernel on {device} (CUDA + triton, or --device cpu)", file=sys.stderr)
        return 2
    reps = args.reps or (3 if args.small else 50)
    blocks = [int(b) for b in args.blocks.split(",")]
    shapes = small_conv_shapes() if args.small else resnet50_conv_shapes()
    gen = torch.Generator().manual_seed(0)
    # kaiming-like scale, as trained convs have
    weights = [(torch.randn(s, generator=gen) * (2.0 / (s[1] * s[2] * s[3])) ** 0.5).to(device) for s in shapes]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": args.commit or git_commit(),
        "num_weights": len(shapes),
        "num_params": sum(w.numel() for w in weights),
        "num_rows": sum(s[0] for s in shapes),
        "reps": reps,
        "errors": {},
        "timings_ms": {},
        "host_ms": {},
        "ratios": {},
    }
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}  commit {result['commit'][:12]}")
    print(f"{result['num_weights']} weights, {result['num_params']} params, {result['num_rows']} rows")
    t0 = time.perf_counter()
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        result["errors"][name] = errs = max_errors(weights, dtype, device)
        for mode, e in errs.items():
            print(f"{name} {mode}: max abs err " + ", ".join(f"{k} {v:.2e}" for k, v in e.items()))
        cases = build_cases(weights, dtype, blocks)
        timings = time_interleaved(
            cases, device, reps=reps, warmup=2 if args.small else 10, inner=1 if args.small else 5
        )
        host = {k: host_ms(cases[k], device, reps) for k in ("per-layer fwd+bwd", "multi fwd+bwd")}
        result["timings_ms"][name], result["host_ms"][name] = timings, host
        result["ratios"][name] = print_table(name, timings, host)
    result["wall_s"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out} ({result['wall_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
