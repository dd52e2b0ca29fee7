"""Fused multi-class hinge loss (torch's multi_margin_loss) in Triton.

Math, per row of scores x (C classes), target y, margin M, power p in {1, 2}, the
target's class weight w_y (1 without a weight) and the reduction's gradient scale
`scale` (1/N for 'mean', else 1):

    z_j   = M - x_y + x_j                                   (j != y)
    loss  = (w_y / C) sum_{j != y} max(0, z_j)^p
    dx_j  = scale (w_y / C) [z_j > 0] (p == 1 ? 1 : 2 z_j)   (j != y)
    dx_y  = -sum_{j != y} dx_j

As in torch, a term counts only where z_j > 0 (a NaN term is dropped).  The classic
multiclass SVM loss (sum over the wrong classes) is this loss times C.  Arithmetic is
float32 (float64 for float64 inputs) with int64 row offsets; a target outside [0, C)
gives its row a NaN loss and NaN gradient without any out-of-bounds access.

`_multi_margin_tile_kernel` takes BLOCK_M rows of C <= BLOCK_C classes as one tile;
`_multi_margin_loop_kernel` takes one row per program and walks it once in BLOCK_C blocks,
writing dx_j as it goes and dx_y at the end.
"""

import torch
import triton
import triton.language as tl

from .._ops import accumulation_dtype
from .cross_entropy import TILE_MAX_C, split, sum_rows, tl_acc
from .tuning import cdiv, loop_config, next_pow2, tile_config


@triton.jit
def _hinge(z, keep, P: tl.constexpr):
    """(h, dh/dz) of max(0, z)^P where `keep`, else (0, 0)."""
    on = keep & (z > 0)
    zp = tl.where(on, z, 0.0)
    if P == 1:
        return zp, tl.where(on, 1.0, 0.0)
    else:
        return zp * zp, zp + zp


