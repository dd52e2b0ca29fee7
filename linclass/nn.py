"""Loss modules: torch's classes with the forward routed through linclass's fused ops.

They subclass torch.nn.CrossEntropyLoss / MultiMarginLoss, so constructor arguments,
state_dict (the `weight` buffer) and isinstance checks are torch's own.
"""

from __future__ import annotations

import math

import torch

from . import functional


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by ``linclass.cross_entropy``."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
        )


class MultiMarginLoss(torch.nn.MultiMarginLoss):
    """``torch.nn.MultiMarginLoss`` computed by ``linclass.multi_margin_loss``."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.multi_margin_loss(
            input, target, p=self.p, margin=self.margin, weight=self.weight,
            reduction=self.reduction,
        )


class _LinearLoss(torch.nn.Module):
    """A linear layer (weight (C, D), bias (C,), initialized as nn.Linear) whose forward
    returns the loss of its scores against the targets, fused (linclass.linear_*)."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, reduction: str = "mean",
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.num_classes, self.reduction = in_features, num_classes, reduction
        self.weight = torch.nn.Parameter(torch.empty(num_classes, in_features, **kw))
        self.bias = torch.nn.Parameter(torch.empty(num_classes, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def scores(self, input: torch.Tensor) -> torch.Tensor:
        """The layer's output (for prediction), input @ weight.T + bias."""
        return torch.nn.functional.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"bias={self.bias is not None}, reduction={self.reduction!r}")


class LinearCrossEntropyLoss(_LinearLoss):
    """``nn.Linear`` followed by ``nn.CrossEntropyLoss``, computed by
    ``linclass.linear_cross_entropy`` without materializing the scores."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True,
                 ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 device=None, dtype=None):
        super().__init__(in_features, num_classes, bias, reduction, device, dtype)
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.linear_cross_entropy(
            input, self.weight, target, self.bias, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing)


class LinearMultiMarginLoss(_LinearLoss):
    """``nn.Linear`` followed by ``nn.MultiMarginLoss``, computed by
    ``linclass.linear_multi_margin_loss`` without materializing the scores."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, p: int = 1,
                 margin: float = 1.0, reduction: str = "mean", device=None, dtype=None):
        super().__init__(in_features, num_classes, bias, reduction, device, dtype)
        self.p, self.margin = p, margin

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.linear_multi_margin_loss(
            input, self.weight, target, self.bias, p=self.p, margin=self.margin,
            reduction=self.reduction)
