"""linclass.cross_entropy against the naive float64 reference and against torch."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import linclass
from linclass import reference
import helpers
from helpers import assert_deterministic, assert_close, compare_with_torch, leaf, low_precision_check, run

OPTIONS = list(itertools.product([None, "w"], [False, True], [0.0, 0.3]))  # weight, ignore, smoothing


def make_case(N, C, weight, ignore, smoothing, dtype=torch.float64, extra=()):
    x = torch.randn((N, C) + tuple(extra), dtype=dtype) * 3
    t = torch.randint(0, C, (N,) + tuple(extra))
    kwargs = dict(label_smoothing=smoothing)
    if weight:
        kwargs["weight"] = torch.rand(C, dtype=dtype) + 0.1
    if ignore:
        kwargs["ignore_index"] = 1 if C > 1 else 0
        t.view(-1)[::3] = kwargs["ignore_index"]
    return x, t, kwargs


# ---- naive reference, float64 ------------------------------------------------------


@pytest.mark.parametrize("N", [1, 2, 7, 33])
@pytest.mark.parametrize("C", [1, 2, 3, 10, 17])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_naive_reference(kernel_backend, N, C, reduction):
    for weight, ignore, smoothing in OPTIONS:
        x, t, kw = make_case(N, C, weight, ignore, smoothing)
        g = torch.rand(N, dtype=torch.float64) if reduction == "none" else None
        loss, grad = run(linclass.cross_entropy, x, t, reduction=reduction, grad_output=g, **kw)
        ref_loss, ref_grad = reference.cross_entropy(x, t, reduction=reduction, grad_output=g, **kw)
        what = f"weight={weight} ignore={ignore} smoothing={smoothing}"
        assert_close(loss, ref_loss, torch.float64, what)
        assert_close(grad, ref_grad, torch.float64, what)


def check_float32_against_float64(N, C, extra=()):
    """float32 scores of shape (N, C, *extra) against the float64 reference of the same
    values: every option and reduction."""
    for weight, ignore, smoothing in OPTIONS:
        x, t, kw = make_case(N, C, weight, ignore, smoothing, dtype=torch.float32, extra=extra)
        kw64 = {k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}
        for reduction in ["none", "mean", "sum"]:
            loss, grad = run(linclass.cross_entropy, x, t, reduction=reduction, **kw)
            ref_loss, ref_grad = reference.cross_entropy(x.double(), t, reduction=reduction, **kw64)
            what = f"{reduction} weight={weight} ignore={ignore} smoothing={smoothing}"
            assert_close(loss, ref_loss.float(), torch.float32, what)
            assert_close(grad, ref_grad.float(), torch.float32, what)


@pytest.mark.parametrize("C", [2, 3, 10])
def test_compile_time_class_counts_in_float32(kernel_backend, C):
    # The C++ lane path compiles 2, 3 and 10 classes as constants: 70 float32 rows take
    # its two-tile steps (32 rows), one tile and a partial one.
    check_float32_against_float64(70, C)


def _few_class_rows(C, dtype, layout):
    """70 rows of C classes (the lane path's two-tile steps, a tile and a partial one) in
    `dtype`, their rows following each other or strided."""
    x = torch.randn(70, C + 3) * 3
    x = x[:, :C] if layout == "strided" else x[:, :C].contiguous()
    return x.to(dtype)


@pytest.mark.parametrize("C", [1, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_classes_against_float64(kernel_backend, lane_permutes, C, layout, dtype):
    # Rows of up to seven classes that follow each other move between the rows and the
    # C++ lane path's tiles by permutes (transpose.h; up to 0 or 7 classes with
    # lane_permutes, else by the pair transposes); strided rows come in by the pair
    # transposes (their gradient, a new tensor, goes out by permutes).
    x = _few_class_rows(C, dtype, layout)
    t = torch.randint(0, C, (70,))
    for kwargs in ({}, {"weight": torch.rand(C, dtype=dtype) + 0.5, "label_smoothing": 0.2}):
        kw64 = {k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        for reduction in ["none", "sum"]:
            loss, grad = run(linclass.cross_entropy, x, t, reduction=reduction, **kwargs)
            ref_loss, ref_grad = reference.cross_entropy(x.double(), t, reduction=reduction, **kw64)
            with torch.no_grad():
                evaluation = linclass.cross_entropy(x, t, reduction=reduction, **kwargs)
            # bfloat16: the float64 result rounded, against a float32 one rounded (an ulp apart)
            tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
            torch.testing.assert_close(loss.double(), ref_loss, **tol)
            torch.testing.assert_close(evaluation.double(), ref_loss, **tol)
            torch.testing.assert_close(grad, ref_grad.to(dtype), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_two_class_rows_at_their_edges(kernel_backend, dtype, reduction):
    """Two classes (the C++ lane path takes one exp per row there, the max's own being 1):
    ties, confident rows either way, a difference past exp's range, a masked target,
    infinite and NaN scores, spread over two-tile steps, one tile and a partial one;
    losses and gradients against float64 torch, evaluation equal to training."""
    x = torch.randn(75, 2, dtype=dtype) * 3
    t = torch.randint(0, 2, (75,))
    edges = [([0.0, 0.0], 0), ([5.0, 5.0], 1), ([30.0, 0.0], 0), ([0.0, 30.0], 0),
             ([-1e4, 1e4], 1), ([200.0, -200.0], 1), ([float("-inf"), 3.0], 0),
             ([float("-inf"), 3.0], 1), ([float("inf"), 0.0], 0), ([1.0, float("nan")], 0),
             ([float("-inf"), float("-inf")], 1), ([-0.0, 0.0], 1)]
    for k, (row, target) in enumerate(edges):
        for r in (3 * k, 3 * k + 40):  # in the two-tile steps and in the last tiles
            x[r] = torch.tensor(row, dtype=dtype)
            t[r] = target
    loss, grad = run(linclass.cross_entropy, x, t, reduction=reduction)
    ref_loss, ref_grad = run(F.cross_entropy, x.double(), t, reduction=reduction)
    with torch.no_grad():
        evaluation = linclass.cross_entropy(x, t, reduction=reduction)
    torch.testing.assert_close(evaluation, loss, rtol=0, atol=0, equal_nan=True)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for got, want in ((loss, ref_loss), (grad, ref_grad)):
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        finite = want.isfinite()
        torch.testing.assert_close(got[finite].double(), want[finite], **tol)
    # A confident row's 1 - p_y = e^-30 / (1 + e^-30) keeps its relative precision.
    confident = grad[6, 0].double()
    assert abs(confident / (-torch.tensor(-30.0, dtype=torch.float64).exp()
                            / (1 + torch.tensor(-30.0, dtype=torch.float64).exp())) - 1) < 1e-5


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 5, 3, 2), (1, 17, 9)])
def test_kdim_matches_naive_reference(kernel_backend, shape):
    N, C, extra = shape[0], shape[1], shape[2:]
    for weight, ignore, smoothing in OPTIONS:
        x, t, kw = make_case(N, C, weight, ignore, smoothing, extra=extra)
        for reduction in ["none", "mean", "sum"]:
            loss, grad = run(linclass.cross_entropy, x, t, reduction=reduction, **kw)
            ref_loss, ref_grad = reference.cross_entropy(x, t, reduction=reduction, **kw)
            assert_close(loss, ref_loss, torch.float64, reduction)
            assert_close(grad, ref_grad, torch.float64, reduction)


@pytest.mark.parametrize("shape", [(2, 40, 16), (2, 41, 33), (3, 150, 4, 8), (1, 512, 48),
                                   (2, 513, 16), (1, 64, 5, 7), (3, 1000, 2, 9), (1, 4099, 32),
                                   (1, 32768, 16), (1, 32769, 16)])
def test_kdim_many_classes_in_float32(kernel_backend, shape):
    # K-dim inputs whose d's are contiguous: the C++ lane path takes them at any class
    # count up to 262144 (W positions of one class are one vector; tiles beyond 39 classes
    # in a heap buffer), whole tiles where the d's hold 16k positions (32, 48), tiles
    # across an image's end where not (33, 35, 18); see also the next test.
    check_float32_against_float64(shape[0], shape[1], shape[2:])


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="C++ kernels not built")
@pytest.mark.parametrize("classes", [262144, 262145])
@pytest.mark.parametrize("op", ["cross_entropy", "multi_margin_loss"])
def test_strided_classes_at_the_lane_limit(op, classes):
    # Column-major scores: the C++ lane path up to 262144 classes (tiles of 32 MiB per
    # thread, from the buffer cache), the row path above; both against torch in float64.
    x = (torch.randn(classes, 16) * 3).t()
    t = torch.randint(0, classes, (16,))
    kw = dict(weight=torch.rand(classes), **(dict(label_smoothing=0.1, ignore_index=3)
                                             if op == "cross_entropy" else dict(p=2, margin=0.5)))
    t[5] = 3
    with linclass.backends.use("cpp"):
        loss, grad = run(getattr(linclass, op), x, t, reduction="none", **kw)
    ref_loss, ref_grad = run(getattr(torch.nn.functional, op), x.double(), t, reduction="none",
                             **{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()})
    assert_close(loss, ref_loss.float(), torch.float32, op)
    assert_close(grad, ref_grad.float(), torch.float32, op)


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="C++ kernels not built")
@pytest.mark.parametrize("shape", [(3, 700, 40), (2, 40, 8, 5)])
def test_kdim_strided_lanes_deterministic(shape):
    # The strided-class lane path's blocks are whole tiles at any class count: the same
    # bits on 1 and 2 threads, on a repeat call, and for 'none' each row's loss.
    x = torch.randn(shape)
    t = torch.randint(0, shape[1], (shape[0],) + shape[2:])
    with linclass.backends.use("cpp"):
        for reduction in ("mean", "none"):
            assert_deterministic(linclass.cross_entropy, x, t, reduction=reduction, label_smoothing=0.1)


def test_probability_targets_match_naive_reference():
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    p = torch.softmax(torch.randn(5, 4, 3, dtype=torch.float64), 1)
    w = torch.rand(4, dtype=torch.float64)
    for reduction, smoothing, weight in itertools.product(["none", "mean", "sum"], [0.0, 0.2], [None, w]):
        loss, grad = run(linclass.cross_entropy, x, p, weight=weight, reduction=reduction,
                         label_smoothing=smoothing)
        ref_loss, ref_grad = reference.cross_entropy(x, p, weight=weight, reduction=reduction,
                                                     label_smoothing=smoothing)
        assert_close(loss, ref_loss, torch.float64)
        assert_close(grad, ref_grad, torch.float64)


# ---- against torch -----------------------------------------------------------------


@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ignored_rows_across_blocks_match_torch(kernel_backend, ignored, dtype):
    # Enough rows for several blocks and full SIMD tiles: the C++ lane path reads the
    # targets in the kernel and only learns how many rows count ('mean') after the pass.
    # (Triton's ignored rows are covered above; 5000 rows are slow in its interpreter.)
    if kernel_backend != "cpp":
        pytest.skip("C++ lane path case")
    x = torch.randn(5000, 10, dtype=dtype) * 3
    t = torch.randint(0, 10, (5000,))
    if ignored == "some":
        t[::7] = -100
        t[4000:4100] = -100
    elif ignored == "all":
        t[:] = -100
    for reduction in ["mean", "sum", "none"]:
        g = torch.rand(5000, dtype=dtype) if reduction == "none" else None
        compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, reduction=reduction,
                           grad_output=g)
        if ignored != "none":  # and with label smoothing, whose ignored rows count for nothing too
            compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, reduction=reduction,
                               grad_output=g, label_smoothing=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (6, 1), (64, 3), (33, 17), (100, 32), (16, 33),
                                   (23, 39), (18, 40),  # C++ lanes' last width, groups' first
                                   (20, 44), (33, 47), (17, 48),  # ... or lanes' to 47
                                   (37, 65), (50, 72), (21, 73),
                                   (40, 100), (17, 257), (31, 512), (19, 513),  # C++ group path
                                   (64, 1000), (8, 4097), (3, 50257)])
def test_matches_torch_shapes(kernel_backend, cross_entropy_lanes, dtype, shape):
    x = torch.randn(shape, dtype=dtype) * 4
    t = torch.randint(0, shape[1], (shape[0],))
    for reduction in ["none", "mean", "sum"]:
        g = torch.rand(shape[0], dtype=dtype) if reduction == "none" else None
        compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, reduction=reduction,
                           grad_output=g)



@pytest.mark.parametrize("C", [10, 50, 1000])  # the C++ lane, group and row paths
def test_masked_scores_get_exactly_zero_probability(kernel_backend, C):
    """A score of -inf (a masked class) has probability exactly 0, as in torch: its
    gradient entry is 0, not the exponential's smallest subnormal."""
    x = torch.randn(20, C) * 3
    x[:, 1::3] = float("-inf")
    t = 3 * (torch.arange(20) % (C // 3))  # targets on unmasked columns
    loss, grad = run(linclass.cross_entropy, x, t)
    assert torch.equal(grad[:, 1::3], torch.zeros_like(grad[:, 1::3]))
    assert loss.isfinite()
    compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, label_smoothing=0.0)


@pytest.mark.parametrize("C", [41, 65, 72, 100, 264])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"weight": "rand"}])
def test_group_rows_last_columns(kernel_backend, cross_entropy_lanes, C, options):
    """The C++ group path takes a row's last C % W columns (when at most half a vector)
    for all the group's rows at once, one row per lane: targets in those columns, an
    ignored row, scores of +inf and NaN there, and a last group of padding rows."""
    x = torch.randn(37, C) * 3
    t = C - 1 - torch.arange(37) % 9  # most targets in the last columns
    t[5] = -100
    x[7, C - 1], x[8, C - 2] = float("inf"), float("nan")
    if options.get("weight") == "rand":
        options = {"weight": torch.rand(C) + 0.1}
    for reduction in ["none", "mean", "sum"]:
        g = torch.rand(37) if reduction == "none" else None
        compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, reduction=reduction,
                           grad_output=g, **options)
        keep = torch.ones(37, dtype=torch.bool)
        keep[7:9] = False  # and the finite rows alone, without NaN in a mean
        compare_with_torch(linclass.cross_entropy, F.cross_entropy, x[keep], t[keep],
                           reduction=reduction, grad_output=None if g is None else g[keep],
                           **options)


