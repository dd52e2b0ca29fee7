"""linclass.distributed on real process groups: gloo on 127.0.0.1, 2 and 3 processes.

Every rank builds the same global scores, takes its class shard, and compares the sharded
loss and its gradient with torch.nn.functional on the gathered scores.  Each test spawns
one group and runs many cases in it (a process start costs seconds); a test whose ranks
do not finish within RANK_TIMEOUT fails instead of blocking CI.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import linclass

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

RANK_TIMEOUT = 90.0  # seconds for a whole group, start-up included


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, case, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        case(rank, world, *args)
    except BaseException:
        # spawn reports the first rank to exit; this names the rank that failed first.
        traceback.print_exc()
        sys.stderr.write(f"(rank {rank} of {world} failed)\n")
        raise
    finally:
        dist.destroy_process_group()
    # gloo's worker threads can still be releasing a finished all_gather (whose tensors
    # hold Python references) when the interpreter finalizes, and then the process aborts
    # with "terminate called without an active exception" (a torch teardown race, seen
    # here in about 1 run in 4 of the linear-op case).  A rank whose case passed leaves
    # without finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(case, world: int, *args, timeout: float = RANK_TIMEOUT) -> None:
    """Runs case(rank, world, *args) on `world` spawned processes in one gloo group; an
    exception on any rank fails the test with that rank's traceback."""
    context = mp.start_processes(_entry, args=(world, _free_port(), case, args), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} ranks did not finish within {timeout:.0f} s (a hang)")


# ---- the rank-side cases (module level: spawn imports them by name) --------------------


