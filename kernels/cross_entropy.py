"""Fused softmax cross-entropy in Triton: loss and d loss / d scores from one read.

Math, per row of scores x (C classes), target y, class weights w (ones without a
weight), W = sum_j w_j, label smoothing eps and the reduction's gradient scale `scale`
(1 / sum of target weights for 'mean', else 1):

    m = max_j x_j,  d_j = x_j - m,  e_j = exp(d_j),  s = sum_j e_j,  s' = sum_{j != y} e_j
    loss  = (1 - eps) w_y (log s - d_y) + (eps / C) (W log s - sum_j w_j d_j)
    dx_j  = scale [((1 - eps) w_y + (eps / C) W) e_j / s - (eps / C) w_j]        (j != y)
    dx_y  = scale [(eps / C) (W e_y / s - w_y) - (1 - eps) w_y s' / s]

s' is summed on its own so that 1 - p_y = s' / s keeps its relative precision in
confident rows (p_y -> 1): in bfloat16 `p_y - 1` would round to 0.  All arithmetic is
float32 (float64 for float64 inputs); rows are addressed with int64 offsets.

Rows are (n, k) pairs of an input seen as (outer, C, inner) with element (r, j) at
n * stride_n + k * stride_k + j * stride_c, so (N, C) inputs of any strides and
(N, C, d1, ...) inputs reach the kernels without a copy.  A target that is neither a
class index nor ignore_index gives that row a NaN loss and NaN gradient: the kernels
never read or write outside the tensors.

Two kernels.  `_cross_entropy_tile_kernel` takes BLOCK_M rows of C <= BLOCK_C classes
as one tile (many rows per program at small C).  `_cross_entropy_loop_kernel` takes one
row per program: a whole row read once when the block covers it, else a walk in BLOCK_C
column blocks with an online max / log-sum-exp, then a second pass for the gradient.
Per element the walk does little besides its exp: s' is kept per lane and summed across
threads once per row, only the target's block masks the target out of s', and the
second pass writes the j != y formula everywhere and then, after a barrier, dx_y.  The
second pass re-reads rows that other programs may have pushed out of L2, so the walk has
two launch options (kernels/tuning.py picks them): L2 eviction hints (the first pass's
reads stay, the second pass's reads and stores go first) and a gradient pass in reverse
block order (the blocks read last first).  How these were chosen: docs/gpu.md.
"""

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

from .._ops import accumulation_dtype
from ._math import exp as _exp, log as _log
from .tuning import cdiv, loop_config, next_pow2, tile_config

# C up to this goes through the one-tile kernel.
TILE_MAX_C = 1024


