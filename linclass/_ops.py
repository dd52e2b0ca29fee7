"""The Python side of linclass's op registrations with torch.library.

Every fused loss op, whatever its backend, has the signature
    op(input, target, <loss options>..., reduction: int, compute_grad: bool) -> (loss, grad)
where `grad` is d loss / d input for grad_output = 1, written by the forward kernel in
the same pass as the loss (an empty tensor when compute_grad is False); backward only
rescales that buffer.  The fused linear + loss ops return (loss, grad_input,
grad_weight, grad_bias) the same way, each gradient only where output_mask asks.
Every op returns its loss in the accumulation dtype (float32 for 16-bit inputs, else
the input's; loss_dtype below); the callables made here take `loss_dtype=` to convert
it, which linclass.functional sets to the input's dtype as torch's loss has, except
under torch.autocast, whose loss is float32.

  linclass::cross_entropy, cross_entropy_probs (probability targets, CPU only),
  multi_margin_loss, linear_cross_entropy, linear_multi_margin_loss   the C++ ops:
      schemas and CPU/CUDA kernels are registered in csrc/ops.cpp (LibTorch stable ABI,
      which has no autograd); their autograd and fake kernels (shapes, for
      torch.compile) here, in CPP.
  linclass::<the same>_triton   the Triton ops, defined here with custom_op: launcher
      (kernels/), fake kernel and autograd, in TRITON.  They do not need linclass._C.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, NamedTuple, Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import _extension

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
HAS_TRITON = importlib.util.find_spec("triton") is not None


def dense_strides(t: Tensor) -> Optional[tuple]:
    """The strides of a gradient laid out like `t` when t's elements are dense and do not
    overlap (in any order of its dims), the layout autograd holds a gradient to: t's
    strides, those of size-1 dims made at least 1; None otherwise and for an empty t.
    The C++ CPU kernels allocate their gradient by the same rule (csrc/tensor_ops.h,
    dense_strides), so the fake kernel below describes it exactly."""
    if t.numel() == 0:
        return None
    shape, strides = t.shape, t.stride()
    expected = 1
    for d in sorted((d for d in range(t.dim()) if shape[d] > 1), key=lambda d: strides[d]):
        if strides[d] != expected:
            return None
        expected *= shape[d]
    return tuple(strides[d] if shape[d] > 1 else max(strides[d], 1) for d in range(t.dim()))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend's kernels compute in for scores of `dtype`, and return
    their loss in: float64 for float64, else float32 (the Triton launchers and the
    class-sharded phases use this one rule; the C++ kernels' acc_type says the same)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fused_loss(input, target, *args):
    """The Triton ops' and the CUDA kernels' outputs: a contiguous gradient."""
    reduction, compute_grad = args[-2], args[-1]
    loss = input.new_empty(tuple(target.shape) if reduction == REDUCTIONS["none"] else (),
                           dtype=accumulation_dtype(input.dtype))
    grad = input.new_empty(tuple(input.shape) if compute_grad else (0,))
    return loss, grad


def _fake_cpp_fused_loss(input, target, *args):
    """The C++ ops' outputs: on the CPU the gradient is laid out as the input
    (dense_strides)."""
    loss, grad = _fake_fused_loss(input, target, *args)
    strides = dense_strides(input) if args[-1] and input.device.type == "cpu" else None
    if strides is None:
        return loss, grad
    return loss, input.new_empty_strided(tuple(input.shape), strides)


def _fake_cpp_probs_loss(input, target, weight, label_smoothing, reduction, compute_grad):
    """linclass::cross_entropy_probs's outputs: for 'none' a loss of the input's shape
    without its class dim (0-dim for (C,) scores), the gradient as the C++ ops lay it
    out."""
    rows = (input.shape[:1] + input.shape[2:]) if reduction == REDUCTIONS["none"] else ()
    _, grad = _fake_cpp_fused_loss(input, target, reduction, compute_grad)
    return input.new_empty(tuple(rows), dtype=accumulation_dtype(input.dtype)), grad


def _fake_linear_loss(input, weight, bias, target, *args):
    """The Triton ops' and the CUDA kernels' outputs: contiguous gradients."""
    mask = args[-1]
    return (input.new_empty((), dtype=accumulation_dtype(input.dtype)),
            input.new_empty(tuple(input.shape)) if mask[0] else input.new_empty((0,)),
            input.new_empty(tuple(weight.shape)) if mask[1] else input.new_empty((0,)),
            input.new_empty((weight.shape[0],)) if mask[2] else input.new_empty((0,)))


def _fake_cpp_linear_loss(input, weight, bias, target, *args):
    """The C++ ops' outputs: on the CPU the input's gradient is laid out as the input
    (dense_strides)."""
    out = _fake_linear_loss(input, weight, bias, target, *args)
    strides = dense_strides(input) if args[-1][0] and input.device.type == "cpu" else None
    if strides is None:
        return out
    return (out[0], input.new_empty_strided(tuple(input.shape), strides)) + out[2:]


# ---- autograd, shared by the C++ and the Triton ops ----------------------------------


_FUSED_LOSS_INPUTS = 7  # input, target, three loss options, reduction, compute_grad
_NO_OPTION_GRADS = (None,) * (_FUSED_LOSS_INPUTS - 1)


def _fused_loss_forward(run):
    """The eager Function's forward: the loss; the gradient saved, never returned, so
    autograd has no second output to track.  Nothing else is saved: backward reads the
    reduction from grad_loss's shape (a scalar loss unless 'none' over rows)."""
    def forward(ctx, *args):
        *args, loss_dtype = args  # _eager_call's, after the op's arguments
        loss, grad = run(*args)
        ctx.save_for_backward(grad)
        return _as_dtype(loss, loss_dtype)

    return forward


