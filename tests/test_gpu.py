"""The GPU backends (Triton, CUDA C++) on CUDA tensors, against torch.

Skipped without a CUDA device.  bench/gpu_check.sh runs this file on a GPU machine
(with TRITON_INTERPRET=0, so that Triton compiles for the device).
"""

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import linclass
from helpers import compare_with_torch, leaf, low_precision_check, run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU_BACKENDS = [b for b in ("triton", "cuda") if linclass.backends.runs_on(b, "cuda")]


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request):
    with linclass.backends.use(request.param):
        yield request.param


def test_a_gpu_backend_is_available():
    assert GPU_BACKENDS, linclass.backends.available()
    assert linclass.backends.resolve(torch.device("cuda")) == GPU_BACKENDS[0]


@pytest.mark.skipif(len(GPU_BACKENDS) < 2, reason="needs both GPU backends")
def test_automatic_choice_goes_by_size():
    # Small losses run the CUDA C++ op, large ones Triton's (its node is Linclass<Op>TritonBackward).
    limit = linclass.backends.TRITON_MIN_BYTES
    for rows, triton in ((64, False), (limit // 40 + 1, True)):
        x = torch.randn(rows, 10, device="cuda", requires_grad=True)
        t = torch.randint(0, 10, (rows,), device="cuda")
        for fn in (linclass.cross_entropy, linclass.multi_margin_loss):
            loss = fn(x, t)
            name = type(loss.grad_fn).__name__  # grad_fn.name() fails for Python nodes on torch 2.11
            assert ("TritonBackward" in name) == triton, (rows, fn, name)
            loss.backward()
            torch.testing.assert_close(x.grad, torch.autograd.grad(
                getattr(F, fn.__name__)(x, t), x)[0], rtol=1e-4, atol=1e-6)
            x.grad = None


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (64, 10), (33, 17), (256, 1000), (8, 32000),
                                   (3, 50257), (2, 262144)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_matches_torch(gpu_backend, shape, dtype):
    x = torch.randn(shape, dtype=dtype, device="cuda") * 3
    t = torch.randint(0, shape[1], (shape[0],), device="cuda")
    w = torch.rand(shape[1], dtype=dtype, device="cuda") + 0.5
    for reduction, (weight, smoothing, ignore) in itertools.product(
            ["none", "mean", "sum"], [(None, 0.0, -100), (w, 0.1, 0)]):
        g = torch.rand(shape[0], dtype=dtype, device="cuda") if reduction == "none" else None
        compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, reduction=reduction,
                           weight=weight, label_smoothing=smoothing, ignore_index=ignore,
                           grad_output=g)


@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 40, 2, 3)])
def test_cross_entropy_kdim_and_strided(gpu_backend, shape):
    x = torch.randn(shape, device="cuda")
    t = torch.randint(0, shape[1], (shape[0],) + shape[2:], device="cuda")
    compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, reduction="none")
    xt = torch.randn(2000, 6, device="cuda").t()
    compare_with_torch(linclass.cross_entropy, F.cross_entropy, xt, torch.randint(0, 2000, (6,), device="cuda"))


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (64, 10), (33, 17), (256, 1000), (8, 32000),
                                   (2, 262144)])
@pytest.mark.parametrize("p", [1, 2])
def test_multi_margin_loss_matches_torch(gpu_backend, shape, p):
    x = torch.randn(shape, device="cuda")
    t = torch.randint(0, shape[1], (shape[0],), device="cuda")
    w = torch.rand(shape[1], device="cuda") + 0.5
    for reduction, weight in itertools.product(["none", "mean", "sum"], [None, w]):
        compare_with_torch(linclass.multi_margin_loss, F.multi_margin_loss, x, t, p=p,
                           margin=0.7, weight=weight, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reductions_at_the_edges(gpu_backend, dtype):
    """The per-row losses' reduction: no rows, every row ignored ('mean' is NaN, as in
    torch), the most rows one block sums, and more (the CUDA op hands those to at::sum)."""
    for n, c in [(0, 5), (3, 4), (1 << 16, 3), ((1 << 20) + 3, 2)]:
        x = torch.randn(n, c, device="cuda", dtype=dtype)
        t = torch.randint(0, c, (n,), device="cuda")
        for reduction in ("mean", "sum"):
            compare_with_torch(linclass.cross_entropy, F.cross_entropy, x, t, reduction=reduction)
            compare_with_torch(linclass.cross_entropy, F.cross_entropy, x,
                               torch.full_like(t, -100), reduction=reduction)
            if n:
                compare_with_torch(linclass.multi_margin_loss, F.multi_margin_loss, x, t,
                                   reduction=reduction)
            else:  # torch's hinge returns uninitialized memory for no rows (2.14, CPU)
                loss = linclass.multi_margin_loss(x, t, reduction=reduction)
                assert loss.isnan().item() if reduction == "mean" else loss.item() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 10), (512, 32000), (8, 128256)])
