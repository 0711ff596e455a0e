#!/usr/bin/env bash
# Whether the cuda_graph backend still hands gradients across streams (PyTorch >= 2.10 warns "The AccumulateGrad
# node's stream does not match ..."; once per process, so each phase runs in its own process).
# run from the repo root on a CUDA machine; prints one verdict per phase
for m in capture replay; do python - $m <<'PY'
import sys, traceback, warnings
import torch
from torchws.kernels.cuda_graph import GraphedPass
mode = sys.argv[1]
set_warn = torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch
warnings.filterwarnings("error", message="The AccumulateGrad node's stream", category=UserWarning)
w = [torch.randn(16, 9, device="cuda", requires_grad=True), torch.randn(16, device="cuda", requires_grad=True)]
fn = lambda ts: [(ts[0] - ts[0].mean(1, keepdim=True)) * ts[1].unsqueeze(1)]
set_warn(mode == "capture")  # the warning fires once per process: test each phase in its own process
try:
    g = GraphedPass(fn, w)
    set_warn(True)
    for _ in range(3):
        (out,) = g()
        out.square().sum().backward()
except UserWarning:
    traceback.print_exc(limit=-3)
    print(f"{mode}: MISMATCH WARNING")
    raise SystemExit(1)
ref = [t.detach().clone().requires_grad_() for t in w]
fn(ref)[0].square().sum().backward()
ok = all(torch.allclose(a.grad, 3 * b.grad) for a, b in zip(w, ref))
print(f"{mode}: no mismatch warning; grads match eager: {ok}")
PY
done
python -m pytest -q -m gpu -W error::UserWarning tests/test_batched.py -k 'cuda_graph or deferred'
