"""BatchChannelNorm2d against a composition written here from var_mean, in both modes, train and eval."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchws.layers.bcn import BatchChannelNorm2d

C, G, EPS = 8, 4, 1e-5


def _bcn(estimate: bool, *, rate: float = 0.3, momentum: float | None = 0.1) -> BatchChannelNorm2d:
    """A float64 BCN with every parameter and buffer set to something non-trivial."""
    torch.manual_seed(0)
    m = BatchChannelNorm2d(C, G, eps=EPS, momentum=momentum, estimate=estimate, estimate_rate=rate, dtype=torch.float64)
    with torch.no_grad():
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.normal_()
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    return m


def _reference(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, m: BatchChannelNorm2d) -> torch.Tensor:
    """Per-channel normalize with (mean, var) + BN affine -> group standardization -> per-group affine."""
    c = (1, -1, 1, 1)
    y = (x - mean.view(c)) / torch.sqrt(var.view(c) + EPS) * m.bn.weight.view(c) + m.bn.bias.view(c)
    n = x.shape[0]
    yg = y.reshape(n, G, -1)
    gvar, gmean = torch.var_mean(yg, dim=2, correction=0, keepdim=True)
    z = (yg - gmean) / torch.sqrt(gvar + EPS)
    return (z * m.weight + m.bias).reshape(x.shape)


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, C, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def test_standard_train_uses_batch_stats_and_updates_running_stats():
    m, x = _bcn(False), _x()
    rm0, rv0 = m.bn.running_mean.clone(), m.bn.running_var.clone()
    out = m.train()(x)
    var_b, mean_b = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(out, _reference(x, mean_b, var_b, m), rtol=1e-10, atol=1e-10)
    var_unbiased = torch.var(x, dim=(0, 2, 3), correction=1)
    torch.testing.assert_close(m.bn.running_mean, 0.9 * rm0 + 0.1 * mean_b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.bn.running_var, 0.9 * rv0 + 0.1 * var_unbiased, rtol=1e-12, atol=1e-12)
    assert int(m.bn.num_batches_tracked) == 1


def test_standard_eval_uses_running_stats_without_update():
    m, x = _bcn(False), _x()
    rm0, rv0 = m.bn.running_mean.clone(), m.bn.running_var.clone()
    out = m.eval()(x)
    torch.testing.assert_close(out, _reference(x, rm0, rv0, m), rtol=1e-10, atol=1e-10)
    assert torch.equal(m.bn.running_mean, rm0) and torch.equal(m.bn.running_var, rv0)


def test_estimated_train_updates_like_the_authors_then_normalizes_with_the_estimates():
    r = 0.3
    m, x = _bcn(True, rate=r), _x()
    rm0, rv0 = m.bn.running_mean.clone(), m.bn.running_var.clone()
    out = m.train()(x)
    mean_b = x.mean(dim=(0, 2, 3))
    second_moment = ((x - rm0.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))  # about the old estimate
    rm1, rv1 = (1 - r) * rm0 + r * mean_b, (1 - r) * rv0 + r * second_moment
    torch.testing.assert_close(m.bn.running_mean, rm1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.bn.running_var, rv1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, _reference(x, rm1, rv1, m), rtol=1e-10, atol=1e-10)
    assert int(m.bn.num_batches_tracked) == 1


def test_estimated_eval_uses_estimates_without_update():
    m, x = _bcn(True), _x()
    rm0, rv0 = m.bn.running_mean.clone(), m.bn.running_var.clone()
    out = m.eval()(x)
    torch.testing.assert_close(out, _reference(x, rm0, rv0, m), rtol=1e-10, atol=1e-10)
    assert torch.equal(m.bn.running_mean, rm0) and torch.equal(m.bn.running_var, rv0)


def test_estimated_output_is_per_sample():
    x = _x(4)
    m = _bcn(True).eval()
    torch.testing.assert_close(m(x), torch.cat([m(x[i : i + 1]) for i in range(4)]), rtol=1e-12, atol=1e-12)
    # train mode: given the statistics after the update, each sample's output depends on that sample alone
    m = _bcn(True).train()
    out = m(x)
    m.eval()
    torch.testing.assert_close(out, torch.cat([m(x[i : i + 1]) for i in range(4)]), rtol=1e-12, atol=1e-12)
    # rate 0: training forwards at batch 1 equal the batched forward
    m = _bcn(True, rate=0.0).train()
    torch.testing.assert_close(m(x), torch.cat([m(x[i : i + 1]) for i in range(4)]), rtol=1e-12, atol=1e-12)


def test_standard_train_is_not_per_sample():
    # the contrast that makes the test above meaningful: batch statistics couple the samples
    x = _x(4)
    m = _bcn(False).train()
    assert not torch.allclose(m(x), torch.cat([m(x[i : i + 1]) for i in range(4)]))


@pytest.mark.parametrize(("estimate", "train", "rate"), [(False, True, 0.3), (True, False, 0.3), (True, True, 0.0)])
def test_gradcheck(estimate: bool, train: bool, rate: float):
    m = _bcn(estimate, rate=rate).train(train)
    names = ["bn.weight", "bn.bias", "weight", "bias"]
    params = dict(m.named_parameters())
    x = torch.randn(2, C, 3, 2, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *[params[n].detach().requires_grad_() for n in names]))


def test_non_divisible_groups_names_both():
    with pytest.raises(ValueError, match=r"num_channels=48.*num_groups=32"):
        BatchChannelNorm2d(48, 32)


def test_state_dict_layout_and_loading_batchnorm_stats():
    m = BatchChannelNorm2d(64)
    assert set(m.state_dict()) == {
        "weight",
        "bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    }
    assert m.weight.shape == (1, 32, 1)
    bn = nn.BatchNorm2d(64)
    bn.running_mean.normal_()
    m.bn.load_state_dict(bn.state_dict())
    assert torch.equal(m.bn.running_mean, bn.running_mean)
    assert not isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm))


def test_frozen_inner_batchnorm_uses_running_stats():
    m, x = _bcn(False), _x()
    m.train()
    m.bn.eval()  # what "freeze every BatchNorm2d" loops do
    rm0, rv0 = m.bn.running_mean.clone(), m.bn.running_var.clone()
    torch.testing.assert_close(m(x), _reference(x, rm0, rv0, m), rtol=1e-10, atol=1e-10)


def test_no_affine_has_no_parameters():
    m = BatchChannelNorm2d(8, 2, affine=False)
    assert list(m.parameters()) == []
    y = m(torch.randn(2, 8, 3, 3))
    var, mean = torch.var_mean(y.reshape(2, 2, -1), dim=2, correction=0)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_channels_last_input_and_torchscript():
    m = _bcn(True).eval()
    x = _x()
    ref = m(x)
    torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), ref)
    scripted = torch.jit.script(copy.deepcopy(m))
    torch.testing.assert_close(scripted(x), ref)


def test_wrong_rank_and_rate_raise():
    with pytest.raises(ValueError, match="4-D"):
        BatchChannelNorm2d(8, 2)(torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match="estimate_rate"):
        BatchChannelNorm2d(8, 2, estimate=True, estimate_rate=1.5)


def test_estimated_two_forwards_then_one_backward():
    # micro-batches accumulated into one graph: the second update must not invalidate the first forward's graph
    m = _bcn(True).train()
    x = _x()
    (m(x[:2]).square().sum() + m(x[2:]).square().sum()).backward()
    assert m.bn.weight.grad is not None and torch.isfinite(m.bn.weight.grad).all()
