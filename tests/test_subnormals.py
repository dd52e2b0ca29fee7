"""Subnormal floats in the C++ CPU kernels (csrc/parallel.h).

A softmax over scores that lie far apart has probabilities below the smallest normal
float; the C++ kernels flush those to zero (every task runs with the MXCSR's
flush-to-zero and denormals-are-zero bits), since on Intel cores each subnormal costs a
microcode assist (~15x the time of a cross-entropy over such rows).  These tests pin the
result (each entry within twice its dtype's smallest normal of the float64 result, no
subnormal left), the
paths that make such entries (lane, group and row paths, the fused linear products),
and that the caller's own floating-point mode is left as it was.
"""

import pytest
import torch
import torch.nn.functional as F

import linclass

pytestmark = pytest.mark.skipif("cpp" not in linclass.backends.available(),
                                reason="C++ kernels not built")


def tiny(dtype):
    return torch.finfo(dtype).tiny  # the smallest normal number


def assert_flushed_and_close(ours, ref, dtype):
    """ours (dtype) against the float64 result: no subnormal entry; entries far below 1
    within the smallest normal of dtype (and float rounding) of theirs, the others to
    the float rounding of the largest entry."""
    assert not ((ours != 0) & (ours.abs() < tiny(dtype))).any(), "a subnormal entry was kept"
    err = (ours.to(torch.float64) - ref).abs()
    small = ref.abs() < 1e-20
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (err[small] <= 2 * tiny(dtype) + rtol * ref[small].abs()).all()
    assert (err[~small] <= 8 * torch.finfo(dtype).eps * ref.abs().max()).all()


def softmax_gradient(x, t, smoothing):
    """d sum-loss / dx in float64, the target's 1 - p_y as the sum of the other
    probabilities (torch's float64 p_y - 1 rounds it to 0 for a confident row)."""
    p = torch.softmax(x.to(torch.float64), 1)
    rows = torch.arange(len(t))
    others = p.clone()
    others[rows, t] = 0
    grad = p - smoothing / x.shape[1]
    grad[rows, t] = -(1 - smoothing) * others.sum(1) + smoothing * (p[rows, t] - 1 / x.shape[1])
    return grad


def spread_scores(n, c, dtype, spread):
    """Rows whose scores span `spread`: most probabilities are subnormal or zero."""
    torch.manual_seed(0)
    x = torch.rand(n, c, dtype=torch.float64) * -spread
    x[:, 0] = 0.0  # each row's max
    return x.to(dtype), torch.randint(0, c, (n,))


@pytest.mark.parametrize("classes", [10, 50, 1000])  # the lane, group and row paths
@pytest.mark.parametrize("dtype,spread", [(torch.float32, 110.0), (torch.float64, 760.0)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_flushes_subnormal_probabilities(classes, dtype, spread, smoothing):
    x, t = spread_scores(64, classes, dtype, spread)
    p = torch.softmax(x.to(torch.float64), 1)
    assert ((p > 0) & (p < tiny(dtype))).sum() > 0  # the case has what it is about
    ours = x.detach().clone().requires_grad_()
    with linclass.backends.use("cpp"):
        loss = linclass.cross_entropy(ours, t, label_smoothing=smoothing, reduction="sum")
    loss.backward()
    ref_loss = F.cross_entropy(x.to(torch.float64), t, label_smoothing=smoothing, reduction="sum")
    torch.testing.assert_close(loss.to(torch.float64), ref_loss, rtol=1e-5, atol=0)
    assert_flushed_and_close(ours.grad, softmax_gradient(x, t, smoothing), dtype)


@pytest.mark.parametrize("classes", [10, 300])  # the register-blocked products, the GEMMs
def test_fused_linear_products_read_flushed_probabilities(classes):
    torch.manual_seed(1)
    n, d = 96, 64
    x = torch.randn(n, d)
    w = (torch.randn(classes, d) * 20).requires_grad_()  # scores ~160 apart
    t = torch.randint(0, classes, (n,))
    with linclass.backends.use("cpp"):
        linclass.linear_cross_entropy(x, w, t, reduction="sum").backward()
    w64 = w.detach().to(torch.float64).requires_grad_()
    scores = x.to(torch.float64) @ w64.t()
    p = torch.softmax(scores, 1)
    assert ((p > 0) & (p < tiny(torch.float32))).sum() > 0
    F.cross_entropy(scores, t, reduction="sum").backward()
    err = (w.grad.to(torch.float64) - w64.grad).abs()
    assert (err <= 1e-4 * w64.grad.abs().max()).all(), err.max()


@pytest.mark.parametrize("flush", [False, True])
def test_the_callers_floating_point_mode_is_kept(flush):
    """The kernels set flush-to-zero in their own tasks only, and put back what they
    found, in the calling thread too (which runs one of the tasks)."""
    subnormal = torch.tensor([1e-39])
    if not torch.set_flush_denormal(flush):
        pytest.skip("no flush-to-zero mode on this CPU")
    try:
        x, t = spread_scores(4096, 1000, torch.float32, 110.0)
        x.requires_grad_()
        with linclass.backends.use("cpp"):
            linclass.cross_entropy(x, t).backward()
            linclass.multi_margin_loss(x, t).backward()
        assert ((subnormal * 1.0) == 0).item() == flush
    finally:
        torch.set_flush_denormal(False)  # torch's default
