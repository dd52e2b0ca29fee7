"""Bad input raises the exception torch raises (a clear message, never a crash)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import linclass
from linclass import _ops
from helpers import compare_with_torch, run

x = torch.randn(4, 5)
t = torch.tensor([0, 1, 4, 2])

CE_CASES = {
    "target >= C": (x, torch.tensor([0, 1, 5, 2]), {}),
    "negative target": (x, torch.tensor([0, 1, -2, 2]), {}),
    "target == C in K-dim": (torch.randn(2, 3, 4), torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]]), {}),
    "int32 target": (x, t.int(), {}),
    "batch mismatch": (x, t[:3], {}),
    "2-D target for 2-D input": (x, t.view(4, 1), {}),
    "K-dim target mismatch": (torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.long), {}),
    "float target of wrong shape": (x, torch.rand(4, 4), {}),
    "float target with ignore_index": (x, torch.rand(4, 5), {"ignore_index": 1}),
    "weight of wrong size": (x, t, {"weight": torch.ones(4)}),
    "2-D weight": (x, t, {"weight": torch.ones(1, 5)}),
    "weight of wrong dtype": (x, t, {"weight": torch.ones(5, dtype=torch.float64)}),
    "integer weight": (x, t, {"weight": torch.ones(5, dtype=torch.long)}),
    "unknown reduction": (x, t, {"reduction": "avg"}),
    "label_smoothing > 1": (x, t, {"label_smoothing": 1.5}),
    "integer input": (x.long(), t, {}),
    "0-d input": (torch.tensor(1.0), torch.tensor(0), {}),
    "1-D input, 2-element target": (torch.randn(5), torch.tensor([3, 1]), {}),
    "1-D input, 2-D target": (torch.randn(5), torch.tensor([[1]]), {}),
    "ignore_index beyond int64": (x, t, {"ignore_index": 2**70}),
    "C = 0": (torch.randn(3, 0), torch.zeros(3, dtype=torch.long), {}),
    "list target": (x, [0, 1, 4, 2], {}),
    "None target": (x, None, {}),
    "float ignore_index": (x, t, {"ignore_index": 1.0}),
    "bool ignore_index": (x, t, {"ignore_index": True}),
    "string label_smoothing": (x, t, {"label_smoothing": "0.1"}),
}

MM_CASES = {
    "target >= C": (x, torch.tensor([0, 1, 5, 2]), {}),
    "negative target": (x, torch.tensor([0, 1, -1, 2]), {}),
    "int32 target": (x, t.int(), {}),
    "float target": (x, t.float(), {}),
    "batch mismatch": (x, t[:3], {}),
    "2-D target": (x, t.view(4, 1), {}),
    "p = 3": (x, t, {"p": 3}),
    "weight of wrong size": (x, t, {"weight": torch.ones(4)}),
    "weight of wrong dtype": (x, t, {"weight": torch.ones(5, dtype=torch.float64)}),
    "unknown reduction": (x, t, {"reduction": "x"}),
    "3-D input": (torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long), {}),
    "C = 0": (torch.randn(3, 0), torch.zeros(3, dtype=torch.long), {}),
    "integer input": (x.long(), t, {}),
    "list target": (x, [0, 1, 4, 2], {}),
    "2-D weight": (x, t, {"weight": torch.ones(1, 5)}),
    "string margin": (x, t, {"margin": "1"}),
    "1-D tensor margin": (x, t, {"margin": torch.tensor([1.0])}),
}


def _raised(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        return e
    return None


def _check(ours_fn, torch_fn, case):
    inp, tgt, kw = case
    theirs = _raised(torch_fn, inp, tgt, **kw)
    assert theirs is not None, "torch accepts this input: not a bad-input case"
    ours = _raised(ours_fn, inp, tgt, **kw)
    assert ours is not None, f"linclass accepted input torch rejects ({theirs!r})"
    # torch's C++ errors subclass RuntimeError; ours must be catchable the same way.
    assert isinstance(ours, type(theirs)) or type(theirs) in type(ours).__mro__, (ours, theirs)
    assert str(ours)
    return ours


@pytest.mark.parametrize("name", list(CE_CASES))
def test_cross_entropy_rejects(kernel_backend, name):
    _check(linclass.cross_entropy, F.cross_entropy, CE_CASES[name])


@pytest.mark.parametrize("name", list(MM_CASES))
def test_multi_margin_loss_rejects(kernel_backend, name):
    _check(linclass.multi_margin_loss, F.multi_margin_loss, MM_CASES[name])


@pytest.mark.parametrize("value", [np.int64(1), torch.tensor(1), -100])
def test_ignore_index_takes_what_torch_takes(kernel_backend, value):
    tgt = torch.tensor([0, 1, 1, 3])
    compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, tgt, ignore_index=value)


@pytest.mark.parametrize("value", [np.float32(0.5), torch.tensor(0.5), 2, True])
def test_margin_takes_what_torch_takes(kernel_backend, value):
    compare_with_torch(linclass.multi_margin_loss, F.multi_margin_loss, x, t, margin=value)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_infinite_margin_gives_torch_infinite_loss(kernel_backend, reduction):
    # Every term is infinite: inf like torch, not NaN (the C++ lane path's row-less
    # padding lanes once made it 0 * inf); the gradient is finite for p = 1.
    for rows in (4, 40):
        inp, tgt = torch.randn(rows, 5), torch.randint(0, 5, (rows,))
        ours = run(linclass.multi_margin_loss, inp, tgt, margin=float("inf"), reduction=reduction)
        theirs = run(F.multi_margin_loss, inp, tgt, margin=float("inf"), reduction=reduction)
        assert torch.equal(ours[0], theirs[0]) and ours[0].isinf().all()
        torch.testing.assert_close(ours[1], theirs[1])


def test_fused_linear_ops_reject_a_target_that_is_not_a_tensor(kernel_backend):
    w = torch.randn(5, 3)
    for op in (linclass.linear_cross_entropy, linclass.linear_multi_margin_loss):
        with pytest.raises(TypeError, match="target must be a Tensor"):
            op(torch.randn(4, 3), w, [0, 1, 2, 3])


def test_out_of_range_target_names_index_and_value(kernel_backend):
    e = _raised(linclass.cross_entropy, torch.randn(2, 3, 4), torch.tensor([[0, 1, 2, 0], [0, 7, 0, 0]]))
    assert isinstance(e, IndexError) and "target[1, 1] = 7" in str(e), e
    e = _raised(linclass.multi_margin_loss, x, torch.tensor([0, 1, 2, -3]))
    assert isinstance(e, RuntimeError) and "target[3] = -3" in str(e), e


@pytest.mark.parametrize("bad", [-1, 10, 2**32 + 3, -(2**40)])
@pytest.mark.parametrize("kw", [{}, {"ignore_index": 4}, {"weight": torch.rand(10)}])
def test_first_bad_target_is_named_among_many_rows(kernel_backend, bad, kw):
    # Several thousand rows: several blocks and full SIMD tiles, where the C++ lane path
    # checks the targets inside the kernel; the earliest bad row must be the one named,
    # whatever block finds it first.  2**32 + 3 is in range in its low 32 bits.
    if kernel_backend != "cpp" and abs(bad) >= 2**31:
        pytest.skip("huge targets are checked by the C++ kernels only here")
    n = 5000
    tgt = torch.randint(0, 10, (n,))
    tgt[4321], tgt[2345], tgt[4999] = bad, bad, 11
    inp = torch.randn(n, 10, requires_grad=True)
    e = _raised(linclass.cross_entropy, inp, tgt, **kw)
    assert isinstance(e, IndexError) and f"target[2345] = {bad}" in str(e), e
    if "ignore_index" not in kw:
        e = _raised(linclass.multi_margin_loss, inp, tgt, **kw)
        assert isinstance(e, RuntimeError) and f"target[2345] = {bad}" in str(e), e


def test_weight_requiring_grad_is_rejected_like_torch(kernel_backend):
    w = torch.ones(5, requires_grad=True)
    for ours, theirs in [(linclass.cross_entropy, F.cross_entropy),
                         (linclass.multi_margin_loss, F.multi_margin_loss)]:
        _check(lambda a, b: ours(a.requires_grad_(), b, weight=w),
               lambda a, b: theirs(a.requires_grad_(), b, weight=w), (x.clone(), t, {}))


def test_raw_ops_check_arguments(kernel_backend):
    ce_op = torch.ops.linclass.cross_entropy
    with pytest.raises(RuntimeError, match="int64"):
        ce_op(x, t.int(), None, -100, 0.0, 1, False)
    with pytest.raises(RuntimeError, match="reduction"):
        ce_op(x, t, None, -100, 0.0, 7, False)
    with pytest.raises(RuntimeError, match="batch size"):
        ce_op(x, t[:2], None, -100, 0.0, 1, False)
    # On the stable ABI a C++ kernel can only raise RuntimeError: the raw op tags the
    # message, the public functions (and _ops.call_cpp) raise the IndexError torch would.
    with pytest.raises(RuntimeError, match=r"^\[IndexError\] cross_entropy: target"):
        ce_op(x, t + 10, None, -100, 0.0, 1, True)
    with pytest.raises(IndexError, match="^cross_entropy: target"):
        _ops.call_cpp(ce_op, x, t + 10, None, -100, 0.0, 1, True)
    margin_op = torch.ops.linclass.multi_margin_loss
    with pytest.raises(RuntimeError, match="p == 1"):
        margin_op(x, t, 3, 1.0, None, 1, False)
    with pytest.raises(RuntimeError, match="weight"):
        margin_op(x, t, 1, 1.0, torch.ones(3), 1, False)


def test_backward_without_saved_gradient_is_an_error(kernel_backend):
    xr = x.clone().requires_grad_()
    loss, _ = torch.ops.linclass.cross_entropy(xr, t, None, -100, 0.0, 1, False)
    with pytest.raises(RuntimeError, match="compute_grad"):
        loss.backward()


def test_double_backward_is_an_error(kernel_backend):
    xr = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(linclass.cross_entropy(xr, t), xr, create_graph=True)


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="needs the C++ kernels")
@pytest.mark.parametrize("op", [linclass.cross_entropy, linclass.multi_margin_loss])
def test_forward_mode_ad_is_an_error_not_a_lost_tangent(op):
    import torch.autograd.forward_ad as fwAD

    with linclass.backends.use("cpp"), fwAD.dual_level():
        dual = fwAD.make_dual(x.clone(), torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            op(dual, t)
