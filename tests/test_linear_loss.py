"""Fused linear + loss against the unfused torch composition."""

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F

import linclass
from linclass import _linear_blocks
from conftest import KERNEL_BACKENDS
from helpers import rel_error


@pytest.fixture(params=[(b, rows) for b in KERNEL_BACKENDS for rows in (0, 3)],
                ids=lambda p: f"{p[0]}-{'auto' if not p[1] else f'{p[1]}rows'}")
def linear_backend(request):
    """Each fused backend, with automatic blocks and with 3-row blocks (many blocks)."""
    backend, rows = request.param
    with _block_rows(rows), linclass.backends.use(backend):
        yield backend


@contextlib.contextmanager
def _block_rows(rows, none_block_bytes=1):
    """Rows per block of the C++ and (when installed) the Triton fused linear ops; with
    rows set, reduction='none' runs blocks of none_block_bytes of scores (default: one
    row per block; linclass._linear_blocks)."""
    triton_linear = None
    if linclass.backends.runs_on("triton", "cpu"):
        from linclass.kernels import linear_loss as triton_linear
    old = torch.ops.linclass._linear_block_rows(rows)
    old_block_bytes = _linear_blocks.BLOCK_BYTES
    if rows:
        _linear_blocks.BLOCK_BYTES = none_block_bytes
    if triton_linear:
        triton_linear.BLOCK_ROWS = rows
    try:
        yield
    finally:
        torch.ops.linclass._linear_block_rows(old)
        _linear_blocks.BLOCK_BYTES = old_block_bytes
        if triton_linear:
            triton_linear.BLOCK_ROWS = 0


def make(n, d, c, dtype=torch.float64, bias=True, transposed_weight=False):
    x = torch.randn(n, d, dtype=dtype)
    if transposed_weight:  # the seed keeps W as (D, C): W.t() must work without a copy
        w = torch.randn(d, c, dtype=dtype).t()
    else:
        w = torch.randn(c, d, dtype=dtype)
    b = torch.randn(c, dtype=dtype) if bias else None
    t = torch.randint(0, c, (n,))
    return x, w, b, t


def grads_of(fn, x, w, b, *args, **kwargs):
    """The loss and its gradients; a per-row loss ('none') weighted by a grad_output of
    its own per row (drawn from the loss's shape alone, the same for every fn)."""
    leaves = [v.detach().clone().requires_grad_(True) if v is not None else None for v in (x, w, b)]
    loss = fn(leaves[0], leaves[1], *args, bias=leaves[2], **kwargs)
    want = [v for v in leaves if v is not None]
    grad_output = None
    if loss.dim():
        g = torch.Generator().manual_seed(loss.numel())
        grad_output = torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype)
    grads = torch.autograd.grad(loss, want, grad_output)
    return loss.detach(), grads


def unfused_ce(x, w, t, bias=None, **kw):
    return F.cross_entropy(F.linear(x, w, bias), t, **kw)


def unfused_mm(x, w, t, bias=None, **kw):
    return F.multi_margin_loss(F.linear(x, w, bias), t, **kw)


def check(fused, unfused, x, w, b, t, rtol=1e-9, atol=1e-11, **kw):
    loss, grads = grads_of(fused, x, w, b, t, **kw)
    ref_loss, ref_grads = grads_of(unfused, x, w, b, t, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol, equal_nan=True)
    for g, r, name in zip(grads, ref_grads, ("input", "weight", "bias")):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")


SHAPES = [(1, 1, 1), (5, 1, 7), (9, 13, 1), (33, 17, 10), (40, 8, 40), (7, 16, 3000)]


@pytest.mark.parametrize("n,d,c", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transposed_weight", [False, True])
def test_cross_entropy_matches_unfused(linear_backend, n, d, c, bias, transposed_weight):
    x, w, b, t = make(n, d, c, bias=bias, transposed_weight=transposed_weight)
    for reduction, smoothing, ignore in itertools.product(["mean", "sum", "none"], [0.0, 0.2], [None, 0]):
        kw = dict(reduction=reduction, label_smoothing=smoothing)
        if ignore is not None:
            t2 = t.clone()
            t2[::2] = ignore
            kw["ignore_index"] = ignore
        else:
            t2 = t
        check(linclass.linear_cross_entropy, unfused_ce, x, w, b, t2, **kw)


@pytest.mark.parametrize("n,d,c", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_multi_margin_matches_unfused(linear_backend, n, d, c, bias):
    x, w, b, t = make(n, d, c, bias=bias, transposed_weight=True)
    for reduction, p, margin in itertools.product(["mean", "sum", "none"], [1, 2], [1.0, 0.3]):
        check(linclass.linear_multi_margin_loss, unfused_mm, x, w, b, t, p=p, margin=margin,
              reduction=reduction)


@pytest.mark.parametrize("bias", [True, False])
def test_empty_batch_gives_empty_and_zero_gradients(linear_backend, bias):
    # No rows: grad_input is empty, grad_weight and grad_bias zero; 'mean' is NaN for
    # cross-entropy as in torch (torch's own hinge returns uninitialized memory there,
    # so its sum / mean over no rows are checked by value).
    x, w, b, t = make(0, 6, 5, bias=bias)
    for reduction in ("mean", "sum"):
        check(linclass.linear_cross_entropy, unfused_ce, x, w, b, t, reduction=reduction)
        loss, grads = grads_of(linclass.linear_multi_margin_loss, x, w, b, t, reduction=reduction)
        assert loss.isnan() if reduction == "mean" else loss.item() == 0.0
        assert grads[0].shape == (0, 6)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])


