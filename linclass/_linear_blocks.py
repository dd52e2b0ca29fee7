"""The fused linear + loss ops' Python paths, a block of rows at a time: the class-sharded
ops (linclass.distributed), and above one block of scores the one-process ops'
reduction='none' (LinearLossRows) and cross-entropy against probability targets
(LinearLossBlocks, LinearLossRows).  The one-process class-index 'mean'/'sum' ops run
the same scheme in their kernels (csrc/linear_blocks.h, kernels/linear_loss.py).

Per block:  S = X_b W^T + b  (F.linear's product, rounded once to the input dtype);
a fused loss kernel turns S into the block's score gradient G;  dX_b = G W,
dW += G^T X_b,  db += column sums of G.  Extra memory: one block of scores and its
gradient, never N x C.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple

import torch

from . import _extension, _ops

# Scores are made a block of rows at a time, as many rows as about this many bytes of
# the (N, C) scores hold (in the accumulation dtype).  The same cap as the one-process
# op's CPU kernel (csrc/cpu/linear_loss.cpp), so that the GEMMs are as deep: each block
# streams the whole weight through three products.  The class-sharded ops size blocks
# by the global C (each rank makes its shard's columns, 1/K of these bytes): blocks
# sized by the shard instead (half as many rows at 2 ranks) made 2x the one process's
# weight traffic in all.
BLOCK_BYTES = 64 << 20
# On a GPU: the CUDA C++ op's blocks (csrc/cuda/linear_loss.cpp).  A 64 MiB block at an
# LLM vocabulary is ~130 rows, too few for a GPU's GEMMs.
CUDA_BLOCK_BYTES = 256 << 20

_HALF_TYPES = (torch.float16, torch.bfloat16)


def row_blocks(rows: int, classes: int, dtype: torch.dtype, device: torch.device) -> list:
    """Slices of the rows for scores of `classes` columns; one empty block when there are
    no rows (so that the class-sharded ops' exchanges and sums still run on every rank)."""
    per_row = max(classes, 1) * torch.empty((), dtype=_ops.accumulation_dtype(dtype)).element_size()
    cap = CUDA_BLOCK_BYTES if device.type == "cuda" else BLOCK_BYTES
    step = max(1, min(rows, cap // per_row))
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)] or [slice(0, 0)]


def native_16bit_products(x: torch.Tensor) -> bool:
    """Whether products of x's 16-bit dtype run natively: always on CUDA; on the CPU as
    the one-process linear kernels decide (its instructions, or their testing knob)."""
    if x.is_cuda:
        return True
    return x.is_cpu and _extension.HAS_CPP and bool(
        torch.ops.linclass._native_16bit_products(x.dtype == torch.bfloat16))


def product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias=None,
            accumulate: bool = False) -> torch.Tensor:
    """out = a @ b (+ bias), or out += a @ b with `accumulate`; returns out.  On the CPU
    the C++ op's own products (csrc/linear_blocks.h, block_product: float32 through
    oneDNN where that is faster than the BLAS), elsewhere torch's.  One dtype for all.
    Traced (torch.compile) torch's too, which every supported torch functionalizes;
    the op writes into views (a block's rows of the input gradient), which is only
    tested eagerly here."""
    if out.is_cpu and _extension.HAS_CPP and not torch.compiler.is_compiling():
        _extension.follow_mkldnn_flag()
        torch.ops.linclass._block_product(out, a, b, bias, accumulate)
    elif accumulate:
        out.addmm_(a, b)
    elif bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)
    return out


class Blocks(NamedTuple):
    """A linear layer's operands (detached) and its scores a block of rows at a time."""
    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None
    x_mm: torch.Tensor  # the gradient products' operands: 16-bit where the device
    w_mm: torch.Tensor  # multiplies them natively, else float32 copies (made once)
    slices: list
    buffer: torch.Tensor  # one buffer for every block's scores
    wide: torch.Tensor | None  # float32 scores where x_mm, w_mm are float32 copies

    def scores(self, block: slice) -> torch.Tensor:
        out = self.buffer[:block.stop - block.start]
        if self.wide is not None:
            # 16-bit products this CPU only emulates (far slower than float32 ones):
            # the product of the float32 copies, rounded once into the block's scores.
            wide = self.wide[:block.stop - block.start]
            bias = None if self.b is None else self.b.to(wide.dtype)
            return out.copy_(product(wide, self.x_mm[block], self.w_mm.t(), bias))
        return product(out, self.x[block], self.w.t(), self.b)

    def gradients(self, block_grads: Iterable, wants) -> list:
        """Accumulates the blocks' score gradients G, given as (block, G) pairs, into the
        (input, weight, bias) gradients `wants` asks for, in the accumulation dtype
        (None for the others).  Blocks add in order: the same result every run."""
        acc = _ops.accumulation_dtype(self.x.dtype)
        x, w = self.x, self.w
        # Every row of gi is written by its block (the slices cover the rows): no zero fill.
        gi = torch.empty(x.shape[0], x.shape[1], dtype=acc, device=x.device) if wants[0] else None
        gw = torch.zeros(w.shape, dtype=acc, device=x.device) if wants[1] else None
        gb = torch.zeros(w.shape[0], dtype=acc, device=x.device) if wants[2] else None
        native = self.x_mm.dtype in _HALF_TYPES
        for block, g in block_grads:
            if gb is not None:
                gb += g.sum(0)
            g = g.to(self.x_mm.dtype)  # 16-bit for native products (rounded once, as F.linear's)
            if gi is not None and native:
                gi[block] = g @ self.w_mm
            elif gi is not None:
                product(gi[block], g, self.w_mm)
            if gw is not None and native:
                gw += g.t() @ self.x_mm[block]  # each block's product rounded once, summed in float32
            elif gw is not None:
                product(gw, g.t(), self.x_mm[block], accumulate=True)
        return [gi, gw, gb]