def test_low_precision_error_relative_to_fp32(gpu_backend, dtype, shape):
    x = torch.randn(shape, device="cuda") * 3
    t = torch.randint(0, shape[1], (shape[0],), device="cuda")
    low_precision_check(linclass.cross_entropy, F.cross_entropy, x, dtype, t, label_smoothing=0.1)
    low_precision_check(linclass.multi_margin_loss, F.multi_margin_loss, x, dtype, t)


def test_confident_rows_keep_true_class_gradient_in_bf16(gpu_backend):
    x = torch.zeros(4, 1000, device="cuda")
    t = torch.tensor([0, 1, 2, 3], device="cuda")
    x[torch.arange(4), t] = torch.tensor([12.0, 14.0, 16.0, 18.0], device="cuda")
    _, grad = run(linclass.cross_entropy, x.bfloat16(), t, reduction="sum")
    xd = leaf(x.double())
    (exact,) = torch.autograd.grad(F.cross_entropy(xd, t, reduction="sum"), xd)
    true_class = grad.double()[torch.arange(4), t]
    rel = ((true_class - exact[torch.arange(4), t]) / exact[torch.arange(4), t]).abs().max()
    assert rel < 1e-2  # one bf16 rounding, not cancellation to 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_reads_16bit_scores(gpu_backend, reduction):
    """Under CUDA autocast: torch's float32 loss, from the bfloat16 scores read as they
    are (no float32 copy of them: the op's extra memory is its bfloat16 gradient)."""
    x = (torch.randn(512, 4000, device="cuda") * 3).bfloat16()
    t = torch.randint(0, 4000, (512,), device="cuda")
    for ours, theirs in ((linclass.cross_entropy, F.cross_entropy),
                         (linclass.multi_margin_loss, F.multi_margin_loss)):
        a, b = leaf(x), leaf(x)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ours(a, t, reduction=reduction)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = theirs(b, t, reduction=reduction)
        assert loss.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        assert extra < 1.5 * x.numel() * x.element_size(), extra
        g = torch.rand_like(loss) if loss.dim() else None
        loss.backward(g)
        ref.backward(g)
        assert a.grad.dtype == torch.bfloat16
        torch.testing.assert_close(a.grad, b.grad, rtol=2 ** -7, atol=1e-6)


def test_bad_target_is_nan_and_in_bounds(gpu_backend):
    x = torch.randn(4, 7, device="cuda", requires_grad=True)
    t = torch.tensor([0, 9, 2, -5], device="cuda")
    loss = linclass.cross_entropy(x, t, reduction="none")
    assert loss[[1, 3]].isnan().all() and loss[[0, 2]].isfinite().all()
    loss.sum().backward()
    assert x.grad[[1, 3]].isnan().all() and x.grad[[0, 2]].isfinite().all()
    torch.cuda.synchronize()  # the device is still usable


