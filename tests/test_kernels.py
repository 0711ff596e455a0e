"""Multi-tensor WS kernel (torchws.kernels) against an independent float64 reference.

Without CUDA the kernels run in Triton's interpreter, which needs TRITON_INTERPRET=1 before triton is first
imported: set at the top of this module (importing torch does not import triton). If another module imported
triton first, the tests skip with that reason (test_interpreter_needs_env_before_triton checks the message).
With CUDA, the same tests run compiled on the GPU.
"""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from torchws.functional import standardize_rows  # noqa: E402
from torchws.kernels import build_plan, get_plan, is_available, multi_standardize  # noqa: E402
from torchws.presets import get_preset  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not is_available(DEVICE), reason=f"no Triton kernel on {DEVICE}: triton imported before TRITON_INTERPRET=1 was set?"
)

EPS = {"inside_sqrt": 1e-5, "added_to_std": 1e-5, "clamp_fan_in_var": 1e-4}
MODES = list(EPS)
# (O, fan-in...) shapes: n = 2, n < block, n == block, n > block (1030 > 1024), a conv layout, and tiny filters
SHAPES = [(3, 2), (5, 37), (2, 1024), (2, 1030), (4, 3, 3, 3), (6, 5)]


def _reference(weights, mode, eps, gains=None, unbiased=None):
    """The formulas, row by row, in float64 (autograd gives the reference backward)."""
    unbiased = mode == "added_to_std" if unbiased is None else unbiased
    outs = []
    for i, w in enumerate(weights):
        rows = w.reshape(w.shape[0], -1).double()
        n = rows.shape[1]
        centered = rows - rows.mean(dim=1, keepdim=True)
        var = (centered * centered).sum(dim=1, keepdim=True) / (n - 1 if unbiased else n)
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


def _assert_close(got, ref, tol=2e-6):
    """fp32 rounding: ``tol`` absolute at unit scale, relative to the tensor's largest value beyond it.

    Gradients of small-variance rows are large (rstd ~ 1e3) and cancel, so their error scales with rstd.
    """
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(got.double(), ref.double(), atol=tol * scale, rtol=1e-5)


def _weights(dtype=torch.float32, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=gen) for s in shapes]
    ws[-1] = ws[-1] * 1e-3  # (6, 5): n*var ~ 5e-6 < 1e-4 exercises the clamp branch, and eps matters elsewhere
    return [w.to(DEVICE, dtype).requires_grad_() for w in ws]


def _gains(seed=1):
    gen = torch.Generator().manual_seed(seed)
    gains = [torch.randn(s[0], generator=gen).to(DEVICE).requires_grad_() for s in SHAPES]
    gains[1] = gains[3] = None  # mixed: some weights without gain
    return gains


def _grads(outs, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen).to(DEVICE, o.dtype) for o in outs]


def _present(gains):
    return [g for g in (gains or []) if g is not None]


