"""Fused SGD steps of the classic linear classifier (C++ CPU kernels, float32).

Each step is one call into linclass._C: the minibatch gather, the scores, the fused loss
kernel, the weight gradient and the update, with no Python in between.  They are what
``linclass.workflow``'s LinearSVM / Softmax and its batched sweep run per iteration on
CPU float32 data; ``available(input)`` says whether they can run.

Losses: "svm" (multiclass hinge, margin 1, summed over the wrong classes) or
"softmax" (cross-entropy); each step's data loss is the mean over the minibatch.
"""

from __future__ import annotations

import torch

from . import _ops, backends

LOSSES = {"softmax": 0, "svm": 1}


def available(input: torch.Tensor) -> bool:
    """Whether the fused steps run on `input`: CPU float32 data with the cpp backend."""
    return (input.device.type == "cpu" and input.dtype == torch.float32
            and backends.resolve(input.device) == "cpp")


def _loss_code(loss: str) -> int:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    if not backends.runs_on("cpp", "cpu"):
        raise backends.BackendUnavailable("the fused SGD steps need linclass._C (the cpp backend)")
    return LOSSES[loss]


def linear_sgd_step(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                    index: torch.Tensor, loss: str, learning_rate: float, reg: float) -> float:
    """One SGD step on rows ``index`` of (input, target); returns the minibatch loss
    (mean data loss + reg * sum(weight**2), before the update).

    input (N, D) and weight (C, D) contiguous float32 CPU tensors (weight is the
    classifier's W transposed, the layout the kernels stream; updated in place),
    target (N,) int64, index (B,) int64 rows of the minibatch.
    """
    return _ops.call_cpp(torch.ops.linclass.linear_sgd_step, input, weight, target, index,
                         _loss_code(loss), float(learning_rate), float(reg))


def linear_sgd_sweep_step(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                          index: torch.Tensor, loss: str, runs: int, decay: torch.Tensor,
                          grad_scale: torch.Tensor) -> None:
    """One step of `runs` SGD runs side by side on the same minibatch.

    weight (D, runs * C), run k owning columns [k C, (k + 1) C), is updated in place:
    ``weight = decay * weight + X_b^T (grad_scale * dS)`` where dS is the gradient of the
    summed loss with respect to the scores X_b weight; decay and grad_scale hold one
    float32 factor per column (for plain SGD: 1 - 2 lr reg and -lr / B).
    """
    _ops.call_cpp(torch.ops.linclass.linear_sgd_sweep_step, input, weight, target, index,
                  _loss_code(loss), int(runs), decay, grad_scale)
