"""Backward of the fused ops without a host synchronization: G *= go in place, where go
is the (one-element) grad_output on the device.

The forward kernels already wrote d loss / d input for go = 1, so when go == 1 (what
loss.backward() passes) the backward has nothing to do.  Finding that out on the host
(`go.item()`) would stall the CPU until the GPU has caught up, every step.  Here every
program reads go itself and returns at once when it is 1: the common case costs one
launch and no memory traffic, any other go one read and one write of G.
"""

import triton
import triton.language as tl

from .tuning import cdiv

BLOCK = 4096
MAX_PROGRAMS = 1024  # grid-stride beyond this: an early exit costs each program ~1 load


@triton.jit
def _scale_kernel(G, GO, n, BLOCK: tl.constexpr):
    """G[i] = G[i] * go for i < n, unless go == 1."""
    go = tl.load(GO)
    go = go.to(tl.float64) if go.dtype == tl.float64 else go.to(tl.float32)
    if go != 1.0:
        offs = tl.arange(0, BLOCK)
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
            i = start + offs
            ok = i < n
            g = tl.load(G + i, mask=ok)
            tl.store(G + i, (g.to(go.dtype) * go).to(G.dtype.element_ty), mask=ok)


def scale_(grads, go):
    """Scale each tensor of `grads` in place by the one-element tensor `go` (nothing is
    done on the device when go == 1).  In-place writes go around autograd's version
    counters: the caller owns these buffers."""
    for g in grads:
        if not g.is_contiguous():  # rare (a transposed input's gradient): a torch multiply
            g.data.mul_(go)
            continue
        n = g.numel()
        if n:
            programs = max(1, min(cdiv(n, BLOCK), MAX_PROGRAMS))
            _scale_kernel[(programs,)](g, go, n, BLOCK=BLOCK)