def _as_dtype(loss: Tensor, dtype) -> Tensor:
    """The op's loss (in its accumulation dtype) in `dtype`, where one is given."""
    return loss if dtype is None or loss.dtype is dtype else loss.to(dtype)


def _setup_fused_loss(ctx, inputs, output):
    # register_autograd's (traced calls: torch.compile, opcheck), where the op itself
    # decides compute_grad.
    ctx.compute_grad = inputs[-1]
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


_is_compiling = torch.compiler.is_compiling


def _rescale(saved: list, grad_loss: Tensor) -> list:
    """The saved gradients (computed for grad_output = 1) times the one-element grad_loss.

    The buffers are handed to autograd (which adopts them as .grad when it can) unless
    the graph is kept for another backward, which must find them unchanged: then the
    result is a new tensor.  Eager CUDA scales in place with kernels/scale.py, which
    skips the work on the device when grad_loss is 1 and never synchronizes with the
    host; on the CPU reading grad_loss is free.  Traced (torch.compile): the in-place op
    linclass::scale_saved_grad_ below, where torch marks AOTAutograd's backward tracing
    as compiling (2.13 and 2.14 do; under 2.11 the traced backward multiplies, as eager
    subclass tensors do, and opcheck's AOT test rejects the in-place op under its
    functionalization).  Subclass tensors: an ordinary multiply."""
    if _is_compiling():
        for s in saved:
            torch.ops.linclass.scale_saved_grad_(s, grad_loss)
        return saved
    if type(grad_loss) is not Tensor or _keep_graph():
        return [s * grad_loss for s in saved]
    _scale_in_place(saved, grad_loss)
    return saved


def _scale_in_place(saved: list, grad_loss: Tensor) -> None:
    if (grad_loss.is_cuda and HAS_TRITON) or DEVICE_RESCALE_ON_CPU:
        from .kernels import scale

        scale.scale_(saved, grad_loss)
    elif grad_loss.is_cuda or grad_loss.item() != 1.0:  # CUDA: no host read of grad_loss
        for s in saved:
            s.mul_(grad_loss)


# The backward of a compiled graph.  A multiply there would be one more pass over the
# N x C gradient into a new tensor, every step.  This in-place op is functionalized by
# AOTAutograd and run by Inductor in the saved buffer, which the backward may donate, so
# grad_output = 1 costs no multiply; where the buffer cannot be donated (another use,
# retain_graph) Inductor scales a copy (bench/test_bench_compiled.py).
_LIB = torch.library.Library("linclass", "FRAGMENT")
_LIB.define("scale_saved_grad_(Tensor(a!) grad, Tensor grad_output) -> ()")


def _scale_saved_grad_(grad: Tensor, grad_output: Tensor) -> None:
    _scale_in_place([grad], grad_output)


_LIB.impl("scale_saved_grad_", _scale_saved_grad_, "CPU")
_LIB.impl("scale_saved_grad_", _scale_saved_grad_, "CUDA")
if _extension.HAS_CPP:  # the fused linear ops' Python paths' products (_linear_blocks.product)
    torch.library.register_fake("linclass::_block_product", lambda out, a, b, bias, accumulate: None)