def test_float32_large_classes(linear_backend):
    # float32 sums over 50257 classes round differently in different GEMM blockings:
    # ours must be no further from the float64 result than torch's float32 result is.
    x, w, b, t = make(6, 24, 50257, dtype=torch.float32)
    for fused, unfused in [(linclass.linear_cross_entropy, unfused_ce),
                           (linclass.linear_multi_margin_loss, unfused_mm)]:
        ours = grads_of(fused, x, w, b, t)
        theirs = grads_of(unfused, x, w, b, t)
        oracle = grads_of(unfused, x.double(), w.double(), b.double(), t)
        for o, th, ref in zip((ours[0],) + ours[1], (theirs[0],) + theirs[1], (oracle[0],) + oracle[1]):
            err = (o.double() - ref).abs().max()
            assert err <= (th.double() - ref).abs().max() * 2 + 1e-6 * ref.abs().max(), err


def test_noncontiguous_input_and_partial_grads(linear_backend):
    x, w, b, t = make(20, 30, 9)
    x = x[:, ::2]
    w = w[:, ::2]
    check(linclass.linear_cross_entropy, unfused_ce, x, w, b, t)
    # only the weight takes a gradient (the classic linear classifier: X is data)
    wl = w.clone().requires_grad_()
    (g,) = torch.autograd.grad(linclass.linear_cross_entropy(x, wl, t, b), wl)
    (ref,) = torch.autograd.grad(unfused_ce(x, wl, t, b), wl)
    torch.testing.assert_close(g, ref)



@pytest.mark.parametrize("n,d,c", [(33, 17, 10), (7, 16, 300), (300, 24, 40)])
def test_column_major_input(linear_backend, n, d, c):
    """x.t() of a (D, N) tensor: the unfused gradients, and (C++) the input's gradient
    in the input's strides, which autograd would otherwise copy it into; compiled too
    (the fake kernel must say those strides)."""
    for fused, unfused in ((linclass.linear_cross_entropy, unfused_ce),
                           (linclass.linear_multi_margin_loss, unfused_mm)):
        _, w, b, t = make(n, d, c)
        x = torch.randn(d, n, dtype=torch.float64).t()
        check(fused, unfused, x, w, b, t)
        if linear_backend == "cpp":
            op = getattr(torch.ops.linclass, fused.__name__)
            extra = (-100, 0.0) if fused is linclass.linear_cross_entropy else (1, 1.0)
            grad_input = op(x, w, b, t, *extra, 1, [True, True, True])[1]
            assert grad_input.stride() == x.stride()
    x = torch.randn(8, 12).t().requires_grad_()
    w = torch.randn(5, 8, requires_grad=True)
    t = torch.randint(0, 5, (12,))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w: linclass.linear_cross_entropy(x, w, t) * 2, fullgraph=True)
    compiled(x, w).backward()
    ref = x.detach().clone().requires_grad_()
    (unfused_ce(ref, w.detach(), t) * 2).backward()
    torch.testing.assert_close(x.grad, ref.grad)
    torch._dynamo.reset()


def test_label_smoothing_edge_values_match_unfused(linear_backend):
    """torch smooths only when the value is positive: negative and NaN mean none."""
    x, w, b, t = make(6, 5, 7)
    for smoothing in (-0.1, float("nan"), 1.0):
        check(linclass.linear_cross_entropy, unfused_ce, x, w, b, t, label_smoothing=smoothing)

def test_vector_input(linear_backend):
    x, w, b, t = make(1, 6, 4)
    check(linclass.linear_cross_entropy, unfused_ce, x[0], w, b, t[0])


@pytest.mark.parametrize("n,d,c", [(5, 1, 7), (33, 17, 10), (7, 16, 3000)])
@pytest.mark.parametrize("bias", [True, False])
def test_probability_targets_match_unfused(linear_backend, n, d, c, bias):
    """Probability targets: on the CPU kernel a block of rows at a time above one block
    of scores (linear_backend's 3rows: one row a block), else composed."""
    x, w, b, _ = make(n, d, c, bias=bias, transposed_weight=True)
    probs = torch.rand(n, c, dtype=torch.float64).softmax(1)
    probs[0] = 0.0
    probs[0, -1] = 1.0  # a one-hot row
    for reduction, smoothing in itertools.product(["mean", "sum", "none"], [0.0, 0.3]):
        check(linclass.linear_cross_entropy, unfused_ce, x, w, b, probs, reduction=reduction,
              label_smoothing=smoothing)