@triton.jit
def _row_offsets(rows, inner, stride_n, stride_k):
    return (rows // inner) * stride_n + (rows % inner) * stride_k


@triton.jit
def _cross_entropy_tile_kernel(
    X, G, T, W, LOSS, CONSTS,
    n_rows, C, inner,
    sxn, sxc, sxk, sgn, sgc, sgk,
    ignore_index, keep_hi, keep_lo, smooth_hi, smooth_lo,
    HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    SCALE_LOSS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """BLOCK_M rows x BLOCK_C >= C classes in one tile (see the module docstring)."""
    keep = tl.zeros([], ACC) + keep_hi + keep_lo
    smooth = tl.zeros([], ACC) + smooth_hi + smooth_lo
    weight_sum = tl.load(CONSTS + 1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    y = tl.load(T + rows, mask=row_ok, other=ignore_index)
    ignored = y == ignore_index
    bad = row_ok & ~ignored & ((y < 0) | (y >= C))
    valid = row_ok & ~ignored & ~bad

    x_off = _row_offsets(rows, inner, sxn, sxk)
    x = tl.load(X + x_off[:, None] + cols[None, :] * sxc, mask=mask, other=float("-inf")).to(ACC)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
    else:
        w = tl.where(col_ok, 1.0, 0.0).to(ACC)
    scale = tl.load(CONSTS)
    loss, g = cross_entropy_tile(x, cols, y, mask, valid, bad, w, keep, smooth, weight_sum, scale,
                      HAS_WEIGHT, SMOOTHING)
    if SCALE_LOSS:
        loss *= scale  # ignored rows: 0 * (1 / 0) = NaN when every row is ignored
    tl.store(LOSS + rows, loss, mask=row_ok)
    if COMPUTE_GRAD:
        g_off = _row_offsets(rows, inner, sgn, sgk)
        tl.store(G + g_off[:, None] + cols[None, :] * sgc, g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def cross_entropy_tile(x, cols, y, mask, valid, bad, w, keep, smooth, weight_sum, scale,
            HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr):
    """(per-row loss, gradient times `scale`) of a [BLOCK_M, BLOCK_C] tile of scores x
    (-inf outside `mask`) with targets y, class weights w (0 outside the classes), as in
    the module docstring.  Rows that are not `valid` get 0 (ignored) or NaN (`bad`).
    Shared by the loss kernels and the fused linear kernel (kernels/linear_tile.py)."""
    m = tl.max(x, 1)
    d = x - m[:, None]
    e = tl.where(mask, _exp(d), 0.0)
    is_y = (cols[None, :] == y[:, None]) & mask
    s_excl = tl.sum(tl.where(is_y, 0.0, e), 1)
    e_y = tl.sum(tl.where(is_y, e, 0.0), 1)
    d_y = tl.sum(tl.where(is_y, d, 0.0), 1)
    s = s_excl + e_y
    log_s = _log(s)
    if HAS_WEIGHT:
        w_y = tl.sum(tl.where(is_y, w[None, :], 0.0), 1)
    else:
        w_y = tl.where(valid, 1.0, 0.0).to(x.dtype)
    loss = keep * w_y * (log_s - d_y)
    if SMOOTHING:
        sum_wd = tl.sum(tl.where(mask, w[None, :] * d, 0.0), 1)
        loss += smooth * (weight_sum * log_s - sum_wd)
    loss = tl.where(valid, loss, tl.where(bad, float("nan"), 0.0))
    a = scale * (keep * w_y + smooth * weight_sum) / s
    g = a[:, None] * e
    if SMOOTHING:
        g -= (scale * smooth) * w[None, :]
    g_y = scale * (smooth * (weight_sum * e_y / s - w_y) - keep * w_y * s_excl / s)
    g = tl.where(is_y, g_y[:, None], g)
    g = tl.where(valid[:, None], g, tl.where(bad[:, None], float("nan"), 0.0))
    return loss, g


@triton.jit
def _cross_entropy_loop_kernel(
    X, G, T, W, LOSS, CONSTS,
    n_rows, C, inner,
    sxn, sxc, sxk, sgn, sgc, sgk,
    ignore_index, keep_hi, keep_lo, smooth_hi, smooth_lo,
    HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    SCALE_LOSS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
    REVERSE: tl.constexpr, EVICT: tl.constexpr,
):
    """One row per program, walked in BLOCK_C blocks: a first pass for the loss, a second
    one for the gradient (in reverse block order with REVERSE).  With EVICT, L2 eviction hints:
    the first pass's reads stay (evict_last) for the second pass, whose reads and
    gradient stores go first (evict_first), so that the gradient written does not push
    out the rows still to be re-read.

    Online log-sum-exp: with a running max m, s' (per lane) is rescaled by exp(m_old - m)
    when m grows, and sum_j w_j d_j by - (sum of w seen) * (m - m_old); s = s' + e_y.
    """
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(T + row)
    x_base = X + _row_offsets(row, inner, sxn, sxk)
    g_base = G + _row_offsets(row, inner, sgn, sgk)
    cols = tl.arange(0, BLOCK_C)
    if (y == ignore_index) | (y < 0) | (y >= C):
        fill = tl.where(y == ignore_index, 0.0, float("nan"))
        if SCALE_LOSS:
            tl.store(LOSS + row, fill * tl.load(CONSTS))  # NaN when every row is ignored
        else:
            tl.store(LOSS + row, fill)
        if COMPUTE_GRAD:
            for start in range(0, C, BLOCK_C):
                c = start + cols
                fill_block = tl.zeros([BLOCK_C], tl.float32) + fill
                tl.store(g_base + c * sgc, fill_block.to(G.dtype.element_ty), mask=c < C)
    else:
        keep = tl.zeros([], ACC) + keep_hi + keep_lo
        smooth = tl.zeros([], ACC) + smooth_hi + smooth_lo
        weight_sum = tl.load(CONSTS + 1)
        x_y = tl.load(x_base + y * sxc).to(ACC)
        m = tl.full([], float("-inf"), ACC)
        # s' summed per lane (one cross-thread sum at the end, not one per block), and
        # s = s' + e_y afterwards: a sum of positive terms, no cancellation.
        s_excl = tl.zeros([BLOCK_C], ACC)
        sum_wd = tl.zeros([], ACC)
        w_seen = tl.zeros([], ACC)
        y_start = (y // BLOCK_C) * BLOCK_C  # the block that holds the target
        for start in range(0, C, BLOCK_C):
            c = start + cols
            ok = c < C
            if EVICT:
                x = tl.load(x_base + c * sxc, mask=ok, other=float("-inf"), eviction_policy="evict_last")
            else:
                x = tl.load(x_base + c * sxc, mask=ok, other=float("-inf"))
            x = x.to(ACC)
            m_new = tl.maximum(m, tl.max(x, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: no shift
            alpha = _exp(m - m_safe)
            e = _exp(x - m_safe)  # 0 past the row's end (x = -inf there, m_safe finite)
            if start == y_start:  # one block per row pays for the target's mask
                e = tl.where(c == y, 0.0, e)
            s_excl = s_excl * alpha + e
            if SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(W + c, mask=ok, other=0.0).to(ACC)
                else:
                    w = tl.where(ok, 1.0, 0.0).to(ACC)
                shift = tl.where(m == float("-inf"), 0.0, m_safe - m)
                sum_wd = sum_wd - w_seen * shift + tl.sum(tl.where(ok, w * (x - m_safe), 0.0), 0)
                w_seen += tl.sum(w, 0)
            m = m_new
        if HAS_WEIGHT:
            w_y = tl.load(W + y).to(ACC)
        else:
            w_y = tl.full([], 1.0, ACC)
        d_y = x_y - m  # NaN when every score is -inf, as in torch
        e_y = _exp(d_y)
        s_excl = tl.sum(s_excl, 0)
        s = s_excl + e_y
        log_s = _log(s)
        loss = keep * w_y * (log_s - d_y)
        if SMOOTHING:
            loss += smooth * (weight_sum * log_s - sum_wd)
        if SCALE_LOSS:
            loss *= tl.load(CONSTS)
        tl.store(LOSS + row, loss)

        if COMPUTE_GRAD:
            scale = tl.load(CONSTS)
            a = scale * (keep * w_y + smooth * weight_sum) / s
            b = scale * smooth
            g_y = scale * (smooth * (weight_sum * e_y / s - w_y) - keep * w_y * s_excl / s)
            if REVERSE:  # last block first: the blocks pass 1 read last are still in L2
                last = (tl.cdiv(C, BLOCK_C) - 1) * BLOCK_C
                for i in range(0, C, BLOCK_C):
                    _cross_entropy_grad_block(last - i, cols, x_base, g_base, W, C, sxc, sgc, m, a, b,
                                   G.dtype.element_ty, HAS_WEIGHT, SMOOTHING, ACC, EVICT)
            else:
                for start in range(0, C, BLOCK_C):
                    _cross_entropy_grad_block(start, cols, x_base, g_base, W, C, sxc, sgc, m, a, b,
                                   G.dtype.element_ty, HAS_WEIGHT, SMOOTHING, ACC, EVICT)
            # The blocks wrote the j != y formula into the target's slot too (no per-element
            # select); every thread's store of it comes before this one.
            tl.debug_barrier()
            tl.store(g_base + y * sgc, g_y.to(G.dtype.element_ty))


@triton.jit
def _cross_entropy_grad_block(start, cols, x_base, g_base, W, C, sxc, sgc, m, a, b, OUT,
                   HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, ACC: tl.constexpr,
                   EVICT: tl.constexpr):
    """dx_j (j != y) of columns start + cols of a row (second pass of _cross_entropy_loop_kernel)."""
    c = start + cols
    ok = c < C
    if EVICT:
        x = tl.load(x_base + c * sxc, mask=ok, other=float("-inf"), eviction_policy="evict_first")
    else:
        x = tl.load(x_base + c * sxc, mask=ok, other=float("-inf"))
    g = a * _exp(x.to(ACC) - m)
    if SMOOTHING:
        if HAS_WEIGHT:
            g -= b * tl.load(W + c, mask=ok, other=0.0).to(ACC)
        else:
            g -= b
    if EVICT:
        tl.store(g_base + c * sgc, g.to(OUT), mask=ok, eviction_policy="evict_first")
    else:
        tl.store(g_base + c * sgc, g.to(OUT), mask=ok)


def _geometry(t: torch.Tensor):
    """(outer, C, inner, stride_n, stride_c, stride_k) of a (C,), (N, C) or (N, C, d...)
    tensor, or None when the d-dims cannot be seen as one strided dim."""
    if t.dim() == 1:
        return 1, t.shape[0], 1, 0, t.stride(0), 0
    outer, classes = t.shape[0], t.shape[1]
    inner, stride_k = 1, 1
    first = True
    empty = t.numel() == 0  # its strides are arbitrary (contiguous() keeps them); unread
    for d in range(t.dim() - 1, 1, -1):
        if t.shape[d] == 1 or empty:
            inner *= t.shape[d]
            continue
        if first:
            stride_k, first = t.stride(d), False
        elif t.stride(d) != inner * stride_k:
            return None
        inner *= t.shape[d]
    if any(t.shape[d] == 0 for d in range(2, t.dim())):
        inner = 0
    return outer, classes, inner, t.stride(0), t.stride(1), stride_k


def launch_geometry(input: torch.Tensor):
    """The input (made contiguous only when its d-dims cannot be flattened) and its geometry."""
    geom = _geometry(input)
    if geom is None:
        input = input.contiguous()
        geom = _geometry(input)
    return input, geom


def tl_acc(acc: torch.dtype):
    """The Triton accumulation dtype for a torch one (accumulation_dtype's result)."""
    return tl.float64 if acc == torch.float64 else tl.float32


@triton.jit
def _consts_store(CONSTS, denom, weight_sum, MEAN: tl.constexpr):
    if MEAN:
        # Target weights summing to zero: NaN, as torch's 0 / 0 (see the C++ setup).
        scale = tl.where(denom != 0, 1.0 / denom, float("nan"))
    else:
        scale = tl.full([], 1.0, denom.dtype)
    tl.store(CONSTS, scale)
    tl.store(CONSTS + 1, weight_sum)
    tl.store(CONSTS + 2, denom)


@triton.jit
def _cross_entropy_consts_kernel(T, W, CONSTS, n, C, ignore_index,
                      MEAN: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr,
                      BLOCK: tl.constexpr, PARTS: tl.constexpr):
    """CONSTS[0:3] = (scale, W, denominator) for the launch that follows.

    denominator = sum of w_y over the rows whose target is not ignore_index (their count
    without a weight), W = sum_j w_j (C without a weight), scale = 1 / denominator for
    'mean', else 1.  Out-of-range targets count with weight 0 (their rows are NaN anyway).

    P programs (P <= PARTS; PARTS = 1: one program, which writes the result itself)
    share the targets and the weights, grid-stride: one program alone would read all N
    targets at one SM's bandwidth (milliseconds at N ~ 10^7, more than the loss kernel
    itself at small C).  Each writes its partial sums to CONSTS[4 + p] and
    CONSTS[4 + PARTS + p], then takes a ticket (CONSTS[3], zero on entry); the program
    that draws the last one sums the P partials (a fixed tree) and writes the result.
    Deterministic for a given N, C: no float atomics on the sums.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], ACC)
    for start in range(pid * BLOCK, n, programs * BLOCK):
        i = start + offs
        y = tl.load(T + i, mask=i < n, other=ignore_index)
        keep = (i < n) & (y != ignore_index)
        if HAS_WEIGHT:
            inside = keep & (y >= 0) & (y < C)
            acc += tl.load(W + y, mask=inside, other=0.0).to(ACC)
        else:
            acc += tl.where(keep, 1.0, 0.0).to(ACC)
    denom = tl.sum(acc, 0)
    if HAS_WEIGHT:
        wacc = tl.zeros([BLOCK], ACC)
        for start in range(pid * BLOCK, C, programs * BLOCK):
            j = start + offs
            wacc += tl.load(W + j, mask=j < C, other=0.0).to(ACC)
        weight_sum = tl.sum(wacc, 0)
    else:
        weight_sum = tl.zeros([], ACC) + C
    if PARTS == 1:
        _consts_store(CONSTS, denom, weight_sum, MEAN)
    else:
        tl.store(CONSTS + 4 + pid, denom)
        tl.store(CONSTS + 4 + PARTS + pid, weight_sum)
        # acq_rel: this program's partials are visible to whoever draws the last ticket
        ticket = tl.atomic_add(CONSTS + 3, 1.0, sem="acq_rel")
        if ticket == programs - 1:
            parts = tl.arange(0, PARTS)
            total = tl.sum(tl.load(CONSTS + 4 + parts, mask=parts < programs, other=0.0,
                                   volatile=True), 0)
            if HAS_WEIGHT:
                weight_sum = tl.sum(tl.load(CONSTS + 4 + PARTS + parts, mask=parts < programs,
                                            other=0.0, volatile=True), 0)
            _consts_store(CONSTS, total, weight_sum, MEAN)


@functools.lru_cache(maxsize=256)  # on every launch, with few distinct values
def split(v: float):
    """v as two float32 kernel arguments hi + lo: Triton passes Python floats as float32,
    and float64 kernels need v to double precision (hi + lo recovers it to ~2^-48)."""
    hi = float(np.float32(v))
    if not math.isfinite(hi):  # inf (or beyond float32): v - hi would make lo NaN
        return hi, 0.0
    return hi, float(np.float32(v - hi))


CONSTS_BLOCK = 1024  # targets per program and step
CONSTS_PARTS = 256  # programs at most (one partial sum each)


def consts(target, weight, ignore_index, classes, acc, mean):
    """(scale, W, denominator) on the device as the first three elements of a buffer, from
    one launch (no host synchronization).  Few targets (and weights): one program, no
    zeroed ticket (a fill launch saved on the small problems, whose time is host time)."""
    n = target.numel()
    longest = max(n, classes if weight is not None else 1)
    programs = max(1, min(cdiv(longest, 4 * CONSTS_BLOCK), CONSTS_PARTS))
    parts = CONSTS_PARTS if programs > 1 else 1
    make = torch.zeros if programs > 1 else torch.empty
    out = make(4 + 2 * parts, device=target.device, dtype=acc)
    _cross_entropy_consts_kernel[(programs,)](
        target, weight if weight is not None else out, out, n, classes, ignore_index, MEAN=mean,
        HAS_WEIGHT=weight is not None, ACC=tl_acc(acc), BLOCK=CONSTS_BLOCK, PARTS=parts)
    return out


def launch(input, grad, target, weight, ignore_index, label_smoothing, const, scale_loss=False,
           config=None):
    """Run the kernels: per-row losses (float32/64; times const[0] with `scale_loss`)
    returned, gradient (times const[0]) written to `grad` when it is not None.  `const`
    is consts(...).  `grad` may be `input` itself (each program reads its rows before
    writing them), else contiguous in input's shape.  `config` overrides tile_config /
    loop_config (bench/tune_gpu.py)."""
    input, (outer, C, inner, sxn, sxc, sxk) = launch_geometry(input)
    target = target.contiguous()
    rows = outer * inner
    acc = accumulation_dtype(input.dtype)
    loss_rows = torch.empty(rows, device=input.device, dtype=acc)
    compute_grad = grad is not None
    _, _, _, sgn, sgc, sgk = _geometry(grad) if compute_grad else (0, 0, 0, 0, 0, 0)
    smooth = label_smoothing / C if C > 0 else 0.0
    args = (input, grad if compute_grad else input, target, weight if weight is not None else input,
            loss_rows, const, rows, C, max(inner, 1), sxn, sxc, sxk, sgn, sgc, sgk,
            ignore_index, *split(1.0 - label_smoothing), *split(smooth))
    meta = dict(HAS_WEIGHT=weight is not None, SMOOTHING=label_smoothing != 0.0,
                COMPUTE_GRAD=compute_grad, SCALE_LOSS=scale_loss,
                ACC=tl_acc(acc))
    if rows > 0:
        if C <= TILE_MAX_C:
            block_c = max(next_pow2(C), 2)
            block_m, warps = config or tile_config(C, input.element_size(), "cross_entropy")
            _cross_entropy_tile_kernel[(cdiv(rows, block_m),)](
                *args, **meta, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)
        else:
            block_c, warps, *walk = config or loop_config(C, input.element_size(), "cross_entropy")
            if block_c >= C:  # the whole row in one block: one read, no second pass
                _cross_entropy_tile_kernel[(rows,)](*args, **meta, BLOCK_M=1, BLOCK_C=block_c, num_warps=warps)
            else:
                # walk = (reverse, evict): the gradient pass's block order and L2
                # eviction hints; missing entries are off.
                reverse, evict = tuple(walk) + (False, False)[len(walk):]
                _cross_entropy_loop_kernel[(rows,)](*args, **meta, BLOCK_C=block_c, num_warps=warps,
                                         REVERSE=bool(reverse), EVICT=bool(evict))
    return loss_rows


def cross_entropy(input, target, weight, ignore_index, label_smoothing, reduction, compute_grad):
    """Launcher behind linclass::cross_entropy_triton: returns (loss, grad) as the C++ op.

    Host work is kept to a few launches (consts, the loss kernel, one sum): at small C the
    op's time is its host overhead."""
    acc = accumulation_dtype(input.dtype)
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    const = consts(target, weight, ignore_index, C, acc, reduction == 1)
    grad = torch.empty_like(input, memory_format=torch.contiguous_format) if compute_grad else None
    loss_rows = launch(input, grad, target, weight, ignore_index, label_smoothing, const,
                       scale_loss=reduction == 1)
    if reduction == 0:
        loss = loss_rows.reshape(target.shape)
    else:
        loss = sum_rows(loss_rows, const[0] if reduction == 1 else None)
    return loss, grad if compute_grad else input.new_empty((0,))


def sum_rows(loss_rows, scale=None):
    """Sum of per-row losses (already scaled for 'mean'), in their accumulation dtype,
    which the op returns its loss in (see linclass/_ops.py).  With no rows, 'mean'
    (`scale` = 1 / 0) gives 0 * inf = NaN, as torch does."""
    total = loss_rows.sum()
    if scale is not None and loss_rows.numel() == 0:
        total = total * scale
    return total
