"""Shared comparison helpers for the loss tests."""

from __future__ import annotations

import contextlib

import torch

import linclass

# Absolute/relative tolerances for comparing with torch in the same dtype.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
}
# compare_with_torch: how much further from torch's float64 result than torch itself a
# result in each dtype may be.
ORACLE_TOL = {
    torch.float32: TOL[torch.float32],
    torch.bfloat16: dict(rtol=2**-8, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-7),
}


@contextlib.contextmanager
def cpp_knob(name: str, value: int):
    """A C++ testing knob (torch.ops.linclass.<name>: sets a value, returns the previous
    one) set for the block; nothing without the C++ extension."""
    knob = getattr(torch.ops.linclass, name, None) if linclass._extension.HAS_CPP else None
    old = knob(value) if knob is not None else None
    try:
        yield
    finally:
        if knob is not None:
            knob(old)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def run(fn, input, *args, grad_output=None, **kwargs):
    """loss and d(sum(loss * grad_output))/d input for a fresh leaf copy of input."""
    x = leaf(input)
    loss = fn(x, *args, **kwargs)
    g = torch.ones_like(loss) if grad_output is None else grad_output
    (grad,) = torch.autograd.grad(loss, x, g)
    return loss.detach(), grad


def assert_close(actual, expected, dtype, what=""):
    torch.testing.assert_close(actual, expected, equal_nan=True, msg=lambda m: f"{what}: {m}",
                               **TOL.get(dtype, {}))


def _double(v):
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def compare_with_torch(lc_fn, torch_fn, input, *args, grad_output=None, extra_rtol=0.0, **kwargs):
    """Same shapes and dtypes as torch; values equal to torch's in float64 and, in
    float32 / float16 / bfloat16, no further from torch's float64 result than torch's own
    result in that dtype is (elementwise, up to ORACLE_TOL: about one unit in the last
    place below float32, plus `extra_rtol` relative).  torch's own low-precision cross-entropy gradient is off by up
    to ~2% (its log-softmax is rounded to bfloat16 first), so it is no reference there."""
    loss, grad = run(lc_fn, input, *args, grad_output=grad_output, **kwargs)
    ref_loss, ref_grad = run(torch_fn, input, *args, grad_output=grad_output, **kwargs)
    assert loss.shape == ref_loss.shape and loss.dtype == ref_loss.dtype
    assert grad.shape == ref_grad.shape and grad.dtype == ref_grad.dtype
    if input.dtype not in ORACLE_TOL:
        assert_close(loss, ref_loss, input.dtype, "loss")
        assert_close(grad, ref_grad, input.dtype, "grad")
        return
    oracle = run(torch_fn, input.double(), *[_double(a) for a in args],
                 grad_output=_double(grad_output), **{k: _double(v) for k, v in kwargs.items()})
    tol = ORACLE_TOL[input.dtype]
    for what, ours, theirs, best in zip(("loss", "grad"), (loss, grad), (ref_loss, ref_grad), oracle):
        assert torch.equal(ours.isnan(), theirs.isnan()), what
        ok = ~best.isnan()
        err_ours = (ours.double() - best)[ok].abs()
        err_torch = (theirs.double() - best)[ok].abs()
        bound = err_torch + tol["atol"] + (tol["rtol"] + extra_rtol) * best[ok].abs()
        assert (err_ours <= bound).all(), (
            f"{what}: max error {err_ours.max().item():.3g} vs torch {input.dtype} "
            f"{err_torch.max().item():.3g}")


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def low_precision_check(lc_fn, torch_fn, input32, dtype, *args, slack=2e-3, torch_has_dtype=True,
                        **kwargs):
    """Our error in `dtype` (relative to the fp32 oracle) must not exceed torch's error
    in the same dtype by more than `slack` (or `slack` alone when torch lacks the dtype)."""
    oracle_loss, oracle_grad = run(torch_fn, input32, *args, **kwargs)
    low = input32.to(dtype)
    loss, grad = run(lc_fn, low, *args, **{k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()})
    assert loss.dtype == dtype and grad.dtype == dtype
    ours = (rel_error(loss, oracle_loss), rel_error(grad, oracle_grad))
    if torch_has_dtype:
        t_loss, t_grad = run(torch_fn, low, *args, **{k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()})
        theirs = (rel_error(t_loss, oracle_loss), rel_error(t_grad, oracle_grad))
    else:
        theirs = (0.0, 0.0)
    assert ours[0] <= theirs[0] + slack, (ours, theirs)
    assert ours[1] <= theirs[1] + slack, (ours, theirs)
    return ours, theirs


def assert_deterministic(fn, input, *args, **kwargs):
    """Bitwise-equal loss and gradient on a repeat call and with a different thread count."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in [threads, threads, 1]:
            torch.set_num_threads(n)
            results.append(run(fn, input, *args, **kwargs))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