def test_unweighted_class_counts_growing_within_a_process(kernel_backend):
    """Without class weights the C++ kernels read a shared row of ones that grows with
    the largest C seen; label smoothing reads all of it, and the last class's target its
    far end.  Each C here is larger than any before it in the test session."""
    for C in (3, 1500, 310_000):
        x = torch.randn(2, C) * 3
        t = torch.tensor([C - 1, C // 2])
        compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, label_smoothing=0.2)

@pytest.mark.parametrize("shape", [(33, 17), (21, 100), (16, 1000)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weight,ignore,smoothing", OPTIONS)
def test_matches_torch_every_keyword(kernel_backend, shape, reduction, weight, ignore, smoothing):
    x, t, kw = make_case(*shape, weight, ignore, smoothing, dtype=torch.float32)
    g = torch.rand(shape[0]) if reduction == "none" else None
    compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, reduction=reduction,
                       grad_output=g, **kw)


@pytest.mark.parametrize("shape", [(4, 3, 5), (2, 10, 3, 4), (2, 40, 7), (3, 5, 1, 1), (2, 3, 0)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_kdim_matches_torch(kernel_backend, shape, reduction):
    x = torch.randn(shape)
    t = torch.randint(0, shape[1], (shape[0],) + shape[2:])
    w = torch.rand(shape[1])
    compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, reduction=reduction,
                       weight=w, label_smoothing=0.1, ignore_index=0)


def noncontiguous_inputs():
    base = torch.randn(40, 24)
    yield "transposed", base.t()[:, :13], torch.randint(0, 13, (24,))
    yield "strided rows", base[::3], torch.randint(0, 24, (14,))
    yield "strided classes", base[:, ::2], torch.randint(0, 12, (40,))
    yield "expanded", torch.randn(1, 9).expand(16, 9), torch.randint(0, 9, (16,))
    yield "channels_last", torch.randn(2, 6, 5, 3).to(memory_format=torch.channels_last), torch.randint(0, 6, (2, 5, 3))
    yield "kdim permuted", torch.randn(3, 4, 7).permute(0, 2, 1), torch.randint(0, 7, (3, 4))
    yield "kdim sliced", torch.randn(3, 5, 8, 6)[:, :, ::2, 1:], torch.randint(0, 5, (3, 4, 5))
    yield "large C transposed", torch.randn(2000, 5).t(), torch.randint(0, 2000, (5,))
    yield "medium C, row offsets", torch.randn(50, 300)[::2, 7:207], torch.randint(0, 200, (25,))
    yield "medium C transposed", torch.randn(100, 37).t(), torch.randint(0, 100, (37,))


@pytest.mark.parametrize("name,x,t", list(noncontiguous_inputs()), ids=lambda v: v if isinstance(v, str) else "")
def test_noncontiguous_inputs_match_torch(kernel_backend, name, x, t):
    assert not x.is_contiguous() or name == "expanded"
    for reduction in ["none", "mean"]:
        compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, reduction=reduction,
                           label_smoothing=0.05)
    target_view = torch.stack([t, t], -1)[..., 0]  # non-contiguous target
    compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, target_view)


def test_one_dimensional_input(kernel_backend):
    x = torch.randn(7)
    for reduction in ["none", "mean", "sum"]:
        compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, torch.tensor(3),
                           reduction=reduction)
        # torch's forward accepts a 1-element target here (its backward then fails);
        # ours gives the same value and a working gradient.
        loss, grad = run(linclass.cross_entropy, x, torch.tensor([3]), reduction=reduction)
        assert_close(loss, F.cross_entropy(x, torch.tensor([3]), reduction=reduction), torch.float32)
        assert_close(grad, run(F.cross_entropy, x, torch.tensor(3), reduction=reduction)[1],
                     torch.float32)


