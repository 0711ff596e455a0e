"""What WS costs on the paths users run: SGD steps of a GN+WS model against the same model with GN only.

Variants (one process, same initial weights within a model family, timed side by side):
    gn          ``create_model("<family>_gn")``: the baseline every ratio divides by
    default     ``create_model("<family>_gn_ws")``: the library default (the model-level pass, engine "auto")
    per_layer   ``create_model(..., batched_ws=False)``: every layer standardizes its own weight
    torch       ``enable_batched_ws(model, backend="torch")``
    numba       ``enable_batched_ws(model, backend="numba")`` (CPU)
    numba_serial  the same with the kernels on one thread (as with one torch thread): what their split over numba's
                threads saves at 2+ threads
    hooks_only  the default model with an engine that hands each layer its raw weight: not WS, but the cost of the
                pass's hooks and the layers' cache lookups alone (the rest of ``default`` is the standardization)
    cuda_graph  ``enable_batched_ws(model, backend="cuda_graph")`` (CUDA)
    timm        the GN model with timm-style ``StdConv2d`` convs (``F.batch_norm`` on the weight; peers.py)
    authors     the GN model with the authors' WS conv (unbiased std + 1e-5 outside; peers.py)
    folded      ``torchws.fold`` of the GN+WS model: plain convs holding standardized weights
    compile_gn, compile_ws   ``torch.compile`` of the gn and default models (compiled once per batch size,
                outside the timing)

A step is zero_grad, forward, cross-entropy, backward, SGD step (momentum 0.9, weight decay 1e-4). Timing runs in
warm blocks: each variant runs ``--block`` consecutive steps (the figure is the block's mean step), the variants take
turns in a rotated order, ``--rounds`` rounds. Reported: the median step per variant and the median over rounds of
each round's ratio to ``gn`` ("paired": steadier when the host's speed drifts). ``--trainer`` adds path (b): the
``torchws train`` CLI end to end, GN and GN+WS runs alternating, their img/s. Not a test: prints a table and writes
JSON (``--out``) with device, versions and commit.

    python benchmarks/bench_paths.py --threads 2 --batches 1,2 --out results/cpu_paths.json
    python benchmarks/bench_paths.py --threads 1 --batches 2 --variants gn,default --trainer 3
    python benchmarks/bench_paths.py --device cuda --family resnet50 --batches 1,2 --bf16 --channels-last
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import AuthorsWSConv2d, TimmStdConv2d, swap_convs  # noqa: E402

import torchws  # noqa: E402
from torchws.fast import enable_batched_ws, find_handle  # noqa: E402
from torchws.fast.engines import numba as numba_engine  # noqa: E402
from torchws.models import create_model  # noqa: E402

ALL = ["gn", "default", "per_layer", "torch", "numba", "numba_serial", "cuda_graph", "hooks_only", "timm", "authors",
       "folded", "compile_gn", "compile_ws"]  # fmt: skip


def build(variant: str, family: str, in_chans: int, classes: int, device: torch.device, channels_last: bool):
    """The model of ``variant`` on ``device``; ``None`` where the variant does not apply there."""
    if variant in ("cuda_graph",) and device.type != "cuda" or variant.startswith("numba") and device.type != "cpu":
        return None
    torch.manual_seed(0)
    kwargs = {"num_classes": classes, "in_chans": in_chans}
    if variant in ("gn", "timm", "authors", "compile_gn"):
        model = create_model(f"{family}_gn", **kwargs)
        if variant in ("timm", "authors"):
            model = swap_convs(model, TimmStdConv2d if variant == "timm" else AuthorsWSConv2d)
    else:
        model = create_model(f"{family}_gn_ws", batched_ws=variant != "per_layer", **kwargs)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if variant in ("torch", "numba", "numba_serial", "cuda_graph"):
        enable_batched_ws(model, backend=variant.removesuffix("_serial"))
    elif find_handle(model) is not None:
        find_handle(model).refresh()  # engine chosen for the model's device and layout
    if variant == "hooks_only":
        handle = find_handle(model)
        handle.engine = RawWeights(handle.plan)
    if variant == "folded":
        model = torchws.fold(model)
    if variant.startswith("compile"):
        model = torch.compile(model)
    return model


class RawWeights:
    """An engine (the protocol of :mod:`torchws.fast.engines`) that standardizes nothing: each layer's own weight."""

    name = "raw_weights"

    def __init__(self, plan) -> None:
        self.plan = plan

    def __call__(self) -> dict:
        return {m: m.weight for m in self.plan.layers}


def make_step(model, x, y, bf16: bool):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    return step