torch.library.register_fake("linclass::scale_saved_grad_", lambda grad, grad_output: None,
                            lib=_LIB)


def _check_first_order():
    if torch.is_grad_enabled():  # backward(create_graph=True)
        raise RuntimeError(
            "linclass: the fused losses are differentiable once; backward with "
            "create_graph=True (double backward) is not supported. Use "
            "linclass.backends.use('torch') for higher-order gradients.")


def _backward_fused_loss(ctx, grad_loss, *_):
    """The saved gradient (made for grad_output = 1) times grad_loss: one scale for a
    scalar loss, one per row for reduction='none' over rows.  A per-row grad_loss that
    is one value expanded (the backward of loss.sum()) scales as a scalar, which costs
    nothing when it is 1; a per-row scale is made in the saved buffer, handed over as
    in _rescale, instead of into a new N x C tensor."""
    _check_first_order()
    (grad,) = ctx.saved_tensors
    if grad_loss.dim() and not _is_compiling() and grad_loss.numel() and not any(grad_loss.stride()):
        grad_loss = grad_loss.as_strided((), ())
    if not grad_loss.dim():
        (grad,) = _rescale([grad], grad_loss)
        return (grad,) + _NO_OPTION_GRADS
    per_row = grad_loss.unsqueeze(1) if grad.dim() >= 2 else grad_loss
    if _is_compiling() or type(grad_loss) is not Tensor or type(grad) is not Tensor or _keep_graph():
        # A float32 grad_loss (the loss is float32 for 16-bit scores) would promote the
        # product: rounded to the gradient's dtype once, as mul_ below rounds it.
        return ((grad * per_row).to(grad.dtype),) + _NO_OPTION_GRADS
    return (grad.mul_(per_row),) + _NO_OPTION_GRADS


