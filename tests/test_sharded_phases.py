"""The per-shard phases of linclass.distributed's losses (linclass/_sharded.py and their
C++ and Triton kernels, csrc/cpu/sharded.cpp and kernels/sharded.py) in one process: the K shards' statistics are stacked
as the all-gather would, so large shapes (vector tails, streamed stores, many threads)
are checked without starting process groups.  Against torch on the whole scores in
float64 (the naive reference) for both phase backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import linclass
from linclass import _sharded

BACKENDS = [b for b in ("cpp", "triton", "torch") if linclass.backends.runs_on(b, "cpu")]


def _skip_slow(backend, rows):
    # The Triton interpreter runs ~1 ms per program (one per row and phase).
    if backend == "triton" and rows > 100:
        pytest.skip("too many rows for the Triton interpreter")


def _edges(classes, shards):
    return [classes * r // shards for r in range(shards + 1)]


def sharded_cross_entropy(x, y, shards, weight=None, ignore_index=-100, label_smoothing=0.0,
                          reduction="mean"):
    """(loss, d loss / d x) from per-shard phases, the gather replaced by a stack."""
    edges = _edges(x.shape[1], shards)
    starts, widths = edges[:-1], [b - a for a, b in zip(edges, edges[1:])]
    local_w = [None if weight is None else weight[a:b] for a, b in zip(edges, edges[1:])]
    stats = torch.stack([_sharded.ce_phase1(x[:, a:b], y, a, w, label_smoothing > 0, ignore_index)
                         for (a, b), w in zip(zip(edges, edges[1:]), local_w)])
    grads, loss = [], None
    for r in range(shards):
        merged = _sharded.ce_merge(stats, y, weight, starts, widths, x.shape[1], ignore_index,
                                   label_smoothing, reduction, r)
        a, b = edges[r], edges[r + 1]
        grads.append(_sharded.ce_phase2(x[:, a:b], y, a, local_w[r], merged, ignore_index))
        rows = merged.loss
        loss = rows if reduction == "none" else rows.sum() / (
            merged.target_weight.sum() if reduction == "mean" else 1)
    return loss, torch.cat(grads, dim=1)


def sharded_multi_margin(x, y, shards, p=1, margin=1.0, weight=None, reduction="mean"):
    edges = _edges(x.shape[1], shards)
    x_y = sum(_sharded.target_scores(x[:, a:b], y, a) for a, b in zip(edges, edges[1:]))
    parts = [_sharded.mm_phase2(x[:, a:b], y, a, x_y, p, margin, weight, x.shape[1], reduction)
             for a, b in zip(edges, edges[1:])]
    stats = torch.stack([s for s, _ in parts])
    for (a, _), (_, g) in zip(zip(edges, edges[1:]), parts):
        loss_rows = _sharded.mm_finish(stats, g, y, a, weight, x.shape[1])
    loss = loss_rows if reduction == "none" else (
        loss_rows.sum() / (x.shape[0] if reduction == "mean" else 1))
    return loss, torch.cat([g for _, g in parts], dim=1)


def sharded_probabilities(x, t, shards, weight=None, label_smoothing=0.0, reduction="mean"):
    """(loss, d loss / d x) against class probabilities t from per-shard phases."""
    edges = _edges(x.shape[1], shards)
    cuts = list(zip(edges, edges[1:]))
    local_w = [None if weight is None else weight[a:b] for a, b in cuts]
    stats = torch.stack([_sharded.ce_probs_phase1(x[:, a:b], t[:, a:b], w, label_smoothing,
                                                  x.shape[1]) for (a, b), w in zip(cuts, local_w)])
    grads = []
    for r, (a, b) in enumerate(cuts):
        merged = _sharded.ce_probs_merge(stats, reduction, r)
        grads.append(_sharded.ce_probs_phase2(x[:, a:b], t[:, a:b], local_w[r], merged,
                                              label_smoothing, x.shape[1]))
    rows = merged.loss
    loss = rows if reduction == "none" else rows.sum() / (x.shape[0] if reduction == "mean" else 1)
    return loss, torch.cat(grads, dim=1)


def _reference(fn, x, y, **kwargs):
    full = x.double().requires_grad_(True)
    loss = fn(full, y, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), full)
    return loss.detach(), grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,shards", [((3, 1), 1), ((37, 19), 3), ((2100, 1003), 2),
                                          ((5, 4099), 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_phases(backend, shape, shards, dtype):
    n, classes = shape
    _skip_slow(backend, n)
    g = torch.Generator().manual_seed(n + classes)
    x = (torch.randn(n, classes, generator=g, dtype=torch.float64) * 5).to(dtype)
    x[0, 0] = 60.0  # confident: 1 - p_y must survive (S' summed apart)
    y = torch.randint(0, classes, (n,), generator=g)
    y[0] = 0
    if n > 2:
        y[1] = -100
    weight = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.2).to(dtype)
    tol = dict(rtol=1e-10, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-7)
    with linclass.backends.use(backend):
        for kwargs in (dict(), dict(weight=weight, label_smoothing=0.1, reduction="sum"),
                       dict(label_smoothing=0.3, reduction="none")):
            loss, grad = sharded_cross_entropy(x, y, shards, **kwargs)
            ref_kwargs = {k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            expected, expected_grad = _reference(F.cross_entropy, x, y, **ref_kwargs)
            torch.testing.assert_close(loss.double(), expected, **tol)
            torch.testing.assert_close(grad.double(), expected_grad, **tol)
        if classes > 1:
            # The confident row's target gradient, -(1 - p_y) ~ -1e-20, relative to itself
            # (torch's float64 p_y - 1 is 0 here: the reference sums the other classes).
            _, grad = sharded_cross_entropy(x, y, shards, reduction="sum")
            row = x[0].double()
            e = torch.exp(row - row.max())
            expected = -e[1:].sum() / e.sum()
            rel = (grad[0, 0].double() - expected).abs() / expected.abs()
            assert rel < (1e-5 if dtype == torch.float32 else 1e-12), rel


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,shards", [((3, 1), 1), ((37, 19), 3), ((2100, 1003), 2),
                                          ((5, 4099), 4), ((3, 64128), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probability_target_phases(backend, shape, shards, dtype):
    """Against class probabilities, each shard its columns of them; long float32 rows
    keep their precision (each row's sums run over up to 32064 columns a shard)."""
    n, classes = shape
    _skip_slow(backend, n)
    g = torch.Generator().manual_seed(n + classes)
    x = (torch.randn(n, classes, generator=g, dtype=torch.float64) * 5).to(dtype)
    x[0, 0] = 60.0
    t = torch.softmax(torch.randn(n, classes, generator=g, dtype=torch.float64) * 3, 1).to(dtype)
    weight = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.2).to(dtype)
    tol = dict(rtol=1e-10, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-7)
    with linclass.backends.use(backend):
        for kwargs in (dict(), dict(weight=weight, label_smoothing=0.1, reduction="sum"),
                       dict(label_smoothing=0.3, reduction="none")):
            loss, grad = sharded_probabilities(x, t, shards, **kwargs)
            ref_kwargs = {k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            expected, expected_grad = _reference(F.cross_entropy, x, t.double(), **ref_kwargs)
            torch.testing.assert_close(loss.double(), expected, **tol)
            torch.testing.assert_close(grad.double(), expected_grad, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,shards", [((3, 1), 1), ((37, 19), 3), ((2100, 1003), 2)])
@pytest.mark.parametrize("p", [1, 2])
def test_multi_margin_phases(backend, shape, shards, p):
    n, classes = shape
    _skip_slow(backend, n)
    g = torch.Generator().manual_seed(n * classes + p)
    x = torch.randn(n, classes, generator=g, dtype=torch.float64) * 0.3
    y = torch.randint(0, classes, (n,), generator=g)
    weight = torch.rand(classes, generator=g, dtype=torch.float64) + 0.2
    with linclass.backends.use(backend):
        for kwargs in (dict(), dict(weight=weight, margin=0.4, reduction="sum"),
                       dict(reduction="none")):
            loss, grad = sharded_multi_margin(x, y, shards, p=p, **kwargs)
            expected, expected_grad = _reference(F.multi_margin_loss, x, y, p=p, **kwargs)
            torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_phases_ignore_rows_and_keep_nan_rows(backend):
    x = torch.randn(4, 10, dtype=torch.float64)
    x[1, 2] = float("inf")
    x[2, 3] = float("nan")
    x[3, 4] = float("inf")
    y = torch.tensor([0, 5, 6, -100])  # row 3 is ignored: 0 despite its +inf score
    with linclass.backends.use(backend):
        loss, grad = sharded_cross_entropy(x, y, 2, reduction="none")
    expected, expected_grad = _reference(F.cross_entropy, x, y, reduction="none")
    # An ignored row contributes nothing, as in linclass.cross_entropy; torch's softmax
    # backward turns its +inf into a NaN row there.
    expected_grad[3] = 0.0
    torch.testing.assert_close(loss, expected, equal_nan=True, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad, expected_grad, equal_nan=True, rtol=1e-10, atol=1e-13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_phases_on_cuda(backend, dtype):
    """The GPU road (bench/gpu_check.sh runs this file): the Triton phases and the torch
    ops on CUDA tensors, against the float64 result."""
    if not linclass.backends.runs_on(backend, "cuda"):
        pytest.skip(f"{backend} does not run on CUDA here")
    g = torch.Generator().manual_seed(5)
    for n, classes, shards in ((64, 1000, 3), (512, 32000, 2), (8, 128256, 4)):
        x = (torch.randn(n, classes, generator=g) * 4).to(dtype).cuda()
        y = torch.randint(0, classes, (n,), generator=g).cuda()
        tol = dict(rtol=2e-5, atol=1e-6)  # float32 arithmetic for both dtypes
        with linclass.backends.use(backend):
            for kwargs in (dict(), dict(label_smoothing=0.1, reduction="sum")):
                loss, grad = sharded_cross_entropy(x, y, shards, **kwargs)
                expected, expected_grad = _reference(F.cross_entropy, x.cpu(), y.cpu(), **kwargs)
                torch.testing.assert_close(loss.double().cpu(), expected, **tol)
                torch.testing.assert_close(grad.double().cpu(), expected_grad, **tol)
            loss, grad = sharded_multi_margin(x, y, shards, p=2)
            expected, expected_grad = _reference(F.multi_margin_loss, x.cpu(), y.cpu(), p=2)
            torch.testing.assert_close(loss.double().cpu(), expected, **tol)
            torch.testing.assert_close(grad.double().cpu(), expected_grad, **tol)
            t = torch.softmax(torch.randn(n, classes, generator=g), 1).to(dtype).cuda()
            loss, grad = sharded_probabilities(x, t, shards, label_smoothing=0.1)
            expected, expected_grad = _reference(F.cross_entropy, x.cpu(), t.cpu().double(),
                                                 label_smoothing=0.1)
            torch.testing.assert_close(loss.double().cpu(), expected, **tol)
            torch.testing.assert_close(grad.double().cpu(), expected_grad, **tol)