def test_probability_targets_take_blocks_only_on_the_cpu_kernel(monkeypatch):
    x, w, b, _ = make(40, 8, 30)
    x.requires_grad_()
    probs = torch.rand(40, 30, dtype=torch.float64).softmax(1)

    def node(*args, **kw):
        return type(linclass.linear_cross_entropy(*args, **kw).grad_fn).__name__

    assert "LinearLoss" not in node(x, w, probs, b)  # one block: composed
    monkeypatch.setattr(_linear_blocks, "BLOCK_BYTES", 39 * 30 * 8)
    assert "LinearLossBlocks" in node(x, w, probs, b)
    assert "LinearLossRows" in node(x, w, probs, b, reduction="none")
    with linclass.backends.use("torch"):
        assert "LinearLoss" not in node(x, w, probs, b)
    # a differentiable target gets its gradient (torch's path)
    p = probs.clone().requires_grad_()
    linclass.linear_cross_entropy(x, w, p, b).backward()
    assert p.grad is not None
    # torch's errors and mixed dtypes (torch promotes) are torch's
    with pytest.raises(RuntimeError, match="ignore_index"):
        linclass.linear_cross_entropy(x, w, probs, b, ignore_index=0)
    assert linclass.linear_cross_entropy(x, w, probs.float(), b).dtype == torch.float64


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_leading_dimensions_are_rows(linear_backend, reduction):
    """A (B, T, D) input with (B, T) targets (a transformer's hidden states and labels; also
    (B, T, C) probabilities) is B * T rows; the loss of 'none' has shape (B, T)."""
    x, w, b, t = make(12, 5, 7)
    t[4] = -100
    x3, t3 = x.reshape(3, 4, 5), t.reshape(3, 4)
    for fused, unfused, target, kw in (
            (linclass.linear_cross_entropy, unfused_ce, t3, dict(label_smoothing=0.1)),
            (linclass.linear_multi_margin_loss, unfused_mm, t3.clamp(min=0), dict(p=2)),
            (linclass.linear_cross_entropy, unfused_ce, torch.rand(3, 4, 7, dtype=x.dtype), {})):
        loss, grads = grads_of(fused, x3, w, b, target, reduction=reduction, **kw)
        flat = target.reshape(12, -1).squeeze(1)
        ref_loss, ref_grads = grads_of(unfused, x, w, b, flat, reduction=reduction, **kw)
        assert loss.shape == ((3, 4) if reduction == "none" else ())
        torch.testing.assert_close(loss, ref_loss.reshape(loss.shape), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(grads[0], ref_grads[0].reshape(3, 4, 5), rtol=1e-9, atol=1e-11)
        for g, r in zip(grads[1:], ref_grads[1:]):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    with pytest.raises(RuntimeError, match=r"\(\*, D\) with target \(\*\)"):
        linclass.linear_cross_entropy(x3, w, t, b)  # targets not shaped as the rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_relative_to_fp32(linear_backend, dtype):
    check_low_precision(*make(48, 32, 500, dtype=torch.float32), dtype)


def check_low_precision(x, w, b, t, dtype):
    """Loss and gradients in `dtype` no further from the float32 result than torch's
    (also per row, weighted per row in backward; and against probability targets)."""
    probs = torch.rand(t.shape[0], w.shape[0], dtype=torch.float64).softmax(1).to(x.dtype)
    for reduction, t in itertools.product(("mean", "none"), (t, probs)):
        oracle = grads_of(unfused_ce, x, w, b, t, reduction=reduction)
        low_t = t.to(dtype) if t.is_floating_point() else t
        ours = grads_of(linclass.linear_cross_entropy, x.to(dtype), w.to(dtype), b.to(dtype), low_t,
                        reduction=reduction)
        theirs = grads_of(unfused_ce, x.to(dtype), w.to(dtype), b.to(dtype), low_t,
                          reduction=reduction)
        for o, th, ref in zip((ours[0],) + ours[1], (theirs[0],) + theirs[1], (oracle[0],) + oracle[1]):
            assert o.dtype == dtype
            assert rel_error(o, ref) <= rel_error(th, ref) + 1e-2


def same_for_thread_counts(x, w, b, t, counts, **kw):
    """linear_cross_entropy's loss and gradients with torch's thread count set to each of
    `counts` in turn (None: the current one), asserted bitwise equal; returns them."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in counts:
            torch.set_num_threads(n or threads)
            results.append(grads_of(linclass.linear_cross_entropy, x, w, b, t, **kw))
    finally:
        torch.set_num_threads(threads)
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert all(torch.equal(g, r) for g, r in zip(grads, results[0][1]))
    return results[0]


# small-C sub-blocks (6000 x 40: two blocks, class groups where built), the BLAS blocks
@pytest.mark.parametrize("d,c", [(20, 12), (2000, 10), (6000, 40), (40, 300)])
def test_deterministic_across_threads(linear_backend, d, c):
    if linear_backend == "triton" and d > 100:
        pytest.skip("the Triton path's GEMMs are torch's; thread-count independence is the C++ path's")
    x, w, b, t = make(300, d, c, dtype=torch.float32)
    same_for_thread_counts(x, w, b, t, [None, None, 1], label_smoothing=0.1)



# A few rows (N <= 16, unit-stride rows), C past the register-blocked products: the C++
# path's own products (csrc/cpu/skinny_gemm.h) instead of the BLAS.  D = 1024 puts rows
# 4 KiB apart; D = 37 and C = 7103 leave tails in every vector loop and class group;
# the small weights run on one thread, or on a few chunks shared by the threads.
# 17-64 rows with a cache-resident weight take them too, their backward 16 rows at a
# time, dW summed over the chunks (a full chunk and one row; two full chunks; tails).
# The scores from transposed weight tiles (score_lanes: D <= 64, or 8 rows and more):
# 1-2 rows 4 tiles at once, 3-7 rows 2 (groups with empty tiles past C), D at 64 and 65
# on either side of the row limit, 33-64 rows; 65-1024 rows of at most 64 features (and
# 65 x 65, the BLAS blocks beside them).
SKINNY = [(1, 1024, 300), (5, 37, 7103), (8, 1024, 257), (9, 64, 4099), (16, 300, 1000),
          (13, 20000, 150),  # dX partials capped by memory, 3 chunks
          (1, 3, 70), (2, 17, 131), (16, 40, 300), (11, 5, 1000),
          (17, 48, 300), (32, 64, 1000), (25, 5, 100), (30, 130, 97),
          (3, 64, 100), (4, 65, 300), (7, 1, 33), (8, 65, 170), (33, 100, 77), (64, 16, 700),
          (50, 512, 130),
          (65, 64, 300), (200, 3, 1000), (1024, 16, 70), (65, 65, 100)]  # 65-1024 rows at D <= 64


def _cpp_only():
    if "cpp" not in linclass.backends.available():
        pytest.skip("needs the C++ kernels")
    return linclass.backends.use("cpp")


@contextlib.contextmanager
def _knob(op, value):
    """A C++ testing knob (an op that sets a value and returns the previous one), set
    for the block."""
    old = op(value)
    try:
        yield
    finally:
        op(old)


def _16bit_products(mode):
    """The C++ ops' 16-bit weight-gradient products: 0 float32, 1 the input dtype."""
    return _knob(torch.ops.linclass._linear_16bit_products, mode)


# 16-bit weight gradients on the CPU (csrc/linear_blocks.h): float32 products of converted
# operands (one rounding), or products in the input dtype summed in float32 (one block:
# F.linear's backward; several: one rounding more per block), each measured against the
# float64 gradients of the same 16-bit inputs, next to torch's error in that dtype.  With
# 16 blocks the float32 sum of the blocks' products stays within torch's error, while a
# running sum kept in the input dtype exceeds the bound (bench/results/linear-16bit.md).
@pytest.mark.parametrize("products", [0, 1])
@pytest.mark.parametrize("rows", [0, 6])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_weight_gradient_error(products, rows, dtype):
    with _cpp_only(), _block_rows(rows), _16bit_products(products):
        x, w, b, t = make(96, 64, 300, dtype=torch.float32)
        x, w, b = x.to(dtype), (w * 0.2).to(dtype), b.to(dtype)
        exact_loss, exact = grads_of(unfused_ce, x.double(), w.double(), b.double(), t)
        our_loss, ours = grads_of(linclass.linear_cross_entropy, x, w, b, t)
        their_loss, theirs = grads_of(unfused_ce, x, w, b, t)
        bounds = (1.1, 1.2 if products and rows else 1.1, 1.1)  # input, weight, bias
        for name, o, th, ex, bound in zip(("input", "weight", "bias"), ours, theirs, exact, bounds):
            assert o.dtype == dtype
            assert rel_error(o, ex) <= bound * rel_error(th, ex) + 1e-6, name
        # The loss, from scores rounded to the input dtype as F.linear's (products 0:
        # made in float32 from converted operands, then rounded).
        assert abs(our_loss.double() - exact_loss) <= 2 * abs(their_loss.double() - exact_loss) + 1e-3 * abs(exact_loss)


@pytest.mark.parametrize("n,d,c", SKINNY)
@pytest.mark.parametrize("bias", [True, False])
def test_few_rows_match_unfused(n, d, c, bias):
    with _cpp_only():
        x, w, b, t = make(n, d, c, bias=bias)
        check(linclass.linear_cross_entropy, unfused_ce, x, w, b, t, label_smoothing=0.1)
        check(linclass.linear_multi_margin_loss, unfused_mm, x, w, b, t, p=2)


@pytest.mark.parametrize("wants", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, True, True)])
def test_few_rows_large_weight_partial_grads_and_strided_input(wants):
    """Each gradient alone and together; X's rows strided inside a wider tensor (a view
    of the leaf: a clone of the view would be contiguous)."""
    with _cpp_only():
        x, w, b, t = make(6, 1024 + 5, 300)
        w = w[:, :1024].contiguous()
        leaves = [v.clone().requires_grad_(want) for v, want in zip((x, w, b), wants)]
        x_rows = leaves[0][:, :1024]
        assert x_rows.stride(0) == 1024 + 5
        ours = torch.autograd.grad(linclass.linear_cross_entropy(x_rows, leaves[1], t, leaves[2]),
                                   [v for v in leaves if v.requires_grad])
        ref = torch.autograd.grad(unfused_ce(x_rows, leaves[1], t, leaves[2]),
                                  [v for v in leaves if v.requires_grad])
        for g, r in zip(ours, ref):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d,c", [(2, 7, 100), (9, 64, 301), (40, 100, 90), (5, 70, 50)])
