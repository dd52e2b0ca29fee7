"""Class-sharded fused losses on torch.distributed.

A classifier head too wide for one device is split by classes: rank r holds the scores
of classes [class_start, class_start + C_local) of a global (N, C).  Each function here is
called by every rank of the group with its own shard and the same (replicated) class
indices (or, for cross_entropy, its own columns of class probabilities), and returns the
loss of the gathered scores, identical on every rank; backward gives each rank its slice
of d loss / d scores.  Nothing N x C is ever gathered.

    import linclass.distributed as ld
    loss = ld.cross_entropy(scores_local, target, group)       # = F.cross_entropy(scores, target)
    loss = ld.multi_margin_loss(scores_local, target, group)   # = F.multi_margin_loss(...)

As in the one-process ops the gradient is made in the forward (linclass._sharded: the
shard is reduced to a few numbers per row, the ranks exchange them, and the gradient is
written from the global numbers), and backward only rescales it: no collective runs in
backward.  Collectives per call (each one stacked buffer):
  - the layout check: an all-gather of 6 integers per rank (rows, shard width and start,
    fingerprints of the targets and options, an error flag).  It runs first so that
    input that would make the ranks' buffers differ raises a clear error on every rank
    instead of crashing or hanging in the collective that follows;
  - cross-entropy: one all-gather of 6 numbers per row (max, sums of exponentials, the
    target's score, the label-smoothing sum: the max-merge of online softmax); against
    class probabilities (each rank passing its columns of them), 4 numbers per row;
  - multi-margin: one all-gather of the target scores, then one of 2 numbers per row.
The linear + loss ops (the head's weight sharded by classes) add one all-gather per
block of rows for cross-entropy and an all-reduce of the input's gradient.

Also accepted: a DTensor of scores sharded on the class dimension (``Shard(1)`` on a 1-D
mesh), for which the loss comes back as a replicated DTensor.  For data parallelism,
global_mean_denominator gives the exact global-batch 'mean'.
"""

from __future__ import annotations

import math
import sys
import zlib
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import _linear_blocks, _ops, _sharded
from .functional import (_FLOAT_TYPES, _autocast_linear, _autocasting,
                         _fold_leading_dims, _ignore_index, _margin, _reduction_code,
                         _torch_loss_dtype)

__all__ = ["cross_entropy", "global_mean_denominator", "linear_cross_entropy",
           "linear_multi_margin_loss", "multi_margin_loss"]


class Layout(NamedTuple):
    rank: int
    world: int
    starts: list  # class_start of every rank
    widths: list  # C_local of every rank
    classes: int  # global C

    @property
    def start(self) -> int:
        return self.starts[self.rank]


def _fingerprint_target(target) -> int:
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.dim() != 1:
        return 0
    # Each row's target times its own odd 32-bit multiplier (i * 2654435761 is a bijection
    # modulo 2^32), summed modulo 2^64: two rows' targets swapped, or moved by opposite
    # amounts, change the sum wherever the rows are (with period-65521 multipliers, rows
    # 65521 apart could swap unnoticed).
    t = target.detach().long()
    mix = torch.arange(t.numel(), device=t.device) * 2654435761 % (1 << 32) + 1
    return int((t * mix).sum() + 7 * t.numel())


def _fingerprint_options(options: tuple, weight) -> int:
    text = repr(options)
    if isinstance(weight, torch.Tensor):
        raw = weight.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        text += f"|weight {tuple(weight.shape)} {weight.dtype} {zlib.crc32(raw)}"
    return zlib.crc32(text.encode())