def _backward_traced_fused_loss(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * _FUSED_LOSS_INPUTS
    if not ctx.compute_grad:
        raise RuntimeError(
            "linclass: this fused loss ran with compute_grad=False, so it saved no gradient; "
            "call it through linclass.cross_entropy / linclass.multi_margin_loss, which set "
            "compute_grad when the input requires grad")
    return _backward_fused_loss(ctx, grad_loss)


def _save_linear_loss(ctx, inputs, output):
    # Which gradients the kernel made: output_mask, not their sizes (an empty batch's
    # grad_input is empty too).
    ctx.options = (tuple(inputs[-1]), len(inputs))
    ctx.save_for_backward(*output[1:])


def _linear_loss_forward(run):
    """The eager Function's forward: the loss; the gradients saved (see
    _fused_loss_forward)."""
    def forward(ctx, *args):
        *args, loss_dtype = args
        out = run(*args)
        _save_linear_loss(ctx, args, out)
        return _as_dtype(out[0], loss_dtype)

    return forward


def _setup_linear_loss(ctx, inputs, output):
    _save_linear_loss(ctx, inputs, output)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward_linear_loss(ctx, grad_loss, *_):
    made, n_inputs = ctx.options
    if grad_loss is None:
        return (None,) * n_inputs
    _check_first_order()
    saved = ctx.saved_tensors  # input, weight, bias
    for i in range(3):
        if ctx.needs_input_grad[i] and not made[i]:
            raise RuntimeError(
                f"linclass: this fused linear loss ran without the gradient of its argument {i}; "
                "call it through linclass.linear_cross_entropy / linear_multi_margin_loss")
    present = [i for i in range(3) if made[i]]
    scaled = dict(zip(present, _rescale([saved[i] for i in present], grad_loss)))
    return tuple(scaled.get(i) for i in range(3)) + (None,) * (n_inputs - 3)


# ---- registration ----------------------------------------------------------------------

# A kernel on the stable ABI can only raise RuntimeError; where torch raises another type
# for the same mistake, csrc/tensor_ops.h tags the message and the eager call re-raises
# it with that type.
_ERROR_TAGS = {"[IndexError] ": IndexError, "[NotImplementedError] ": NotImplementedError}


def _retyped(error: RuntimeError) -> Exception:
    message = str(error)
    for tag, kind in _ERROR_TAGS.items():
        at = message.find(tag)
        if at >= 0:
            return kind(message[at + len(tag):])
    return error


def _reraise(error: RuntimeError):
    """Raises `error`, or the exception of the type torch would raise when it is tagged."""
    retyped = _retyped(error)
    if retyped is error:
        raise error
    raise retyped from None


def call_cpp(op, *args):
    """Runs a C++ op, re-raising a tagged error with the type torch would raise."""
    try:
        return op(*args)
    except RuntimeError as error:
        _reraise(error)


def _refuse_dual_tensors(args):
    """The ops carry no forward derivative: a dual input must fail, not lose its tangent."""
    for arg in args:
        if isinstance(arg, Tensor) and _forward_ad.unpack_dual(arg).tangent is not None:
            raise NotImplementedError(
                "linclass: the fused losses do not support forward-mode AD; use "
                "linclass.backends.use('torch') for jvp")


class _Family(NamedTuple):
    """What the ops of one signature family share: fake kernel, autograd, and whether a
    call's arguments ask for a gradient."""
    fake: Callable
    eager_forward: Callable  # run -> the eager Function's forward
    backward: Callable  # the eager Function's
    setup_context: Callable  # register_autograd's: save, and the outputs' gradient flags
    traced_backward: Callable  # register_autograd's
    needs_autograd: Callable


FUSED_LOSS = _Family(_fake_fused_loss, _fused_loss_forward, _backward_fused_loss,
                     _setup_fused_loss, _backward_traced_fused_loss,
                     lambda args: args[-1])  # compute_grad
CPP_FUSED_LOSS = FUSED_LOSS._replace(fake=_fake_cpp_fused_loss)


def _inputs(count: int, backward: Callable) -> Callable:
    """`backward` for an op of `count` inputs (the fused-loss backward answers for 7)."""
    return lambda ctx, *grads: backward(ctx, *grads)[:count]


# cross_entropy_probs has no ignore_index: one input fewer.
CPP_PROBS_LOSS = CPP_FUSED_LOSS._replace(
    fake=_fake_cpp_probs_loss, backward=_inputs(6, _backward_fused_loss),
    traced_backward=_inputs(6, _backward_traced_fused_loss))
LINEAR_LOSS = _Family(_fake_linear_loss, _linear_loss_forward, _backward_linear_loss,
                      _setup_linear_loss, _backward_linear_loss,
                      lambda args: any(args[-1]))  # output_mask
CPP_LINEAR_LOSS = LINEAR_LOSS._replace(fake=_fake_cpp_linear_loss)


def _eager_call(name, op, run, family: _Family):
    """The callable for op, returning the loss: traced calls (torch.compile, opcheck) go
    to the op itself; eager ones run `run` inside a torch.autograd.Function, or directly
    when family.needs_autograd(args) says no gradient is asked for.  custom_op's Python
    dispatch (the route register_autograd takes) costs about twice the Function's host
    time per call, more than a small loss's kernels.  The Function's one output is the
    loss: the gradients the kernel wrote are saved, never returned, so autograd has no
    second output to track (bench/results/stable-abi-overhead.md).  It is named after
    the op: its graph node is Linclass<Op>Backward.  `loss_dtype` converts the op's
    loss (in its accumulation dtype) inside the Function, so the graph gets no node of
    its own for the conversion."""
    needs_autograd = family.needs_autograd
    backward = family.backward
    eager = type("Linclass" + "".join(part.title() for part in name.split("_")),
                 (torch.autograd.Function,),
                 {"forward": staticmethod(family.eager_forward(run)),
                  "backward": staticmethod(lambda ctx, *grads: backward(ctx, *grads) + (None,))})

    def call(*args, loss_dtype=None):
        if _is_compiling():
            return _as_dtype(op(*args)[0], loss_dtype)
        if _forward_ad._current_level >= 0:
            _refuse_dual_tensors(args)
        try:
            if needs_autograd(args):
                return eager.apply(*args, loss_dtype)
            return _as_dtype(run(*args)[0], loss_dtype)
        except RuntimeError as error:
            _reraise(error)

    call.op = op
    return call


def _register(name, launcher, family: _Family):
    """Defines the custom op linclass::<name> from `launcher` (its schema comes from the
    launcher's annotations) with its fake kernel and autograd, and returns the callable
    that runs it (_eager_call)."""
    op = torch.library.custom_op(f"linclass::{name}", mutates_args=())(launcher)
    op.register_fake(family.fake)
    op.register_autograd(family.traced_backward, setup_context=family.setup_context)
    return _eager_call(name, op, launcher, family)


# The key of the C++ CPU kernels.
_CPU_KERNEL_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active


def is_plain_cpu(x: Tensor) -> bool:
    """Whether an op on x would reach the CPU kernel through only the autograd keys: a
    dense CPU tensor with no Python dispatch (subclass or mode), functorch wrapper,
    nested, negated-view or zero-tensor key.  Tested attribute by attribute, which costs
    a fraction of building x's DispatchKeySet (tests/test_torch_integration.py compares
    the two)."""
    return (type(x) in _PLAIN_TYPES and x.is_cpu and x.layout is torch.strided
            and not x.is_nested and not x.is_neg() and not x._is_zerotensor()
            and not _dispatch_modes() and not _functorch_active())


def _register_cpp(name, family: _Family):
    """Fake kernel and autograd of the C++ op linclass::<name> (csrc/ops.cpp), and the
    callable that runs it."""
    op = getattr(torch.ops.linclass, name).default
    torch.library.register_fake(f"linclass::{name}")(family.fake)
    torch.library.register_autograd(f"linclass::{name}", family.traced_backward,
                                    setup_context=family.setup_context)

    redispatch = op._handle.redispatch_boxed  # op.redispatch without its Python frame

    def run(*args):
        # Eager calls on plain CPU tensors go straight to the kernel, past the Python
        # kernel that register_autograd puts on the Autograd key for torch.compile and
        # opcheck, whose cost per call exceeds a small loss's kernel
        # (bench/results/stable-abi-overhead.md).  Autograd is _eager_call's Function.
        # Anything else (a subclass, fake or functorch-wrapped input, a mode, CUDA)
        # takes the full dispatch.
        if is_plain_cpu(args[0]):
            return redispatch(_CPU_KERNEL_KEYS, *args)
        return op(*args)

    return _eager_call(name, op, run, family)


# The C++ ops, by family (csrc/ops.cpp): filled when linclass._C is loaded.
CPP: dict = {}

if _extension.HAS_CPP:
    for _name in ("cross_entropy", "multi_margin_loss"):
        CPP[_name] = _register_cpp(_name, CPP_FUSED_LOSS)
        CPP[f"linear_{_name}"] = _register_cpp(f"linear_{_name}", CPP_LINEAR_LOSS)
    CPP["cross_entropy_probs"] = _register_cpp("cross_entropy_probs", CPP_PROBS_LOSS)


# The Triton ops, by family: filled when triton is installed.  The kernels are imported
# on first call, after the caller had the chance to set TRITON_INTERPRET.  custom_op
# (not triton_op): its fake registration is what opcheck and torch.compile use, and it
# works under the Triton interpreter too.
TRITON: dict = {}

if HAS_TRITON:
    def _cross_entropy_triton(input: Tensor, target: Tensor, weight: Optional[Tensor],
                             ignore_index: int, label_smoothing: float, reduction: int,
                             compute_grad: bool) -> tuple[Tensor, Tensor]:
        from .kernels import cross_entropy

        return cross_entropy.cross_entropy(input, target, weight, ignore_index, label_smoothing,
                                           reduction, compute_grad)

    def _multi_margin_loss_triton(input: Tensor, target: Tensor, p: int, margin: float,
                                 weight: Optional[Tensor], reduction: int,
                                 compute_grad: bool) -> tuple[Tensor, Tensor]:
        from .kernels import multi_margin

        return multi_margin.multi_margin_loss(input, target, p, margin, weight, reduction,
                                              compute_grad)

    def _linear_cross_entropy_triton(input: Tensor, weight: Tensor, bias: Optional[Tensor],
                                    target: Tensor, ignore_index: int, label_smoothing: float,
                                    reduction: int, output_mask: list[bool]
                                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from .kernels import linear_loss

        return linear_loss.linear_cross_entropy(input, weight, bias, target, ignore_index,
                                                label_smoothing, reduction, output_mask)

    def _linear_multi_margin_loss_triton(input: Tensor, weight: Tensor, bias: Optional[Tensor],
                                        target: Tensor, p: int, margin: float, reduction: int,
                                        output_mask: list[bool]
                                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from .kernels import linear_loss

        return linear_loss.linear_multi_margin_loss(input, weight, bias, target, p, margin,
                                                    reduction, output_mask)

    TRITON = {
        "cross_entropy": _register("cross_entropy_triton", _cross_entropy_triton, FUSED_LOSS),
        "multi_margin_loss": _register("multi_margin_loss_triton", _multi_margin_loss_triton,
                                       FUSED_LOSS),
        "linear_cross_entropy": _register("linear_cross_entropy_triton",
                                          _linear_cross_entropy_triton, LINEAR_LOSS),
        "linear_multi_margin_loss": _register("linear_multi_margin_loss_triton",
                                              _linear_multi_margin_loss_triton, LINEAR_LOSS),
    }
