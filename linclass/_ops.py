"""Registration of the fused loss ops, and the op tables the public functions use.

Every fused loss op, whatever its backend, has the signature
    op(input, target, <loss options>..., reduction: int, compute_grad: bool) -> (loss, grad)
where `grad` is d loss / d input for grad_output = 1, written by the forward kernel in
the same pass as the loss (an empty tensor when compute_grad is False).  Backward only
rescales that buffer.

  linclass::cross_entropy, ::multi_margin_loss   schemas and CPU/CUDA kernels in C++
      (csrc/), autograd in C++ (csrc/autograd.cpp), shapes registered here
  linclass::cross_entropy_triton, ::multi_margin_loss_triton   Triton kernels
      (kernels/), registered here with torch.library.custom_op, register_fake and
      register_autograd; they do not need linclass._C

The fused linear + loss ops (linear_cross_entropy, linear_multi_margin_loss and their
_triton twins) return (loss, grad_input, grad_weight, grad_bias) the same way.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor

from . import _extension

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _fake_fused_loss(input, target, *args):
    reduction, compute_grad = args[-2], args[-1]
    loss = input.new_empty(tuple(target.shape) if reduction == REDUCTIONS["none"] else ())
    grad = input.new_empty(tuple(input.shape) if compute_grad else (0,))
    return loss, grad


def _fake_linear_loss(input, weight, bias, target, *args):
    mask = args[-1]
    return (input.new_empty(()),
            input.new_empty(tuple(input.shape)) if mask[0] else input.new_empty((0,)),
            input.new_empty(tuple(weight.shape)) if mask[1] else input.new_empty((0,)),
            input.new_empty((weight.shape[0],)) if mask[2] else input.new_empty((0,)))


# ---- autograd of the Python (Triton) ops; mirrors csrc/autograd.cpp -------------------


def _setup_fused_loss(ctx, inputs, output):
    ctx.reduction, ctx.compute_grad = inputs[-2], inputs[-1]
    ctx.input_dim = inputs[0].dim()
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(output[1])
    # The saved-gradient output takes no gradient: without these, autograd would build
    # an N x C tensor of zeros for it on every backward.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


# Tests set this to run the device-side rescale (kernels/scale.py) on CPU tensors too,
# under the Triton interpreter.
DEVICE_RESCALE_ON_CPU = False

# Whether the running backward keeps its graph (retain_graph=True); private torch API,
# so without it every backward is assumed to keep it (an out-of-place multiply).
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)


def _rescale(saved: list, grad_loss: Tensor) -> list:
    """The saved gradients (computed for grad_output = 1) times the one-element grad_loss.

    The buffers are handed to autograd (which adopts them as .grad when it can) unless
    the graph is kept for another backward, which must find them unchanged: then the
    result is a new tensor.  Eager CUDA scales in place with kernels/scale.py, which
    skips the work on the device when grad_loss is 1 and never synchronizes with the
    host; on the CPU reading grad_loss is free.  Traced (torch.compile) or subclass
    tensors: an ordinary multiply."""
    if type(grad_loss) is not Tensor or torch.compiler.is_compiling() or _keep_graph():
        return [s * grad_loss for s in saved]
    if grad_loss.is_cuda or DEVICE_RESCALE_ON_CPU:
        from .kernels import scale

        scale.scale_(saved, grad_loss)
        return saved
    if grad_loss.item() != 1.0:
        for s in saved:
            s.mul_(grad_loss)
    return saved


def _backward_fused_loss(ctx, grad_loss, _grad_of_grad):
    if grad_loss is None:
        return (None,) * ctx.n_inputs
    if not ctx.compute_grad:
        raise RuntimeError(
            "linclass: this fused loss ran with compute_grad=False, so it saved no gradient; "
            "call it through linclass.cross_entropy / linclass.multi_margin_loss, which set "
            "compute_grad when the input requires grad")
    if torch.is_grad_enabled():
        raise RuntimeError(
            "linclass: the fused losses are differentiable once; backward with "
            "create_graph=True (double backward) is not supported. Use "
            "linclass.backends.use('torch') for higher-order gradients.")
    (grad,) = ctx.saved_tensors
    if ctx.reduction == REDUCTIONS["none"] and ctx.input_dim >= 2:
        grad_loss = grad_loss.unsqueeze(1)  # one scale per row, broadcast over classes
    if ctx.reduction == REDUCTIONS["none"] and grad_loss.numel() != 1:
        grad_input = grad * grad_loss
    else:
        (grad_input,) = _rescale([grad], grad_loss)
    return (grad_input,) + (None,) * (ctx.n_inputs - 1)


def _setup_linear_loss(ctx, inputs, output):
    ctx.n_inputs = len(inputs)
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward_linear_loss(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * ctx.n_inputs
    if torch.is_grad_enabled():
        raise RuntimeError("linclass: the fused losses are differentiable once; backward with "
                           "create_graph=True (double backward) is not supported.")
    saved = ctx.saved_tensors  # input, weight, bias
    for i, s in enumerate(saved):
        if ctx.needs_input_grad[i] and s.numel() == 0:
            raise RuntimeError(
                f"linclass: this fused linear loss ran without the gradient of its argument {i}; "
                "call it through linclass.linear_cross_entropy / linear_multi_margin_loss")
    present = [i for i, s in enumerate(saved) if s.numel() != 0]
    scaled = dict(zip(present, _rescale([saved[i] for i in present], grad_loss)))
    return tuple(scaled.get(i) for i in range(3)) + (None,) * (ctx.n_inputs - 3)


# Eager Triton losses get their autograd from linclass._C (linclass::_with_saved_grad, a
# C++ graph node, and the CUDA rescale kernel) when it is built for the input's device;
# tests turn this off to cover the Python node below.
CPP_AUTOGRAD = _extension.has_kernel("_with_saved_grad", "Autograd")


def _cpp_autograd_for(device: torch.device) -> bool:
    return CPP_AUTOGRAD and (device.type == "cpu" or (device.type == "cuda" and _extension.HAS_CUDA_KERNELS))


def _eager_fast_path(op, launcher, setup_context, backward, saved_grad=False):
    """The registered Triton op under torch.compile (and for opcheck, which calls it
    directly); in eager mode the same launcher and the same setup/backward through a
    torch.autograd.Function, which skips custom_op's Python dispatch (measured on the
    development CPU with a trivial launcher: 246 -> 130 us per forward + backward).
    With `saved_grad` (the loss ops) and linclass._C built, the graph node is C++
    (linclass::_with_saved_grad): on an H200 host the Python node's backward was a
    large part of a small loss's time (torch.profiler)."""
    class _Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = launcher(*args)
            setup_context(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        if saved_grad and args[-1] and _cpp_autograd_for(args[0].device):
            loss, grad = launcher(*args)  # (..., reduction, compute_grad)
            return torch.ops.linclass._with_saved_grad.default(args[0], loss, grad, args[-2]), grad
        return _Eager.apply(*args)

    call.op = op
    return call


# ---- op tables ---------------------------------------------------------------------

# op family -> {backend: op}; filled for the backends that are built.
CROSS_ENTROPY: dict = {}
MULTI_MARGIN_LOSS: dict = {}
LINEAR_CROSS_ENTROPY: dict = {}
LINEAR_MULTI_MARGIN_LOSS: dict = {}

if _extension.HAS_CPP:
    for _name in ("cross_entropy", "multi_margin_loss"):
        torch.library.register_fake(f"linclass::{_name}")(_fake_fused_loss)
        torch.library.register_fake(f"linclass::linear_{_name}")(_fake_linear_loss)
    # The C++ ops dispatch on device: CPU kernels for "cpp", CUDA kernels for "cuda".
    lc = torch.ops.linclass
    CROSS_ENTROPY["cpp"] = CROSS_ENTROPY["cuda"] = lc.cross_entropy.default
    MULTI_MARGIN_LOSS["cpp"] = MULTI_MARGIN_LOSS["cuda"] = lc.multi_margin_loss.default
    LINEAR_CROSS_ENTROPY["cpp"] = LINEAR_CROSS_ENTROPY["cuda"] = lc.linear_cross_entropy.default
    LINEAR_MULTI_MARGIN_LOSS["cpp"] = LINEAR_MULTI_MARGIN_LOSS["cuda"] = lc.linear_multi_margin_loss.default

HAS_TRITON = importlib.util.find_spec("triton") is not None

if HAS_TRITON:
    # custom_op (not triton_op): its fake registration is what opcheck and
    # torch.compile use, and it works in the Triton interpreter too (triton_op's
    # fake-tensor path does not).  The kernels are imported on first call, after the
    # caller had the chance to set TRITON_INTERPRET.

    def _cross_entropy_triton(input: Tensor, target: Tensor, weight: Optional[Tensor],
                             ignore_index: int, label_smoothing: float, reduction: int,
                             compute_grad: bool) -> tuple[Tensor, Tensor]:
        from .kernels import cross_entropy as kernel

        return kernel.cross_entropy(input, target, weight, ignore_index, label_smoothing,
                                    reduction, compute_grad)

    def _multi_margin_loss_triton(input: Tensor, target: Tensor, p: int, margin: float,
                                 weight: Optional[Tensor], reduction: int,
                                 compute_grad: bool) -> tuple[Tensor, Tensor]:
        from .kernels import multi_margin as kernel

        return kernel.multi_margin_loss(input, target, p, margin, weight, reduction, compute_grad)

    def _linear_cross_entropy_triton(input: Tensor, weight: Tensor, bias: Optional[Tensor],
                                    target: Tensor, ignore_index: int, label_smoothing: float,
                                    reduction: int, output_mask: list[bool]
                                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from .kernels import linear_loss as kernel

        return kernel.linear_cross_entropy(input, weight, bias, target, ignore_index,
                                           label_smoothing, reduction, output_mask)

    def _linear_multi_margin_loss_triton(input: Tensor, weight: Tensor, bias: Optional[Tensor],
                                        target: Tensor, p: int, margin: float, reduction: int,
                                        output_mask: list[bool]
                                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from .kernels import linear_loss as kernel

        return kernel.linear_multi_margin_loss(input, weight, bias, target, p, margin, reduction,
                                               output_mask)

    cross_entropy_triton, multi_margin_loss_triton, linear_cross_entropy_triton, \
        linear_multi_margin_loss_triton = (
            torch.library.custom_op(f"linclass::{fn.__name__[1:]}", mutates_args=())(fn)
            for fn in (_cross_entropy_triton, _multi_margin_loss_triton,
                       _linear_cross_entropy_triton, _linear_multi_margin_loss_triton))
    for _op in (cross_entropy_triton, multi_margin_loss_triton):
        _op.register_fake(_fake_fused_loss)
        _op.register_autograd(_backward_fused_loss, setup_context=_setup_fused_loss)
    for _op in (linear_cross_entropy_triton, linear_multi_margin_loss_triton):
        _op.register_fake(_fake_linear_loss)
        _op.register_autograd(_backward_linear_loss, setup_context=_setup_linear_loss)
    lc = torch.ops.linclass
    CROSS_ENTROPY["triton"] = _eager_fast_path(lc.cross_entropy_triton.default, _cross_entropy_triton,
                                               _setup_fused_loss, _backward_fused_loss, saved_grad=True)
    MULTI_MARGIN_LOSS["triton"] = _eager_fast_path(
        lc.multi_margin_loss_triton.default, _multi_margin_loss_triton, _setup_fused_loss,
        _backward_fused_loss, saved_grad=True)
    LINEAR_CROSS_ENTROPY["triton"] = _eager_fast_path(
        lc.linear_cross_entropy_triton.default, _linear_cross_entropy_triton, _setup_linear_loss,
        _backward_linear_loss)
    LINEAR_MULTI_MARGIN_LOSS["triton"] = _eager_fast_path(
        lc.linear_multi_margin_loss_triton.default, _linear_multi_margin_loss_triton,
        _setup_linear_loss, _backward_linear_loss)