def _layouts(classes: int, world: int):
    """(name, per-rank (class_start or None, width)) shard layouts of `classes` classes."""
    even = [classes * r // world for r in range(world + 1)]
    yield "default", [(None, even[r + 1] - even[r]) for r in range(world)]
    # Given starts, ranks in reverse class order, the first rank twice as wide.
    widths = [classes - (world - 1) * (classes // (world + 1))] + [classes // (world + 1)] * (world - 1)
    starts = [sum(widths[r + 1:]) for r in range(world)]
    yield "reversed", [(starts[r], widths[r]) for r in range(world)]
    # One rank holds no class at all.
    yield "empty", [(None, classes if r == 0 else 0) for r in range(world)]


def _shard(x, layout, rank):
    start, width = layout[rank]
    a = start if start is not None else sum(w for _, w in layout[:rank])
    return a, width


def _all_equal_across_ranks(t: torch.Tensor, world: int) -> bool:
    t = t.detach().reshape(-1).to(torch.float64).contiguous()
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return all(bool(((o == out[0]) | (o.isnan() & out[0].isnan())).all()) for o in out)


def _compare(rank, world, sharded_fn, torch_fn, x, target, layout, kwargs, tol, go_seed=1):
    a, width = _shard(x, layout, rank)
    local = x[:, a:a + width].clone().requires_grad_(True)
    before = local.detach().clone()
    class_start = layout[rank][0]
    loss = sharded_fn(local, target, class_start=class_start, **kwargs)
    grad_out = torch.rand(loss.shape, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(go_seed)).to(x.dtype)
    (grad,) = torch.autograd.grad(loss, local, grad_out)
    full = x.clone().requires_grad_(True)
    expected = torch_fn(full, target, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected, full, grad_out)
    what = f"{sharded_fn.__name__} {kwargs} rank {rank}/{world}"
    torch.testing.assert_close(loss, expected, equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)
    torch.testing.assert_close(grad, expected_grad[:, a:a + width], equal_nan=True,
                               msg=lambda m: f"{what} grad: {m}", **tol)
    torch.testing.assert_close(local.detach(), before, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{what}: the scores were modified: {m}")
    assert _all_equal_across_ranks(loss, world), f"{what}: the ranks returned different losses"


F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=2e-5, atol=2e-6)


def _phase_backends():
    """(backend, full) for the phase implementations that run on CPU tensors: the C++
    kernels (cpp), the Triton kernels under the interpreter (a subset of the cases: it
    runs ~1 ms per program) and the torch ops (torch)."""
    import linclass

    return [(b, b != "triton") for b in ("cpp", "triton", "torch")
            if linclass.backends.runs_on(b, "cpu")]


def _case_matches_unsharded(rank, world):
    import linclass

    for backend, full in _phase_backends():
        with linclass.backends.use(backend):
            _matches_unsharded(rank, world, full)
            _probabilities_match_unsharded(rank, world)


def _sliced_target(fn):
    """fn called with this rank's columns of a (N, C) target of class probabilities."""
    def sharded(local, target, class_start=None, **kwargs):
        a, width = sharded.shard
        return fn(local, target[:, a:a + width], class_start=class_start, **kwargs)

    sharded.__name__ = f"{fn.__name__}[probabilities]"
    return sharded


def _probabilities_match_unsharded(rank, world):
    """Targets of class probabilities: each rank passes its columns of them (the phases
    run as C++ kernels with the cpp backend, as torch ops with the others)."""
    import linclass.distributed as ld

    g = torch.Generator().manual_seed(5)
    n, classes = 7, 11
    x64 = torch.randn(n, classes, generator=g, dtype=torch.float64) * 4
    x64[1, 5] = 40.0
    probs = torch.softmax(torch.randn(n, classes, generator=g, dtype=torch.float64) * 2, 1)
    probs[2] = 0.0  # a one-hot row (zeros elsewhere)
    probs[2, 7] = 1.0
    probs[3] *= 1.7  # not normalized: torch takes them as they are
    w = torch.rand(classes, generator=g, dtype=torch.float64) + 0.1
    fn = _sliced_target(ld.cross_entropy)
    for name, layout in _layouts(classes, world):
        fn.shard = _shard(x64, layout, rank)
        for dtype, tol in ((torch.float64, F64), (torch.float32, F32)):
            for kwargs in (dict(), dict(weight=w), dict(label_smoothing=0.2),
                           dict(weight=w, label_smoothing=0.05)):
                kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                for reduction in ("mean", "sum", "none"):
                    _compare(rank, world, fn, F.cross_entropy, x64.to(dtype), probs.to(dtype), layout,
                             dict(kwargs, reduction=reduction), tol)
    layout = next(_layouts(classes, world))[1]
    fn.shard = _shard(x64, layout, rank)
    # Shards far below the global max (their exponentials underflow) keep their target terms.
    far = x64.clone()
    far[:, 0] = 900.0
    for kwargs in (dict(), dict(label_smoothing=0.1, reduction="none")):
        for dtype, tol in ((torch.float64, F64), (torch.float32, F32)):
            _compare(rank, world, fn, F.cross_entropy, far.to(dtype), probs.to(dtype), layout, kwargs, tol)
    # -inf scores with target 0 (NaN loss, 0 gradient) and with target > 0 or smoothing
    # (inf loss), a shard all -inf, a row all -inf, +inf and NaN scores: torch's values,
    # row by row.
    odd = x64.clone()
    odd[0, 1] = float("-inf")
    odd[1, 2] = float("-inf")
    odd[4, :] = float("-inf")
    odd[4, 0] = 2.0
    odd[3, :] = float("-inf")
    odd[5, 4] = float("inf")
    odd[6, 6] = float("nan")
    hard = probs.clone()
    hard[0, 1] = 0.0
    for kwargs in (dict(reduction="none"), dict(reduction="none", label_smoothing=0.1)):
        _compare(rank, world, fn, F.cross_entropy, odd, hard, layout, kwargs, F64)
    # No rows: 'mean' is NaN, as in torch.
    _compare(rank, world, fn, F.cross_entropy, x64[:0], probs[:0], layout, dict(), F64)
    # Probabilities of another dtype than the scores: torch's promoted loss (float64
    # arithmetic here), the gradient in the scores' dtype.
    _compare(rank, world, fn, F.cross_entropy, x64.float(), probs, layout,
             dict(label_smoothing=0.1), F32)
    # Half precision: within a few ulps of the float64 result.
    a, width = fn.shard
    for dtype, rtol, t_dtype in ((torch.bfloat16, 2**-7, torch.bfloat16),
                                 (torch.float16, 2**-9, torch.float16),
                                 (torch.bfloat16, 2**-7, torch.float32)):
        local = x64[:, a:a + width].to(dtype).requires_grad_(True)
        loss = ld.cross_entropy(local, probs[:, a:a + width].to(t_dtype), label_smoothing=0.1)
        loss.backward()
        full = x64.to(dtype).double().requires_grad_(True)
        ref = F.cross_entropy(full, probs.to(t_dtype).double(), label_smoothing=0.1)
        ref.backward()
        assert loss.dtype == t_dtype and local.grad.dtype == dtype
        torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=1e-3)
        torch.testing.assert_close(local.grad.double(), full.grad[:, a:a + width], rtol=rtol, atol=1e-3)


def _matches_unsharded(rank, world, full=True):
    import linclass.distributed as ld

    g = torch.Generator().manual_seed(0)
    n, classes = 9, 13
    x64 = torch.randn(n, classes, generator=g, dtype=torch.float64) * 4
    x64[1, 5] = 40.0  # a confident row: 1 - p_y needs the separately summed S'
    y = torch.randint(0, classes, (n,), generator=g)
    w = torch.rand(classes, generator=g, dtype=torch.float64) + 0.1
    ce_options = [dict(), dict(weight=w), dict(label_smoothing=0.15),
                  dict(weight=w, label_smoothing=0.3, ignore_index=3)]
    layouts = list(_layouts(classes, world))
    dtypes = ((torch.float64, F64), (torch.float32, F32))
    reductions = ("mean", "sum", "none")
    mm_options = [dict(), dict(weight=w, margin=0.7)]
    if not full:
        layouts, dtypes, reductions = layouts[::2], dtypes[:1], ("mean", "none")
        ce_options, mm_options = ce_options[::3], mm_options[1:]
    for name, layout in layouts:
        for dtype, tol in dtypes:
            x = x64.to(dtype)
            for kwargs in ce_options:
                kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                y_ignored = y.clone()
                y_ignored[[0, 4]] = kwargs.get("ignore_index", -100)
                for reduction in reductions:
                    for target in (y, y_ignored) if full else (y_ignored,):
                        _compare(rank, world, ld.cross_entropy, F.cross_entropy, x, target, layout,
                                 dict(kwargs, reduction=reduction), tol)
            for p in (1, 2):
                for kwargs in mm_options:
                    kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                    for reduction in reductions:
                        _compare(rank, world, ld.multi_margin_loss, F.multi_margin_loss, x, y,
                                 layout, dict(kwargs, p=p, reduction=reduction), tol)
        # All targets in the last rank's shard / in the first one.
        for target in (torch.full((n,), classes - 1), torch.zeros(n, dtype=torch.int64)):
            _compare(rank, world, ld.cross_entropy, F.cross_entropy, x64, target, layout,
                     dict(label_smoothing=0.1), F64)
            _compare(rank, world, ld.multi_margin_loss, F.multi_margin_loss, x64, target, layout,
                     dict(p=2), F64)
    layout = next(_layouts(classes, world))[1]
    # Every row ignored: 'mean' is NaN, as in torch.
    _compare(rank, world, ld.cross_entropy, F.cross_entropy, x64, torch.full((n,), -100), layout,
             dict(), F64)
    # A row whose target's shard lies far below the global max (exp(m_r - M) underflows
    # there, in float32 and float64): its target column still gets -(1 - p_y).
    far = x64.clone()
    far[:, 0] = 900.0
    y_far = torch.full((n,), classes - 1)
    for kwargs in (dict(), dict(label_smoothing=0.1), dict(reduction="none")):
        for dtype, tol in ((torch.float64, F64), (torch.float32, F32)):
            _compare(rank, world, ld.cross_entropy, F.cross_entropy, far.to(dtype), y_far, layout,
                     kwargs, tol)
    # Every kept target weighs 0: NaN too, with label smoothing (whose part alone is x / 0).
    w_zero = w.clone()
    w_zero[y] = 0.0
    _compare(rank, world, ld.cross_entropy, F.cross_entropy, x64, y, layout,
             dict(weight=w_zero, label_smoothing=0.2), F64)
    # -inf, +inf and NaN scores give torch's NaN / finite rows.
    odd = x64.clone()
    odd[2, :] = float("-inf")
    odd[2, 3] = 1.0
    odd[3, 4] = float("inf")
    odd[5, 6] = float("nan")
    _compare(rank, world, ld.cross_entropy, F.cross_entropy, odd, y, layout,
             dict(reduction="none"), F64)
    # Half precision: torch is not the oracle; within a few ulps of the float64 result.
    for dtype, rtol in ((torch.bfloat16, 2**-7), (torch.float16, 2**-9)):
        a, width = _shard(x64, layout, rank)
        local = x64[:, a:a + width].to(dtype).requires_grad_(True)
        loss = ld.cross_entropy(local, y, label_smoothing=0.1)
        loss.backward()
        full = x64.to(dtype).double().requires_grad_(True)
        ref = F.cross_entropy(full, y, label_smoothing=0.1)
        ref.backward()
        assert loss.dtype == dtype and local.grad.dtype == dtype
        torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=1e-3)
        torch.testing.assert_close(local.grad.double(), full.grad[:, a:a + width], rtol=rtol, atol=1e-3)


def _case_collectives(rank, world):
    """At most two collectives forward (cross-entropy), three (hinge), none backward."""
    from torch.distributed.tensor.debug import CommDebugMode

    import linclass.distributed as ld

    x = torch.randn(6, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 5 * world - 1, 4])
    for fn, expected in ((ld.cross_entropy, 2), (ld.multi_margin_loss, 3)):
        with CommDebugMode() as forward:
            loss = fn(x, y, label_smoothing=0.1) if fn is ld.cross_entropy else fn(x, y)
        with CommDebugMode() as backward:
            loss.backward()
        assert forward.get_total_counts() == expected, (fn.__name__, forward.get_comm_counts())
        assert backward.get_total_counts() == 0, (fn.__name__, backward.get_comm_counts())
    probs = torch.softmax(torch.randn(6, 5), 1)
    with CommDebugMode() as forward:
        loss = ld.cross_entropy(x, probs, label_smoothing=0.1)
    with CommDebugMode() as backward:
        loss.backward()
    assert forward.get_total_counts() == 2, forward.get_comm_counts()
    assert backward.get_total_counts() == 0, backward.get_comm_counts()


