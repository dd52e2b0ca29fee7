"""Drop-in replacements for torch.nn.functional.cross_entropy and multi_margin_loss, and
the fused linear + loss ops.

Each function checks its arguments the way torch does (same exception types, clearer
messages), picks a backend (linclass.backends) and calls that backend's fused op from
the tables below; its kernel computes the loss and its gradient in one pass:
  cpp, cuda  linclass/_ops.py (autograd) -> torch.ops.linclass.<op>: schema and per-device
             kernels registered in csrc/ops.cpp; kernels in csrc/cpu/ and csrc/cuda/, one
             file per op family
  triton     linclass/_ops.py (custom op and its autograd) -> kernels/<op family>.py
  torch      torch.nn.functional itself
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn import _reduction as _Reduction

from . import _extension, _linear_blocks, _ops, backends


def _op_table(name: str) -> dict:
    """{backend: op} for op family `name`, for the backends that are built."""
    table = {}
    if name in _ops.CPP:  # the C++ ops dispatch on the device: CPU or CUDA kernels
        table["cpp"] = table["cuda"] = _ops.CPP[name]
    if name in _ops.TRITON:
        table["triton"] = _ops.TRITON[name]
    return table


CROSS_ENTROPY = _op_table("cross_entropy")
MULTI_MARGIN_LOSS = _op_table("multi_margin_loss")
LINEAR_CROSS_ENTROPY = _op_table("linear_cross_entropy")
LINEAR_MULTI_MARGIN_LOSS = _op_table("linear_multi_margin_loss")

_FLOAT_TYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HALF_TYPES = (torch.float16, torch.bfloat16)


def _autocasting(tensor) -> bool:
    """Whether torch.autocast is on for the tensor's device (its dtype policy then
    applies to the ops below, as it does to torch's)."""
    device = tensor.device.type
    return device in ("cpu", "cuda") and torch.is_autocast_enabled(device)


def _autocast_inputs(input, weight):
    """torch.autocast runs cross_entropy and multi_margin_loss in float32 (its float32
    list): float32 copies of 16-bit scores and class weights, a float32 loss, and the
    gradient rounded to the scores' dtype through the cast.  The kernels compute in
    float32 from 16-bit scores as they are and return a float32 loss (_torch_loss_dtype
    keeps it under autocast): torch's result without the copies.  Only class weights of
    another dtype than the scores' (the kernels take one dtype) are cast, with the
    scores, to float32 as torch casts them.  Returns (input, weight)."""
    if not (isinstance(weight, torch.Tensor) and weight.dtype is not input.dtype
            and (input.dtype in _HALF_TYPES or weight.dtype in _HALF_TYPES)
            and _autocasting(input)):
        return input, weight
    if input.dtype in _HALF_TYPES:
        input = input.float()
    if weight.dtype in _HALF_TYPES:
        weight = weight.float()
    return input, weight


def _torch_loss_dtype(input) -> torch.dtype:
    """The dtype of torch's loss for these scores: theirs, except under torch.autocast,
    which runs torch's losses in float32 (16-bit scores then give a float32 loss).  The
    ops return their loss in the accumulation dtype and are asked for this one
    (the `loss_dtype` of their calls); the class-sharded losses give it too."""
    if input.dtype in _HALF_TYPES and _autocasting(input):
        return torch.float32
    return input.dtype


def _autocast_linear(input, weight, bias):
    """torch.autocast runs F.linear in its lower-precision dtype: input, weight and bias
    (float32 or 16-bit; float64 stays) are cast to it, as F.linear's would be."""
    dtype = torch.get_autocast_dtype(input.device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, *_HALF_TYPES) else t

    return cast(input), cast(weight), cast(bias)

# GPU kernels turn an out-of-range target into a NaN row instead of stopping the device;
# with this set, targets on the GPU are checked first (one host synchronization per call).
_CHECK_GPU_TARGETS = os.environ.get("LINCLASS_CHECK_TARGETS", "0") == "1"


