"""Fused linear + loss for few classes in one Triton kernel: the scores, the loss and
all three gradients from register tiles, with tl.dot over D.  No score matrix exists.

For C <= MAX_C (the classic linear classifiers, the two-layer net's last layer) a
program takes BLOCK_M rows of X at a time, all classes at once (BLOCK_C >= C):

    S    = X_b W^T + b        tl.dot over BLOCK_D slices of D: [BLOCK_M, BLOCK_C], float32
    loss_b, dS                the loss tile of the plain kernels (cross_entropy.cross_entropy_tile,
                              multi_margin.multi_margin_tile), dS scaled for the batch's reduction
    dX_b = dS W               tl.dot per BLOCK_D slice, stored
    dW_p += dS^T X_b          a per-program float32 partial [C, D] (read-modify-write)
    db_p += column sums of dS

Programs take row blocks pid, pid + P, pid + 2P, ...; afterwards dW = sum_p dW_p and
db = sum_p db_p, added in a fixed order: deterministic, no float atomics.  Extra memory
is the P x C x D float32 partials (P ~ twice the SM count) and one float per row, never
N x C.  X is read twice per row block (scores, then dX / dW, the second time mostly
from L2).  float32 products use IEEE float32 (not TF32), like torch's default matmul.
"""

import os

import torch
import triton
import triton.language as tl

from .cross_entropy import cross_entropy_tile, consts, split
from .multi_margin import multi_margin_tile
from .tuning import cdiv, next_pow2, sm_count

MAX_C = 64
# On CUDA only 16-bit inputs take this kernel: float32 products here are IEEE float32
# without tensor cores, which measured 2.4 ms against cuBLAS's 0.9 ms at 40000 x 3073 x 10
# on an H200 (bench/results/gpu-NVIDIA-H200.md); bfloat16 ran level with torch there.
# The interpreter runs float32 through it too, so the tests check the kernel at float32.
DTYPES = {"cuda": (torch.bfloat16, torch.float16),
          "cpu": (torch.float32, torch.bfloat16, torch.float16)}
PROGRAMS = 0  # tests set a small number (the interpreter costs ~1 ms per program step)


# The Triton interpreter's tl.dot misreads 16-bit operands (triton 3.8: bfloat16 products
# come out ~1e10); there the operands are widened to float32 first, which gives the same
# products (a product of two 16-bit floats is exact in float32).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _operand(v, WIDEN: tl.constexpr):
    if WIDEN:
        return v.to(tl.float32)
    else:
        return v