def test_uint8_targets(kernel_backend):
    x = torch.randn(9, 5)
    t = torch.randint(0, 5, (9,), dtype=torch.uint8)
    compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_probability_targets_match_torch(kernel_backend, reduction):
    x = torch.randn(6, 5, 2)
    p = torch.softmax(torch.randn(6, 5, 2), 1)
    compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, p, reduction=reduction,
                       weight=torch.rand(5), label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_and_all_ignored(kernel_backend, reduction):
    compare_with_torch(linclass.cross_entropy, F.cross_entropy, torch.randn(0, 5),
                       torch.zeros(0, dtype=torch.long), reduction=reduction)
    t = torch.full((4,), -100)
    for smoothing in [0.0, 0.2]:
        compare_with_torch(linclass.cross_entropy, F.cross_entropy, torch.randn(4, 5), t,
                           reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_input_with_any_strides(kernel_backend, reduction):
    # An empty tensor's strides are arbitrary and contiguous() keeps them; the kernels
    # read nothing, so they must not care (they once failed to find rows in them).
    for shape, strides in [((0, 128, 2, 4), (2304, 18, 9, 2)), ((3, 5, 0, 2), (7, 1, 40, 3)),
                           ((0, 7), (1, 0))]:
        x = torch.empty_strided(shape, strides)
        t = torch.zeros((shape[0], *shape[2:]), dtype=torch.long)
        compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, reduction=reduction)