@pytest.mark.parametrize("block", [None, 128])
@pytest.mark.parametrize("with_gains", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_forward_backward_match_float64_reference(mode, with_gains, block):
    weights, gains = _weights(), _gains() if with_gains else None
    inputs = weights + _present(gains)
    outs = multi_standardize(weights, mode=mode, eps=EPS[mode], gains=gains, block=block)
    grad_outs = _grads(outs)
    got = torch.autograd.grad(outs, inputs, grad_outs)
    ref_outs = _reference(weights, mode, EPS[mode], gains)
    ref = torch.autograd.grad(ref_outs, inputs, grad_outs)
    assert len(got) == len(weights) + (4 if with_gains else 0)
    for a, b, w in zip(outs, ref_outs, weights):
        assert a.shape == w.shape and a.dtype == torch.float32
        _assert_close(a, b)
    for a, b, x in zip(got, ref, inputs):
        assert a.shape == x.shape and a.dtype == x.dtype
        _assert_close(a, b)


@pytest.mark.parametrize("preset,mode", [("paper", "inside_sqrt"), ("official", "added_to_std"), ("bit", "inside_sqrt"),
                                         ("nf", "clamp_fan_in_var")])  # fmt: skip
def test_matches_functional_standardize_rows(preset, mode):
    weights = _weights(seed=3)
    rows = [w.reshape(w.shape[0], -1) for w in weights]
    outs = multi_standardize(rows, mode=mode, eps=get_preset(preset).eps)
    grad_outs = _grads(outs)
    got = torch.autograd.grad(outs, weights, grad_outs)
    ref_outs = [standardize_rows(r, preset=preset) for r in rows]
    ref = torch.autograd.grad(ref_outs, weights, grad_outs)
    for a, b in zip(list(outs) + list(got), ref_outs + list(ref)):
        _assert_close(a, b, tol=4e-6)  # both sides fp32


def test_unbiased_inside_sqrt_variance_override():
    weights = _weights(seed=4)
    outs = multi_standardize(weights, mode="inside_sqrt", eps=1e-5, variance="unbiased")
    grad_outs = _grads(outs)
    got = torch.autograd.grad(outs, weights, grad_outs)
    ref_outs = _reference(weights, "inside_sqrt", 1e-5, unbiased=True)
    ref = torch.autograd.grad(ref_outs, weights, grad_outs)
    for a, b in zip(list(outs) + list(got), ref_outs + list(ref)):
        _assert_close(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_inputs(mode):
    weights, gains = _weights(torch.bfloat16, seed=5), _gains()
    inputs = weights + _present(gains)
    outs = multi_standardize(weights, mode=mode, eps=EPS[mode], gains=gains)
    assert all(o.dtype == torch.bfloat16 for o in outs) and len(inputs) == 10
    grad_outs = _grads(outs)
    got = torch.autograd.grad(outs, inputs, grad_outs)
    ref_outs = _reference(weights, mode, EPS[mode], gains)
    ref = torch.autograd.grad(ref_outs, inputs, grad_outs)
    for a, b in zip(outs, ref_outs):  # one bf16 rounding (8 mantissa bits)
        _assert_close(a, b, tol=1e-2)
    for a, b in zip(got, ref):  # weights' grads bf16, fp32 gains' grads fp32
        assert a.dtype == b.dtype
        _assert_close(a, b, tol=1e-2)


@pytest.mark.parametrize("mode", MODES)
def test_constant_row_is_finite(mode):
    # 0.25 in 16 elements: sums and the mean are exact, so y = 0 and dx = rstd * (g - mean(g)) exactly
    w = torch.randn(3, 16)
    w[1] = 0.25
    w = w.to(DEVICE).requires_grad_()
    (out,) = multi_standardize([w], mode=mode, eps=EPS[mode])
    g = torch.randn(3, 16).to(DEVICE)
    (dw,) = torch.autograd.grad(out, w, g)
    assert torch.isfinite(out).all() and torch.isfinite(dw).all()
    assert (out[1] == 0).all()
    rstd = {"inside_sqrt": 1e-5**-0.5, "added_to_std": 1e5, "clamp_fan_in_var": 1e-4**-0.5}[mode]
    _assert_close(dw[1], rstd * (g[1] - g[1].mean()))
    if mode != "added_to_std":  # autograd's sqrt'(0) makes the reference NaN for added_to_std
        (ref,) = torch.autograd.grad(_reference([w], mode, EPS[mode]), w, g)
        _assert_close(dw, ref)


def test_none_grads_count_as_zero():
    weights = _weights(seed=6)
    outs = multi_standardize(weights, mode="inside_sqrt", eps=1e-5)
    g0, g2 = torch.randn(outs[0].shape).to(DEVICE), torch.randn(outs[2].shape).to(DEVICE)
    loss = (outs[0] * g0).sum() + (outs[2] * g2).sum()  # outputs 1, 3, 4, 5 get None grads in backward
    got = torch.autograd.grad(loss, weights)
    ref_outs = _reference(weights, "inside_sqrt", 1e-5)
    ref = torch.autograd.grad((ref_outs[0] * g0).sum() + (ref_outs[2] * g2).sum(), weights, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, ref)):
        if i in (0, 2):
            _assert_close(a, b)
        else:
            assert b is None and (a == 0).all()


def test_outputs_are_views_of_one_buffer_shaped_like_inputs():
    weights = _weights(seed=7)
    with torch.no_grad():
        outs = multi_standardize(weights, mode="inside_sqrt", eps=1e-5)
    assert [o.shape for o in outs] == [w.shape for w in weights]
    assert len({o.untyped_storage().data_ptr() for o in outs}) == 1
    assert all(o.is_contiguous() for o in outs)


def test_plan_tables_and_cache():
    plan = build_plan([(2, 3), (1, 4, 1), (3, 2)], torch.float32, "cpu")
    assert plan.row_offset.tolist() == [0, 3, 6, 10, 12, 14]
    assert plan.row_fan_in.tolist() == [3, 3, 4, 2, 2, 2]
    assert plan.row_offset.dtype == torch.int64 and plan.row_fan_in.dtype == torch.int32
    assert (plan.total, plan.num_rows, plan.max_fan_in) == (16, 6, 4)
    a = [torch.randn(2, 3), torch.randn(4, 5)]
    b = [torch.randn(2, 3), torch.randn(4, 5)]
    assert get_plan(a) is get_plan(b)
    assert get_plan(a) is not get_plan([torch.randn(2, 3), torch.randn(4, 6)])
    assert get_plan(a) is not get_plan([t.double() for t in a])


def test_invalid_inputs_raise():
    w = torch.randn(3, 4).to(DEVICE)
    with pytest.raises(ValueError, match="fan-in >= 2"):
        multi_standardize([torch.randn(3, 1).to(DEVICE)], mode="inside_sqrt", eps=1e-5)
    with pytest.raises(ValueError, match="share dtype"):
        multi_standardize([w, w.double()], mode="inside_sqrt", eps=1e-5)
    with pytest.raises(ValueError, match="unknown mode"):
        multi_standardize([w], mode="outside", eps=1e-5)
    with pytest.raises(ValueError, match="one gain each"):
        multi_standardize([w], mode="inside_sqrt", eps=1e-5, gains=[torch.ones(4).to(DEVICE)])


def test_is_available():
    assert is_available(DEVICE)
    assert not is_available("meta")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="checks the CPU interpreter")