@triton.jit
def _linear_tile_kernel(
    X, Wt, B, T, CONSTS, LOSS, GX, GWP, GBP,
    N, D, C, sxn, sxd, swc, swd, sgn, sgd,
    ignore_index, keep_hi, keep_lo, smooth_hi, smooth_lo, margin_hi, margin_lo,
    CE: tl.constexpr, POWER: tl.constexpr, SMOOTHING: tl.constexpr, HAS_BIAS: tl.constexpr,
    GRAD_X: tl.constexpr, GRAD_W: tl.constexpr, GRAD_B: tl.constexpr, PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row blocks pid, pid + P, ... of loss(X W^T + b) (see the module docstring).
    CE: cross-entropy (CONSTS = scale, sum of class weights), else the hinge of power POWER
    (CONSTS = scale).  LOSS gets the unscaled per-row losses."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ks = tl.arange(0, BLOCK_D)
    scale = tl.load(CONSTS)
    keep = tl.zeros([], tl.float32) + keep_hi + keep_lo
    smooth = tl.zeros([], tl.float32) + smooth_hi + smooth_lo
    margin = tl.zeros([], tl.float32) + margin_hi + margin_lo
    gb = tl.zeros([BLOCK_C], tl.float32)
    for rb in range(pid, tl.cdiv(N, BLOCK_M), tl.num_programs(0)):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < N
        s = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
        for k0 in range(0, D, BLOCK_D):
            k = k0 + ks
            xk = tl.load(X + rows[:, None] * sxn + k[None, :] * sxd,
                         mask=row_ok[:, None] & (k < D)[None, :], other=0.0)
            wk = tl.load(Wt + cols[None, :] * swc + k[:, None] * swd,
                         mask=col_ok[None, :] & (k < D)[:, None], other=0.0)
            s = tl.dot(_operand(xk, WIDEN), _operand(wk, WIDEN), s, input_precision=PRECISION)
        if HAS_BIAS:
            s += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        if CE:
            y = tl.load(T + rows, mask=row_ok, other=ignore_index)
            ignored = y == ignore_index
            bad = row_ok & ~ignored & ((y < 0) | (y >= C))
            valid = row_ok & ~ignored & ~bad
            w = tl.where(col_ok, 1.0, 0.0)
            loss, g = cross_entropy_tile(tl.where(mask, s, float("-inf")), cols, y, mask, valid, bad, w,
                              keep, smooth, tl.load(CONSTS + 1), scale, False, SMOOTHING)
        else:
            y = tl.load(T + rows, mask=row_ok, other=0)
            valid = row_ok & (y >= 0) & (y < C)
            w_over_c = tl.where(valid, 1.0, 0.0) / C
            loss, g = multi_margin_tile(tl.where(mask, s, 0.0), cols, y, mask, row_ok & ~valid, w_over_c,
                              margin, scale, POWER)
        tl.store(LOSS + rows, loss, mask=row_ok)
        g = tl.where(mask, g, 0.0)
        if GRAD_B:
            gb += tl.sum(g, 0)
        gq = _operand(g.to(X.dtype.element_ty), WIDEN)  # the products' operand type, as in torch's GEMMs
        if GRAD_X or GRAD_W:
            for k0 in range(0, D, BLOCK_D):
                k = k0 + ks
                k_ok = k < D
                if GRAD_X:
                    wk = tl.load(Wt + cols[:, None] * swc + k[None, :] * swd,
                                 mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                    gx = tl.dot(gq, _operand(wk, WIDEN), input_precision=PRECISION)
                    tl.store(GX + rows[:, None] * sgn + k[None, :] * sgd, gx.to(GX.dtype.element_ty),
                             mask=row_ok[:, None] & k_ok[None, :])
                if GRAD_W:
                    xk = tl.load(X + rows[:, None] * sxn + k[None, :] * sxd,
                                 mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    part = tl.dot(tl.trans(gq), _operand(xk, WIDEN), input_precision=PRECISION)
                    pw = GWP + pid.to(tl.int64) * C * D + cols[:, None] * D + k[None, :]
                    ok = col_ok[:, None] & k_ok[None, :]
                    tl.store(pw, tl.load(pw, mask=ok, other=0.0) + part, mask=ok)
    if GRAD_B:
        tl.store(GBP + pid * C + cols, gb, mask=col_ok)


def applies(input, weight) -> bool:
    """Whether the one-kernel path takes this problem (else the chunked one)."""
    return (weight.shape[0] <= MAX_C and input.dim() == 2
            and input.dtype in DTYPES.get(input.device.type, ()))


def _programs(n_blocks, device):
    if PROGRAMS:
        return max(1, min(n_blocks, PROGRAMS))
    return max(1, min(n_blocks, 2 * sm_count(device)))  # the interpreter: 2 "SMs"


def run(input, weight, bias, target, mask, is_cross_entropy, ignore_index=-100,
        label_smoothing=0.0, p=1, margin=1.0, mean=True):
    """(sum of the unscaled per-row losses, dX, dW, db) with the gradients scaled for
    'mean' (`mean`) or 'sum'; empty tensors for the gradients `mask` leaves out."""
    n, d = input.shape
    c = weight.shape[0]
    dev = input.device
    if is_cross_entropy:
        const = consts(target, None, ignore_index, c, torch.float32, mean)
    else:
        const = torch.full((1,), (1.0 / n if n else float("nan")) if mean else 1.0, device=dev,
                           dtype=torch.float32)
    # 64 x 64 tiles with 4 warps: the fastest 16-bit tiling on an H200 (bench/results/
    # gpu-NVIDIA-H200.md), and free of spills on sm_80/sm_90 (tests/test_triton_aot.py).
    block_c = max(16, next_pow2(c))
    block_m, block_d = 64, 64 if input.element_size() == 2 else 32
    n_blocks = cdiv(n, block_m)
    programs = _programs(n_blocks, dev)
    loss_rows = torch.empty(n, device=dev, dtype=torch.float32)
    empty = input.new_empty((0,))
    gx = torch.empty((n, d), device=dev, dtype=input.dtype) if mask[0] else empty
    # zeroed: programs add into their partials, and with no rows they stay the (zero) result
    gwp = torch.zeros((programs, c, d), device=dev, dtype=torch.float32) if mask[1] else empty
    gbp = torch.zeros((programs, c), device=dev, dtype=torch.float32) if mask[2] else empty
    if n:
        _linear_tile_kernel[(programs,)](
            input, weight, bias if bias is not None else input, target.contiguous(), const,
            loss_rows, gx if mask[0] else input, gwp if mask[1] else loss_rows,
            gbp if mask[2] else loss_rows,
            n, d, c, input.stride(0), input.stride(1), weight.stride(0), weight.stride(1),
            d if mask[0] else 0, 1, ignore_index, *split(1.0 - label_smoothing),
            *split(label_smoothing / c), *split(margin),
            CE=is_cross_entropy, POWER=p, SMOOTHING=label_smoothing != 0.0, HAS_BIAS=bias is not None,
            GRAD_X=mask[0], GRAD_W=mask[1], GRAD_B=mask[2],
            PRECISION="ieee" if input.dtype == torch.float32 or INTERPRETED else "tf32",
            WIDEN=INTERPRETED and input.element_size() == 2,
            BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_D=block_d,
            num_warps=4)
    gw = gwp.sum(0).to(input.dtype) if mask[1] else empty
    gb = gbp.sum(0).to(input.dtype) if mask[2] else empty
    return loss_rows.sum(), const, gx, gw, gb