@pytest.mark.parametrize("C", [3, 10, 50, 700])  # the C++ lane, group and row paths
def test_zero_weight_sum_matches_torch(kernel_backend, C):
    """Every kept target weighs 0: the 'mean' is 0 / 0, NaN like torch's, with label
    smoothing too (whose part alone would be x / 0 = inf), and the kept rows' gradient
    NaN; ignored rows keep a zero gradient."""
    w = torch.rand(C) + 0.5
    w[0] = w[1] = 0.0
    t = torch.tensor([0, 1, 0, 2, 1])
    for smoothing, ignored in itertools.product([0.0, 0.1, 1.0], [False, True]):
        target = t.clone()
        if ignored:
            target[3] = -100  # the only row with weight
        else:
            target[3] = 0
        compare_with_torch(linclass.cross_entropy, F.cross_entropy, torch.randn(5, C), target,
                           weight=w, label_smoothing=smoothing)


def test_negative_and_full_label_smoothing(kernel_backend):
    x, t = torch.randn(8, 6), torch.randint(0, 6, (8,))
    for smoothing in [-0.1, 1.0, float("nan")]:  # torch accepts all three (NaN: none)
        compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, label_smoothing=smoothing)


def test_legacy_reduction_arguments(kernel_backend):
    x, t = torch.randn(8, 6), torch.randint(0, 6, (8,))
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        a = linclass.cross_entropy(x, t, None, size_average, -100, reduce)
        b = F.cross_entropy(x, t, None, size_average, -100, reduce)
        assert_close(a, b, torch.float32)


