"""linclass.multi_margin_loss against the naive float64 reference and against torch."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import linclass
from linclass import reference
from helpers import assert_deterministic, assert_close, compare_with_torch, low_precision_check, run

OPTIONS = list(itertools.product([1, 2], [1.0, 0.3], [None, "w"]))  # p, margin, weight


def make_case(N, C, weight, dtype=torch.float64):
    x = torch.randn(N, C, dtype=dtype)
    t = torch.randint(0, C, (N,))
    w = torch.rand(C, dtype=dtype) + 0.1 if weight else None
    return x, t, w


@pytest.mark.parametrize("N", [1, 2, 7, 33])
@pytest.mark.parametrize("C", [1, 2, 3, 10, 17])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_naive_reference(kernel_backend, N, C, reduction):
    for p, margin, weight in OPTIONS:
        x, t, w = make_case(N, C, weight)
        g = torch.rand(N, dtype=torch.float64) if reduction == "none" else None
        kw = dict(p=p, margin=margin, weight=w, reduction=reduction)
        loss, grad = run(linclass.multi_margin_loss, x, t, grad_output=g, **kw)
        ref_loss, ref_grad = reference.multi_margin_loss(x, t, grad_output=g, **kw)
        what = f"p={p} margin={margin} weight={weight}"
        assert_close(loss, ref_loss, torch.float64, what)
        assert_close(grad, ref_grad, torch.float64, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (6, 1), (64, 3), (33, 17), (100, 32), (16, 33),
                                   (23, 39), (18, 40),  # C++ lanes' last width, groups' first
                                   (37, 64), (37, 65),  # groups: a whole last vector, one column past it
                                   (37, 160), (37, 161),  # the hinge's last training group width, its first row one
                                   (50, 72), (21, 73), (40, 100), (17, 200), (19, 201),
                                   (64, 1000), (8, 4097), (3, 50257)])
def test_matches_torch_shapes(kernel_backend, dtype, shape):
    x = torch.randn(shape, dtype=dtype)
    t = torch.randint(0, shape[1], (shape[0],))
    for reduction in ["none", "mean", "sum"]:
        g = torch.rand(shape[0], dtype=dtype) if reduction == "none" else None
        compare_with_torch(linclass.multi_margin_loss, F.multi_margin_loss, x, t,
                           reduction=reduction, grad_output=g)


@pytest.mark.parametrize("C", [1, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_classes_against_float64(kernel_backend, lane_permutes, C, layout, dtype):
    # Rows of up to seven classes that follow each other move between the rows and the
    # C++ lane path's tiles by permutes (transpose.h; up to 0 or 7 classes with
    # lane_permutes, else by the pair transposes); strided rows come in by the pair
    # transposes (their gradient, a new tensor, goes out by permutes); 70 rows: two-tile
    # steps, a tile and a partial one.
    x = torch.randn(70, C + 3)
    x = (x[:, :C] if layout == "strided" else x[:, :C].contiguous()).to(dtype)
    t = torch.randint(0, C, (70,))
    # bfloat16: the float64 result rounded, against a float32 one rounded (up to an ulp apart)
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    for p, margin, weight in OPTIONS:
        w = torch.rand(C) + 0.1 if weight else None
        for reduction in ["none", "sum"]:
            kw = dict(p=p, margin=margin, reduction=reduction)
            loss, grad = run(linclass.multi_margin_loss, x, t, weight=None if w is None else w.to(dtype), **kw)
            ref_loss, ref_grad = reference.multi_margin_loss(
                x.double(), t, weight=None if w is None else w.to(dtype).double(), **kw)
            with torch.no_grad():
                evaluation = linclass.multi_margin_loss(x, t, weight=None if w is None else w.to(dtype), **kw)
            torch.testing.assert_close(loss.double(), ref_loss, **tol)
            torch.testing.assert_close(evaluation.double(), ref_loss, **tol)
            torch.testing.assert_close(grad, ref_grad.to(dtype), **tol)


@pytest.mark.parametrize("shape", [(33, 17), (21, 100), (16, 1000)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("p,margin,weight", OPTIONS + [(1, -0.5, None), (2, 0.0, "w")])
def test_matches_torch_every_keyword(kernel_backend, shape, reduction, p, margin, weight):
    x, t, w = make_case(*shape, weight, dtype=torch.float32)
    g = torch.rand(shape[0]) if reduction == "none" else None
    compare_with_torch(linclass.multi_margin_loss, F.multi_margin_loss, x, t, p=p, margin=margin,
                       weight=w, reduction=reduction, grad_output=g)



@pytest.mark.parametrize("C", [3, 39, 40, 64, 65, 72, 100, 120, 128, 160, 161, 200, 256, 257, 600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_evaluation_matches_training_and_float64(kernel_backend, C, dtype):
    """A forward without gradient takes its own path at some class counts (the C++
    kernels' row groups run forward-only up to more classes than in training: 161-256;
    100 ends in 4 columns past its last whole vector, which the groups sum across their
    rows, 120 and 200 in 8, which they do not): its losses against float64 torch and, on the C++ backend,
    each row's loss bitwise the training one (same terms, same order; a reduction sums
    the rows in another order there), for every keyword."""
    for p, margin, weight in OPTIONS:
        x, t, w = make_case(37, C, weight, dtype=dtype)
        for reduction in ["none", "mean", "sum"]:
            kw = dict(p=p, margin=margin, weight=w, reduction=reduction)
            with torch.no_grad():
                evaluation = linclass.multi_margin_loss(x, t, **kw)
            training = linclass.multi_margin_loss(x.clone().requires_grad_(True), t, **kw).detach()
            expected = F.multi_margin_loss(x.double(), t, **{**kw, "weight": None if w is None else w.double()})
            what = f"{p=} {margin=} {weight=} {reduction=}"
            assert_close(evaluation, expected.to(dtype), dtype, what)
            if kernel_backend == "cpp" and reduction == "none":
                assert torch.equal(evaluation, training), what
            assert_close(evaluation, training, dtype, what)


def test_unweighted_class_counts_growing_within_a_process(kernel_backend):
    """Without class weights the C++ kernels read w[y] from a shared row of ones that
    grows with the largest C seen; targets at its far end, C larger than any before."""
    for C in (3, 1500, 320_000):
        x = torch.randn(2, C) * 3
        t = torch.tensor([C - 1, C // 2])
        compare_with_torch(linclass.multi_margin_loss, F.multi_margin_loss, x, t, p=2)

def test_noncontiguous_and_vector_inputs(kernel_backend):
    base = torch.randn(40, 24)
    cases = [
        (base.t()[:, :13], torch.randint(0, 13, (24,))),
        (base[::3], torch.randint(0, 24, (14,))),
        (base[:, ::2], torch.randint(0, 12, (40,))),
        (torch.randn(1, 9).expand(16, 9), torch.randint(0, 9, (16,))),
        (torch.randn(3000, 4).t(), torch.randint(0, 3000, (4,))),
        (torch.randn(50, 300)[::2, 7:207], torch.randint(0, 200, (25,))),
        (torch.randn(100, 37).t(), torch.randint(0, 100, (37,))),
    ]
    for x, t in cases:
        for reduction in ["none", "mean"]:
            compare_with_torch(linclass.multi_margin_loss, F.multi_margin_loss, x, t,
                               reduction=reduction, p=2)
    x = torch.randn(7)
    for t in [torch.tensor(2), torch.tensor([2])]:
        for reduction in ["none", "mean", "sum"]:
            compare_with_torch(linclass.multi_margin_loss, F.multi_margin_loss, x, t,
                               reduction=reduction)
    compare_with_torch(linclass.multi_margin_loss, F.multi_margin_loss, torch.randn(1, 5),
                       torch.tensor(3), reduction="none")


def test_empty_batch(kernel_backend):
    x, t = torch.randn(0, 5), torch.zeros(0, dtype=torch.long)
    compare_with_torch(linclass.multi_margin_loss, F.multi_margin_loss, x, t, reduction="none")
    # torch returns uninitialized memory for 'sum' and 'mean' over no rows.
    assert linclass.multi_margin_loss(x, t, reduction="sum").item() == 0.0
    assert linclass.multi_margin_loss(x, t).isnan()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_batch_with_the_automatic_choice(dtype):
    # The automatic choice runs small CPU losses on torch's kernel, which returns
    # uninitialized memory for 'sum' and 'mean' over no rows: empty ones stay ours.
    if linclass.backends.current() is not None:
        pytest.skip("a backend is forced (LINCLASS_BACKEND)")
    for classes in (5, 1000):
        x, t = torch.randn(0, classes, dtype=dtype), torch.zeros(0, dtype=torch.long)
        for _ in range(3):
            assert linclass.multi_margin_loss(x, t, reduction="sum").item() == 0.0
            assert linclass.multi_margin_loss(x, t).isnan()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("p", [1, 2])
def test_gradcheck(kernel_backend, reduction, p):
    x = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 40, (6,))
    w = torch.rand(40, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x: linclass.multi_margin_loss(x, t, p=p, margin=0.7, weight=w, reduction=reduction),
        (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(256, 10), (40, 200), (64, 1000), (4, 32000)])
def test_low_precision_error_relative_to_fp32(kernel_backend, dtype, shape):
    x = torch.randn(shape)
    t = torch.randint(0, shape[1], (shape[0],))
    # torch has no CPU multi_margin_loss for these dtypes: our error alone is bounded.
    low_precision_check(linclass.multi_margin_loss, F.multi_margin_loss, x, dtype, t, p=2,
                        torch_has_dtype=False, slack=1e-2)


def test_stability_extreme_scores(kernel_backend):
    x = torch.randn(6, 50) * 1e4
    t = torch.randint(0, 50, (6,))
    for p in [1, 2]:
        compare_with_torch(linclass.multi_margin_loss, F.multi_margin_loss, x, t, p=p)
        loss, grad = run(linclass.multi_margin_loss, x, t, p=p)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    x = torch.full((3, 20), 3.0e4)  # all equal: every wrong class violates the margin by 1
    t = torch.tensor([0, 19, 4])
    loss, grad = run(linclass.multi_margin_loss, x, t)
    torch.testing.assert_close(loss, torch.tensor(19 / 20))


@pytest.mark.parametrize("C", [12, 100])
def test_non_finite_scores_like_torch(kernel_backend, C):
    x = torch.randn(20, C)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2, 7] = float("-inf")
    t = torch.arange(20) % C
    a = run(linclass.multi_margin_loss, x, t, reduction="none")
    b = run(F.multi_margin_loss, x, t, reduction="none")
    for ours, theirs in zip(a, b):
        torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("shape", [(1000, 10), (64, 3000)])
def test_deterministic_across_calls_and_threads(kernel_backend, shape):
    x = torch.randn(shape)
    t = torch.randint(0, shape[1], (shape[0],))
    assert_deterministic(linclass.multi_margin_loss, x, t, p=2)


@pytest.mark.parametrize("C", [10, 50, 100, 1000])
@pytest.mark.parametrize("p", [1, 2])
def test_a_rows_result_does_not_depend_on_its_neighbours(kernel_backend, C, p):
    # The C++ kernels take rows in SIMD groups, padding a last partial group: a row's
    # loss and gradient are the same bits wherever it sits in the batch.
    x, t = torch.randn(45, C), torch.randint(0, C, (45,))
    w = torch.rand(C) + 0.5
    loss, grad = run(linclass.multi_margin_loss, x, t, reduction="none", p=p, weight=w)
    for lo, hi in [(0, 1), (3, 20), (17, 45), (44, 45)]:
        part_loss, part_grad = run(linclass.multi_margin_loss, x[lo:hi], t[lo:hi],
                                   reduction="none", p=p, weight=w)
        assert torch.equal(part_loss, loss[lo:hi]) and torch.equal(part_grad, grad[lo:hi])


def test_classic_svm_loss_is_multi_margin_times_c(kernel_backend):
    # sum over wrong classes of max(0, s_j - s_y + 1), averaged over N
    x = torch.randn(20, 7, dtype=torch.float64)
    t = torch.randint(0, 7, (20,))
    margins = (x - x.gather(1, t[:, None]) + 1).clamp_min(0)
    margins[torch.arange(20), t] = 0
    classic = margins.sum() / 20
    torch.testing.assert_close(linclass.multi_margin_loss(x, t) * 7, classic)


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="C++ kernels not built")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 7), (64, 10), (33, 45), (20, 100), (17, 101), (9, 136),
                                   (6, 1000), (3, 4099)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_half_types_are_float32_math_rounded_once(dtype, shape, reduction):
    """As for cross_entropy: the float32 kernel's results on the same values, rounded
    once as torch rounds, through the vectorized and the scalar conversions."""
    x = (torch.randn(shape[0], shape[1] + 5) * 0.3).to(dtype)[:, :shape[1]]  # strided rows
    t = torch.randint(0, shape[1], (shape[0],))
    w = torch.rand(shape[1]).to(dtype) + 0.5
    args = (2, 1.0, w, linclass._ops.REDUCTIONS[reduction], True)
    loss, grad = torch.ops.linclass.multi_margin_loss(x, t, *args)
    args32 = (2, 1.0, w.float(), linclass._ops.REDUCTIONS[reduction], True)
    loss32, grad32 = torch.ops.linclass.multi_margin_loss(x.float(), t, *args32)
    assert loss.dtype == torch.float32 and torch.equal(loss, loss32)  # the op's loss: float32
    assert torch.equal(grad, grad32.to(dtype))


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="needs linclass._C")
@pytest.mark.parametrize("c", [65, 66, 72, 88, 100, 136, 160])
@pytest.mark.parametrize("streamed", [False, True], ids=["in-cache", "streamed"])
def test_group_rows_last_columns_summed_across_the_group(c, streamed):
    """The group path sums a row's last C % 16 columns (at most 8, up to 100 classes;
    136 takes the groups without, 160 has none) for its
    16 rows at once, one row per lane: targets in those columns (their terms left out),
    a padded last group, p = 1 and p = 2 with a margin and class weights, a gradient in
    cache and one of 8 MiB and more (streamed); against torch in float64, the same bits
    on a repeat call and on one thread."""
    n = (9 << 20) // (4 * c) + 5 if streamed else 37
    x = torch.randn(n, c)
    t = torch.randint(0, c, (n,))
    t[::3] = c - 1 - torch.arange(0, n, 3) % max(c % 16, 1)  # targets in the last columns
    w = torch.rand(c) + 0.5
    with linclass.backends.use("cpp"):
        for kwargs in ({}, dict(p=2, margin=0.7, weight=w)):
            for reduction in ("none", "sum"):
                g = torch.rand(n) if reduction == "none" else None
                loss, grad = run(linclass.multi_margin_loss, x, t, reduction=reduction, grad_output=g, **kwargs)
                ref_loss, ref_grad = run(F.multi_margin_loss, x.double(), t, reduction=reduction,
                                         grad_output=None if g is None else g.double(),
                                         **{k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()})
                what = f"{reduction} {kwargs}"
                assert_close(loss, ref_loss.float(), torch.float32, f"loss {what}")
                assert_close(grad, ref_grad.float(), torch.float32, f"grad {what}")
            assert_deterministic(linclass.multi_margin_loss, x, t, reduction="sum", **kwargs)


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="needs linclass._C")
@pytest.mark.parametrize("c,dtype", [(2048, torch.float32), (2051, torch.float32),
                                     (2051, torch.float64), (16400, torch.float32)])
def test_long_streamed_rows_hand_their_gradient_to_the_next_row(c, dtype):
    """Rows of 8 KiB and more write their gradient, recomputed from their scores, during
    the next row's sums (kDeferredGradientRowBytes): rows off vector boundaries (2051),
    a row per block (16400), each thread's last row; p = 1, and p = 2 with a margin and
    class weights; against torch in float64, the same bits on a repeat call and on one
    thread."""
    n = (9 << 20) // (dtype.itemsize * c) + 3
    x = torch.randn(n, c, dtype=dtype)
    t = torch.randint(0, c, (n,))
    w = torch.rand(c, dtype=dtype) + 0.5
    with linclass.backends.use("cpp"):
        for kwargs in ({}, dict(p=2, margin=0.7, weight=w)):
            loss, grad = run(linclass.multi_margin_loss, x, t, reduction="sum", **kwargs)
            ref_loss, ref_grad = run(F.multi_margin_loss, x.double(), t, reduction="sum",
                                     **{k: v.double() if torch.is_tensor(v) else v
                                        for k, v in kwargs.items()})
            assert_close(loss, ref_loss.to(dtype), dtype, f"loss {kwargs}")
            assert_close(grad, ref_grad.to(dtype), dtype, f"grad {kwargs}")
            assert_deterministic(linclass.multi_margin_loss, x, t, reduction="sum", **kwargs)
