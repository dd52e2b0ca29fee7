"""linclass: fused loss kernels for PyTorch and the linear-classifier workflow on them.

    import linclass
    loss = linclass.cross_entropy(scores, y)        # drop-in for F.cross_entropy
    loss = linclass.multi_margin_loss(scores, y)    # drop-in for F.multi_margin_loss

Class-sharded versions for torch.distributed (a head split by classes over processes
or devices) are in linclass.distributed (import it explicitly).  The classic classifier
workflow built on these is the subpackage linclass.workflow.
"""

from . import _extension  # noqa: F401  (loads linclass._C; warns once if it cannot)
from . import backends, nn, reference, sgd
from .functional import (
    cross_entropy,
    linear_cross_entropy,
    linear_multi_margin_loss,
    multi_margin_loss,
)

__version__ = "0.1.0"

__all__ = [
    "backends",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_multi_margin_loss",
    "multi_margin_loss",
    "nn",
    "reference",
    "sgd",
]