def serial_kernels(step):
    """``step`` with the numba kernels on the calling thread alone (as with one torch thread), whatever the threads."""

    def run() -> None:
        saved, numba_engine.MIN_CHUNK_ELEMENTS = numba_engine.MIN_CHUNK_ELEMENTS, 1 << 62
        try:
            step()
        finally:
            numba_engine.MIN_CHUNK_ELEMENTS = saved

    return run


def time_block(step, n: int, device: torch.device) -> float:
    """Mean seconds per step over ``n`` consecutive steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def bench_steps(args, device: torch.device, batch: int) -> dict:
    in_chans, size, classes = args.input
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, in_chans, size, size, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    steps, errors = {}, {}
    for v in args.variants:
        try:
            model = build(v, args.family, in_chans, classes, device, args.channels_last)
            if model is None:
                continue
            step = make_step(model, x, y, args.bf16)
            if v == "numba_serial":
                step = serial_kernels(step)
            for _ in range(args.warmup):
                step()
            steps[v] = step
        except Exception as e:  # a peer that cannot run here (the authors' .view on channels_last) is reported
            errors[v] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    times: dict[str, list[float]] = {v: [] for v in steps}
    names = list(steps)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for v in order:
            times[v].append(time_block(steps[v], args.block, device))
    base = times.get("gn")
    out = {}
    for v, ts in times.items():
        paired = statistics.median(t / b for t, b in zip(ts, base)) if base else None
        out[v] = {"median_ms": 1e3 * statistics.median(ts), "paired_ratio": paired, "block_ms": [1e3 * t for t in ts]}
    for v, e in errors.items():
        out[v] = {"error": e}
    return out


def trainer_pair(args, model: str, out_dir: str) -> float:
    """img/s of one ``torchws train`` run (path (b): the CLI end to end, data loading and all)."""
    cmd = [sys.executable, "-m", "torchws", "train", "--dataset", "fashion_mnist", "--model", model,
           "--batch-size", str(args.trainer_batch), "--epochs", "1", "--max-train-images", str(args.trainer_images),
           "--max-eval-images", "1000", "--out-dir", out_dir, "--overwrite", "--seed", "0",
           "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rates = re.findall(r"([0-9.]+) img/s", done.stdout + done.stderr)
    if not rates:
        raise RuntimeError(f"no img/s in the trainer's output:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return float(rates[-1])


def bench_trainer(args) -> dict:
    rates: dict[str, list[float]] = {"gn": [], "gn_ws": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.trainer):
            pair = ["gn", "gn_ws"] if i % 2 == 0 else ["gn_ws", "gn"]
            for v in pair:
                rates[v].append(trainer_pair(args, f"{args.family}_{v}", os.path.join(tmp, v)))
    ratios = [g / w for g, w in zip(rates["gn"], rates["gn_ws"])]
    return {"img_per_s": rates, "step_ratio_per_pair": ratios, "median_step_ratio": statistics.median(ratios)}


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("TORCHWS_COMMIT", "unknown")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    return {"commit": commit, "device": name, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--family", default="cifar_resnet20")
    ap.add_argument("--input", default=None, help="C,H,classes (default: 1,28,10 for cifar_*, else 3,224,1000)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--variants", default="gn,default,per_layer,torch,numba,timm,folded")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--block", type=int, default=25, help="consecutive steps per timed block")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--trainer", type=int, default=0, help="pairs of `torchws train` runs (path b); 0: none")
    ap.add_argument("--trainer-batch", type=int, default=2)
    ap.add_argument("--trainer-images", type=int, default=2048)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    small = args.family.startswith("cifar")
    c, h, k = (int(v) for v in (args.input or ("1,28,10" if small else "3,224,1000")).split(","))
    args.input = (c, h, k)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(ALL))
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(ALL)}")
    result = {"env": environment(device), "args": {k: v for k, v in vars(args).items()}, "steps": {}}
    print(json.dumps(result["env"]))
    for b in (int(v) for v in args.batches.split(",")):
        r = result["steps"][b] = bench_steps(args, device, b)
        mode = ("bf16 autocast" if args.bf16 else "fp32") + (" + channels_last" if args.channels_last else "")
        print(f"\n{args.family} batch {b} ({mode}), {args.rounds} rounds of {args.block}-step blocks")
        for v, m in r.items():
            if "error" in m:
                print(f"  {v:12s} {m['error']}")
            else:
                print(f"  {v:12s} {m['median_ms']:8.3f} ms   x{m['paired_ratio']:.3f} of gn (paired)")
    if args.trainer:
        t = result["trainer"] = bench_trainer(args)
        print(f"\ntorchws train, batch {args.trainer_batch}, {args.threads} thread(s): img/s {t['img_per_s']}; "
              f"GN+WS step / GN step per pair {[round(r, 3) for r in t['step_ratio_per_pair']]}, "
              f"median {t['median_step_ratio']:.3f}")  # fmt: skip
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
