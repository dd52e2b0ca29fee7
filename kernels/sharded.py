"""The per-shard phases of the class-sharded losses (linclass.distributed) in Triton: the
GPU twin of csrc/cpu/sharded.cpp.  The math and its derivation: linclass/_sharded.py.

Each rank holds the scores x (N, C_local) of classes [start, start + C_local); one
program per row walks its columns in BLOCK_C blocks.
  ce_stats   cross-entropy phase 1: per row m, s, s' (without the target's term), d,
             owner flag, u (a (6, N) tensor)
  ce_grad    cross-entropy phase 2: dx_j = a exp(x_j - shift) - b w_j, dx_y = the given
             target gradient (rows with a = b = 0 and a zero target gradient are
             ignored rows: all 0)
  mm_grad    multi-margin phase 2: the row's loss part and gradient part (2, N), and
             dx_j = v p max(0, h_j)^(p-1) [h_j > 0] for j != y (the target's column 0)
  ce_probs_stats / ce_probs_grad   cross-entropy against this shard's columns t of
             class probabilities: per row m, s, T = sum w t', A = sum w t' (x - m) (a
             (4, N) tensor); then dx_j = a exp(x_j - shift) - scale w_j t'_j
Inputs are contiguous and in the accumulation dtype (float32, or float64): the caller
converts.  Scalars that must keep float64 precision (margin) come in as tensors.
"""

import torch
import triton
import triton.language as tl

from ._math import exp as _exp
from .tuning import next_pow2

_MAX_BLOCK = 2048


@triton.jit
def _owned_column(y, start, C, ignore_index):
    local = y - start
    own = (y != ignore_index) & (local >= 0) & (local < C)
    return own, tl.where(own, local, -1)


@triton.jit
def _row_max(x_row, C, BLOCK_C: tl.constexpr):
    """The row's max, and the shift its exponentials take: the max, or 0 where it is not
    finite (a shard all -inf, or holding +inf / NaN: the merge makes such rows NaN)."""
    offs = tl.arange(0, BLOCK_C)
    m_vec = tl.full([BLOCK_C], float("-inf"), x_row.dtype.element_ty)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        m_vec = tl.maximum(m_vec, tl.load(x_row + cols, mask=cols < C, other=float("-inf")))
    m = tl.max(m_vec, 0)
    finite = (m == m) & (m != float("inf")) & (m != float("-inf"))
    return m, tl.where(finite, m, 0.0).to(x_row.dtype.element_ty)


@triton.jit
def _ce_stats_kernel(X, T, W, OUT, n_rows, C, start, ignore_index,
                     HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * C
    own, col = _owned_column(tl.load(T + row), start, C, ignore_index)
    offs = tl.arange(0, BLOCK_C)
    acc = X.dtype.element_ty
    m, shift = _row_max(x_row, C, BLOCK_C)
    s_vec = tl.zeros([BLOCK_C], acc)
    u_vec = tl.zeros([BLOCK_C], acc)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        mask = cols < C
        d = tl.load(x_row + cols, mask=mask, other=0.0) - shift
        s_vec += tl.where(mask & (cols != col), _exp(d), 0.0)  # s' skips the target's term
        if SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=mask, other=0.0)
            else:
                w = tl.where(mask, 1.0, 0.0).to(acc)
            u_vec += tl.where(mask, w * d, 0.0)
    s_excl = tl.sum(s_vec, 0)
    d_y = tl.where(own, tl.load(x_row + tl.maximum(col, 0), mask=own, other=0.0) - shift, 0.0)
    e_y = tl.where(own, _exp(d_y), 0.0)
    tl.store(OUT + row, m)
    tl.store(OUT + n_rows + row, s_excl + e_y)
    tl.store(OUT + 2 * n_rows + row, s_excl)
    tl.store(OUT + 3 * n_rows + row, d_y)
    tl.store(OUT + 4 * n_rows + row, tl.where(own, 1.0, 0.0).to(acc))
    tl.store(OUT + 5 * n_rows + row, tl.sum(u_vec, 0))