def test_few_rows_row_strided_weight(n, d, c, dtype):
    """W's rows further apart than D (a view of a wider leaf): the transposed score tiles
    and the backward read them at W's row stride."""
    with _cpp_only():
        x, w, b, t = make(n, d + 5, c, dtype=dtype)
        x = x[:, :d].contiguous()
        tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        for fused, unfused, kw in ((linclass.linear_cross_entropy, unfused_ce, dict(label_smoothing=0.1)),
                                   (linclass.linear_multi_margin_loss, unfused_mm, {})):
            results = []
            for fn in (fused, unfused):
                leaves = [v.clone().requires_grad_() for v in (x, w, b)]
                rows = leaves[1][:, :d]
                assert rows.stride(0) == d + 5
                loss = fn(leaves[0], rows, t, leaves[2], **kw)
                results.append((loss, *torch.autograd.grad(loss, leaves)))
            for ours, ref in zip(*results):
                torch.testing.assert_close(ours, ref, **tol)
            assert not results[0][2][:, d:].any()


# (1, 3073, 64) and (8, 1024, 32): few rows that the register-blocked products' class
# count would take, on the few-row ones (few_rows_beat_small_gemm).
@pytest.mark.parametrize("n,d,c", [(12, 1024, 600), (5, 40, 700), (32, 64, 1000), (21, 300, 200),
                                   (1, 3073, 64), (8, 1024, 32), (40, 16, 700), (3, 33, 1000),
                                   (300, 20, 500)])