def _expect_error(fn, error, match):
    with pytest.raises(error, match=match):
        fn()


def _case_bad_input(rank, world):
    """Each mistake raises a clear error on every rank; the group stays usable."""
    import linclass.distributed as ld

    n, width = 4, 3
    classes = width * world
    x = torch.randn(n, width)
    y = torch.tensor([0, 1, classes - 1, 2])
    for fn in (ld.cross_entropy, ld.multi_margin_loss):
        error = IndexError if fn is ld.cross_entropy else RuntimeError
        _expect_error(lambda: fn(x, torch.tensor([0, 1, classes, 2])), error, "out of bounds")
        _expect_error(lambda: fn(x, torch.tensor([0, -5, 1, 2])), error, "out of bounds")
        # Shard starts that overlap (every rank claims class 0).
        _expect_error(lambda: fn(x, y, class_start=0), ValueError, "do not tile")
        _expect_error(lambda: fn(x, y, class_start=0 if rank == 0 else None), ValueError,
                      "some ranks only")
        _expect_error(lambda: fn(torch.randn(n + rank, width), torch.zeros(n + rank, dtype=torch.long)),
                      ValueError, "different numbers of rows")
        # A mistake on one rank only: that rank gets its own error, the others one naming it.
        bad = torch.randn(n, width, 2) if rank == world - 1 else x
        _expect_error(lambda: fn(bad, y), ValueError,
                      "must be \\(N, C_local\\)" if rank == world - 1 else "rank\\(s\\) \\[")
        _expect_error(lambda: fn(x, y if rank else y.flip(0)), ValueError, "target differs")
        # Two targets 65521 rows apart swapped on one rank (a period of the old check).
        far = torch.zeros(65522, dtype=torch.long)
        far[-1] = 1
        _expect_error(lambda: fn(torch.randn(65522, width), far if rank else far.roll(1)),
                      ValueError, "target differs")
        _expect_error(lambda: fn(x, y, reduction="mean" if rank else "sum"), ValueError,
                      "different options")
        _expect_error(lambda: fn(x, y, weight=torch.ones(classes + 1)), RuntimeError,
                      "one entry per class")
    _expect_error(lambda: ld.cross_entropy(x, y, label_smoothing=1.5), ValueError, "label_smoothing")
    probs = torch.softmax(torch.randn(n, width), 1)
    # Class probabilities: the rank's own columns, no gradient, no ignore_index; a rank
    # passing class indices while the others pass probabilities.
    _expect_error(lambda: ld.cross_entropy(x, torch.rand(n, classes)), ValueError, "shaped as scores_local")
    _expect_error(lambda: ld.cross_entropy(x, probs.clone().requires_grad_(True)), RuntimeError,
                  "not differentiable")
    _expect_error(lambda: ld.cross_entropy(x, probs, ignore_index=1), ValueError,
                  "ignore_index is not supported")
    _expect_error(lambda: ld.multi_margin_loss(x, probs), TypeError, "class indices")
    _expect_error(lambda: ld.cross_entropy(x, probs if rank else y), ValueError, "different options")
    _expect_error(lambda: ld.multi_margin_loss(x, y, p=3), ValueError, "p == 1")
    # A bad option on one rank only: raised on every rank after the layout exchange (the
    # rank at fault its own error), never before it, where the others would wait.
    last = rank == world - 1
    others = "rank\\(s\\) \\["
    inp, w_local = torch.randn(n, 2), torch.randn(width, 2)
    for call, error, match in (
            (lambda v: ld.cross_entropy(x, y, ignore_index=v), TypeError, (1.5, -100)),
            (lambda v: ld.multi_margin_loss(x, y, margin=v), TypeError, ("x", 1.0)),
            (lambda v: ld.cross_entropy(x, y, class_start=v), TypeError, (6.5, rank * width)),
            (lambda v: ld.cross_entropy(x, y, class_start=v), TypeError, ("a", rank * width)),
            (lambda v: ld.multi_margin_loss(x, y, class_start=v), ValueError, (2**70, rank * width)),
            (lambda v: ld.linear_cross_entropy(inp, w_local, y, label_smoothing=v), ValueError,
             (1.5, 0.0)),
            (lambda v: ld.linear_cross_entropy(inp, w_local, y, ignore_index=v), TypeError,
             (1.5, -100)),
            (lambda v: ld.linear_multi_margin_loss(inp, w_local, y, p=v), ValueError, (3, 1)),
            (lambda v: ld.linear_multi_margin_loss(inp, w_local, y, margin=v), TypeError, ("x", 1.0))):
        bad_value, good_value = match
        with pytest.raises(error if last else ValueError, match=None if last else others):
            call(bad_value if last else good_value)
    # After all that, the group still agrees on a good call.
    loss = ld.cross_entropy(x, y)
    assert _all_equal_across_ranks(loss, world)


