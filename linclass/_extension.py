"""Loads the compiled kernel libraries.

linclass._C defines torch.ops.linclass.* (its STABLE_TORCH_LIBRARY initializers run when
it is imported) and holds the CUDA kernels when it was built with them.  The C++ CPU kernels
come in one module per x86 vector ISA, linclass._cpu_<isa>; the best one this CPU runs
is imported here, or the one LINCLASS_CPU_ISA names (avx512, avx2, default) when the CPU
supports it.  When a library is missing or fails to load, linclass still imports and
the ops it would run fall back to the 'torch' backend; one RuntimeWarning says so.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

ISAS = ("avx512", "avx2", "default")  # widest first

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


def _has_onednn_linear() -> bool:
    """Whether torch has oneDNN's inner product op with the arguments the CPU fused linear
    ops pass it (csrc/tensor_ops.h, onednn_linear): a torch built without oneDNN has
    none, and a later torch might change it; then their products stay on the BLAS."""
    expected = {"default": ["X", "W", "B", "attr", "scalars", "algorithm"],
                "binary": ["X", "other", "W", "B", "attr"]}
    try:
        op = torch.ops.mkldnn._linear_pointwise
        return torch.backends.mkldnn.is_available() and all(
            [a.name for a in getattr(op, overload)._schema.arguments] == names
            for overload, names in expected.items())
    except (AttributeError, RuntimeError):
        return False


# The CPU fused linear ops may run their float32 products through oneDNN's inner product
# (csrc/linear_blocks.h, block_product).
HAS_ONEDNN = _has_onednn_linear()
if HAS_CPP:
    torch.ops.linclass._set_onednn_available(HAS_ONEDNN)
_onednn_told = [HAS_ONEDNN]  # what the C++ side was last told
_mkldnn_enabled = getattr(torch._C, "_get_mkldnn_enabled", lambda: True)


def follow_mkldnn_flag() -> None:
    """Keeps the fused linear ops' products off oneDNN while torch.backends.mkldnn is
    disabled (`torch.backends.mkldnn.flags(enabled=False)`, which turns torch's own
    oneDNN paths off: whoever sets it expects none from here either).  The flag is
    read on every eager call of those ops (a C call) and the C++ side told when it
    changed; a compiled graph keeps the choice of the last eager call."""
    if HAS_CPP and HAS_ONEDNN and _mkldnn_enabled() != _onednn_told[0]:
        _onednn_told[0] = not _onednn_told[0]
        torch.ops.linclass._set_onednn_available(_onednn_told[0])


def supported_isas() -> list[str]:
    """The ISAs this CPU runs, widest first.

    From torch's own CPU detection (cpuid, so it is right under an emulator too, where
    /proc/cpuinfo describes the host); ATEN_CPU_CAPABILITY lowers it for both."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return list(ISAS)
    if capability == "AVX2":
        return ["avx2", "default"]
    return ["default"]


def _import_isa(isa: str) -> str | None:
    """Imports linclass._cpu_<isa>, which offers its kernels to _C; the error if it fails."""
    try:
        importlib.import_module(f"linclass._cpu_{isa}")
        return None
    except ImportError as e:
        return str(e)


def use_isa(isa: str) -> str:
    """Makes the CPU kernels built for `isa` the ones every CPU op runs; returns the
    previous ISA.  Raises ValueError for an unknown name or one this CPU cannot run,
    RuntimeError when that module is not installed."""
    if isa not in ISAS:
        raise ValueError(f"unknown CPU ISA {isa!r}; choose one of {', '.join(ISAS)}")
    if isa not in supported_isas():
        raise ValueError(
            f"this CPU cannot run the {isa} kernels (it supports {', '.join(supported_isas())})"
        )
    if not HAS_CPP:
        raise RuntimeError(f"linclass._C is not loaded ({LOAD_ERROR})")
    error = _import_isa(isa)
    if error is not None:
        raise RuntimeError(f"the CPU kernels for {isa} could not be loaded ({error})")
    return torch.ops.linclass._set_cpu_isa(isa)


def _load_cpu_kernels() -> str | None:
    """Imports the kernels for the requested or best ISA; the reason when none loaded."""
    if not HAS_CPP:
        return f"linclass._C is not loaded ({LOAD_ERROR})"
    wanted = os.environ.get("LINCLASS_CPU_ISA") or None
    runnable = supported_isas()
    if wanted is not None and wanted not in ISAS:
        raise ValueError(
            f"LINCLASS_CPU_ISA={wanted!r} is not a CPU ISA; choose one of {', '.join(ISAS)}"
        )
    if wanted is not None and wanted not in runnable:
        warnings.warn(
            f"linclass: LINCLASS_CPU_ISA={wanted} asks for kernels this CPU cannot run; "
            f"using {runnable[0]}",
            RuntimeWarning,
            stacklevel=4,
        )
        wanted = None
    errors = []
    for isa in [wanted] if wanted else runnable:
        error = _import_isa(isa)
        if error is None:
            torch.ops.linclass._set_cpu_isa(isa)
            return None
        errors.append(f"{isa}: {error}")
    reason = "no CPU kernel module could be loaded (" + "; ".join(errors) + ")"
    warnings.warn(f"linclass: {reason}; CPU ops fall back to the 'torch' backend.",
                  RuntimeWarning, stacklevel=4)
    return reason


CPU_LOAD_ERROR = _load_cpu_kernels()
HAS_CPU_KERNELS = CPU_LOAD_ERROR is None


def cpu_isa() -> str | None:
    """The vector ISA of the CPU kernels in use ('avx512', 'avx2', 'default')."""
    return torch.ops.linclass._cpu_isa() if HAS_CPU_KERNELS else None


def loaded_isas() -> list[str]:
    """The ISAs whose CPU kernel modules are loaded in this process."""
    return list(torch.ops.linclass._cpu_isas()) if HAS_CPP else []