# ---- gradcheck, precision, stability, determinism ------------------------------------


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(5, 4), (3, 40), (2, 3, 4)])
def test_gradcheck(kernel_backend, reduction, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, shape[1], (shape[0],) + shape[2:])
    t.view(-1)[0] = 2
    w = torch.rand(shape[1], dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x: linclass.cross_entropy(x, t, weight=w, ignore_index=2, reduction=reduction,
                                         label_smoothing=0.15), (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(256, 10), (40, 200), (64, 1000), (4, 32000)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_low_precision_error_relative_to_fp32(kernel_backend, dtype, shape, smoothing):
    x = torch.randn(shape) * 3
    t = torch.randint(0, shape[1], (shape[0],))
    low_precision_check(linclass.cross_entropy, F.cross_entropy, x, dtype, t,
                        label_smoothing=smoothing, weight=torch.rand(shape[1]) + 0.5)


def test_confident_rows_keep_true_class_gradient(kernel_backend):
    # p_y -> 1: the true-class gradient -(1 - p_y) is tiny but must not cancel to 0.
    x = torch.zeros(4, 50, dtype=torch.float32)
    t = torch.tensor([0, 1, 2, 3])
    x[torch.arange(4), t] = torch.tensor([12.0, 14.0, 16.0, 18.0])
    _, grad = run(linclass.cross_entropy, x, t, reduction="sum")
    ref = reference.cross_entropy(x.double(), t, reduction="sum")[1]
    rel = ((grad.double() - ref).abs() / ref.abs()).max()
    assert rel < 1e-5


def _evaluation_edge_rows(C, dtype):
    """Rows that stress a provisional softmax shift taken from a row's first columns."""
    x = torch.randn(10, C, dtype=dtype) * 2
    t = torch.randint(0, C, (10,))
    x[1, :64] = -80.0  # the first columns far below the row's max (> 30 below)
    x[1, C - 3] = 40.0
    x[2, :64] = float("-inf")  # the first columns masked
    x[3, :64] = -20.0  # 20-30 below the max: kept, then rescaled by exp(m0 - m)
    x[3, C // 2] = 12.0
    x[4, t[4]] = 29.0  # a confident row: loss ~ C e^-29
    x[5, 7] = float("inf")
    x[6, 9] = float("nan")
    x[7] = float("-inf")
    x[8, t[8]] = float("-inf")  # the target masked: infinite loss
    x[9] *= 1e4  # large scores
    return x, t


@pytest.mark.parametrize("C", [600, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight", [False, True])
def test_evaluation_rows_match_training_and_float64(kernel_backend, C, dtype, weight):
    """A forward without gradient (the C++ row path then finds the row's max in its exp
    pass, from a provisional shift) gives the losses of a forward with gradient and of
    float64, on rows whose first columns are far below the max, masked, or whose scores
    are confident, infinite or NaN."""
    x, t = _evaluation_edge_rows(C, dtype)
    kwargs = {"reduction": "none"}
    if weight:
        kwargs["weight"] = torch.rand(C, dtype=dtype) + 0.1
    with torch.no_grad():
        evaluation = linclass.cross_entropy(x, t, **kwargs)
    training = linclass.cross_entropy(leaf(x), t, **kwargs).detach()
    expected = F.cross_entropy(x.double(), t, **{k: v.double() if torch.is_tensor(v) else v
                                                  for k, v in kwargs.items()})
    for got in (evaluation, training):
        assert torch.equal(got.isnan(), expected.isnan()), (got, expected)
        assert torch.equal(got.isinf(), expected.isinf()), (got, expected)
        finite = expected.isfinite()
        torch.testing.assert_close(got[finite].double(), expected[finite], rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=1e-6 if dtype == torch.float32 else 1e-13)
    torch.testing.assert_close(evaluation, training, rtol=4e-7 if dtype == torch.float32 else 1e-15,
                               atol=2e-7 if dtype == torch.float32 else 1e-15, equal_nan=True)


@pytest.mark.parametrize("C", [5, 100])
def test_stability_extreme_scores(kernel_backend, C):
    x = torch.randn(6, C) * 1e4
    t = torch.randint(0, C, (6,))
    compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, label_smoothing=0.1)
    loss, grad = run(linclass.cross_entropy, x, t)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # every score equal and huge: loss log(C), gradient (1/C - onehot) / N
    x = torch.full((3, C), 3.0e4)
    t = torch.tensor([0, C - 1, 1])
    loss, grad = run(linclass.cross_entropy, x, t)
    torch.testing.assert_close(loss, torch.tensor(float(C)).log())
    expected = (torch.full((3, C), 1.0 / C) - F.one_hot(t, C)) / 3
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("C", [2, 3, 12, 100])
def test_non_finite_scores_propagate_like_torch(kernel_backend, C):
    # The bad rows share their SIMD group (C++ lane and group paths) with good ones,
    # which must not be touched.  Two classes take their own exps (one per row).
    x = torch.randn(20, C)
    x[0, 3 % C] = float("nan")
    x[1, 5 % C] = float("inf")
    x[2] = float("-inf")
    t = torch.arange(20) % C
    a = run(linclass.cross_entropy, x, t, reduction="none")
    b = run(F.cross_entropy, x, t, reduction="none")
    for ours, theirs in zip(a, b):
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert_close(ours[3:], theirs[3:], torch.float32)


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"weight": "rand"}])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_ignored_rows_with_non_finite_scores_get_zero_gradient(kernel_backend, options, reduction):
    # A deliberate difference from torch (README, "Drop-in use"): torch's log-softmax
    # backward turns an ignored row holding NaN or +-inf (padding, masked positions) into
    # a NaN gradient row, which then poisons the weights; an ignored row takes no part in
    # the loss, so its gradient here is 0 (as in Liger-Kernel).  Losses equal torch's.
    x = torch.randn(6, 12)
    x[1, 3], x[2, 4], x[3] = float("nan"), float("inf"), float("-inf")
    t = torch.tensor([0, -100, -100, -100, 5, 2])
    if options.get("weight") == "rand":
        options = {"weight": torch.rand(12) + 0.1}
    ours, grad = run(linclass.cross_entropy, x, t, reduction=reduction, **options)
    theirs, ref_grad = run(F.cross_entropy, x, t, reduction=reduction, **options)
    assert_close(ours, theirs, torch.float32, "loss")
    kept = t != -100
    assert torch.equal(grad[~kept], torch.zeros(3, 12))
    assert ref_grad[~kept].isnan().any(1).all()  # what torch gives (if it ever changes, follow)
    assert_close(grad[kept], ref_grad[kept], torch.float32, "grad")


@pytest.mark.parametrize("kind", ["nan", "+inf", "-inf row"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_non_finite_row_makes_the_summed_loss_nan(kernel_backend, kind, reduction):
    # Summed losses take another route on the CPU than per-row ones (the lane path's
    # deferred logs): one bad row among many must still make them NaN, as in torch.
    x = torch.randn(1000, 10)
    t = torch.randint(0, 10, (1000,))
    if kind == "nan":
        x[517, 3] = float("nan")
    elif kind == "+inf":
        x[517, 3] = float("inf")
    else:
        x[517] = float("-inf")
    ours = run(linclass.cross_entropy, x, t, reduction=reduction)
    theirs = run(F.cross_entropy, x, t, reduction=reduction)
    assert ours[0].isnan() and theirs[0].isnan()
    assert torch.equal(ours[1].isnan(), theirs[1].isnan())


@pytest.mark.parametrize("C", [3, 10, 32])
@pytest.mark.parametrize("smoothing,ignore", [(0.0, False), (0.2, True)])
def test_summed_loss_over_many_rows(kernel_backend, C, smoothing, ignore):
    # Many blocks and many tiles per lane: the CPU lane path sums the rows' log-sum-exps
    # as the log of their running product (row_driver.h); the sum must be as close to
    # float64 as torch's float32 sum is, and agree with the sum of the per-row losses.
    n = 20011 if kernel_backend == "cpp" else 611  # the interpreter: ~1 ms per 64 rows
    x, t, kw = make_case(n, C, None, ignore, smoothing, dtype=torch.float32)
    compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, reduction="sum", **kw)
    compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, reduction="mean", **kw)
    total = linclass.cross_entropy(x, t, reduction="sum", **kw).double()
    rows = linclass.cross_entropy(x, t, reduction="none", **kw).double().sum()
    assert abs(total - rows) <= 1e-6 * rows


@pytest.mark.parametrize("shape", [(1000, 10), (64, 3000)])
def test_deterministic_across_calls_and_threads(kernel_backend, shape):
    x = torch.randn(shape)
    t = torch.randint(0, shape[1], (shape[0],))
    assert_deterministic(linclass.cross_entropy, x, t, label_smoothing=0.1)


@pytest.mark.parametrize("C", [10, 100, 1000])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "ignore_index": 2}])
def test_a_rows_result_does_not_depend_on_its_neighbours(kernel_backend, C, options):
    # The C++ kernels take rows in SIMD groups, padding a last partial group: a row's
    # loss and gradient are the same bits wherever it sits in the batch.
    x, t = torch.randn(45, C) * 3, torch.randint(0, C, (45,))
    t[::4] = 2
    loss, grad = run(linclass.cross_entropy, x, t, reduction="none", **options)
    for lo, hi in [(0, 1), (3, 20), (17, 45), (44, 45)]:
        part_loss, part_grad = run(linclass.cross_entropy, x[lo:hi], t[lo:hi], reduction="none",
                                   **options)
        assert torch.equal(part_loss, loss[lo:hi]) and torch.equal(part_grad, grad[lo:hi])