def _case_dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    import linclass.distributed as ld

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3 * world + 1, generator=g, dtype=torch.float64)  # uneven chunks
    y = torch.randint(0, x.shape[1], (5,), generator=g)
    for fn, torch_fn, kwargs in ((ld.cross_entropy, F.cross_entropy, dict(label_smoothing=0.2)),
                                 (ld.multi_margin_loss, F.multi_margin_loss, dict(p=2))):
        scores = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_(True)
        loss = fn(scores, y, **kwargs)
        assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
        loss.backward()
        full = x.clone().requires_grad_(True)
        expected = torch_fn(full, y, **kwargs)
        expected.backward()
        torch.testing.assert_close(loss.to_local(), expected.detach(), **F64)
        torch.testing.assert_close(scores.grad.full_tensor(), full.grad, **F64)
    # Class probabilities: as a DTensor sharded like the scores, replicated, sharded by
    # rows, or a plain (N, C) tensor; each rank reads its columns.
    probs = torch.softmax(torch.randn(x.shape, generator=g, dtype=torch.float64), 1)
    full = x.clone().requires_grad_(True)
    expected = F.cross_entropy(full, probs, label_smoothing=0.1)
    expected.backward()
    for target in (distribute_tensor(probs, mesh, [Shard(1)]),
                   distribute_tensor(probs, mesh, [Replicate()]),
                   distribute_tensor(probs, mesh, [Shard(0)]), probs):
        scores = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_(True)
        loss = ld.cross_entropy(scores, target, label_smoothing=0.1)
        assert isinstance(loss, DTensor) and loss.placements == (Replicate(),)
        loss.backward()
        torch.testing.assert_close(loss.to_local(), expected.detach(), **F64)
        torch.testing.assert_close(scores.grad.full_tensor(), full.grad, **F64)
    with pytest.raises(ValueError, match="Shard\\(1\\)"):
        ld.cross_entropy(distribute_tensor(x, mesh, [Shard(0)]), y)