def _check_targets(op: str, backend: str | None, target: torch.Tensor, classes: int,
                   ignore_index: int | None, error: type) -> None:
    """Raise `error` naming the first target outside [0, classes) (ignore_index allowed).

    The C++ CPU kernels check their targets themselves; the other backends are checked
    here when the targets are in host memory (free) or LINCLASS_CHECK_TARGETS=1, and so
    are those of kernels that see them a block of rows at a time (backend None), whose
    errors would name a target by its place in its block.
    """
    if backend == "cpp" or torch.compiler.is_compiling():
        return
    if target.device.type != "cpu" and not _CHECK_GPU_TARGETS:
        return
    bad = (target < 0) | (target >= classes)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bool(bad.any()):
        flat = int(bad.reshape(-1).nonzero()[0])
        pos = list(torch.unravel_index(torch.tensor(flat), target.shape)) if target.dim() else []
        where = "[" + ", ".join(str(int(i)) for i in pos) + "]" if target.dim() else ""
        allowed = f" or target == ignore_index, which is {ignore_index}" if ignore_index is not None else ""
        raise error(f"{op}: target{where} = {int(target.reshape(-1)[flat])} is out of bounds for "
                    f"{classes} classes (expected 0 <= target < {classes}{allowed})")


def _reduction_code(size_average, reduce, reduction: str) -> tuple[str, int]:
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    if reduction not in _ops.REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction, _ops.REDUCTIONS[reduction]


def _needs_grad(t: torch.Tensor) -> bool:
    return t.requires_grad and torch.is_grad_enabled()