# ---- fused: one N x C buffer, forward-only path ---------------------------------------


def test_forward_only_when_no_grad(kernel_backend):
    x = torch.randn(8, 5)
    t = torch.randint(0, 5, (8,))
    loss, grad = torch.ops.linclass.cross_entropy(x, t, None, -100, 0.0, 1, False)
    assert grad.numel() == 0
    with torch.no_grad():
        assert not linclass.cross_entropy(leaf(x), t).requires_grad


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (33, 10), (100, 17), (65, 32), (9, 100)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_forward_only_loss_matches_torch(kernel_backend, shape, reduction):
    # The forward-only kernels are their own code (the CPU lane path sums the
    # exponentials without the target masks): their losses against torch's float64
    # result, within float32 tolerance, for every keyword.
    for weight, ignore, smoothing in OPTIONS:
        x, t, kw = make_case(*shape, weight, ignore, smoothing, dtype=torch.float32)
        with torch.no_grad():
            ours = linclass.cross_entropy(x, t, reduction=reduction, **kw)
        best = F.cross_entropy(x.double(), t, reduction=reduction,
                               **{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()})
        torch.testing.assert_close(ours.double(), best, **helpers.TOL[torch.float32], equal_nan=True,
                                   msg=lambda m: f"{weight=} {ignore=} {smoothing=}: {m}")