@triton.jit
def _multi_margin_tile_kernel(
    X, G, T, W, LOSS,
    n_rows, C, sxn, sxc, sgn, sgc, margin_hi, margin_lo, scale_hi, scale_lo,
    P: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    SCALE_LOSS: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """BLOCK_M rows x BLOCK_C >= C classes in one tile (see the module docstring)."""
    margin = tl.zeros([], ACC) + margin_hi + margin_lo
    scale = tl.zeros([], ACC) + scale_hi + scale_lo
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    y = tl.load(T + rows, mask=row_ok, other=0)
    valid = row_ok & (y >= 0) & (y < C)
    bad = row_ok & ~valid
    x = tl.load(X + rows[:, None] * sxn + cols[None, :] * sxc, mask=mask, other=0.0).to(ACC)
    if HAS_WEIGHT:
        w_y = tl.load(W + y, mask=valid, other=0.0).to(ACC)
    else:
        w_y = tl.where(valid, 1.0, 0.0).to(ACC)
    loss, g = multi_margin_tile(x, cols, y, mask, bad, w_y / C, margin, scale, P)
    if SCALE_LOSS:
        loss *= scale
    tl.store(LOSS + rows, loss, mask=row_ok)
    if COMPUTE_GRAD:
        tl.store(G + rows[:, None] * sgn + cols[None, :] * sgc, g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def multi_margin_tile(x, cols, y, mask, bad, w_over_c, margin, scale, P: tl.constexpr):
    """(per-row loss, gradient times `scale`) of a [BLOCK_M, BLOCK_C] tile of scores x
    with targets y and per-row w_y / C, as in the module docstring; `bad` rows get NaN.
    Shared by the loss kernels and the fused linear kernel (kernels/linear_tile.py)."""
    is_y = (cols[None, :] == y[:, None]) & mask
    x_y = tl.sum(tl.where(is_y, x, 0.0), 1)
    h, d = _hinge(margin - x_y[:, None] + x, mask & ~is_y, P)
    loss = tl.where(bad, float("nan"), w_over_c * tl.sum(h, 1))
    coef = scale * w_over_c
    g = coef[:, None] * d
    g = tl.where(is_y, -(coef * tl.sum(d, 1))[:, None], g)
    g = tl.where(bad[:, None], float("nan"), g)
    return loss, g


@triton.jit
def _multi_margin_loop_kernel(
    X, G, T, W, LOSS,
    n_rows, C, sxn, sxc, sgn, sgc, margin_hi, margin_lo, scale_hi, scale_lo,
    P: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    SCALE_LOSS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One row per program, walked in BLOCK_C blocks (see the module docstring)."""
    margin = tl.zeros([], ACC) + margin_hi + margin_lo
    scale = tl.zeros([], ACC) + scale_hi + scale_lo
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(T + row)
    x_base = X + row * sxn
    g_base = G + row * sgn
    cols = tl.arange(0, BLOCK_C)
    if (y < 0) | (y >= C):
        tl.store(LOSS + row, float("nan"))
        if COMPUTE_GRAD:
            for start in range(0, C, BLOCK_C):
                c = start + cols
                tl.store(g_base + c * sgc, tl.full([BLOCK_C], float("nan"), G.dtype.element_ty), mask=c < C)
        return
    c_y = margin - tl.load(x_base + y * sxc).to(ACC)
    if HAS_WEIGHT:
        w_over_c = tl.load(W + y).to(ACC) / C
    else:
        w_over_c = tl.full([], 1.0, ACC) / C
    coef = scale * w_over_c
    sum_h = tl.zeros([], ACC)
    sum_d = tl.zeros([], ACC)
    for start in range(0, C, BLOCK_C):
        c = start + cols
        ok = c < C
        x = tl.load(x_base + c * sxc, mask=ok, other=0.0).to(ACC)
        h, d = _hinge(c_y + x, ok & (c != y), P)
        if COMPUTE_GRAD:
            # dx_j needs only x_j and x_y: written as the block is read (one pass).  The
            # target's slot gets 0 here (d is 0 there) and dx_y after the loop.  Masking it
            # out instead costs the stores their vectorization (seen on an H200: bf16 2x
            # slower).
            tl.store(g_base + c * sgc, (coef * d).to(G.dtype.element_ty), mask=ok)
        sum_h += tl.sum(h, 0)
        sum_d += tl.sum(d, 0)
    loss = w_over_c * sum_h
    if SCALE_LOSS:
        loss *= scale
    tl.store(LOSS + row, loss)
    if COMPUTE_GRAD:
        tl.debug_barrier()  # every thread's store of the target's slot comes first
        tl.store(g_base + y * sgc, (-coef * sum_d).to(G.dtype.element_ty))


def launch(input, grad, target, p, margin, weight, scale, scale_loss=False, config=None):
    """Run the kernels on an (N, C) input: per-row losses returned (times `scale`, a float,
    with `scale_loss`), gradient (times `scale`) written to `grad` (may be `input` itself;
    else contiguous) when it is not None.  `config` = (BLOCK_M or BLOCK_C, num_warps)
    overrides the launch configuration (bench/tune_gpu.py)."""
    rows, C = input.shape
    target = target.contiguous()
    acc = accumulation_dtype(input.dtype)
    loss_rows = torch.empty(rows, device=input.device, dtype=acc)
    compute_grad = grad is not None
    args = (input, grad if compute_grad else input, target, weight if weight is not None else input,
            loss_rows, rows, C, input.stride(0), input.stride(1),
            grad.stride(0) if compute_grad else 0, grad.stride(1) if compute_grad else 0,
            *split(margin), *split(scale))
    meta = dict(P=p, HAS_WEIGHT=weight is not None, COMPUTE_GRAD=compute_grad,
                SCALE_LOSS=scale_loss, ACC=tl_acc(acc))
    if rows > 0:
        if C <= TILE_MAX_C:
            block_c = max(next_pow2(C), 2)
            block_m, warps = config or tile_config(C, input.element_size(), "multi_margin")
            _multi_margin_tile_kernel[(cdiv(rows, block_m),)](
                *args, **meta, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)
        else:
            block_c, warps = config or loop_config(C, input.element_size(), "multi_margin")
            _multi_margin_loop_kernel[(rows,)](*args, **meta, BLOCK_C=block_c, num_warps=warps)
    return loss_rows


def multi_margin_loss(input, target, p, margin, weight, reduction, compute_grad):
    """Launcher behind linclass::multi_margin_loss_triton: (N, C) input, (N,) target."""
    rows = input.shape[0]
    mean = reduction == 1
    # torch divides the 'mean' of this loss by the number of rows (0/0 = NaN for none).
    scale = (1.0 / rows if rows else float("nan")) if mean else 1.0
    grad = torch.empty(input.shape, device=input.device, dtype=input.dtype) if compute_grad else None
    loss_rows = launch(input, grad, target, p, margin, weight, scale, scale_loss=mean)
    if reduction == 0:
        loss = loss_rows
    elif rows == 0 and mean:
        loss = torch.full((), float("nan"), device=input.device, dtype=loss_rows.dtype)
    else:
        loss = sum_rows(loss_rows)
    return loss, grad if compute_grad else input.new_empty((0,))
