"""Fused linear + loss on the Triton backend: loss(X W^T + b, y) and its gradients for X,
W and b, so the N x C score matrix never exists.  Few classes (C <= linear_tile.MAX_C,
16-bit on CUDA): one Triton kernel with tl.dot (kernels/linear_tile.py).  Otherwise a
chunk of rows at a time:

For each chunk of rows:  S = X_c W^T + b (cuBLAS / the CPU BLAS, in the input dtype)
                         the Triton loss kernel turns S into dS in place, scaled for the
                         whole batch's reduction (loss and gradient in one read of S)
                         dW += dS^T X_c,  db += column sums of dS,  dX_c = dS W
Chunks run in order and every accumulation adds them in order: no atomics, the same
result every run.  Extra memory is one chunk of scores (plus the float32 bias
accumulator).  dW accumulates in the weight's dtype (one rounding per chunk for
bfloat16), as the chunked formulation in Liger-Kernel does: a float32 accumulator would
need float32 GEMMs.
"""

import torch

from .._ops import accumulation_dtype
from . import cross_entropy
from . import linear_tile
from . import multi_margin

# Chunks are sized like the C++ blocks (csrc/cpu/linear_loss.cpp): the input chunk stays near
# 4 MiB and the score chunk within 64 MiB, at least 32 rows.  On a GPU a chunk holds up to
# 512 MiB of scores: every chunk re-reads and re-writes dW (C x D) in its GEMM, so few
# large chunks are faster (measured on an H200 at 8192 x 4096 x 128256 bf16: with 256 MiB
# chunks the dW traffic alone cost ~4 ms of 43).  Tests set BLOCK_ROWS to exercise many
# chunks.
BLOCK_ROWS = 0


def _chunk_rows(n, d, c, elem, cuda):
    if BLOCK_ROWS:
        return BLOCK_ROWS
    if cuda:
        return max(1, min(n, (512 << 20) // max(1, c * elem)))
    by_input = (4 << 20) // max(1, d * elem)
    by_scores = (64 << 20) // max(1, c * elem)
    return min(max(32, min(by_input, by_scores)), max(n, 1))


def _chunks(input, weight, bias, target, mask, run_loss):
    """Shared loop: run_loss(S, t, rows) turns S into dS in place (if any gradient is
    wanted) and returns the chunk's per-row losses."""
    n, d = input.shape
    c = weight.shape[0]
    any_grad = any(mask)
    # Contiguous whatever the input's layout, as the op's fake kernel says (linclass/_ops.py):
    # empty_like would copy a transposed input's strides, which torch.compile then rejects.
    gx = (torch.empty_like(input, memory_format=torch.contiguous_format) if mask[0]
          else input.new_empty((0,)))
    new_gw = torch.empty if n else torch.zeros  # every chunk adds to dW; no chunk, no rows
    gw = new_gw((c, d), device=input.device, dtype=input.dtype) if mask[1] else input.new_empty((0,))
    acc = accumulation_dtype(input.dtype)
    gb = torch.zeros(c, device=input.device, dtype=acc) if mask[2] else None
    total = torch.zeros((), device=input.device, dtype=acc)
    step = _chunk_rows(n, d, c, input.element_size(), input.is_cuda)
    wt = weight.t()
    for r0 in range(0, n, step):
        xc = input[r0:r0 + step]
        s = torch.addmm(bias, xc, wt) if bias is not None else xc @ wt
        total += run_loss(s, target[r0:r0 + step], any_grad).sum()
        if mask[0]:
            torch.mm(s, weight, out=gx[r0:r0 + step])
        if mask[1]:
            if r0 == 0:
                torch.mm(s.t(), xc, out=gw)  # the first chunk writes dW: no read of zeros
            else:
                gw.addmm_(s.t(), xc)
        if mask[2]:
            gb += s.sum(0, dtype=acc)
        del s  # free this chunk's scores before the next chunk's are made
    return total, gx, gw, gb.to(input.dtype) if gb is not None else input.new_empty((0,))


def linear_cross_entropy(input, weight, bias, target, ignore_index, label_smoothing, reduction, mask):
    """Launcher behind linclass::linear_cross_entropy_triton ('mean' or 'sum')."""
    if linear_tile.applies(input, weight):
        total, const, gx, gw, gb = linear_tile.run(input, weight, bias, target, mask, True,
                                                   ignore_index, label_smoothing, mean=reduction == 1)
        loss = total / const[2] if reduction == 1 else total
        return loss, gx, gw, gb
    acc = accumulation_dtype(input.dtype)
    const = cross_entropy.consts(target, None, ignore_index, weight.shape[0], acc, reduction == 1)

    def run_loss(s, t, grad):
        return cross_entropy.launch(s, s if grad else None, t, None, ignore_index, label_smoothing, const)

    total, gx, gw, gb = _chunks(input, weight, bias, target, mask, run_loss)
    loss = total / const[2] if reduction == 1 else total  # 0/0 = NaN when all are ignored
    return loss, gx, gw, gb


def linear_multi_margin_loss(input, weight, bias, target, p, margin, reduction, mask):
    """Launcher behind linclass::linear_multi_margin_loss_triton ('mean' or 'sum')."""
    n = input.shape[0]
    if linear_tile.applies(input, weight):
        total, _, gx, gw, gb = linear_tile.run(input, weight, bias, target, mask, False, p=p,
                                               margin=margin, mean=reduction == 1)
        loss = total / n if reduction == 1 else total
        return loss, gx, gw, gb
    scale = 1.0 / n if reduction == 1 and n else 1.0

    def run_loss(s, t, grad):
        return multi_margin.launch(s, s if grad else None, t, p, margin, None, scale)

    total, gx, gw, gb = _chunks(input, weight, bias, target, mask, run_loss)
    loss = total / n if reduction == 1 else total  # 0/0 = NaN for no rows, as elsewhere
    return loss, gx, gw, gb