def _check_input(op: str, input: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a Tensor, got {type(input).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{op}: target must be a Tensor, got {type(target).__name__}")
    if input.dtype not in _FLOAT_TYPES:
        # torch raises NotImplementedError from its kernel dispatch here.
        raise NotImplementedError(
            f"{op}: input must be float32, float64, float16 or bfloat16, got {input.dtype}"
        )


def _check_weight(op: str, weight, input: torch.Tensor, classes: int, torch_name: str) -> None:
    if weight is None:
        return
    if weight.dim() != 1 or weight.numel() != classes:
        raise RuntimeError(
            f"{op}: weight must have one entry per class ({classes}), got shape {tuple(weight.shape)}"
        )
    if weight.dtype != input.dtype:
        raise RuntimeError(f"{op}: weight dtype {weight.dtype} does not match input dtype {input.dtype}")
    if weight.device != input.device:
        raise RuntimeError(f"{op}: weight is on {weight.device} but input is on {input.device}")
    if _needs_grad(weight):
        raise RuntimeError(
            f"The function '{torch_name}' is not differentiable with respect to argument 'weight'. "
            "This input cannot have requires_grad True."
        )


def _ignore_index(value) -> int:
    """ignore_index as the kernels take it; like torch, an integer (a Python or NumPy int,
    or a 0-dim integer tensor), not a float or a bool."""
    if type(value) is not int:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"ignore_index must be an int, got {type(value).__name__}")
        value = value.__index__()
    if not -2**63 <= value < 2**63:  # torch's argument parser raises ValueError too
        raise ValueError(f"ignore_index = {value} does not fit in a 64-bit integer")
    return value


def _margin(value) -> float:
    """margin as the kernels take it; like torch, a real number (also a NumPy scalar or a
    0-dim tensor), not a string or a tensor with dimensions."""
    if type(value) is float:
        return value
    if isinstance(value, (str, bytes)) or (isinstance(value, torch.Tensor) and value.dim() != 0):
        raise TypeError(f"margin must be a number, got {type(value).__name__}")
    return float(value)


def _label_smoothing(value) -> float:
    """The smoothing the kernels apply, with torch's error above 1: torch smooths only
    when the value is positive (so a negative or NaN one means none)."""
    if value > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {value}")
    return float(value) if value > 0.0 else 0.0

def _cross_entropy_layout(shape, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(target, classes) for cross_entropy's input of `shape`, raising torch's error
    (clearer) for a target that does not match: (C,) with a 0-D or one-element target,
    (N, C) with (N,), (N, C, d1, ..., dk) with (N, d1, ..., dk)."""
    dim = len(shape)
    if dim == 0:
        raise RuntimeError("cross_entropy: input must have at least 1 dimension (classes)")
    if dim == 1:
        if target.dim() > 1:  # torch's type and message
            raise RuntimeError(
                "cross_entropy: for 1D input, target must be 0-D or 1-D (0D or 1D target tensor "
                f"expected, multi-target not supported), got shape {tuple(target.shape)}")
        if target.numel() != 1:
            raise ValueError(
                "cross_entropy: for 1D input, target must be 0-D or hold one element, "
                f"got shape {tuple(target.shape)}"
            )
        return target.reshape(()), shape[0]
    if target.dim() == 0 or target.shape[0] != shape[0]:
        got = target.shape[0] if target.dim() else 0
        raise ValueError(
            f"Expected input batch_size ({shape[0]}) to match target batch_size ({got})."
        )
    if target.shape[1:] != shape[2:]:
        expected = [shape[0], *shape[2:]]
        raise RuntimeError(
            f"cross_entropy: expected target of shape {expected} for input of shape "
            f"{list(shape)}, got {list(target.shape)}"
        )
    return target, shape[1]


def _probs_on_kernel(backend: str, input, target, weight, ignore_index, scores_shape=None) -> bool:
    """Whether cross_entropy with a probability target runs the fused C++ CPU kernel
    (linclass::cross_entropy_probs): scores with at least one class on the CPU, a
    target of their shape and dtype and a weight of their dtype, neither needing a
    gradient, no ignore_index, no torch.autocast.  The rest (other devices, mixed
    dtypes, a differentiable target, torch's errors) goes to F.cross_entropy.
    scores_shape: that of the scores the input makes (a fused linear op's), else the
    input's own."""
    shape = input.shape if scores_shape is None else scores_shape
    if not (backend == "cpp" and "cross_entropy_probs" in _ops.CPP and input.is_cpu
            and len(shape) >= 1):
        return False
    classes = shape[1 if len(shape) > 1 else 0]
    return (classes > 0 and target.shape == shape and target.dtype is input.dtype
            and target.is_cpu and not _needs_grad(target)
            and (weight is None or (isinstance(weight, torch.Tensor) and weight.dtype is input.dtype
                                    and weight.shape == (classes,) and weight.is_cpu
                                    and not _needs_grad(weight)))
            and type(ignore_index) is int and ignore_index == -100 and not _autocasting(input))


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Softmax cross-entropy; same arguments, results and errors as
    ``torch.nn.functional.cross_entropy``.

    input: (C,), (N, C) or (N, C, d1, ..., dk) scores (float32/64, float16, bfloat16).
    target: class indices (int64 or uint8) of shape (), (N,) or (N, d1, ..., dk), or
    class probabilities with the input's shape (a fused kernel of their own on the CPU;
    torch's otherwise).  The kernel computes the loss and
    d loss / d input together.
    """
    if (type(input) is torch.Tensor and type(target) is torch.Tensor
            and not target.dtype.is_floating_point  # probabilities: the kernel wins at any size
            and backends.cpu_cross_entropy_on_torch(input)
            and size_average is None and reduce is None and type(reduction) is str
            and reduction in _ops.REDUCTIONS):
        # A small loss, run by torch (see backends): what F.cross_entropy does for plain
        # tensors, with its checks and errors.
        return torch._C._nn.cross_entropy_loss(input, target, weight, _ops.REDUCTIONS[reduction],
                                               ignore_index, label_smoothing)
    reduction, reduction_code = _reduction_code(size_average, reduce, reduction)
    _check_input("cross_entropy", input, target)
    input, weight = _autocast_inputs(input, weight)
    backend = backends.resolve_for(input)
    target_dtype = target.dtype
    if target_dtype.is_floating_point and _probs_on_kernel(backend, input, target, weight, ignore_index):
        return _ops.CPP["cross_entropy_probs"](
            input, target, weight, _label_smoothing(label_smoothing), reduction_code,
            input.requires_grad and torch.is_grad_enabled(), loss_dtype=_torch_loss_dtype(input))
    if backend == "torch" or target_dtype.is_floating_point:
        return F.cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing,
        )
    if target_dtype is not torch.int64 and target_dtype is not torch.uint8:
        raise RuntimeError(
            f"cross_entropy: expected target dtype to be Long or Byte, but got {target_dtype}"
        )
    shape = input.shape
    if len(shape) == 2 and target.dim() == 1 and target.shape[0] == shape[0]:
        classes = shape[1]  # (N, C) and (N,): the common case, fully checked here
    else:
        target, classes = _cross_entropy_layout(shape, target)
    if weight is not None:
        _check_weight("cross_entropy", weight, input, classes, "nll_loss_forward")
    smoothing = _label_smoothing(label_smoothing)
    if not (input.is_cpu and target.is_cpu) and target.device != input.device:
        raise RuntimeError(f"cross_entropy: target is on {target.device} but input is on {input.device}")
    if target_dtype is not torch.int64:
        target = target.long()
    ignore_index = _ignore_index(ignore_index)
    if backend != "cpp":  # the C++ kernels check their targets themselves
        _check_targets("cross_entropy", backend, target, classes, ignore_index, IndexError)
    op = CROSS_ENTROPY[backend]
    return op(input, target, weight, ignore_index, smoothing, reduction_code,
              input.requires_grad and torch.is_grad_enabled(), loss_dtype=_torch_loss_dtype(input))


def multi_margin_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    p: int = 1,
    margin: float = 1.0,
    weight: torch.Tensor | None = None,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multi-class hinge loss; same arguments, results and errors as
    ``torch.nn.functional.multi_margin_loss`` (it also accepts float16/bfloat16 on CPU).

    loss_i = sum_{j != y_i} weight[y_i] * max(0, margin - x[y_i] + x[j])^p / C.
    The classic multiclass SVM loss (sum over wrong classes, mean over N) is
    ``multi_margin_loss(scores, y) * C``.
    """
    if (type(input) is torch.Tensor and type(target) is torch.Tensor and weight is None
            and backends.cpu_hinge_on_torch(input)
            and size_average is None and reduce is None and type(reduction) is str
            and reduction in _ops.REDUCTIONS and (p == 1 or p == 2)):
        # A small loss, run by torch (see backends): what F.multi_margin_loss does for
        # plain tensors after its checks of p and weight, with torch's own errors.
        return torch._C._nn.multi_margin_loss(input, target, p, margin, None, _ops.REDUCTIONS[reduction])
    reduction, reduction_code = _reduction_code(size_average, reduce, reduction)
    if p not in (1, 2):
        raise ValueError("only p == 1 and p == 2 supported")
    _check_input("multi_margin_loss", input, target)
    input, weight = _autocast_inputs(input, weight)
    backend = backends.resolve_for(input)
    if backend == "cpp" and backends.cpu_hinge_on_torch(input):
        backend = "torch"
    if backend == "torch":
        if weight is None and type(input) is torch.Tensor and type(target) is torch.Tensor:
            # What F.multi_margin_loss does after the checks made above (its
            # __torch_function__ check only matters for subclasses): on the small losses
            # routed here its Python costs as much as the whole margin over torch.
            return torch._C._nn.multi_margin_loss(input, target, p, margin, None, reduction_code)
        return F.multi_margin_loss(input, target, p, margin, weight, reduction=reduction)
    if target.dtype != torch.int64:
        raise RuntimeError(f"multi_margin_loss: expected target dtype int64, got {target.dtype}")
    dim = input.dim()
    if dim > 2 or (dim and input.shape[-1] == 0):
        raise RuntimeError(
            "multi_margin_loss: expected a non-empty vector (C,) or matrix (N, C), "
            f"got shape {list(input.shape)}"
        )
    classes = input.shape[-1] if dim else 1  # torch reads a 0-dim input as one class
    rows = input.shape[0] if dim == 2 else 1
    target_dim = target.dim()
    if target_dim > 1 or target.numel() != rows:
        raise RuntimeError(
            "multi_margin_loss: target must be 1-D with one class index per input row "
            f"({rows}), got shape {list(target.shape)} for input of shape {list(input.shape)}"
        )
    if weight is not None:
        if weight.dim() != 1:  # torch's type for this one (cross_entropy: RuntimeError)
            raise ValueError(f"multi_margin_loss: weight must be one-dimensional, got shape "
                             f"{tuple(weight.shape)}")
        _check_weight("multi_margin_loss", weight, input, classes, "multi_margin_loss")
    if not (input.is_cpu and target.is_cpu) and target.device != input.device:
        raise RuntimeError(f"multi_margin_loss: target is on {target.device} but input is on {input.device}")
    if backend != "cpp":  # the C++ kernels check their targets themselves
        _check_targets("multi_margin_loss", backend, target, classes, None, RuntimeError)
    op = MULTI_MARGIN_LOSS[backend]
    # (N, C) inputs go in as they are: a reshape to the same shape would add a view and
    # its backward node to every call.
    loss = op(
        input if dim == 2 else input.reshape(rows, classes),
        target if target_dim == 1 else target.reshape(rows), int(p), _margin(margin),
        weight, reduction_code, input.requires_grad and torch.is_grad_enabled(),
        loss_dtype=_torch_loss_dtype(input),
    )
    return loss.reshape(target.shape) if reduction == "none" and loss.shape != target.shape else loss


def _linear_bytes(input, weight) -> int:
    """The bytes a fused linear + loss step touches (input, weight and the scores it never
    stores): its size for the automatic GPU backend (backends.gpu_auto)."""
    rows = input.shape[0] if input.dim() == 2 else 1
    classes, features = weight.shape
    return (rows * features + classes * features + rows * classes) * input.element_size()


def _fold_leading_dims(input, target):
    """A (*, D) input with its (*) class indices (or (*, C) probabilities) as the (N, D)
    rows and (N,) targets the fused ops take, N = prod(*), as a transformer's (B, T, D)
    hidden states and (B, T) labels; None when the shapes are not that (the checks then
    name the problem).  The loss of reduction 'none' goes back to shape (*)."""
    if not (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)
            and input.dim() > 2):
        return None
    lead = input.shape[:-1]
    if target.shape == lead:
        return input.reshape(-1, input.shape[-1]), target.reshape(-1), lead
    if target.is_floating_point() and target.shape[:-1] == lead:
        return input.reshape(-1, input.shape[-1]), target.reshape(-1, target.shape[-1]), lead
    return None


def _check_linear(op: str, input, weight, bias, target):
    _check_input(op, input, target)
    if input.dim() not in (1, 2):
        raise RuntimeError(f"{op}: input must be (N, D), (D,) or (*, D) with target (*), got "
                           f"input {list(input.shape)} and target {list(target.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise RuntimeError(f"{op}: weight must be (C, D) with D = {input.shape[-1]} (as in "
                           f"nn.Linear), got shape {list(getattr(weight, 'shape', []))}")
    if weight.dtype != input.dtype or not (
            (weight.is_cpu and input.is_cpu) or weight.device == input.device):
        raise RuntimeError(f"{op}: weight must have the input's dtype and device, got "
                           f"{weight.dtype} on {weight.device}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]
                             or bias.dtype != input.dtype or bias.device != input.device):
        raise RuntimeError(f"{op}: bias must be ({weight.shape[0]},) with the input's dtype and "
                           f"device, got shape {list(bias.shape)}, {bias.dtype}")
    rows = input.shape[0] if input.dim() == 2 else 1
    if target.is_floating_point():
        return
    if target.dim() > 1 or target.numel() != rows:
        raise ValueError(f"{op}: target must hold one class index per input row ({rows}), got "
                         f"shape {list(target.shape)}")


def _fused_linear(op, input, weight, bias, target, options):
    """Runs a fused linear + loss op on checked arguments, its loss as torch's.  Under
    torch.autocast, F.linear's products run in autocast's dtype (input, weight and bias
    cast as F.linear's are) and the loss, from those 16-bit scores, is float32."""
    mask = [_needs_grad(input), _needs_grad(weight), bias is not None and _needs_grad(bias)]
    if input.is_cpu and not torch.compiler.is_compiling():
        _extension.follow_mkldnn_flag()
    if not _autocasting(input):
        return op(_as_rows(input), weight, bias, target, *options, mask, loss_dtype=input.dtype)
    with torch.autocast(input.device.type, enabled=False):
        x, w, b = _autocast_linear(input, weight, bias)
        return op(_as_rows(x), w, b, target, *options, mask)


# torch 2.11 traced the block paths' autograd Functions wrongly under torch.compile (zero
# gradients: tests/test_linear_loss.py::test_compile_fullgraph in bench/wheel_matrix.sh);
# 2.13 and 2.14 trace them right, 2.12 was not tried.  Older torch composes there.
_TRACES_BLOCKS = torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)


def _rows_exceed_one_block(input, weight) -> bool:
    """Whether a fused linear loss's scores take more than one block of rows
    (_linear_blocks.BLOCK_BYTES): then reduction='none' and probability targets run a
    block at a time (_linear_blocks); within one block composing F.linear and the loss
    holds no more memory and is as fast or faster ('none': one GEMM fewer)."""
    if not _TRACES_BLOCKS and torch.compiler.is_compiling():
        return False
    rows = input.shape[0] if input.dim() == 2 else 1
    return _linear_blocks.exceeds_one_block(rows, weight.shape[0], input.dtype, input.device)


def _linear_loss_rows(run_loss, input, weight, bias, rows_target, shape):
    """A fused linear loss with reduction='none', a block of rows at a time: the per-row
    losses as torch's, of the target's `shape` (under torch.autocast: products in its
    dtype, float32 losses)."""
    if not _autocasting(input):
        loss = _linear_blocks.LinearLossRows.apply(_as_rows(input), weight, bias, rows_target,
                                                   run_loss, input.dtype)
    else:
        with torch.autocast(input.device.type, enabled=False):
            x, w, b = _autocast_linear(input, weight, bias)
            loss = _linear_blocks.LinearLossRows.apply(_as_rows(x), w, b, rows_target, run_loss,
                                                       torch.float32)
    return loss if loss.shape == shape else loss.reshape(shape)


def _linear_probs_in_blocks(input, weight, bias, probs, reduction, smoothing):
    """linear_cross_entropy against class probabilities (N, C) on the CPU, above one
    block of scores: the probability kernel a block of rows at a time
    (linclass/_linear_blocks.py), so that only the target is N x C."""
    probs_op = _ops.CPP["cross_entropy_probs"].op

    def run_loss(s, t, code, grad):
        return probs_op(s, t, None, smoothing, code, grad)

    if reduction == "none":
        return _linear_blocks.LinearLossRows.apply(input, weight, bias, probs, run_loss,
                                                   input.dtype)
    return _linear_blocks.LinearLossBlocks.apply(input, weight, bias, probs, run_loss,
                                                 input.shape[0] if reduction == "mean" else None,
                                                 input.dtype)


def _as_rows(input):
    """A (D,) input as the one row (1, D) the ops take."""
    return input.unsqueeze(0) if input.dim() == 1 else input


def linear_cross_entropy(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """``cross_entropy(F.linear(input, weight, bias), target, ...)`` without the N x C scores.

    input (N, D) or (D,); weight (C, D) as in ``nn.Linear`` (any strides: a (D, C) matrix
    ``W`` is passed as ``W.t()`` without a copy); bias (C,).  With 'mean' or 'sum' the
    scores are made, turned into their gradient and consumed a block of rows at a time,
    and the gradients for input, weight and bias are accumulated as the blocks go.
    With 'none' the forward makes the per-row losses a block at a time and the backward
    makes each block's scores again (one more GEMM).  Probability targets (N, C) run
    the CPU probability kernel a block at a time (other devices: composed).  Where all
    the scores fit in one block, both compose ``linclass.cross_entropy(F.linear(...))``.
    An input (*, D) with target (*) is taken as N = prod(*) rows (a transformer's (B, T, D)
    hidden states and (B, T) labels); the loss of 'none' then has shape (*).
    """
    folded = _fold_leading_dims(input, target)
    if folded is not None:
        loss = linear_cross_entropy(folded[0], weight, folded[1], bias, ignore_index, reduction,
                                    label_smoothing)
        return loss.reshape(folded[2]) if loss.dim() else loss
    reduction, reduction_code = _reduction_code(None, None, reduction)
    _check_linear("linear_cross_entropy", input, weight, bias, target)
    backend = backends.resolve_for(input, _linear_bytes(input, weight) if input.is_cuda else None)
    if target.is_floating_point() and input.dim() == 2 and _rows_exceed_one_block(input, weight) \
            and _probs_on_kernel(backend, input, target, None, ignore_index,
                                 (input.shape[0], weight.shape[0])):
        return _linear_probs_in_blocks(input, weight, bias, target, reduction,
                                       _label_smoothing(label_smoothing))
    if (backend == "torch" or target.is_floating_point()
            or (reduction == "none" and not _rows_exceed_one_block(input, weight))):
        return cross_entropy(F.linear(input, weight, bias), target, ignore_index=ignore_index,
                             reduction=reduction, label_smoothing=label_smoothing)
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"linear_cross_entropy: expected target dtype to be Long or Byte, but "
                           f"got {target.dtype}")
    smoothing = _label_smoothing(label_smoothing)
    t1 = target if target.dim() == 1 else target.reshape(-1)
    if t1.dtype is not torch.int64:
        t1 = t1.long()
    _check_targets("linear_cross_entropy", None if reduction == "none" else backend, t1,
                   weight.shape[0], ignore_index, IndexError)
    if reduction == "none":
        loss_op, ignore = CROSS_ENTROPY[backend].op, _ignore_index(ignore_index)
        return _linear_loss_rows(
            lambda s, t, code, grad: loss_op(s, t, None, ignore, smoothing, code, grad),
            input, weight, bias, t1, target.shape)
    return _fused_linear(LINEAR_CROSS_ENTROPY[backend], input, weight, bias, t1,
                         (_ignore_index(ignore_index), smoothing, reduction_code))


def linear_multi_margin_loss(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                             bias: torch.Tensor | None = None, p: int = 1, margin: float = 1.0,
                             reduction: str = "mean") -> torch.Tensor:
    """``multi_margin_loss(F.linear(input, weight, bias), target, ...)`` without the N x C
    scores (see linear_cross_entropy; also for (*, D) inputs).  The classic linear SVM
    loss is this times C."""
    folded = _fold_leading_dims(input, target)
    if folded is not None:
        loss = linear_multi_margin_loss(folded[0], weight, folded[1], bias, p, margin, reduction)
        return loss.reshape(folded[2]) if loss.dim() else loss
    reduction, reduction_code = _reduction_code(None, None, reduction)
    if p not in (1, 2):
        raise ValueError("only p == 1 and p == 2 supported")
    _check_linear("linear_multi_margin_loss", input, weight, bias, target)
    backend = backends.resolve_for(input, _linear_bytes(input, weight) if input.is_cuda else None)
    if backend == "torch" or (reduction == "none" and not _rows_exceed_one_block(input, weight)):
        return multi_margin_loss(F.linear(input, weight, bias), target, p=p, margin=margin,
                                 reduction=reduction)
    if target.dtype != torch.int64:
        raise RuntimeError(f"linear_multi_margin_loss: expected target dtype int64, got {target.dtype}")
    t1 = target if target.dim() == 1 else target.reshape(-1)
    _check_targets("linear_multi_margin_loss", None if reduction == "none" else backend, t1,
                   weight.shape[0], None, RuntimeError)
    if reduction == "none":
        loss_op, p, margin = MULTI_MARGIN_LOSS[backend].op, int(p), _margin(margin)
        return _linear_loss_rows(
            lambda s, t, code, grad: loss_op(s, t, p, margin, None, code, grad),
            input, weight, bias, t1, target.shape)
    return _fused_linear(LINEAR_MULTI_MARGIN_LOSS[backend], input, weight, bias, t1,
                         (int(p), _margin(margin), reduction_code))
