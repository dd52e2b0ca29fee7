"""Autograd and fake-tensor (shape) registrations of the fused loss ops.

Every fused loss op, whatever its backend, has the signature
    op(input, target, <loss options>..., reduction: int, compute_grad: bool) -> (loss, grad)
where `grad` is d loss / d input for grad_output = 1, written by the forward kernel in
the same pass as the loss (an empty tensor when compute_grad is False).  Backward is
therefore only a rescale of that saved buffer by grad_output, so a forward+backward
allocates a single N x C buffer.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _extension

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _fake_fused_loss(input, target, *args):
    reduction, compute_grad = args[-2], args[-1]
    loss = input.new_empty(tuple(target.shape) if reduction == REDUCTIONS["none"] else ())
    grad = input.new_empty(tuple(input.shape) if compute_grad else (0,))
    return loss, grad


def _setup_fused_loss(ctx, inputs, output):
    ctx.reduction, ctx.compute_grad = inputs[-2], inputs[-1]
    ctx.input_dim = inputs[0].dim()
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(output[1])
    # The saved-gradient output takes no gradient: without these, autograd would build
    # an N x C tensor of zeros for it on every backward.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _is_one(g: torch.Tensor) -> bool:
    """True when g is a plain (eager) tensor holding the single value 1.

    Compiled graphs trace with fake/functional tensors and always take the multiply.
    """
    if type(g) is not torch.Tensor or g.numel() != 1:
        return False
    if g.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return g.item() == 1.0


@once_differentiable
def _backward_fused_loss(ctx, grad_loss, _grad_of_grad):
    if not ctx.compute_grad:
        raise RuntimeError(
            "linclass: this fused loss ran with compute_grad=False, so it saved no gradient; "
            "call it through linclass.cross_entropy / linclass.multi_margin_loss, which set "
            "compute_grad when the input requires grad"
        )
    (grad,) = ctx.saved_tensors
    if grad_loss is None:  # the loss took no part in what is being differentiated
        return (None,) * ctx.n_inputs
    if ctx.reduction == REDUCTIONS["none"] and ctx.input_dim >= 2:
        grad_loss = grad_loss.unsqueeze(1)  # per-row scale, broadcast over the class dim
    # loss.backward() on a 'mean'/'sum' loss passes grad_output = 1: hand the saved buffer
    # over as it is (autograd steals it for .grad), with no pass over N x C at all.
    grad_input = grad if _is_one(grad_loss) else grad * grad_loss
    return (grad_input,) + (None,) * (ctx.n_inputs - 1)


def register_fused_loss(qualname: str) -> None:
    """Attach the shared fake and autograd implementations to a fused loss op."""
    torch.library.register_fake(qualname)(_fake_fused_loss)
    torch.library.register_autograd(qualname, _backward_fused_loss, setup_context=_setup_fused_loss)


# op families -> {backend: op}; filled for the backends that are built.
CROSS_ENTROPY: dict = {}
MULTI_MARGIN_LOSS: dict = {}

if _extension.HAS_CPP:
    register_fused_loss("linclass::cross_entropy")
    register_fused_loss("linclass::multi_margin_loss")
    # The C++ op dispatches on device: CPU kernels for "cpp", CUDA kernels for "cuda".
    CROSS_ENTROPY["cpp"] = CROSS_ENTROPY["cuda"] = torch.ops.linclass.cross_entropy.default
    MULTI_MARGIN_LOSS["cpp"] = MULTI_MARGIN_LOSS["cuda"] = torch.ops.linclass.multi_margin_loss.default