def test_few_rows_float32_deterministic_across_threads(n, d, c):
    with _cpp_only():
        x, w, b, t = make(n, d, c, dtype=torch.float32)
        first = same_for_thread_counts(x, w, b, t, [None, 1, 3])
        # In float32: no further from the float64 result than torch's float32 composition.
        oracle = grads_of(unfused_ce, x.double(), w.double(), b.double(), t)
        theirs = grads_of(unfused_ce, x, w, b, t)
        for ours, th, ref in zip((first[0],) + first[1], (theirs[0],) + theirs[1],
                                 (oracle[0],) + oracle[1]):
            assert rel_error(ours, ref) <= 2 * rel_error(th, ref) + 1e-7

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_score_matrix_is_allocated(linear_backend, reduction):
    # N x C would be 2048 * 300 * 4 bytes; with blocks, nothing that large exists
    # ('none': blocks of 64 rows in the forward and again in the backward).
    from torch.profiler import ProfilerActivity, profile

    x, w, b, t = make(2048, 8, 300, dtype=torch.float32)
    w = w.requires_grad_()
    grad_output = torch.rand(2048) if reduction == "none" else None
    probs = torch.rand(2048, 300).softmax(1)
    with (_block_rows(64, none_block_bytes=64 * 300 * 4),
          profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof):
        for fn in (linclass.linear_cross_entropy, linclass.linear_multi_margin_loss):
            fn(x, w, t, b, reduction=reduction).backward(grad_output)
        if linear_backend == "cpp":  # probability targets: blocks on the CPU kernel only
            linclass.linear_cross_entropy(x, w, probs, b, reduction=reduction).backward(grad_output)
    biggest = max((e.self_cpu_memory_usage for e in prof.events()), default=0)
    assert biggest < 2048 * 300 * 4 // 4, biggest


def test_none_within_one_block_composes_and_above_runs_blocks(monkeypatch):
    """reduction='none' composes F.linear and the loss while the scores fit one block
    (no more memory, one GEMM fewer), and runs blocks above."""
    x, w, b, t = make(40, 8, 30)
    x.requires_grad_()
    assert "LinearLossRows" not in type(linclass.linear_cross_entropy(x, w, t, b, reduction="none").grad_fn).__name__
    monkeypatch.setattr(_linear_blocks, "BLOCK_BYTES", 39 * 30 * 8)
    for fn in (linclass.linear_cross_entropy, linclass.linear_multi_margin_loss):
        assert "LinearLossRows" in type(fn(x, w, t, b, reduction="none").grad_fn).__name__


def test_errors(linear_backend):
    x, w, b, t = make(4, 5, 3, dtype=torch.float32)
    for reduction in ("mean", "none"):  # 'none': blocks of one row with linear_backend's 3rows
        with pytest.raises(IndexError, match=r"cross_entropy: target\[2\] = 7"):
            linclass.linear_cross_entropy(x, w, torch.tensor([0, 1, 7, 2]), b, reduction=reduction)
        with pytest.raises(RuntimeError, match=r"multi_margin_loss: target\[2\] = -1"):
            linclass.linear_multi_margin_loss(x, w, torch.tensor([0, 1, -1, 2]), b,
                                              reduction=reduction)
    with pytest.raises(RuntimeError, match=r"weight must be \(C, D\)"):
        linclass.linear_cross_entropy(x, w.t(), t, b)
    with pytest.raises(RuntimeError, match="bias"):
        linclass.linear_cross_entropy(x, w, t, torch.randn(4))
    with pytest.raises(RuntimeError, match="dtype"):
        linclass.linear_cross_entropy(x, w.double(), t, b)
    with pytest.raises(ValueError, match="one class index per input row"):
        linclass.linear_cross_entropy(x, w, t[:3], b)
    with pytest.raises(ValueError, match="reduction"):
        linclass.linear_cross_entropy(x, w, t, b, reduction="avg")
    with pytest.raises(ValueError, match="p == 1"):
        linclass.linear_multi_margin_loss(x, w, t, b, p=3)


def _linear_ops(name):
    ops = [getattr(torch.ops.linclass, name).default]
    if linclass.backends.runs_on("triton", "cpu"):
        ops.append(getattr(torch.ops.linclass, f"{name}_triton").default)
    return ops


@pytest.mark.parametrize("op", _linear_ops("linear_cross_entropy") + _linear_ops("linear_multi_margin_loss"), ids=str)
def test_opcheck(op):
    x, w, b, t = make(6, 4, 5)
    extra = (-100, 0.1) if "cross_entropy" in str(op) else (2, 0.5)
    for mask in ([True, True, True], [False, True, False]):
        args = (x.requires_grad_(mask[0]), w.requires_grad_(mask[1]), b.requires_grad_(mask[2]), t,
                *extra, 1, mask)
        torch.library.opcheck(op, args)
    # a column-major input, whose gradient the C++ kernel lays out as the input
    xt = torch.randn(4, 6, dtype=torch.float64).t().requires_grad_()
    torch.library.opcheck(op, (xt, w, b, t, *extra, 2, [True, True, True]))


def test_compile_fullgraph(linear_backend):
    x, w, b, t = make(16, 8, 6, dtype=torch.float32)

    def f(x, w, b):
        return linclass.linear_cross_entropy(x, w, t, b) + linclass.linear_multi_margin_loss(x, w, t, b)

    probs = torch.rand(16, 6).softmax(1)

    def per_row(x, w, b):  # 'none' weighted per row: blocks of one row (_block_rows)
        return ((linclass.linear_cross_entropy(x, w, t, b, reduction="none")
                 + linclass.linear_multi_margin_loss(x, w, t, b, reduction="none")
                 + linclass.linear_cross_entropy(x, w, probs, b, reduction="none"))
                * torch.arange(1.0, 17.0)).sum() + linclass.linear_cross_entropy(x, w, probs, b)

    for fn in (f, per_row):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        leaves = [v.clone().requires_grad_() for v in (x, w, b)]
        ref_leaves = [v.clone().requires_grad_() for v in (x, w, b)]
        compiled(*leaves).backward()
        fn(*ref_leaves).backward()
        for a, r in zip(leaves, ref_leaves):
            torch.testing.assert_close(a.grad, r.grad)