@triton.jit
def _ce_grad_kernel(X, T, W, SHIFT, A, B, TG, G, C, start, ignore_index,
                    HAS_WEIGHT: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * C
    g_row = G + row * C
    _, col = _owned_column(tl.load(T + row), start, C, ignore_index)
    shift = tl.load(SHIFT + row)
    a = tl.load(A + row)
    b = tl.load(B + row)
    target_grad = tl.load(TG + row)
    # NaN coefficients (NaN rows) are not 0; a row whose exponentials underflow here has
    # a = b = 0 but its target column (csrc/cpu/sharded.cpp).
    ignored = (a == 0) & (b == 0) & (target_grad == 0)
    offs = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        mask = cols < C
        g = a * _exp(tl.load(x_row + cols, mask=mask, other=0.0) - shift)
        if HAS_WEIGHT:
            g -= b * tl.load(W + cols, mask=mask, other=0.0)
        else:
            g -= b
        g = tl.where(cols == col, target_grad, g)
        tl.store(g_row + cols, tl.where(ignored, 0.0, g), mask=mask)


@triton.jit
def _mm_grad_kernel(X, T, XY, V, MARGIN, STATS, G, n_rows, C, start,
                    P: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * C
    local = tl.load(T + row) - start  # (the hinge has no ignore_index)
    col = tl.where((local >= 0) & (local < C), local, -1)
    base = tl.load(MARGIN) - tl.load(XY + row)
    v = tl.load(V + row)
    acc = X.dtype.element_ty
    offs = tl.arange(0, BLOCK_C)
    loss_vec = tl.zeros([BLOCK_C], acc)
    grad_vec = tl.zeros([BLOCK_C], acc)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        mask = cols < C
        h = base + tl.load(x_row + cols, mask=mask, other=0.0)
        valid = mask & (cols != col)
        pos = tl.where(valid & (h > 0), h, 0.0)
        if P == 1:
            g = tl.where(valid & (h > 0), v, 0.0)
            loss_vec += pos
        else:
            g = 2.0 * v * pos
            loss_vec += pos * pos
        grad_vec += g
        if COMPUTE_GRAD:
            tl.store(G + row * C + cols, g, mask=mask)
    tl.store(STATS + row, tl.sum(loss_vec, 0))
    tl.store(STATS + n_rows + row, tl.sum(grad_vec, 0))


@triton.jit
def _weighted_target(T, W, cols, mask, keep, spread, HAS_WEIGHT: tl.constexpr):
    """w_j t'_j with t' = keep t + spread (0 past the row's end)."""
    wt = tl.load(T + cols, mask=mask, other=0.0) * keep + spread
    if HAS_WEIGHT:
        wt *= tl.load(W + cols, mask=mask, other=0.0)
    return tl.where(mask, wt, 0.0)


@triton.jit
def _ce_probs_stats_kernel(X, T, W, OUT, n_rows, C, keep, spread,
                           HAS_WEIGHT: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * C
    t_row = T + row * C
    offs = tl.arange(0, BLOCK_C)
    acc = X.dtype.element_ty
    m, shift = _row_max(x_row, C, BLOCK_C)
    s_vec = tl.zeros([BLOCK_C], acc)
    t_vec = tl.zeros([BLOCK_C], acc)
    a_vec = tl.zeros([BLOCK_C], acc)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        mask = cols < C
        d = tl.load(x_row + cols, mask=mask, other=0.0) - shift
        wt = _weighted_target(t_row, W, cols, mask, keep, spread, HAS_WEIGHT)
        s_vec += tl.where(mask, _exp(d), 0.0)
        t_vec += wt
        a_vec += tl.where(mask, wt * d, 0.0)  # 0 * -inf = NaN where t' = 0, as in torch
    tl.store(OUT + row, m)
    tl.store(OUT + n_rows + row, tl.sum(s_vec, 0))
    tl.store(OUT + 2 * n_rows + row, tl.sum(t_vec, 0))
    tl.store(OUT + 3 * n_rows + row, tl.sum(a_vec, 0))


@triton.jit
def _ce_probs_grad_kernel(X, T, W, SHIFT, A, G, C, keep, spread, scale,
                          HAS_WEIGHT: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * C
    t_row = T + row * C
    shift = tl.load(SHIFT + row)
    a = tl.load(A + row)
    offs = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        mask = cols < C
        g = a * _exp(tl.load(x_row + cols, mask=mask, other=0.0) - shift)
        g -= scale * _weighted_target(t_row, W, cols, mask, keep, spread, HAS_WEIGHT)
        tl.store(G + row * C + cols, g, mask=mask)


def _block(C, most=_MAX_BLOCK):
    return min(next_pow2(max(C, 1)), most)


def _warps(C):
    return 8 if C >= 8192 else 4


def ce_stats(x, target, start, weight, smoothing, ignore_index):
    n, C = x.shape
    out = torch.empty(6, n, dtype=x.dtype, device=x.device)
    if n:
        w = weight.to(x.dtype).contiguous() if weight is not None else x
        _ce_stats_kernel[(n,)](x, target, w, out, n, C, start, ignore_index,
                               HAS_WEIGHT=weight is not None, SMOOTHING=bool(smoothing),
                               BLOCK_C=_block(C), num_warps=_warps(C))
    return out


def ce_grad(x, target, start, weight, shift, exp_coef, weight_coef, target_grad, ignore_index,
            out=None):
    n, C = x.shape
    g = torch.empty_like(x) if out is None else out
    if n and C:
        w = weight.to(x.dtype).contiguous() if weight is not None else x
        _ce_grad_kernel[(n,)](x, target, w, shift, exp_coef, weight_coef, target_grad, g, C,
                              start, ignore_index, HAS_WEIGHT=weight is not None,
                              BLOCK_C=_block(C), num_warps=_warps(C))
    return g


def mm_grad(x, target, start, x_y, row_coef, p, margin, compute_grad):
    n, C = x.shape
    stats = torch.empty(2, n, dtype=x.dtype, device=x.device)
    g = torch.empty_like(x) if compute_grad else None
    if n:
        margin_t = torch.full((1,), margin, dtype=x.dtype, device=x.device)
        _mm_grad_kernel[(n,)](x, target, x_y, row_coef, margin_t, stats, g if compute_grad else x,
                              n, C, start, P=p, COMPUTE_GRAD=bool(compute_grad),
                              BLOCK_C=_block(C), num_warps=_warps(C))
    return stats, g


def ce_probs_stats(x, t, weight, label_smoothing, classes):
    n, C = x.shape
    out = torch.empty(4, n, dtype=x.dtype, device=x.device)
    if n:
        w = weight.to(x.dtype).contiguous() if weight is not None else x
        # Three row sums in registers: half the other kernels' block, which spilled
        # (float64, sm_80: tests/test_triton_aot.py).
        _ce_probs_stats_kernel[(n,)](x, t, w, out, n, C, 1.0 - label_smoothing,
                                     label_smoothing / classes, HAS_WEIGHT=weight is not None,
                                     BLOCK_C=_block(C, _MAX_BLOCK // 2), num_warps=_warps(C))
    return out


def ce_probs_grad(x, t, weight, label_smoothing, classes, shift, exp_coef, scale):
    n, C = x.shape
    g = torch.empty_like(x)
    if n and C:
        w = weight.to(x.dtype).contiguous() if weight is not None else x
        _ce_probs_grad_kernel[(n,)](x, t, w, shift, exp_coef, g, C, 1.0 - label_smoothing,
                                    label_smoothing / classes, scale,
                                    HAS_WEIGHT=weight is not None, BLOCK_C=_block(C),
                                    num_warps=_warps(C))
    return g