def test_interpreter_needs_env_before_triton():
    # triton imported without TRITON_INTERPRET: setting it later cannot make tl.sum & co. interpretable
    code = (
        "import os, torch, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from torchws.kernels import is_available, multi_standardize\n"
        "assert not is_available('cpu')\n"
        "try:\n"
        "    multi_standardize([torch.randn(4, 9)], mode='inside_sqrt', eps=1e-5)\n"
        "except RuntimeError as e:\n"
        "    print('raised' if 'before triton is imported' in str(e) else e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "raised", res.stdout + res.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_resnet_sized_weights(mode):
    shapes = [(64, 3, 7, 7), (256, 64, 1, 1), (512, 512, 3, 3), (2048, 512, 1, 1), (10, 2)]
    weights = _weights(seed=8, shapes=shapes)
    gen = torch.Generator().manual_seed(9)
    gains = [torch.randn(s[0], generator=gen).cuda().requires_grad_() if i % 2 else None for i, s in enumerate(shapes)]
    inputs = weights + _present(gains)
    outs = multi_standardize(weights, mode=mode, eps=EPS[mode], gains=gains)
    grad_outs = _grads(outs)
    got = torch.autograd.grad(outs, inputs, grad_outs)
    ref_outs = _reference(weights, mode, EPS[mode], gains)
    ref = torch.autograd.grad(ref_outs, inputs, grad_outs)
    for a, b in zip(list(outs) + list(got), ref_outs + list(ref)):
        _assert_close(a, b, tol=1e-5)