def _case_data_parallel_mean(rank, world):
    """Ranks with different batch sizes and ignored rows: the documented recipe gives the
    global batch's mean loss and gradient (the per-rank mean, averaged, would not)."""
    import linclass
    import linclass.distributed as ld

    g = torch.Generator().manual_seed(7)
    d, classes = 4, 6
    sizes = [5 + 3 * r for r in range(world)]
    x = torch.randn(sum(sizes), d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (sum(sizes),), generator=g)
    y[torch.rand(sum(sizes), generator=g) < 0.3] = -100
    class_weight = torch.rand(classes, generator=g, dtype=torch.float64) + 0.5
    w0 = torch.randn(classes, d, generator=g, dtype=torch.float64)
    a = sum(sizes[:rank])
    xs, ys = x[a:a + sizes[rank]], y[a:a + sizes[rank]]

    w = w0.clone().requires_grad_(True)
    denom = ld.global_mean_denominator(ys, class_weight)
    loss = linclass.cross_entropy(xs @ w.t(), ys, class_weight, reduction="sum") * world / denom
    loss.backward()
    grad = w.grad.clone()
    dist.all_reduce(grad)
    grad /= world  # what DDP does
    total = loss.detach().clone()
    dist.all_reduce(total)

    full_w = w0.clone().requires_grad_(True)
    expected = F.cross_entropy(x @ full_w.t(), y, class_weight)
    expected.backward()
    torch.testing.assert_close(total / world, expected.detach(), **F64)
    torch.testing.assert_close(grad, full_w.grad, **F64)

    # Class probabilities: the global number of rows, whatever the weights.
    probs = torch.softmax(torch.randn(sum(sizes), classes, generator=g, dtype=torch.float64), 1)
    denom = ld.global_mean_denominator(probs[a:a + sizes[rank]], class_weight)
    assert float(denom) == sum(sizes)
    w = w0.clone().requires_grad_(True)
    loss = linclass.cross_entropy(xs @ w.t(), probs[a:a + sizes[rank]], class_weight,
                                  reduction="sum") * world / denom
    loss.backward()
    grad = w.grad.clone()
    dist.all_reduce(grad)
    full_w = w0.clone().requires_grad_(True)
    F.cross_entropy(x @ full_w.t(), probs, class_weight).backward()
    torch.testing.assert_close(grad / world, full_w.grad, **F64)


def _case_linear_matches_unsharded(rank, world):
    import linclass

    for backend, full in _phase_backends():
        with linclass.backends.use(backend):
            _linear_matches_unsharded(rank, world, full)