def test_modules_match_linear_plus_loss(linear_backend):
    torch.manual_seed(0)
    ours = linclass.nn.LinearCrossEntropyLoss(12, 7, label_smoothing=0.1)
    linear = torch.nn.Linear(12, 7)
    linear.load_state_dict(ours.state_dict())
    x, t = torch.randn(30, 12), torch.randint(0, 7, (30,))
    a = ours(x, t)
    r = F.cross_entropy(linear(x), t, label_smoothing=0.1)
    a.backward()
    r.backward()
    torch.testing.assert_close(a, r)
    torch.testing.assert_close(ours.weight.grad, linear.weight.grad)
    torch.testing.assert_close(ours.bias.grad, linear.bias.grad)
    svm = linclass.nn.LinearMultiMarginLoss(12, 7, bias=False, p=2)
    torch.testing.assert_close(svm(x, t), F.multi_margin_loss(svm.scores(x), t, p=2))


# ---- the one-kernel Triton path for few classes (kernels/linear_tile.py) ----------------
# float32 and 16-bit inputs with C <= 64 go through it; the tests above run it at float32
# where they use float32 (the float64 ones take the chunked path).  Here every keyword,
# odd shapes and several row blocks per program, against the unfused float64 result.

needs_triton = pytest.mark.skipif(not linclass.backends.runs_on("triton", "cpu"),
                                  reason="needs the Triton interpreter")


@pytest.fixture
def tile_path(monkeypatch):
    from linclass.kernels import linear_tile

    monkeypatch.setattr(linear_tile, "PROGRAMS", 2)  # programs walk several row blocks
    with linclass.backends.use("triton"):
        yield linear_tile


def check_fp32_against_fp64(fused, unfused, x, w, b, t, **kw):
    loss, grads = grads_of(fused, x, w, b, t, **kw)
    ref_loss, ref_grads = grads_of(unfused, *(v.double() if v is not None else None for v in (x, w, b)), t, **kw)
    assert loss.dtype == x.dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5, equal_nan=True)
    for g, r, name in zip(grads, ref_grads, ("input", "weight", "bias")):
        assert g.dtype == x.dtype
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def check_cross_entropy_keywords(x, w, b, t):
    """check_fp32_against_fp64 for linear_cross_entropy with every reduction, label
    smoothing and ignore_index (every other row ignored)."""
    for reduction, smoothing, ignore in itertools.product(["mean", "sum"], [0.0, 0.3], [None, 0]):
        kw = dict(reduction=reduction, label_smoothing=smoothing)
        t2 = t
        if ignore is not None:
            t2 = t.clone()
            t2[::2] = ignore
            kw["ignore_index"] = ignore
        check_fp32_against_fp64(linclass.linear_cross_entropy, unfused_ce, x, w, b, t2, **kw)


@needs_triton
@pytest.mark.parametrize("n,d,c", [(1, 1, 1), (1, 5, 10), (130, 33, 10), (70, 1, 3), (9, 70, 17), (20, 40, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_tile_path_cross_entropy(tile_path, n, d, c, bias):
    x, w, b, t = make(n, d, c, dtype=torch.float32, bias=bias, transposed_weight=True)
    assert tile_path.applies(x, w)
    check_cross_entropy_keywords(x, w, b, t)


@needs_triton
@pytest.mark.parametrize("n,d,c", [(1, 1, 1), (130, 33, 10), (9, 70, 17)])
def test_tile_path_multi_margin(tile_path, n, d, c):
    x, w, b, t = make(n, d, c, dtype=torch.float32)
    for reduction, p, margin in itertools.product(["mean", "sum"], [1, 2], [1.0, 0.3]):
        check_fp32_against_fp64(linclass.linear_multi_margin_loss, unfused_mm, x, w, b, t, p=p,
                                margin=margin, reduction=reduction)


@needs_triton
def test_tile_path_all_ignored_and_partial_grads(tile_path):
    x, w, b, t = make(40, 12, 10, dtype=torch.float32)
    x, w = x[:, ::2], w[:, ::2]  # strided input and weight
    ignored = torch.full_like(t, -100)
    check_fp32_against_fp64(linclass.linear_cross_entropy, unfused_ce, x, w, b, ignored)  # NaN, as torch
    wl = w.clone().requires_grad_()
    (g,) = torch.autograd.grad(linclass.linear_cross_entropy(x, wl, t, b), wl)
    (ref,) = torch.autograd.grad(unfused_ce(x.double(), wl.double(), t, b.double()), wl)
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tile_path_low_precision_error_relative_to_fp32(tile_path, dtype):
    x, w, b, t = make(96, 80, 10, dtype=torch.float32)
    assert tile_path.applies(x.to(dtype), w.to(dtype))
    check_low_precision(x, w, b, t, dtype)


@needs_triton
def test_tile_path_is_deterministic_and_has_no_score_matrix(tile_path):
    from torch.profiler import ProfilerActivity, profile

    x, w, b, t = make(600, 24, 10, dtype=torch.float32)
    first = grads_of(linclass.linear_cross_entropy, x, w, b, t)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        again = grads_of(linclass.linear_cross_entropy, x, w, b, t)
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, r) for a, r in zip(first[1], again[1]))
    # dX (N x D) is the biggest buffer; N x C scores (N x 16 padded) never exist
    sizes = sorted((e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0), reverse=True)
    assert 600 * 10 * 4 not in sizes and 600 * 16 * 4 not in sizes, sizes[:8]


# ---- the C++ register-blocked path for few classes (csrc/cpu/small_gemm.h) -------------
# float32 with C <= kSmallGemmC (12; 32 in the AVX2 build, 64 AVX-512) takes it, on Intel CPUs up
# to 11 classes (the knob _small_gemm_classes, -1 = by the vendor); beyond, the BLAS
# blocks.  D = 600 crosses its 512-float column chunk, N = 130 leaves a partial 3-row tile;
# 15-64 classes take the dW product in class groups (2-7 of them), 65 the BLAS blocks.


def _small_gemm_classes(classes):
    return _knob(torch.ops.linclass._small_gemm_classes, classes)


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="needs the C++ kernels")
@pytest.mark.parametrize("limit", [0, 64])  # the BLAS blocks, register-blocked where built
@pytest.mark.parametrize("c", [1, 10, 12, 13, 16, 17, 24, 37, 64, 65])
def test_cpp_few_class_path_against_float64(c, limit):
    x, w, b, t = make(130, 600, c, dtype=torch.float32)
    w = w * 0.1  # scores of a few units, as a trained layer gives: not all rows saturated
    with linclass.backends.use("cpp"), _small_gemm_classes(limit):
        check_cross_entropy_keywords(x, w, b, t)
        for p, margin in itertools.product([1, 2], [1.0, 0.3]):
            check_fp32_against_fp64(linclass.linear_multi_margin_loss, unfused_mm, x, w, b, t, p=p,
                                    margin=margin)
        step = linclass.sgd.linear_sgd_step(x, w.clone(), t, torch.arange(0, 130, 2), "softmax", 0.1, 0.0)
        ref = F.cross_entropy(x[::2].double() @ w.double().T, t[::2]).item()
        assert abs(step - ref) <= 1e-5 * max(1.0, abs(ref))


