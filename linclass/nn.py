"""Loss modules: torch's classes with the forward routed through linclass's fused ops.

They subclass torch.nn.CrossEntropyLoss / MultiMarginLoss, so constructor arguments,
state_dict (the `weight` buffer) and isinstance checks are torch's own.
"""

from __future__ import annotations

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