def exchange_layout(op: str, group, shape, device, target, class_start, options: tuple, weight,
                    local_error: Exception | None) -> Layout:
    """Every rank's rows, shard width and start, checked to agree, in one all-gather.

    shape: this rank's (N, C_local), read only when local_error is None.
    Each rank's own argument errors travel in the header, so every rank raises (the rank
    at fault its own error, the others one naming it) and none is left waiting in a
    collective its peers never enter."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(f"{op}: this process is not a member of the given group")
    start_given = -1
    if local_error is None:
        local_error, start_given = _checked(lambda: _class_start(op, class_start))
    ok = local_error is None
    device = device if ok and dist.get_backend(group) == "nccl" else torch.device("cpu")
    header = torch.tensor(
        [0 if ok else 1,
         shape[0] if ok else -1,  # N
         shape[1] if ok else -1,  # C_local
         start_given if ok else -1,
         _fingerprint_target(target) if ok else 0,
         _fingerprint_options(options, weight) if ok else 0],
        dtype=torch.int64, device=device)
    gathered = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(gathered, header, group=group)
    table = torch.stack(gathered).tolist()
    failed = [r for r, row in enumerate(table) if row[0]]
    if failed:
        if not ok:
            raise local_error
        raise ValueError(f"{op}: rank(s) {failed} of the group rejected their arguments (see the "
                         "error raised there); every rank stops")
    rows = [row[1] for row in table]
    if len(set(rows)) != 1:
        raise ValueError(f"{op}: the ranks hold different numbers of rows N: {rows}; every rank "
                         "must pass all N rows of its class shard")
    if len({row[5] for row in table}) != 1:
        raise ValueError(f"{op}: the ranks were called with different options or class weights "
                         f"({options[1:]} here); every rank must pass the same ones")
    if len({row[4] for row in table}) != 1:
        raise ValueError(f"{op}: the target differs across ranks; every rank must pass the same "
                         "(replicated) target")
    widths = [row[2] for row in table]
    given = [row[3] for row in table]
    if all(g == -1 for g in given):
        starts = [sum(widths[:r]) for r in range(world)]
    elif any(g == -1 for g in given):
        raise ValueError(f"{op}: class_start was given on some ranks only ({given}, -1 = not "
                         "given); give it on every rank or on none")
    else:
        starts = given
        order = sorted(range(world), key=lambda r: (starts[r], widths[r]))
        edge = 0
        for r in order:
            if starts[r] != edge:
                raise ValueError(
                    f"{op}: the class shards do not tile [0, C): rank {r} starts at class "
                    f"{starts[r]}, expected {edge} (shard starts {starts}, widths {widths})")
            edge += widths[r]
    classes = sum(widths)
    if classes == 0:
        raise ValueError(f"{op}: the shards hold no classes (C = 0)")
    return Layout(rank, world, starts, widths, classes)


def _gather_rows(stats: torch.Tensor, group, world: int) -> torch.Tensor:
    """(K, S, N): every rank's stacked per-row statistics, in rank order (so every rank
    sums them in the same order and gets the same bits)."""
    stats = stats.contiguous()
    out = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(out, stats, group=group)
    return torch.stack(out)


class _ShardedLoss(torch.autograd.Function):
    """Runs `compute` (-> loss, gradient for grad_output = 1) and keeps the gradient."""

    @staticmethod
    def forward(ctx, scores, compute, per_row):
        loss, grad = compute()
        ctx.per_row = per_row
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        _ops._check_first_order()
        (grad,) = ctx.saved_tensors
        if ctx.per_row:
            return grad * grad_loss.unsqueeze(1), None, None
        (grad,) = _ops._rescale([grad], grad_loss)
        return grad, None, None


def _check_probabilities(op: str, scores, target) -> None:
    """A float target: this rank's slice (N, C_local) of the class probabilities."""
    if tuple(target.shape) != tuple(scores.shape):
        raise ValueError(f"{op}: a target of class probabilities must be this rank's slice of "
                         f"them, shaped as scores_local {list(scores.shape)}, got "
                         f"{list(target.shape)}")
    if target.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{op}: the loss is not differentiable with respect to the target "
                           "probabilities; pass target.detach()")