def _weight_grad_with(knob, x, w, b, t):
    """linear_cross_entropy's weight gradient on the C++ kernels under a knob's setting."""
    with linclass.backends.use("cpp"), knob:
        w_ = w.clone().requires_grad_()
        linclass.linear_cross_entropy(x, w_, t, b).backward()
        return w_.grad


def _cpu_vendor():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="needs the C++ kernels")
@pytest.mark.skipif(_cpu_vendor() is None, reason="no /proc/cpuinfo vendor")
@pytest.mark.parametrize("c", [11, 12, 40])
def test_few_class_limit_follows_the_vendor(c):
    """By default (-1) 12 classes take the BLAS blocks on an Intel CPU and the
    register-blocked products elsewhere (40: where the build has them, AVX-512); 11 take
    the latter everywhere.  The two paths add in other orders, so their last bits tell
    which ran."""
    x, w, b, t = make(300, 700, c, dtype=torch.float32)
    w = w * 0.1

    def weight_grad(limit):
        return _weight_grad_with(_small_gemm_classes(limit), x, w, b, t)

    blas, blocked = weight_grad(0), weight_grad(64)
    if torch.equal(blas, blocked):
        pytest.skip("both paths gave the same bits")
    intel = _cpu_vendor() == "GenuineIntel"
    expected = blas if (intel and c > 11) else blocked
    assert torch.equal(weight_grad(-1), expected)


# ---- the C++ BLAS blocks' float32 products through oneDNN (csrc/linear_blocks.h) ------
# block_product: products of at least 2^22 multiply-adds run through torch's oneDNN
# inner product off Intel (the knob _linear_onednn: -1 by the vendor, 0 the BLAS, 1
# oneDNN), each call's result at most 4 MiB.  1200 x 6 x 4000 cuts the score product
# into column parts (the bias's parts with them); 40 x 1100 x 4100 the weight gradient
# into row parts; 1100 x 5000 x 100 the input gradient into column parts (of W's
# columns, copied); 256-row blocks make dW a sum over blocks (oneDNN's "add" form).

needs_onednn = pytest.mark.skipif(
    "cpp" not in linclass.backends.available() or not linclass._extension.HAS_ONEDNN,
    reason="needs the C++ kernels and torch's oneDNN")


def _onednn(mode):
    return _knob(torch.ops.linclass._linear_onednn, mode)


def check_within_torch_error(fused, unfused, x, w, b, t, factor=4.0, **kw):
    """The float32 loss and gradients no further from the float64 result than `factor`
    times torch's float32 composition (norm-relative).  oneDNN's products round
    differently from MKL's: up to ~2x torch's error (1e-6) at D = 5000."""
    loss, grads = grads_of(fused, x, w, b, t, **kw)
    exact_loss, exact = grads_of(unfused, *(v.double() if v is not None else None for v in (x, w, b)), t, **kw)
    their_loss, theirs = grads_of(unfused, x, w, b, t, **kw)
    assert loss.dtype == x.dtype
    assert abs(loss.double() - exact_loss) <= factor * abs(their_loss.double() - exact_loss) + 1e-6 * abs(exact_loss)
    for name, o, th, ex in zip(("input", "weight", "bias"), grads, theirs, exact):
        assert o.dtype == x.dtype
        assert rel_error(o, ex) <= factor * rel_error(th, ex) + 1e-7, name


@needs_onednn
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("n,d,c,rows,bias,transposed", [
    (1200, 6, 4000, 0, True, False), (1200, 6, 4000, 0, False, True),
    (40, 1100, 4100, 0, True, False), (700, 64, 500, 256, True, True), (300, 200, 300, 0, False, False),
    (1100, 5000, 100, 0, True, False)])
def test_onednn_products_against_float64(mode, n, d, c, rows, bias, transposed):
    x, w, b, t = make(n, d, c, dtype=torch.float32, bias=bias, transposed_weight=transposed)
    w = w * 0.1
    with linclass.backends.use("cpp"), _onednn(mode), _block_rows(rows):
        for reduction in ("mean", "sum"):
            check_within_torch_error(linclass.linear_cross_entropy, unfused_ce, x, w, b, t,
                                     label_smoothing=0.1, reduction=reduction)
        check_within_torch_error(linclass.linear_multi_margin_loss, unfused_mm, x, w, b, t, p=2)