def blocks_of(input: torch.Tensor, weight: torch.Tensor, bias, classes: int) -> Blocks:
    """The blocks for input (N, D), weight (C_local, D), bias (C_local,) or None; blocks
    sized for `classes` columns (the global C of a class-sharded head)."""
    x, w = input.detach(), weight.detach()
    b = None if bias is None else bias.detach()
    # A CPU that emulates 16-bit products is slower than float32 (bench/results/linear-16bit.md).
    native = input.dtype in _HALF_TYPES and native_16bit_products(x)
    acc = _ops.accumulation_dtype(input.dtype)
    x_mm, w_mm = (x, w) if native else (x.to(acc), w.to(acc))
    slices = row_blocks(x.shape[0], classes, input.dtype, input.device)
    buffer = x.new_empty((slices[0].stop - slices[0].start, w.shape[0]))
    wide = x_mm.new_empty(buffer.shape) if x_mm.dtype != x.dtype else None
    return Blocks(x, w, b, x_mm, w_mm, slices, buffer, wide)


def exceeds_one_block(rows: int, classes: int, dtype: torch.dtype, device: torch.device) -> bool:
    return len(row_blocks(rows, classes, dtype, device)) > 1


class LinearLossRows(torch.autograd.Function):
    """loss(X W^T + b, y) with reduction='none' on the one-process ops, without the N x C
    scores: the forward makes each block's scores and their per-row losses (the loss
    kernel without gradient); the backward, which gets grad_output per row only then,
    makes each block's scores again, their 'sum' gradient (the fused kernel), scales its
    rows by grad_output and accumulates the block's products.  One more GEMM than
    composing F.linear and the loss (which holds N x C scores and their gradient).

    run_loss(S, target, reduction_code, compute_grad) -> (loss, grad): the backend's
    fused loss op on one block's scores."""

    @staticmethod
    def forward(ctx, input, weight, bias, target, run_loss: Callable, loss_dtype):
        blocks = blocks_of(input, weight, bias, weight.shape[0])
        acc = _ops.accumulation_dtype(input.dtype)
        losses = torch.empty(input.shape[0], dtype=acc, device=input.device)
        for k in blocks.slices:
            losses[k] = run_loss(blocks.scores(k), target[k], _ops.REDUCTIONS["none"], False)[0]
        ctx.run_loss = run_loss
        ctx.save_for_backward(input, weight, bias, target)
        return losses.to(loss_dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        _ops._check_first_order()
        input, weight, bias, target = ctx.saved_tensors
        wants = list(ctx.needs_input_grad[:3])
        if not any(wants):
            return None, None, None, None, None, None
        blocks = blocks_of(input, weight, bias, weight.shape[0])
        acc = _ops.accumulation_dtype(input.dtype)
        run_loss = ctx.run_loss

        def block_grads():
            for k in blocks.slices:
                g = run_loss(blocks.scores(k), target[k], _ops.REDUCTIONS["sum"], True)[1]
                yield k, g.to(acc).mul_(grad_loss[k].to(acc).unsqueeze(1))

        gi, gw, gb = blocks.gradients(block_grads(), wants)
        return (None if gi is None else gi.to(input.dtype),
                None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(bias.dtype), None, None, None)


class LinearLossBlocks(torch.autograd.Function):
    """loss(X W^T + b, y) with reduction 'sum', or 'mean' over `mean_rows` rows, without
    the N x C scores: per block the scores, their summed loss and gradient (the fused
    kernel, one pass), and the block's products, all in the forward; the backward
    scales the saved gradients by grad_output.  run_loss as for LinearLossRows."""

    @staticmethod
    def forward(ctx, input, weight, bias, target, run_loss: Callable, mean_rows, loss_dtype):
        wants = list(ctx.needs_input_grad[:3])
        blocks = blocks_of(input, weight, bias, weight.shape[0])
        acc = _ops.accumulation_dtype(input.dtype)
        total = torch.zeros((), dtype=acc, device=input.device)

        def block_grads():
            for k in blocks.slices:
                loss, g = run_loss(blocks.scores(k), target[k], _ops.REDUCTIONS["sum"], any(wants))
                total.add_(loss)
                yield k, g

        grads = blocks.gradients(block_grads(), wants)  # runs every block, gradients or not
        scale = None if mean_rows is None else 1.0 / mean_rows if mean_rows else math.nan
        grads = [None if g is None else (g if scale is None else g.mul_(scale)).to(t.dtype)
                 for g, t in zip(grads, (input, weight, bias))]
        ctx.present = [i for i, g in enumerate(grads) if g is not None]
        ctx.save_for_backward(*(grads[i] for i in ctx.present))
        return (total if scale is None else total * scale).to(loss_dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        _ops._check_first_order()
        grads = [None] * 3
        for i, g in zip(ctx.present, _ops._rescale(list(ctx.saved_tensors), grad_loss)):
            grads[i] = g
        return (*grads, None, None, None, None)
