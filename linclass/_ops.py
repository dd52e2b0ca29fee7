"""Fake-tensor (shape) registrations of the fused loss ops, and the op tables.

Every fused loss op, whatever its backend, has the signature
    op(input, target, <loss options>..., reduction: int, compute_grad: bool) -> (loss, grad)
where `grad` is d loss / d input for grad_output = 1, written by the forward kernel in
the same pass as the loss (an empty tensor when compute_grad is False).  Backward only
rescales that buffer (csrc/autograd.cpp for the C++ ops).
"""

from __future__ import annotations

import torch

from . import _extension

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _fake_fused_loss(input, target, *args):
    reduction, compute_grad = args[-2], args[-1]
    loss = input.new_empty(tuple(target.shape) if reduction == REDUCTIONS["none"] else ())
    grad = input.new_empty(tuple(input.shape) if compute_grad else (0,))
    return loss, grad


# op families -> {backend: op}; filled for the backends that are built.
CROSS_ENTROPY: dict = {}
MULTI_MARGIN_LOSS: dict = {}

if _extension.HAS_CPP:
    torch.library.register_fake("linclass::cross_entropy")(_fake_fused_loss)
    torch.library.register_fake("linclass::multi_margin_loss")(_fake_fused_loss)
    # The C++ op dispatches on device: CPU kernels for "cpp", CUDA kernels for "cuda".
    CROSS_ENTROPY["cpp"] = CROSS_ENTROPY["cuda"] = torch.ops.linclass.cross_entropy.default
    MULTI_MARGIN_LOSS["cpp"] = MULTI_MARGIN_LOSS["cuda"] = torch.ops.linclass.multi_margin_loss.default