@needs_onednn
def test_onednn_products_strided_input_and_16bit():
    """X's rows inside a wider tensor, X transposed; float16 inputs whose products this
    CPU makes in float32 (their float32 copies then go through oneDNN too)."""
    x, w, b, t = make(600, 130, 300, dtype=torch.float32)
    w = w * 0.1
    with linclass.backends.use("cpp"), _onednn(1):
        wide = torch.randn(600, 140)
        wide[:, :130] = x
        check_within_torch_error(linclass.linear_cross_entropy, unfused_ce, wide[:, :130], w, b, t)
        check_within_torch_error(linclass.linear_cross_entropy, unfused_ce, x.t().contiguous().t(), w, b, t)
        with _16bit_products(0):
            h = [v.half() for v in (x, w, b)]
            _, ours = grads_of(linclass.linear_cross_entropy, *h, t)
            _, exact = grads_of(unfused_ce, *(v.double() for v in h), t)
            _, theirs = grads_of(unfused_ce, *h, t)
            for o, ex, th in zip(ours, exact, theirs):
                assert o.dtype == torch.float16
                assert rel_error(o, ex) <= 1.1 * rel_error(th, ex) + 1e-6


@needs_onednn
@pytest.mark.parametrize("n,d,c", [(2000, 300, 130), (64, 1024, 1000), (700, 77, 5000)])
def test_onednn_products_deterministic_across_threads(n, d, c):
    x, w, b, t = make(n, d, c, dtype=torch.float32)
    with linclass.backends.use("cpp"), _onednn(1):
        same_for_thread_counts(x, w, b, t, [None, 1, 3])


@needs_onednn
@pytest.mark.skipif(_cpu_vendor() is None, reason="no /proc/cpuinfo vendor")
def test_onednn_choice_follows_the_vendor_and_availability():
    """By default (-1) oneDNN off Intel, the BLAS on Intel; never where torch has no
    oneDNN (linclass._extension tells the C++ side).  The two add in other orders, so
    their last bits tell which ran."""
    x, w, b, t = make(500, 300, 200, dtype=torch.float32)

    def weight_grad(mode):
        return _weight_grad_with(_onednn(mode), x, w, b, t)

    blas, onednn = weight_grad(0), weight_grad(1)
    if torch.equal(blas, onednn):
        pytest.skip("both libraries gave the same bits")
    assert torch.equal(weight_grad(-1), blas if _cpu_vendor() == "GenuineIntel" else onednn)
    old = torch.ops.linclass._set_onednn_available(False)
    try:
        assert torch.equal(weight_grad(1), blas)
    finally:
        torch.ops.linclass._set_onednn_available(old)


@needs_onednn
def test_onednn_off_while_torch_mkldnn_is_disabled():
    """torch.backends.mkldnn disabled keeps both the C++ op's products and the
    Python paths' (_linear_blocks.product) on the BLAS, whatever the knob says; enabled
    again, oneDNN is back."""
    x, w, b, t = make(500, 300, 200, dtype=torch.float32)
    blas, onednn = (_weight_grad_with(_onednn(mode), x, w, b, t) for mode in (0, 1))
    if torch.equal(blas, onednn):
        pytest.skip("both libraries gave the same bits")
    g = torch.Generator().manual_seed(0)
    a, m = torch.randn(300, 500, generator=g), torch.randn(500, 200, generator=g)

    def product(mode):
        with _onednn(mode):
            return _linear_blocks.product(torch.empty(300, 200), a, m)

    blas_product = product(0)
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # (its flags() context also warns about Intel GPUs)
    try:
        assert torch.equal(_weight_grad_with(_onednn(1), x, w, b, t), blas)
        assert torch.equal(product(1), blas_product)
    finally:
        torch.backends.mkldnn.enabled = enabled
    assert torch.equal(_weight_grad_with(_onednn(1), x, w, b, t), onednn)
    assert not torch.equal(product(1), blas_product)


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="needs the C++ kernels")
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_block_product_matches_torch(mode, dtype):
    """The Python paths' products (_linear_blocks.product, the C++ block_product): a @ b
    with and without a bias, accumulated, on transposed operands; a clear error for
    shapes that do not fit; opcheck."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 500, generator=g), torch.randn(200, 500, generator=g).t()
    bias, start = torch.randn(200, generator=g), torch.randn(300, 200, generator=g)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype is torch.float32 else dict(rtol=2e-2, atol=0.5)
    a, b, bias, start = (v.to(dtype) for v in (a, b, bias, start))
    exact = a.double() @ b.double()
    with _onednn(mode):
        out = _linear_blocks.product(torch.empty(300, 200, dtype=dtype), a, b)
        torch.testing.assert_close(out.double(), exact, **tol)
        out = _linear_blocks.product(torch.empty(300, 200, dtype=dtype), a, b, bias)
        torch.testing.assert_close(out.double(), exact + bias.double(), **tol)
        out = _linear_blocks.product(start.clone(), a.t().contiguous().t(), b, accumulate=True)
        torch.testing.assert_close(out.double(), exact + start.double(), **tol)
        with pytest.raises(RuntimeError, match="_block_product"):
            _linear_blocks.product(torch.empty(300, 199, dtype=dtype), a, b)
        with pytest.raises(RuntimeError, match="_block_product: bias"):
            _linear_blocks.product(torch.empty(300, 200, dtype=dtype), a, b, bias[:199])
        torch.library.opcheck(torch.ops.linclass._block_product.default,
                              (torch.empty(300, 200, dtype=dtype), a, b, bias, False))
