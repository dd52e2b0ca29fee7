"""Loads the compiled kernel library linclass._C (C++ CPU and, when built, CUDA kernels).

Importing it runs the TORCH_LIBRARY initializers that define torch.ops.linclass.*.
When the extension is missing or fails to load, linclass still imports and every op
runs on the torch backend; one RuntimeWarning says so.
"""

from __future__ import annotations

import warnings

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.linclass.*)

    LOAD_ERROR: str | None = None
except ImportError as e:  # not built, or built against another torch
    LOAD_ERROR = str(e)
    warnings.warn(
        "linclass: the kernel library linclass._C could not be loaded "
        f"({LOAD_ERROR}); every op falls back to the 'torch' backend. "
        "Rebuild it with `pip install --no-build-isolation -e .` (see README).",
        RuntimeWarning,
        stacklevel=3,
    )

HAS_CPP = LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether linclass._C registered a kernel for torch.ops.linclass.<op> on that key."""
    return HAS_CPP and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"linclass::{op}", dispatch_key
    )


HAS_CUDA_KERNELS = has_kernel("cross_entropy", "CUDA")


def cpu_isa() -> str | None:
    """The vector ISA the CPU kernels were compiled for ('avx512', 'avx2', 'default')."""
    return torch.ops.linclass._cpu_isa() if HAS_CPP else None