def _check_common(op: str, scores, target, weight, reduction: str,
                  probabilities: bool = False) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{op}: scores_local must be a Tensor, got {type(scores).__name__}")
    if scores.dtype not in _FLOAT_TYPES:
        raise TypeError(f"{op}: scores_local must be float32, float64, float16 or bfloat16, got "
                        f"{scores.dtype}")
    if scores.dim() != 2:
        raise ValueError(f"{op}: scores_local must be (N, C_local), got shape {list(scores.shape)}")
    if probabilities and isinstance(target, torch.Tensor) and target.is_floating_point():
        _check_probabilities(op, scores, target)
    elif not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32, torch.uint8):
        kinds = " or of this shard's class probabilities" if probabilities else ""
        raise TypeError(f"{op}: target must be a tensor of class indices (int64){kinds}, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    elif tuple(target.shape) != (scores.shape[0],):
        raise ValueError(f"{op}: target must be ({scores.shape[0]},), one global class index per "
                         f"row, got shape {list(target.shape)}")
    if target.device != scores.device:
        raise RuntimeError(f"{op}: target is on {target.device} but scores_local on {scores.device}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            raise ValueError(f"{op}: weight must be the 1-D weight of all C classes")
        if weight.dtype != scores.dtype or weight.device != scores.device:
            raise RuntimeError(f"{op}: weight must have the scores' dtype and device, got "
                               f"{weight.dtype} on {weight.device}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{op}: the loss is not differentiable with respect to weight")
    _reduction_code(None, None, reduction)


def _checked(check) -> tuple[Exception | None, object]:
    """(None, check()), or (the error, None): a rank's own argument errors are raised on
    every rank after the layout exchange, never before it (the others would wait there)."""
    try:
        return None, check()
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        return error, None


def _class_start(op: str, class_start) -> int:
    """class_start as an int (-1: not given), or the error: an integer, not a float."""
    if class_start is None:
        return -1
    if isinstance(class_start, bool) or not hasattr(class_start, "__index__"):
        raise TypeError(f"{op}: class_start must be an int, got {type(class_start).__name__}")
    value = class_start.__index__()
    if not 0 <= value < 2**62:
        raise ValueError(f"{op}: class_start must be a class index (>= 0), got {value}")
    return value


def _check_smoothing(op: str, label_smoothing) -> None:
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")


def _check_p(op: str, p) -> None:
    if p not in (1, 2):
        raise ValueError(f"{op}: only p == 1 and p == 2 are supported, got {p}")


def _check_range(op: str, target: torch.Tensor, classes: int, ignore_index, error: type) -> None:
    bad = (target < 0) | (target >= classes)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        allowed = f" or target == ignore_index ({ignore_index})" if ignore_index is not None else ""
        raise error(f"{op}: target[{i}] = {int(target[i])} is out of bounds for the {classes} "
                    f"classes of all shards (expected 0 <= target < {classes}{allowed})")


def _check_weight_size(op: str, weight, classes: int) -> None:
    if weight is not None and weight.numel() != classes:
        raise RuntimeError(f"{op}: weight must have one entry per class of all shards ({classes}), "
                           f"got {weight.numel()}")


def _enter(op: str, scores, target, group, class_start, weight, check,
           range_error: type) -> tuple[Layout, torch.Tensor, tuple]:
    """What both score ops start with: this rank's argument checks (run by `check`, which
    returns the op's options as the kernels take them, a dict), the layout exchange that
    carries their outcome, then the checks that need the global C.  Returns (layout,
    target as int64, options)."""
    error, options = _checked(check)
    options = options or {}
    ignore_index = options.get("ignore_index")
    fingerprint = (op, str(getattr(scores, "dtype", ""))) + tuple(sorted(options.items()))
    layout = exchange_layout(op, group, getattr(scores, "shape", None),
                             getattr(scores, "device", None), target, class_start, fingerprint,
                             weight, error)
    if target.is_floating_point():  # class probabilities (checked by `check`)
        _check_weight_size(op, weight, layout.classes)
        return layout, target, options
    target = target.long()
    _check_range(op, target, layout.classes, ignore_index, range_error)
    _check_weight_size(op, weight, layout.classes)
    return layout, target, options


def _reduce(loss_rows: torch.Tensor, reduction: str, denominator) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return _sharded.mean_of(total, denominator) if reduction == "mean" else total


def _dtensor_call(fn, scores, target, weight, kwargs):
    """The DTensor entry: local shard in, replicated DTensor loss out."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    op = fn.__name__
    mesh = scores.device_mesh
    placements = scores.placements
    if (mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard)
            or placements[0].dim not in (1, -1) or scores.dim() != 2):
        raise ValueError(f"{op}: a DTensor of scores must be (N, C) sharded on the class "
                         f"dimension (Shard(1)) over a 1-D mesh, got {placements} on {mesh}")
    if kwargs.get("class_start") is not None:
        raise ValueError(f"{op}: class_start is implied by a DTensor's sharding; do not pass it")

    def local(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    classes = scores.shape[1]
    chunk = math.ceil(classes / mesh.size())  # torch.chunk's split, as Shard(1) uses it
    start = kwargs["class_start"] = min(mesh.get_coordinate()[0] * chunk, classes)
    scores_local = scores.to_local()
    if isinstance(target, torch.Tensor) and target.is_floating_point() and target.dim() == 2:
        # Class probabilities: this rank's columns, from a DTensor sharded as the scores
        # without a collective, else from the whole (N, C).
        if isinstance(target, DTensor) and target.placements == placements \
                and target.device_mesh == mesh:
            target = target.to_local()
        else:
            whole = local(target)  # (a collective for a sharded DTensor: once)
            target = whole[:, start:start + scores_local.shape[1]] \
                if whole.shape[1] == classes else whole
    loss = fn(scores_local, local(target), mesh.get_group(), weight=local(weight), **kwargs)
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)


def _is_dtensor(t) -> bool:
    # Without torch.distributed.tensor imported there is no DTensor to get (and importing
    # it costs tens of MB of resident memory in every rank).
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def cross_entropy(scores_local: torch.Tensor, target: torch.Tensor, group=None, *,
                  class_start: int | None = None, weight: torch.Tensor | None = None,
                  ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy`` of the global scores, from this rank's class shard.

    scores_local: (N, C_local), classes [class_start, class_start + C_local) of the global
    (N, C) (class_start defaults to the sum of the lower ranks' C_local).  target: (N,)
    global class indices, the same on every rank.  weight: the (C,) weights of all
    classes.  Label smoothing spreads over the global C.  Returns the loss, the same on
    every rank (per row for 'none').

    target may also be this rank's slice (N, C_local) of class probabilities (the columns
    of scores_local; floats, a detached tensor), as
    ``F.cross_entropy(scores, probabilities)`` of the gathered tensors: 'mean' divides by
    N, label smoothing mixes in eps / C of the global C, ignore_index is not supported."""
    if _is_dtensor(scores_local):
        return _dtensor_call(cross_entropy, scores_local, target, weight, dict(
            class_start=class_start, ignore_index=ignore_index,
            label_smoothing=label_smoothing, reduction=reduction))
    op = "linclass.distributed.cross_entropy"
    probabilities = isinstance(target, torch.Tensor) and target.is_floating_point()

    def check():
        _check_common(op, scores_local, target, weight, reduction, probabilities=True)
        _check_smoothing(op, label_smoothing)
        ignored = _ignore_index(ignore_index)
        if probabilities and ignored >= 0:  # torch's rule
            raise ValueError(f"{op}: ignore_index is not supported for a target of class "
                             f"probabilities, got ignore_index={ignored}")
        return dict(ignore_index=ignored, label_smoothing=float(label_smoothing),
                    reduction=reduction, probabilities=probabilities)

    layout, target, options = _enter(op, scores_local, target, group, class_start, weight, check,
                                     IndexError)
    ignore_index, label_smoothing = options["ignore_index"], options["label_smoothing"]
    start, width = layout.start, scores_local.shape[1]
    weight_local = None if weight is None else weight[start:start + width]
    compute_grad = scores_local.requires_grad and torch.is_grad_enabled()

    def compute_probabilities():
        x = scores_local.detach()
        stats = _sharded.ce_probs_phase1(x, target, weight_local, label_smoothing,
                                         layout.classes)
        merged = _sharded.ce_probs_merge(_gather_rows(stats, group, layout.world), reduction,
                                         layout.rank)
        loss = _reduce(merged.loss, reduction, x.shape[0])
        grad = None
        if compute_grad:
            grad = _sharded.ce_probs_phase2(x, target, weight_local, merged, label_smoothing,
                                            layout.classes).to(scores_local.dtype)
        # torch promotes: float32 scores against float64 probabilities give a float64 loss.
        return loss.to(torch.promote_types(_torch_loss_dtype(scores_local), target.dtype)), grad

    def compute():
        x = scores_local.detach()
        stats = _sharded.ce_phase1(x, target, start, weight_local, label_smoothing > 0,
                                   ignore_index)
        merged = _sharded.ce_merge(_gather_rows(stats, group, layout.world), target, weight,
                                   layout.starts, layout.widths, layout.classes, ignore_index,
                                   float(label_smoothing), reduction, layout.rank)
        loss = _reduce(merged.loss, reduction, merged.target_weight.sum())
        grad = None
        if compute_grad:
            grad = _sharded.ce_phase2(x, target, start, weight_local, merged, ignore_index)
            grad = grad.to(scores_local.dtype)
        return loss.to(_torch_loss_dtype(scores_local)), grad

    run = compute_probabilities if probabilities else compute
    if not compute_grad:
        return run()[0]
    return _ShardedLoss.apply(scores_local, run, reduction == "none")


def multi_margin_loss(scores_local: torch.Tensor, target: torch.Tensor, group=None, *,
                      class_start: int | None = None, p: int = 1, margin: float = 1.0,
                      weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """``F.multi_margin_loss`` of the global scores, from this rank's class shard (the
    arguments as in cross_entropy): loss_i = sum_{j != y_i} w_{y_i} max(0, margin -
    x[y_i] + x[j])^p / C with the global C."""
    if _is_dtensor(scores_local):
        return _dtensor_call(multi_margin_loss, scores_local, target, weight, dict(
            class_start=class_start, p=p, margin=margin, reduction=reduction))
    op = "linclass.distributed.multi_margin_loss"

    def check():
        _check_common(op, scores_local, target, weight, reduction)
        _check_p(op, p)
        return dict(p=p, margin=_margin(margin), reduction=reduction)

    layout, target, options = _enter(op, scores_local, target, group, class_start, weight, check,
                                     RuntimeError)
    margin = options["margin"]
    start = layout.start
    compute_grad = scores_local.requires_grad and torch.is_grad_enabled()

    def compute():
        x = scores_local.detach()
        x_y = _gather_rows(_sharded.target_scores(x, target, start), group, layout.world).sum(0)
        stats, grad = _sharded.mm_phase2(x, target, start, x_y, p, margin, weight,
                                         layout.classes, reduction, compute_grad=compute_grad)
        gathered = _gather_rows(stats, group, layout.world)
        loss_rows = _sharded.mm_finish(gathered, grad, target, start, weight, layout.classes)
        loss = _reduce(loss_rows, reduction, loss_rows.numel())
        return loss.to(_torch_loss_dtype(scores_local)), None if grad is None else grad.to(scores_local.dtype)

    if not compute_grad:
        return compute()[0]
    return _ShardedLoss.apply(scores_local, compute, reduction == "none")


# ---- the head's weight sharded by classes ------------------------------------------

def _check_linear(op: str, input, weight_local, bias_local, target, reduction: str) -> None:
    if not isinstance(input, torch.Tensor) or input.dim() != 2 or input.dtype not in _FLOAT_TYPES:
        raise ValueError(f"{op}: input must be a floating (N, D) tensor (or (*, D) with target "
                         f"(*)), the same on every rank, got "
                         f"{getattr(input, 'shape', type(input).__name__)}")
    if (not isinstance(weight_local, torch.Tensor) or weight_local.dim() != 2
            or weight_local.shape[1] != input.shape[1]):
        raise ValueError(f"{op}: weight_local must be (C_local, D) with D = {input.shape[1]}, got "
                         f"{list(getattr(weight_local, 'shape', []))}")
    if weight_local.dtype != input.dtype or weight_local.device != input.device:
        raise RuntimeError(f"{op}: weight_local must have the input's dtype and device, got "
                           f"{weight_local.dtype} on {weight_local.device}")
    if bias_local is not None and (not isinstance(bias_local, torch.Tensor)
                                   or tuple(bias_local.shape) != (weight_local.shape[0],)
                                   or bias_local.dtype != input.dtype
                                   or bias_local.device != input.device):
        raise ValueError(f"{op}: bias_local must be ({weight_local.shape[0]},) with the input's "
                         f"dtype and device, got {list(getattr(bias_local, 'shape', []))}")
    _check_common(op, input.new_empty((input.shape[0], 0)), target, None, reduction)


class _ShardedLinearLoss(torch.autograd.Function):
    """run() -> (loss, gradients for grad_output = 1 or None, later); for reduction
    'none' the gradients depend on grad_output per row and later(grad_output) makes them."""

    @staticmethod
    def forward(ctx, input, weight, bias, run):
        loss, grads, later = run()
        ctx.later = later
        if grads is not None:
            ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        _ops._check_first_order()
        if ctx.later is not None:
            grads = ctx.later(grad_loss)
        else:
            saved = list(ctx.saved_tensors)
            present = [i for i, g in enumerate(saved) if g is not None]
            scaled = _ops._rescale([saved[i] for i in present], grad_loss)
            grads = [None] * 3
            for i, g in zip(present, scaled):
                grads[i] = g
        return (*grads, None)


def _linear_loss(op: str, kind: str, input, weight_local, bias_local, target, group,
                 class_start, check_options, reduction: str):
    """check_options() checks the loss's own options and returns them as a dict, or
    raises: like every argument error here, after the layout exchange, on every rank.
    Under torch.autocast the products run in its dtype, as F.linear's would, and the loss
    (accumulated in float32 as always) comes back in float32, as torch's losses do there."""
    if isinstance(input, torch.Tensor) and _autocasting(input):
        with torch.autocast(input.device.type, enabled=False):
            input, weight_local, bias_local = _autocast_linear(input, weight_local, bias_local)
            return _linear_loss_in(op, kind, input, weight_local, bias_local, target, group,
                                   class_start, check_options, reduction, torch.float32)
    return _linear_loss_in(op, kind, input, weight_local, bias_local, target, group, class_start,
                           check_options, reduction, getattr(input, "dtype", None))


def _linear_loss_in(op: str, kind: str, input, weight_local, bias_local, target, group,
                    class_start, check_options, reduction: str, loss_dtype):
    def check():
        _check_linear(op, input, weight_local, bias_local, target, reduction)
        return check_options()

    error, options = _checked(check)
    options = options or {}
    wants = [isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled()
             for t in (input, weight_local, bias_local)]
    # The input gradient is all-reduced: every rank must agree on whether to make it.
    fingerprint = (op, str(getattr(input, "dtype", "")), tuple(getattr(input, "shape", ()))[1:],
                   tuple(sorted(options.items())), reduction, wants[0], bias_local is None)
    shape = None if error else (input.shape[0], weight_local.shape[0])
    layout = exchange_layout(op, group, shape, getattr(input, "device", None), target,
                             class_start, fingerprint, None, error)
    ignore_index = options.get("ignore_index")
    target = target.long()
    _check_range(op, target, layout.classes, ignore_index,
                 IndexError if kind == "ce" else RuntimeError)
    start, n = layout.start, input.shape[0]
    acc = _ops.accumulation_dtype(input.dtype)
    # Blocks sized by the global C (_linear_blocks.BLOCK_BYTES), the same on every rank
    # (each block runs a collective).
    blocks = _linear_blocks.blocks_of(input, weight_local, bias_local, layout.classes)
    x, w, b, x_mm, w_mm = blocks.x, blocks.w, blocks.b, blocks.x_mm, blocks.w_mm
    scores = blocks.scores

    def gradients(block_grads, fixup=None):
        """Accumulates the blocks' score gradients G into (input, weight, bias) gradients;
        the input's is summed over the group (every rank holds a part of its classes)."""
        gi, gw, gb = blocks.gradients(block_grads, wants)
        if fixup is not None:
            fixup(gi, gw, gb)
        if gi is not None:
            dist.all_reduce(gi, group=group)
        return [None if g is None else g.to(input.dtype) for g in (gi, gw, gb)]

    if kind == "ce":
        smoothing = options["label_smoothing"]
        denominator = (target != ignore_index).sum().to(acc)  # of 'mean' (no class weights)

        def run():
            merged, loss_rows = [], []

            def forward_blocks(with_grads):
                """Per block of rows: scores, statistics, their exchange (one all-gather
                of the block's), merge, and with_grads the block's score gradient from
                the same scores (so they are made once)."""
                for k in blocks.slices:
                    s = scores(k)
                    stats = _sharded.ce_phase1(s, target[k], start, None, smoothing > 0,
                                               ignore_index)
                    m = _sharded.ce_merge(_gather_rows(stats, group, layout.world), target[k],
                                          None, layout.starts, layout.widths, layout.classes,
                                          ignore_index, smoothing, reduction, layout.rank,
                                          mean_denominator=denominator)
                    merged.append(m)
                    loss_rows.append(m.loss)
                    if with_grads:
                        yield k, _sharded.ce_phase2(s, target[k], start, None, m, ignore_index,
                                                    overwrite=True)

            def later(grad_out):  # 'none': the saved coefficients, scaled per row
                return gradients(
                    (k, _sharded.ce_phase2(scores(k), target[k], start, None, m, ignore_index,
                                           overwrite=True).mul_(grad_out[k].to(acc).unsqueeze(1)))
                    for k, m in zip(blocks.slices, merged))

            grads = None
            if any(wants) and reduction != "none":
                grads = gradients(forward_blocks(True))
            else:
                for _ in forward_blocks(False):
                    pass
            loss = _reduce(torch.cat(loss_rows), reduction, denominator).to(loss_dtype)
            if not any(wants):
                return loss, None, None
            return loss, grads, later if reduction == "none" else None
    else:
        p, margin = options["p"], options["margin"]

        def run():
            own = (target >= start) & (target < start + w.shape[0])
            rows = own.nonzero().squeeze(1)
            cols = target[rows] - start
            x_y = torch.zeros(n, dtype=acc, device=x.device)
            mine = (x_mm[rows].to(acc) * w_mm[cols].to(acc)).sum(1)
            mine = mine if b is None else mine + b[cols].to(acc)
            # Rounded to the input dtype as the blocks' scores are (F.linear rounds x w^T + b
            # once): a 16-bit target score kept in float32 against rounded s_j moved terms
            # near their kink to the other side of it.
            x_y[rows] = mine.to(input.dtype).to(acc)
            x_y = _gather_rows(x_y, group, layout.world).sum(0)
            parts = []

            def block_grads(row_scale=None, with_grads=True):
                for k in blocks.slices:
                    st, g = _sharded.mm_phase2(scores(k), target[k], start, x_y[k], p, margin,
                                               None, layout.classes, reduction, rows=n,
                                               compute_grad=with_grads)
                    if row_scale is None:
                        parts.append(st)
                    yield k, g if row_scale is None else g.mul_(row_scale[k].to(acc).unsqueeze(1))

            def target_column(stats, row_scale=None):
                """dx_y = -(the row's other gradients, summed over every rank): added to the
                input / weight / bias gradients of the rows whose target this rank holds."""
                g_y = -stats[:, 1].sum(0)[rows]
                if row_scale is not None:
                    g_y = g_y * row_scale[rows].to(acc)

                def fixup(gi, gw, gb):
                    if gi is not None:
                        gi.index_add_(0, rows, g_y.unsqueeze(1) * w_mm[cols].to(acc))
                    if gw is not None:
                        gw.index_add_(0, cols, g_y.unsqueeze(1) * x_mm[rows].to(acc))
                    if gb is not None:
                        gb.index_add_(0, cols, g_y)
                return fixup

            gathered = {}

            def gather_then_target_column(gi, gw, gb):
                gathered["stats"] = _gather_rows(torch.cat(parts, dim=1), group, layout.world)
                target_column(gathered["stats"])(gi, gw, gb)

            grads = None
            if any(wants) and reduction != "none":
                # One pass over the blocks makes the statistics and all the gradients but
                # the target column's, which waits for the other ranks' statistics.
                grads = gradients(block_grads(), gather_then_target_column)
            else:
                for _ in block_grads(with_grads=False):
                    pass
                gather_then_target_column(None, None, None)
            stats = gathered["stats"]
            loss = _reduce(stats[:, 0].sum(0) / layout.classes, reduction, n).to(loss_dtype)
            if not any(wants):
                return loss, None, None
            if reduction == "none":
                return loss, None, lambda grad_out: gradients(block_grads(grad_out),
                                                               target_column(stats, grad_out))
            return loss, grads, None

    if not any(wants):
        return run()[0]
    return _ShardedLinearLoss.apply(input, weight_local, bias_local, run)


def linear_cross_entropy(input: torch.Tensor, weight_local: torch.Tensor, target: torch.Tensor,
                         bias_local: torch.Tensor | None = None, group=None, *,
                         class_start: int | None = None, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(F.linear(input, weight, bias), target)`` for a head whose weight
    (C, D) and bias are sharded by classes: this rank holds rows [class_start, class_start
    + C_local) as weight_local (C_local, D) and bias_local (C_local,); input (N, D) and
    target are the same on every rank.

    No (N, C) or (N, C_local) tensor is made: the scores are made a block of rows at a
    time (as many rows as _linear_blocks.BLOCK_BYTES of the global scores hold), the block's row
    statistics are exchanged (one all-gather per block, of 6 numbers per row), and the
    block's gradient is made from the same scores and accumulated into the input, weight
    and bias gradients.  The input's gradient is summed over the group (in the forward;
    in backward for 'none', which makes the scores again there); the weight's and bias's
    are this rank's slices.
    An input (*, D) with target (*) is taken as prod(*) rows; 'none' then gives shape (*)."""
    op = "linclass.distributed.linear_cross_entropy"
    folded = _fold_leading_dims(input, target)
    if folded is not None:
        loss = linear_cross_entropy(folded[0], weight_local, folded[1], bias_local, group,
                                    class_start=class_start, ignore_index=ignore_index,
                                    label_smoothing=label_smoothing, reduction=reduction)
        return loss.reshape(folded[2]) if loss.dim() else loss

    def options():
        _check_smoothing(op, label_smoothing)
        return dict(ignore_index=_ignore_index(ignore_index), label_smoothing=float(label_smoothing))

    return _linear_loss(op, "ce", input, weight_local, bias_local, target, group, class_start,
                        options, reduction)


def linear_multi_margin_loss(input: torch.Tensor, weight_local: torch.Tensor, target: torch.Tensor,
                             bias_local: torch.Tensor | None = None, group=None, *,
                             class_start: int | None = None, p: int = 1, margin: float = 1.0,
                             reduction: str = "mean") -> torch.Tensor:
    """``F.multi_margin_loss(F.linear(input, weight, bias), target)`` for a head sharded by
    classes (see linear_cross_entropy, also for (*, D) inputs); the scores are made once, a
    block of rows at a time."""
    op = "linclass.distributed.linear_multi_margin_loss"
    folded = _fold_leading_dims(input, target)
    if folded is not None:
        loss = linear_multi_margin_loss(folded[0], weight_local, folded[1], bias_local, group,
                                        class_start=class_start, p=p, margin=margin,
                                        reduction=reduction)
        return loss.reshape(folded[2]) if loss.dim() else loss

    def options():
        _check_p(op, p)
        return dict(p=int(p), margin=_margin(margin))

    return _linear_loss(op, "mm", input, weight_local, bias_local, target, group, class_start,
                        options, reduction)


def global_mean_denominator(target: torch.Tensor, weight: torch.Tensor | None = None,
                            ignore_index: int = -100, group=None) -> torch.Tensor:
    """The denominator of the global batch's 'mean' under data parallelism: the sum, over
    every rank's rows, of the target weights of the rows not ignored (one all-reduce).

    Averaging each rank's 'mean' is biased when the ranks hold different numbers of
    ignored rows or of target weights; instead, on every rank:

        denom = global_mean_denominator(y, weight, ignore_index)
        loss = linclass.cross_entropy(scores, y, weight, ignore_index=ignore_index,
                                      reduction="sum") * world_size / denom

    DDP averages the gradients over the world_size ranks, so they become those of the
    global batch's mean; the global mean loss is the all-reduced sum of `loss` / world_size.
    For a target of class probabilities (C on dimension 1) it is the global number of
    rows, which torch's 'mean' divides by whatever the weights.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("global_mean_denominator: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first")
    if target.is_floating_point():  # class probabilities: 'mean' divides by the rows
        rows = math.prod(target.shape[:1] + target.shape[2:]) if target.dim() > 1 else 1
        local = torch.tensor(float(rows), dtype=torch.float64, device=target.device)
    elif weight is None:
        local = (target != ignore_index).sum().to(torch.float64)
    else:
        valid = target != ignore_index
        local = torch.where(valid, weight.to(torch.float64)[target.long().clamp(0, weight.numel() - 1)],
                            torch.zeros((), dtype=torch.float64, device=target.device)).sum()
    device = target.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    total = local.to(device).reshape(1)
    dist.all_reduce(total, group=group)
    return total[0].to(target.device)