def _linear_matches_unsharded(rank, world, full=True):
    """The class-sharded head: loss equal on every rank, the input gradient equal on every
    rank (summed over the group), weight and bias gradients equal to their slices."""
    from torch.distributed.tensor.debug import CommDebugMode

    import linclass.distributed as ld
    from linclass import _linear_blocks

    default_block_bytes = _linear_blocks.BLOCK_BYTES
    _linear_blocks.BLOCK_BYTES = 3 * 8 * 13  # blocks of about three rows: the block loop is exercised
    g = torch.Generator().manual_seed(0)
    n, d, classes = 10, 5, 13
    x0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    w0 = torch.randn(classes, d, generator=g, dtype=torch.float64)
    b0 = torch.randn(classes, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    y_ignored = y.clone()
    y_ignored[3] = -100
    for name, layout in list(_layouts(classes, world))[:None if full else 1]:
        a, width = _shard(x0, layout, rank)
        cases = [(ld.linear_cross_entropy, F.cross_entropy, y_ignored, o)
                 for o in (dict(), dict(label_smoothing=0.2))]
        cases += [(ld.linear_multi_margin_loss, F.multi_margin_loss, y, o)
                  for o in (dict(), dict(p=2, margin=0.5))]
        for fn, torch_fn, target, kwargs in cases:
            for reduction in ("mean", "sum", "none"):
                for with_bias in (True, False):
                    x = x0.clone().requires_grad_(True)
                    w = w0[a:a + width].clone().requires_grad_(True)
                    b = b0[a:a + width].clone().requires_grad_(True) if with_bias else None
                    params = [x, w] + ([b] if with_bias else [])
                    loss = fn(x, w, target, b, class_start=layout[rank][0], reduction=reduction,
                              **kwargs)
                    grad_out = torch.rand(loss.shape, dtype=torch.float64,
                                          generator=torch.Generator().manual_seed(1))
                    grads = torch.autograd.grad(loss, params, grad_out)
                    xf, wf = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
                    bf = b0.clone().requires_grad_(True) if with_bias else None
                    expected = torch_fn(F.linear(xf, wf, bf), target, reduction=reduction, **kwargs)
                    full = torch.autograd.grad(expected, [xf, wf] + ([bf] if with_bias else []),
                                               grad_out)
                    what = f"{fn.__name__} {name} {kwargs} {reduction} bias={with_bias}"
                    torch.testing.assert_close(loss, expected, **F64, msg=lambda m: f"{what}: {m}")
                    torch.testing.assert_close(grads[0], full[0], **F64, msg=lambda m: f"{what}: {m}")
                    torch.testing.assert_close(grads[1], full[1][a:a + width], **F64)
                    if with_bias:
                        torch.testing.assert_close(grads[2], full[2][a:a + width], **F64)
                    assert _all_equal_across_ranks(loss, world), what
                    assert _all_equal_across_ranks(grads[0], world), what
    # A (B, T, D) input with (B, T) targets: the same rows, the loss of 'none' as (B, T).
    a, width = _shard(x0, next(_layouts(classes, world))[1], rank)
    for fn, torch_fn, target in ((ld.linear_cross_entropy, F.cross_entropy, y_ignored),
                                 (ld.linear_multi_margin_loss, F.multi_margin_loss, y)):
        for reduction in ("mean", "none"):
            x = x0.reshape(2, n // 2, d).clone().requires_grad_(True)
            w = w0[a:a + width].clone().requires_grad_(True)
            loss = fn(x, w, target.reshape(2, n // 2), reduction=reduction)
            xf, wf = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
            expected = torch_fn(F.linear(xf, wf), target, reduction=reduction)
            torch.testing.assert_close(loss, expected.reshape(loss.shape), **F64)
            assert loss.shape == ((2, n // 2) if reduction == "none" else ())
            grads = torch.autograd.grad(loss.sum(), [x, w])
            full = torch.autograd.grad(expected.sum(), [xf, wf])
            torch.testing.assert_close(grads[0], full[0].reshape(x.shape), **F64)
            torch.testing.assert_close(grads[1], full[1][a:a + width], **F64)
    # Collectives (one block of rows): layout, statistics and the input gradient's sum
    # in the forward; none in backward.
    _linear_blocks.BLOCK_BYTES = default_block_bytes
    w = w0[:classes // world * world].reshape(world, -1, d)[rank].clone().requires_grad_(True)
    for fn, expected in ((ld.linear_cross_entropy, 3), (ld.linear_multi_margin_loss, 4)):
        x = x0.clone().requires_grad_(True)
        with CommDebugMode() as forward:
            loss = fn(x, w, y.clamp(0, classes // world * world - 1))
        with CommDebugMode() as backward:
            loss.backward()
        assert forward.get_total_counts() == expected, (fn.__name__, forward.get_comm_counts())
        assert backward.get_total_counts() == 0, (fn.__name__, backward.get_comm_counts())
    # A bfloat16 head: float32 arithmetic inside, against the float64 result of the same
    # bfloat16 values.
    a, width = _shard(x0, next(_layouts(classes, world))[1], rank)
    xb = x0.bfloat16().requires_grad_(True)
    wb = w0[a:a + width].bfloat16().requires_grad_(True)
    loss = ld.linear_cross_entropy(xb, wb, y, label_smoothing=0.1)
    loss.backward()
    xf = xb.detach().double().requires_grad_(True)
    wf = w0.bfloat16().double().requires_grad_(True)
    expected = F.cross_entropy(F.linear(xf, wf), y, label_smoothing=0.1)
    expected.backward()
    assert loss.dtype == xb.grad.dtype == wb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(xb.grad.double(), xf.grad, rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(wb.grad.double(), wf.grad[a:a + width], rtol=2**-7, atol=1e-3)
    # No rows: the torch result (0 for 'sum', NaN for 'mean'), and empty gradients.
    for fn, torch_fn in ((ld.linear_cross_entropy, F.cross_entropy),
                         (ld.linear_multi_margin_loss, F.multi_margin_loss)):
        for reduction in ("mean", "sum", "none"):
            x = torch.zeros(0, d, dtype=torch.float64, requires_grad=True)
            w = w0[a:a + width].clone().requires_grad_(True)
            loss = fn(x, w, torch.zeros(0, dtype=torch.long), reduction=reduction)
            expected = torch_fn(F.linear(x.detach(), w0), torch.zeros(0, dtype=torch.long),
                                reduction=reduction) if torch_fn is F.cross_entropy else \
                (torch.zeros(0, dtype=torch.float64) if reduction == "none" else
                 torch.tensor(float("nan") if reduction == "mean" else 0.0, dtype=torch.float64))
            torch.testing.assert_close(loss, expected, equal_nan=True)
            gx, gw = torch.autograd.grad(loss.sum(), (x, w))
            assert gx.shape == (0, d) and torch.equal(gw, torch.zeros_like(w))
    # A different D on one rank is caught by the layout check.
    with pytest.raises(ValueError, match="different options"):
        ld.linear_cross_entropy(x0[:, :d - rank], w0[:2, :d - rank], y.clamp(0, 1))


# ---- the tests ------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_losses_match_the_unsharded_ops(world):
    run_ranks(_case_matches_unsharded, world)


def _case_autocast(rank, world):
    """Under torch.autocast the sharded score losses are torch's there: a float32 loss
    from 16-bit scores, the gradient in the scores' dtype."""
    import linclass.distributed as ld

    g = torch.Generator().manual_seed(0)
    n, classes = 9, 13
    full = (torch.randn(n, classes, generator=g) * 3).bfloat16()
    y = torch.randint(0, classes, (n,), generator=g)
    a, b = classes * rank // world, classes * (rank + 1) // world
    for ours, theirs in ((ld.cross_entropy, F.cross_entropy), (ld.multi_margin_loss, F.multi_margin_loss)):
        local = full[:, a:b].clone().requires_grad_(True)
        reference = full.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ours(local, y)
            expected = theirs(reference, y)
        assert loss.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        (grad,) = torch.autograd.grad(loss, [local])
        (full_grad,) = torch.autograd.grad(expected, [reference])
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad, full_grad[:, a:b], rtol=0, atol=0)
    # The sharded head: products in bfloat16 (as F.linear's under autocast), a float32 loss.
    x, w_full = torch.randn(n, 8, generator=g), torch.randn(classes, 8, generator=g)
    # (The sharded hinge takes the target's score from float32 products: bfloat16 agreement.)
    for ours, theirs, rtol in ((ld.linear_cross_entropy, F.cross_entropy, 1e-5),
                               (ld.linear_multi_margin_loss, F.multi_margin_loss, 2 ** -8)):
        xs, w = x.clone().requires_grad_(True), w_full[a:b].clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ours(xs, w, y)
        assert loss.dtype == torch.float32
        expected = theirs(F.linear(x.bfloat16(), w_full.bfloat16()).float(), y)
        torch.testing.assert_close(loss, expected, rtol=rtol, atol=0)
        grads = torch.autograd.grad(loss, [xs, w])
        assert all(t.dtype == torch.float32 for t in grads)


def _case_linear_16bit_products(rank, world):
    """The sharded linear ops' 16-bit products: in bfloat16 where the CPU multiplies it
    natively (forced on and off here with the single-process ops' knob), else all of
    them (scores and gradients) in float32 of converted operands; both within bfloat16
    rounding of the float64 result of the same bfloat16 values, over several blocks of
    rows."""
    import linclass.distributed as ld
    from linclass import _linear_blocks

    g = torch.Generator().manual_seed(1)
    n, d, classes = 23, 12, 17
    x0, w0 = torch.randn(n, d, generator=g), torch.randn(classes, d, generator=g) * 0.5
    b0 = torch.randn(classes, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    a, width = classes * rank // world, classes * (rank + 1) // world - classes * rank // world
    products = []

    class Products(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.out,
                        torch.ops.aten.addmm.out, torch.ops.aten.addmm_.default,
                        torch.ops.linclass._block_product.default):  # _linear_blocks.product
                products.append({t.dtype for t in args if isinstance(t, torch.Tensor)})
            return func(*args, **(kwargs or {}))

    default_block_bytes = _linear_blocks.BLOCK_BYTES
    _linear_blocks.BLOCK_BYTES = 4 * 8 * classes  # blocks of a few rows: dW summed over blocks
    old = torch.ops.linclass._linear_16bit_products(-1)
    try:
        for mode in (0, 1):
            torch.ops.linclass._linear_16bit_products(mode)
            for ours, theirs in ((ld.linear_cross_entropy, F.cross_entropy),
                                 (ld.linear_multi_margin_loss, F.multi_margin_loss)):
                x = x0.bfloat16().requires_grad_(True)
                w = w0[a:a + width].bfloat16().requires_grad_(True)
                bias = b0[a:a + width].bfloat16().requires_grad_(True)
                products.clear()
                with Products():
                    loss = ours(x, w, y, bias, reduction="sum")
                loss.backward()
                dtypes = set().union(*products)
                assert dtypes == ({torch.bfloat16} if mode else {torch.float32}), (mode, dtypes)
                xf = x0.bfloat16().double().requires_grad_(True)
                wf = w0.bfloat16().double().requires_grad_(True)
                bf = b0.bfloat16().double().requires_grad_(True)
                expected = theirs(F.linear(xf, wf, bf), y, reduction="sum")
                expected.backward()
                tol = dict(rtol=2 ** -6, atol=2e-2)
                torch.testing.assert_close(loss.double(), expected.detach(), **tol)
                torch.testing.assert_close(x.grad.double(), xf.grad, **tol)
                torch.testing.assert_close(w.grad.double(), wf.grad[a:a + width], **tol)
                torch.testing.assert_close(bias.grad.double(), bf.grad[a:a + width], **tol)
    finally:
        torch.ops.linclass._linear_16bit_products(old)
        _linear_blocks.BLOCK_BYTES = default_block_bytes


def _case_random_layouts(rank, world, seeds):
    """Seeded random cases against the unsharded torch op in float64: shards of random
    widths (some empty) held by the ranks in a random order, every op, dtype, reduction
    and keyword; loss and this rank's gradients."""
    import random

    import linclass.distributed as ld

    tolerance = {torch.float64: 1e-9, torch.float32: 3e-5, torch.bfloat16: 3e-2}
    for seed in seeds:
        rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
        op = rng.choice(["cross_entropy", "multi_margin_loss", "linear_cross_entropy",
                         "linear_multi_margin_loss"])
        dtype = rng.choice([torch.float32, torch.float64, torch.bfloat16])
        classes, n = rng.choice([1, 2, 7, 13, 64, 257]), rng.choice([0, 1, 3, 17, 64])
        edges = [0, *sorted(rng.randint(0, classes) for _ in range(world - 1)), classes]
        order = list(range(world))
        rng.shuffle(order)
        a, b = edges[order[rank]], edges[order[rank] + 1]
        y = torch.randint(0, classes, (n,), generator=g)
        kw = {"reduction": rng.choice(["mean", "sum", "none"]), "class_start": a}
        if "cross_entropy" in op:
            if rng.random() < 0.4:
                kw["ignore_index"] = rng.choice([-100, 0, classes - 1])
                y = torch.where(torch.rand(n, generator=g) < 0.3, kw["ignore_index"], y)
            if rng.random() < 0.3:
                kw["label_smoothing"] = rng.choice([0.05, 0.5, 1.0])
        else:
            kw.update(p=rng.choice([1, 2]), margin=rng.choice([1.0, 0.0, -1.0]))
        what = f"seed {seed}: {op} {dtype} N={n} C={classes} [{a}, {b}) {kw}"
        if op.startswith("linear"):
            d = rng.choice([1, 5, 16])
            x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
            w = (torch.randn(classes, d, generator=g, dtype=torch.float64) / d ** 0.5).to(dtype)
            mine = [x.clone().requires_grad_(), w[a:b].clone().requires_grad_()]
            loss = getattr(ld, op)(*mine[:2], y, **kw)
            full = [x.double().requires_grad_(), w.double().requires_grad_()]
            scores = F.linear(*full)
            if op == "linear_multi_margin_loss" and dtype == torch.bfloat16:
                # The values of the scores rounded to bfloat16, as F.linear (and the
                # sharded op) rounds them: the hinge's gradient jumps where a term crosses
                # 0, which that rounding decides (ties at margin 0 in a longer run of this
                # generator); the gradients still flow through the float64 product.
                scores = scores + (F.linear(x, w).double() - scores).detach()
        else:
            x = (torch.randn(n, classes, generator=g, dtype=torch.float64) * 3).to(dtype)
            mine = [x[:, a:b].clone().requires_grad_()]
            if op == "cross_entropy" and rng.random() < 0.35:  # class probabilities
                kw.pop("ignore_index", None)
                probs = torch.rand(n, classes, generator=g, dtype=torch.float64)
                if rng.random() < 0.5:
                    probs = probs / probs.sum(1, keepdim=True).clamp_min(1e-3)
                probs = probs.to(rng.choice([dtype, torch.float64]))
                what += f" probabilities {probs.dtype}"
                loss = ld.cross_entropy(mine[0], probs[:, a:b], **kw)
                y = probs.double()
            else:
                loss = getattr(ld, op)(mine[0], y, **kw)
            full = [x.double().requires_grad_()]
            scores = full[0]
        kw.pop("class_start")
        expected = getattr(F, op.replace("linear_", ""))(scores, y, **kw)
        if "margin" in kw and n == 0 and kw["reduction"] != "none":  # torch: uninitialized
            expected = torch.tensor(float("nan") if kw["reduction"] == "mean" else 0.0,
                                    dtype=torch.float64)
        tol = dict(rtol=tolerance[dtype], atol=tolerance[dtype], equal_nan=True)
        torch.testing.assert_close(loss.double(), expected.detach(), **tol, msg=lambda m: f"{what}: {m}")
        if n and expected.requires_grad:
            grad_out = torch.randn(expected.shape, generator=g, dtype=torch.float64)
            got = torch.autograd.grad((loss.double() * grad_out).sum(), mine)
            want = torch.autograd.grad((expected * grad_out).sum(), full)
            want = [want[0], want[1][a:b]] if op.startswith("linear") else [want[0][:, a:b]]
            for u, v in zip(got, want):
                torch.testing.assert_close(u.double(), v, **tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world", [2, 3])
def test_random_layouts_match_the_unsharded_ops(world):
    # and, on 2 ranks, seeds whose bfloat16 hinge terms sit at their kink (a longer run
    # found them: the target score was not rounded as the other scores were)
    seeds = [*range(world * 100, world * 100 + 40), *([1633, 2165] if world == 2 else [])]
    run_ranks(_case_random_layouts, world, seeds)


@pytest.mark.skipif("cpp" not in linclass.backends.available(),
                    reason="the 16-bit products knob is a C++ op")
def test_sharded_linear_16bit_products():
    run_ranks(_case_linear_16bit_products, 2)


def test_autocast_gives_torchs_dtypes():
    run_ranks(_case_autocast, 2)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_linear_losses_match_the_unsharded_ops(world):
    run_ranks(_case_linear_matches_unsharded, world)


def test_collective_counts():
    run_ranks(_case_collectives, 2)


@pytest.mark.parametrize("world", [2, 3])
def test_bad_input_raises_on_every_rank(world):
    run_ranks(_case_bad_input, world)


def test_dtensor_sharded_on_classes():
    run_ranks(_case_dtensor, 2)


def test_data_parallel_global_mean():
    run_ranks(_case_data_parallel_mean, 3)


def test_not_initialized_is_a_clear_error():
    import linclass.distributed as ld

    if dist.is_initialized():
        pytest.skip("a process group is already initialized here")
    with pytest.raises(RuntimeError, match="not initialized"):
        ld.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


def test_a_hang_fails_instead_of_blocking():
    """The launcher's timeout: a group where one rank never enters the collective."""
    with pytest.raises(pytest.fail.Exception, match="did not finish"):
        run_ranks(_case_one_rank_waits_forever, 2, timeout=12)


def _case_one_rank_waits_forever(rank, world):
    if rank == 0:
        dist.all_reduce(torch.zeros(1))
    else:
        time.sleep(300)

