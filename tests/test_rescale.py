"""Backward of the fused ops: the saved gradient times grad_output, including the
device-side rescale that CUDA uses (kernels/scale.py: no host synchronization, nothing
done when grad_output is 1), forced here onto CPU tensors under the Triton interpreter,
and repeated backward passes through one graph (retain_graph=True), which must not see
the buffers that an earlier backward handed to autograd."""

import pytest
import torch
import torch.nn.functional as F

import linclass
from linclass import _ops

LOSSES = [
    (linclass.cross_entropy, F.cross_entropy),
    (linclass.multi_margin_loss, F.multi_margin_loss),
]


@pytest.fixture(params=["host-check", "device-rescale"])
def rescale_mode(request, monkeypatch, kernel_backend):
    """The autograd of the C++ and the Triton ops (linclass/_ops.py) reads grad_output on
    the host for CPU tensors, or rescales on the device (kernels/scale.py, what CUDA
    runs)."""
    if request.param == "device-rescale" and kernel_backend != "triton":
        pytest.skip("the device-side rescale belongs to the Triton backend")
    monkeypatch.setattr(_ops, "DEVICE_RESCALE_ON_CPU", request.param == "device-rescale")
    return request.param


@pytest.mark.parametrize("fns", LOSSES, ids=["cross_entropy", "multi_margin_loss"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_twice_with_different_grad_outputs(rescale_mode, fns, reduction):
    ours, theirs = fns
    x = torch.randn(9, 7, dtype=torch.float64)
    t = torch.randint(0, 7, (9,))
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    loss_a = ours(a, t, reduction=reduction)
    loss_b = theirs(b, t, reduction=reduction)
    for go in (1.0, 2.5, -0.5, 1.0):  # accumulates into .grad like any torch op
        g = torch.tensor(go, dtype=torch.float64)
        loss_a.backward(g, retain_graph=True)
        loss_b.backward(g, retain_graph=True)
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("fns", LOSSES, ids=["cross_entropy", "multi_margin_loss"])
@pytest.mark.parametrize("shape", [(9, 7), (7,), (4, 5, 3)])
def test_per_row_grad_outputs_backward_twice(rescale_mode, fns, shape):
    """reduction='none': the per-row scale is made in the saved buffer when the graph is
    not kept, in a new tensor when it is; a grad_output that is one value expanded (the
    backward of loss.sum()) scales as a scalar.  Each backward in turn, as torch's."""
    ours, theirs = fns
    if len(shape) > 2 and theirs is F.multi_margin_loss:
        pytest.skip("multi_margin_loss takes (C,) or (N, C) scores")
    x = torch.randn(shape, dtype=torch.float64)
    t = torch.randint(0, shape[1 if len(shape) > 1 else 0], (shape[0],) + shape[2:]) if len(shape) > 1 else torch.tensor(2)
    weights = torch.rand(t.shape, dtype=torch.float64)
    steps = [lambda loss: (loss * weights).sum(), lambda loss: loss.sum() * 3.0,
             lambda loss: loss.sum(), lambda loss: loss.mean()]
    for keep in (True, False):
        for step in steps:
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            loss_a, loss_b = ours(a, t, reduction="none"), theirs(b, t, reduction="none")
            for _ in range(2 if keep else 1):
                step(loss_a).backward(retain_graph=keep)
                step(loss_b).backward(retain_graph=keep)
                torch.testing.assert_close(a.grad, b.grad)


def test_expanded_grad_output_scales_as_one_value(kernel_backend, monkeypatch):
    """The backward of loss.sum() over reduction='none' hands each row the same value
    through a stride-0 tensor: the saved gradient is rescaled as by a scalar (nothing
    to do for 1), not multiplied row by row."""
    if kernel_backend == "torch":
        pytest.skip("the torch backend runs torch's own autograd")
    scalars = []
    rescale = _ops._rescale
    monkeypatch.setattr(_ops, "_rescale", lambda saved, g: scalars.append(g.dim()) or rescale(saved, g))
    x = torch.randn(6, 9, requires_grad=True)
    t = torch.randint(0, 9, (6,))
    linclass.cross_entropy(x, t, reduction="none").sum().backward()
    assert scalars == [0]
    ref = x.detach().clone().requires_grad_()
    F.cross_entropy(ref, t, reduction="none").sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


@pytest.mark.parametrize("go", [1.0, 3.0, 0.0])
def test_one_backward_scales_once(rescale_mode, go):
    x = torch.randn(5, 12, dtype=torch.float32, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    t = torch.randint(0, 12, (5,))
    (linclass.cross_entropy(x, t) * go).backward()
    (F.cross_entropy(y, t) * go).backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_linear_loss_backward_twice(rescale_mode):
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 3, (6,))
    refs = [v.detach().clone().requires_grad_() for v in (x, w, b)]
    loss = linclass.linear_cross_entropy(x, w, t, b)
    ref = F.cross_entropy(F.linear(*refs[:2], refs[2]), t)
    for go in (2.0, 1.0):
        loss.backward(torch.tensor(go, dtype=torch.float64), retain_graph=True)
        ref.backward(torch.tensor(go, dtype=torch.float64), retain_graph=True)
        for ours, theirs in zip((x, w, b), refs):
            torch.testing.assert_close(ours.grad, theirs.grad)


@pytest.mark.skipif(not linclass.backends.runs_on("triton", "cpu"), reason="needs the Triton interpreter")
@pytest.mark.parametrize("n", [0, 1, 4097, 3 * 4096 * 2 + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scale_kernel(n, dtype, monkeypatch):
    from linclass.kernels import scale

    monkeypatch.setattr(scale, "MAX_PROGRAMS", 2)  # exercise the grid-stride loop
    g = torch.randn(n, dtype=dtype)
    for go in (1.0, -2.0):
        out = g.clone()
        scale.scale_([out], torch.tensor(go, dtype=dtype))
        torch.testing.assert_close(out, (g.double() * go).to(dtype))
    # a non-contiguous gradient is scaled in place as well
    m = torch.randn(6, 5, dtype=dtype).t()
    out = m.clone().t().contiguous().t()
    scale.scale_([out], torch.tensor(3.0, dtype=dtype))
    torch.testing.assert_close(out, (m.double() * 3).to(dtype))