def test_checked_targets_raise_on_request():
    code = (
        "import torch, linclass\n"
        "x = torch.randn(4, 7, device='cuda'); t = torch.tensor([0, 9, 2, 1], device='cuda')\n"
        "try:\n"
        "    linclass.cross_entropy(x, t)\n"
        "except IndexError as e:\n"
        "    print('raised', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, LINCLASS_CHECK_TARGETS="1"), timeout=300)
    assert "raised cross_entropy: target[1] = 9" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_offsets_beyond_int32(gpu_backend):
    free = torch.cuda.mem_get_info()[0]
    n, c = 2, (1 << 30) + 3  # N * C > 2^31
    if free < 3 * n * c * 2 + (1 << 30):
        pytest.skip("not enough GPU memory")
    x = torch.zeros(n, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.tensor([5, c - 1], device="cuda")
    loss = linclass.cross_entropy(x, t)
    loss.backward()
    expected = torch.log(torch.tensor(float(c)))
    assert abs(loss.float().item() - expected.item()) < 1e-2 * expected.item()
    assert x.grad[1, c - 1].float().item() < 0 and x.grad[1, 0].float().item() >= 0


def test_deterministic(gpu_backend):
    x = torch.randn(4096, 1000, device="cuda")
    t = torch.randint(0, 1000, (4096,), device="cuda")
    a = run(linclass.cross_entropy, x, t, label_smoothing=0.1)
    b = run(linclass.cross_entropy, x, t, label_smoothing=0.1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_many_rows_with_weights_and_ignored_targets(gpu_backend, dtype):
    # Past a few thousand rows the 'mean' denominator is summed by several programs
    # (blocks); float64 reference, and the same bits twice.
    n, c = 300007, 7
    x = torch.randn(n, c, device="cuda", dtype=dtype)
    t = torch.randint(0, c, (n,), device="cuda")
    t[::3] = -100
    w = torch.rand(c, device="cuda", dtype=dtype) + 0.5
    a = run(linclass.cross_entropy, x, t, weight=w)
    ref = run(F.cross_entropy, x.double(), t, weight=w.double())
    tol = dict(rtol=1e-2, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(a[0].double(), ref[0], **tol)
    torch.testing.assert_close(a[1].double(), ref[1], **tol)
    b = run(linclass.cross_entropy, x, t, weight=w)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_single_nc_buffer(gpu_backend):
    x = torch.randn(2048, 4096, device="cuda", requires_grad=True)  # 32 MiB
    t = torch.randint(0, 4096, (2048,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linclass.cross_entropy(x, t).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 1.5 * x.numel() * 4, extra


def test_opcheck_and_compile_on_cuda(gpu_backend):
    op = {"triton": torch.ops.linclass.cross_entropy_triton.default,
          "cuda": torch.ops.linclass.cross_entropy.default}[gpu_backend]
    x = torch.randn(6, 5000, device="cuda", requires_grad=True)
    t = torch.randint(0, 5000, (6,), device="cuda")
    torch.library.opcheck(op, (x, t, None, -100, 0.1, 1, True))
    f = torch.compile(lambda x, t: linclass.cross_entropy(x, t) + linclass.multi_margin_loss(x, t),
                      fullgraph=True)
    xa, xb = leaf(x), leaf(x)
    f(xa, t).backward()
    (linclass.cross_entropy(xb, t) + linclass.multi_margin_loss(xb, t)).backward()
    torch.testing.assert_close(xa.grad, xb.grad)


# ---- fused linear + loss on the GPU (Triton loss on chunked GEMMs; CUDA composes cuBLAS) ----

def _linear_both(fused, unfused, x, w, b, t, **kw):
    """Forward and all three gradients of the fused op against the torch composition."""
    ins = [leaf(v) if v is not None else None for v in (x, w, b)]
    ref = [leaf(v) if v is not None else None for v in (x, w, b)]
    out = fused(ins[0], ins[1], t, bias=ins[2], **kw)
    exp = unfused(F.linear(ref[0], ref[1], ref[2]), t, **kw)
    out.backward()
    exp.backward()
    return out, exp, [(a.grad, e.grad) for a, e in zip(ins, ref) if a is not None]


@pytest.mark.parametrize("n,d,c", [(1, 1, 1), (7, 5, 3), (33, 70, 17), (300, 64, 1000), (9, 32, 50257)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_losses_match_torch(gpu_backend, n, d, c, bias):
    x = torch.randn(n, d, device="cuda", dtype=torch.float64)
    w = torch.randn(d, c, device="cuda", dtype=torch.float64).t()  # (C, D) view of a (D, C) W
    b = torch.randn(c, device="cuda", dtype=torch.float64) if bias else None
    t = torch.randint(0, c, (n,), device="cuda")
    t[0] = -100 if n > 1 else t[0]
    cases = [(linclass.linear_cross_entropy, F.cross_entropy, dict(label_smoothing=0.1)),
             (linclass.linear_cross_entropy, F.cross_entropy, dict(reduction="sum")),
             (linclass.linear_multi_margin_loss, F.multi_margin_loss, dict(p=2, margin=0.5))]
    for fused, unfused, kw in cases:
        tt = t.clamp(min=0) if fused is linclass.linear_multi_margin_loss else t
        out, exp, grads = _linear_both(fused, unfused, x, w, b, tt, **kw)
        torch.testing.assert_close(out, exp)
        for g, e in grads:
            torch.testing.assert_close(g, e)


def test_linear_losses_per_row_in_blocks(gpu_backend, monkeypatch):
    """reduction='none' above one block: the per-row losses a block at a time, the
    scores made again in backward and weighted per row (linclass/_linear_blocks.py)."""
    from linclass import _linear_blocks

    monkeypatch.setattr(_linear_blocks, "CUDA_BLOCK_BYTES", 7 * 1000 * 8)  # 7 rows a block
    n, d, c = 50, 32, 1000
    x = torch.randn(n, d, device="cuda", dtype=torch.float64)
    w = torch.randn(c, d, device="cuda", dtype=torch.float64)
    b = torch.randn(c, device="cuda", dtype=torch.float64)
    t = torch.randint(0, c, (n,), device="cuda")
    t[3] = -100
    grad_output = torch.rand(n, device="cuda", dtype=torch.float64)
    cases = [(linclass.linear_cross_entropy, F.cross_entropy, dict(label_smoothing=0.1)),
             (linclass.linear_multi_margin_loss, F.multi_margin_loss, dict(p=2, margin=0.5))]
    for fused, unfused, kw in cases:
        tt = t.clamp(min=0) if fused is linclass.linear_multi_margin_loss else t
        ins, ref = [leaf(v) for v in (x, w, b)], [leaf(v) for v in (x, w, b)]
        out = fused(ins[0], ins[1], tt, bias=ins[2], reduction="none", **kw)
        exp = unfused(F.linear(*ref), tt, reduction="none", **kw)
        assert "LinearLossRows" in type(out.grad_fn).__name__
        out.backward(grad_output)
        exp.backward(grad_output)
        torch.testing.assert_close(out, exp)
        for a, e in zip(ins, ref):
            torch.testing.assert_close(a.grad, e.grad)


def test_linear_cross_entropy_bf16_error_relative_to_fp32(gpu_backend):
    n, d, c = 512, 256, 32000
    x32 = torch.randn(n, d, device="cuda")
    w32 = torch.randn(c, d, device="cuda") * 0.05
    t = torch.randint(0, c, (n,), device="cuda")
    oracle = _linear_both(linclass.linear_cross_entropy, F.cross_entropy, x32, w32, None, t)[1]
    xb, wb = x32.bfloat16(), w32.bfloat16()
    ours = linclass.linear_cross_entropy(xb, wb, t).float()
    theirs = F.cross_entropy(F.linear(xb, wb), t).float()
    assert (ours - oracle).abs() <= (theirs - oracle).abs() + 2e-3 * oracle.abs()


def test_linear_cross_entropy_memory_is_bounded(gpu_backend):
    # The unfused scores alone would be 4 GiB (and their gradient as much again); the fused
    # op holds one chunk (<= 512 MiB of scores) besides the gradients it returns.
    n, d, c = 16384, 256, 65536
    x = torch.randn(n, d, device="cuda", requires_grad=True)
    w = (torch.randn(c, d, device="cuda") * 0.02).requires_grad_()
    t = torch.randint(0, c, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linclass.linear_cross_entropy(x, w, t).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - (x.numel() + w.numel()) * 4
    assert extra < 0.2 * n * c * 4, extra / 2**20


def test_linear_opcheck_and_compile_on_cuda(gpu_backend):
    x = torch.randn(16, 24, device="cuda", requires_grad=True)
    w = torch.randn(300, 24, device="cuda", requires_grad=True)
    b = torch.randn(300, device="cuda", requires_grad=True)
    t = torch.randint(0, 300, (16,), device="cuda")
    f = torch.compile(lambda x, w, b, t: linclass.linear_cross_entropy(x, w, t, bias=b)
                      + linclass.linear_multi_margin_loss(x, w, t, bias=b), fullgraph=True)
    a, e = [leaf(v) for v in (x, w, b)], [leaf(v) for v in (x, w, b)]
    f(*a, t).backward()
    (linclass.linear_cross_entropy(e[0], e[1], t, bias=e[2])
     + linclass.linear_multi_margin_loss(e[0], e[1], t, bias=e[2])).backward()
    for u, v in zip(a, e):
        torch.testing.assert_close(u.grad, v.grad)


@pytest.mark.parametrize("n,d,c", [(1, 1, 1), (130, 33, 10), (4000, 3073, 10), (77, 200, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_few_classes(n, d, c, dtype):
    # C <= 64 in 16 bits: one Triton kernel with tl.dot (kernels/linear_tile.py); float32:
    # the chunked path.  Every keyword; our error against float64 within torch's own
    # same-dtype error (plus a little), and the same bits every run.
    if not linclass.backends.runs_on("triton", "cuda"):
        pytest.skip("needs triton")
    x = torch.randn(n, d, device="cuda")
    w = torch.randn(d, c, device="cuda").t() * 0.05
    b = torch.randn(c, device="cuda")
    t = torch.randint(0, c, (n,), device="cuda")
    cast = [v.to(dtype) for v in (x, w, b)]
    with linclass.backends.use("triton"):
        for fused, unfused, kw in [(linclass.linear_cross_entropy, F.cross_entropy, dict(label_smoothing=0.1)),
                                   (linclass.linear_cross_entropy, F.cross_entropy, dict(reduction="sum")),
                                   (linclass.linear_multi_margin_loss, F.multi_margin_loss, dict(p=2))]:
            out, theirs, grads = _linear_both(fused, unfused, *cast, t, **kw)
            _, oracle, g64 = _linear_both(fused, unfused, *(v.double() for v in (x, w, b)), t, **kw)
            assert (out.double() - oracle).abs() <= (theirs.double() - oracle).abs() * 2 + 1e-3 * oracle.abs() + 1e-6
            for (g, e), (_, o) in zip(grads, g64):
                assert (g.double() - o).norm() <= (e.double() - o).norm() * 1.5 + 1e-6 * o.norm() + 1e-9
            again = _linear_both(fused, unfused, *cast, t, **kw)[2]
            assert all(torch.equal(g, h) for (g, _), (h, _) in zip(grads, again))  # deterministic


def test_linear_tile_path_bf16_error_relative_to_fp32():
    if not linclass.backends.runs_on("triton", "cuda"):
        pytest.skip("needs triton")
    x = torch.randn(4000, 3073, device="cuda")
    w = torch.randn(10, 3073, device="cuda") * 0.01
    t = torch.randint(0, 10, (4000,), device="cuda")
    with linclass.backends.use("triton"):
        _, oracle, og = _linear_both(linclass.linear_cross_entropy, F.cross_entropy, x, w, None, t)
        out, theirs, grads = _linear_both(linclass.linear_cross_entropy, F.cross_entropy,
                                          x.bfloat16(), w.bfloat16(), None, t)
    assert (out.float() - oracle).abs() <= (theirs.float() - oracle).abs() + 2e-3 * oracle.abs()
    for (g, e), (o, _) in zip(grads, og):
        assert (g.float() - o).norm() <= (e.float() - o).norm() * 1.5 + 1e-3 * o.norm()


def test_backward_does_not_synchronize(gpu_backend):
    # The saved gradient is rescaled on the device (nothing to do when grad_output is 1):
    # a step must not wait for the GPU.  torch.cuda.set_sync_debug_mode raises on a sync.
    x = torch.randn(4096, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (4096,), device="cuda")
    for fn in (linclass.cross_entropy, linclass.multi_margin_loss):
        fn(x, t).backward()  # warm up (compilation, allocator)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            x.grad = None
            fn(x, t).backward()
            (fn(x, t) * 3).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        x2 = x.detach().clone().requires_grad_()
        ref = F.cross_entropy if fn is linclass.cross_entropy else F.multi_margin_loss
        ref(x2, t).backward()
        (ref(x2, t) * 3).backward()
        torch.testing.assert_close(x.grad, x2.grad)