def test_single_nc_buffer_per_step(kernel_backend):
    # Count N x C allocations: torch's allocator (seen by the profiler) plus linclass's
    # CPU buffer cache (which the profiler does not see).  Forward + backward needs one.
    x = torch.randn(512, 1024, requires_grad=True)  # 2 MiB of scores
    t = torch.randint(0, 1024, (512,))
    from torch.profiler import ProfilerActivity, profile

    before = torch.ops.linclass._buffer_cache_stats()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        linclass.cross_entropy(x, t).backward()
    after = torch.ops.linclass._buffer_cache_stats()
    cached = (after[2] + after[3]) - (before[2] + before[3])
    big = [e.name for e in prof.events() if e.self_cpu_memory_usage >= x.numel() * 4]
    assert cached + len(big) == 1, (cached, big)
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="needs linclass._C")
@pytest.mark.parametrize("c", [5, 10, 33, 39, 40, 65, 100, 127, 128, 255, 1000, 1100, 1105, 16500])
def test_gradients_of_8_mib_and_more_with_and_without_streaming(c):
    # Past 8 MiB the C++ paths write the gradient with non-temporal stores: rows on
    # vector boundaries (128) where they lie; rows off them from 64 classes (65 to
    # 1105) through one LineStream, which joins each row's last partial vector to the
    # next row's first, also across blocks (16500: a row per block, each thread's rows
    # through one scratch row of exponentials); the lane path from a staging buffer
    # from 8 classes up (10, 33, 39; its last tile partial, n % 16 != 0).  Shorter rows
    # (5, 40) are written with ordinary stores.  Ignored rows (zeros), label smoothing
    # with class weights and the hinge's p = 2 take the same streams: every variant
    # must give torch's values.
    n = (9 << 20) // (4 * c)
    x = torch.randn(n, c)
    t = torch.randint(0, c, (n,))
    t_ignored = t.clone()
    t_ignored[3::7] = -100
    w = torch.rand(c) + 0.5
    with linclass.backends.use("cpp"):
        for ours, theirs, target, kwargs in (
                (linclass.cross_entropy, F.cross_entropy, t, {}),
                (linclass.cross_entropy, F.cross_entropy, t_ignored,
                 dict(weight=w, label_smoothing=0.1)),
                (linclass.multi_margin_loss, F.multi_margin_loss, t, {}),
                (linclass.multi_margin_loss, F.multi_margin_loss, t, dict(p=2, weight=w))):
            loss, grad = run(ours, x, target, **kwargs)
            ref_loss, ref_grad = run(theirs, x, target, **kwargs)
            assert_close(loss, ref_loss, torch.float32, f"loss {kwargs}")
            assert_close(grad, ref_grad, torch.float32, f"grad {kwargs}")


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="needs linclass._C")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [2048, 2051, 16400])
def test_streamed_rows_whose_gradients_are_written_during_the_next_row(c, dtype):
    # Streamed rows of 8 KiB and more hand their gradient on: row r's stores go out
    # during row r + 1's exponentials' pass (row_driver.h, kDeferredGradientRowBytes).
    # Around a pending gradient: ignored rows and a NaN row (each writes its own first),
    # rows off vector boundaries (2051: each row's edges joined through the LineStream
    # with its neighbours'), a row per block (16400), the end of each thread's rows;
    # every variant equal to torch's values, and the same bits on 1, 2 and 3 threads.
    n = (9 << 20) // (dtype.itemsize * c) + 3
    x = torch.randn(n, c, dtype=dtype)
    x[n // 2, 7] = float("inf")  # a NaN row, like torch's
    t = torch.randint(0, c, (n,))
    t[1::5] = -100
    t[2] = t[3] = -100  # two ignored rows in a row
    t[n // 2] = 0  # the NaN row counts
    w = torch.rand(c, dtype=dtype) + 0.5
    with linclass.backends.use("cpp"):
        for kwargs in ({}, dict(weight=w, label_smoothing=0.1)):
            loss, grad = run(linclass.cross_entropy, x, t, reduction="sum", **kwargs)
            ref_loss, ref_grad = run(F.cross_entropy, x.double(), t, reduction="sum",
                                     **{k: v.double() if torch.is_tensor(v) else v
                                        for k, v in kwargs.items()})
            assert grad[n // 2].isnan().all() and loss.isnan()
            rows = torch.ones(n, dtype=torch.bool)
            rows[n // 2] = False
            assert_close(grad[rows], ref_grad[rows].to(dtype), dtype, f"grad {kwargs}")
            assert (grad[t == -100] == 0).all()
            finite = x[rows], t[rows]
            assert_close(run(linclass.cross_entropy, *finite, reduction="sum", **kwargs)[0],
                         F.cross_entropy(finite[0].double(), finite[1], reduction="sum",
                                         **{k: v.double() if torch.is_tensor(v) else v
                                            for k, v in kwargs.items()}).to(dtype),
                         dtype, f"loss {kwargs}")
            threads = torch.get_num_threads()
            try:
                for count in (1, 3):
                    torch.set_num_threads(count)
                    again = run(linclass.cross_entropy, x, t, reduction="sum", **kwargs)[1]
                    torch.testing.assert_close(again, grad, rtol=0, atol=0, equal_nan=True)
            finally:
                torch.set_num_threads(threads)


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="C++ kernels not built")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 7), (64, 10), (33, 45), (20, 100), (6, 1000), (3, 4099),
                                   (5, 16411), (2, 5, 3, 9)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_half_types_are_float32_math_rounded_once(dtype, shape, reduction):
    """The C++ kernels read 16-bit scores as float32 (exactly) and round each result
    once: the float32 kernel's results on the same values, rounded as torch rounds
    (nearest even, subnormals included: scores 4 sd wide make probabilities below
    float16's smallest normal), through the vectorized and the scalar conversions."""
    for sliced in (False, True):  # rows one after another, or a view of wider rows
        wide = (torch.randn(shape[:1] + (shape[1] + 3 * sliced,) + shape[2:]) * 4).to(dtype)
        x = wide[:, :shape[1]]
        t = torch.randint(0, shape[1], (shape[0],) + shape[2:])
        args = (None, -100, 0.0, linclass._ops.REDUCTIONS[reduction], True)
        loss, grad = torch.ops.linclass.cross_entropy(x, t, *args)
        loss32, grad32 = torch.ops.linclass.cross_entropy(x.float(), t, *args)
        assert loss.dtype == torch.float32 and torch.equal(loss, loss32)  # the op's loss: float32
        assert torch.equal(grad, grad32.to(dtype))
        assert (grad32.abs() < 6.1e-5).any() and (grad32 != 0).all()
        x = x.clone()
        x[0, 1] = float("nan")  # a NaN row: NaN where the float32 kernel has NaN (its bit
        # pattern is not compared: torch's own conversions differ, 0x7FC0 or 0xFFFF)
        grad, grad32 = (torch.ops.linclass.cross_entropy(v, t, *args)[1] for v in (x, x.float()))
        nan = grad32.isnan()
        assert nan[0].all() and torch.equal(grad.isnan(), nan)
        assert torch.equal(grad[~nan], grad32[~nan].to(dtype))
