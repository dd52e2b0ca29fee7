"""Which kernels run an op.

Backends:
  "cpp"     C++ CPU kernels from linclass._C (CPU tensors)
  "cuda"    CUDA C++ kernels from linclass._C (CUDA tensors; built with nvcc)
  "triton"  Triton kernels from linclass.kernels (CUDA tensors; CPU tensors too when
            TRITON_INTERPRET=1 was set before triton was imported)
  "torch"   plain torch.nn.functional (any device)

Automatic choice: CPU tensors -> "cpp" (else "torch"), except small float32/64 losses,
which are host-bound and run on "torch" (cpu_cross_entropy_on_torch, cpu_hinge_on_torch).
CUDA tensors -> by problem size when both GPU backends are built (gpu_auto: "cuda" below
TRITON_MIN_BYTES, "triton" from there on), else whichever of them is built, else "torch".
Force one with ``with linclass.backends.use("cpp"): ...`` or the environment variable
LINCLASS_BACKEND.
A forced backend that cannot run on the tensor raises BackendUnavailable; it is never
silently replaced by another.

Probability (soft) targets are computed by the torch backend whatever is chosen.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import _extension, _ops

NAMES = ("cpp", "triton", "cuda", "torch")


class BackendUnavailable(RuntimeError):
    """A backend was requested that cannot run here."""


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Availability is decided once, at import: torch.compile traces the code that reads it.
_HAS_TRITON = _ops.HAS_TRITON
_CUDA = torch.cuda.is_available()
_REASONS = {
    "cpp": None if _extension.HAS_CPU_KERNELS else _extension.CPU_LOAD_ERROR,
    "cuda": None
    if _extension.HAS_CUDA_KERNELS and _CUDA
    else (
        "no CUDA device is visible"
        if _extension.HAS_CUDA_KERNELS
        else "linclass._C was built without CUDA kernels (build with nvcc, or FORCE_CUDA=1)"
    ),
    "triton": None
    if _HAS_TRITON and (_CUDA or _triton_interpreter())
    else (
        "triton is not installed"
        if not _HAS_TRITON
        else "no CUDA device is visible (set TRITON_INTERPRET=1 before importing triton to run it on CPU)"
    ),
    "torch": None,
}
_DEVICES = {"cpp": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu") if _triton_interpreter() else ("cuda",), "torch": None}

_forced: list[str] = []
_CPU_AUTO = "cpp" if _REASONS["cpp"] is None else "torch"


def _check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown linclass backend {name!r}; choose one of {', '.join(NAMES)}")
    return name


_ENV = os.environ.get("LINCLASS_BACKEND") or None
if _ENV is not None:
    _check_name(_ENV)


def available() -> list[str]:
    """Names of the backends that can run on this installation (for some device)."""
    return [n for n in NAMES if _REASONS[n] is None]


def runs_on(name: str, device_type: str) -> bool:
    """Whether backend `name` is available and takes tensors of `device_type`."""
    devices = _DEVICES[_check_name(name)]
    return _REASONS[name] is None and (devices is None or device_type in devices)


def current() -> str | None:
    """The forced backend (innermost ``use``, else LINCLASS_BACKEND), or None for automatic."""
    return _forced[-1] if _forced else _ENV


@contextlib.contextmanager
def use(name: str):
    """Force a backend inside the block (process-wide, like torch.backends flags).

    Raises BackendUnavailable on entry when ``name`` cannot run on this installation.
    """
    _check_name(name)
    if _REASONS[name] is not None:
        raise BackendUnavailable(f"linclass backend {name!r} is not available: {_REASONS[name]}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


# Where both GPU backends are built, the automatic choice on a CUDA device goes by the
# bytes an op reads.  Triton's kernels move more bytes per second at large C (1.5-2x the
# CUDA C++ kernels' on an H200), but every Triton forward + backward also costs more host
# time (Python launcher, Triton's launch binding; 0.2-0.5 ms on the H200 machines against
# torch's ~0.1 ms): below this size a loss step is host-bound and the CUDA C++ ops, whose
# host path is torch's own, finish first.  The value is the crossover measured by
# bench/gpu_bench.py's size sweep (bench/results/gpu-<device>.md).
TRITON_MIN_BYTES = 256 * 2**20


# On the CPU the automatic choice sends small float32/64 losses to torch: there a call is
# host-bound, and torch's losses, whose autograd nodes are C++, cost less per call than
# the C++ kernel behind linclass's Python autograd node (the stable ABI has no C++
# autograd; that node alone costs about as much as torch's whole step at 4 x 10).
# multi_margin_loss: at most CPU_TORCH_HINGE_MAX_SCORES scores.  cross_entropy: torch's
# time grows with the rows as well as the scores, so its bound counts a row as
# CPU_TORCH_CROSS_ENTROPY_ROW_COST scores: 55 rows of 10 classes, 24 of 100, 3 of 1000.
# The crossovers measured on the development machine:
# bench/results/stable-abi-overhead.md.
CPU_TORCH_HINGE_MAX_SCORES = 6144
CPU_TORCH_CROSS_ENTROPY_MAX_COST = 4096
CPU_TORCH_CROSS_ENTROPY_ROW_COST = 64


def cpu_hinge_on_torch(input: torch.Tensor) -> bool:
    """Whether the automatic choice runs this multi_margin_loss on torch: a small
    float32/64 input on the CPU.  Never for an empty input: torch's kernel returns
    uninitialized memory for 'sum' and 'mean' over no rows."""
    return (0 < input.numel() <= CPU_TORCH_HINGE_MAX_SCORES and current() is None
            and (input.dtype is torch.float32 or input.dtype is torch.float64) and input.is_cpu)


def cpu_cross_entropy_on_torch(input: torch.Tensor) -> bool:
    """Whether the automatic choice runs this cross_entropy on torch: a small float32/64
    input of scores on the CPU, (C,), (N, C) or (N, C, d1, ...), not empty."""
    if _forced or _ENV is not None or not input.is_cpu:
        return False
    dtype = input.dtype
    if dtype is not torch.float32 and dtype is not torch.float64:
        return False
    shape = input.shape
    scores = input.numel()
    if not shape or scores == 0:
        return False
    rows = scores // shape[1 if len(shape) > 1 else 0]
    return scores + CPU_TORCH_CROSS_ENTROPY_ROW_COST * rows <= CPU_TORCH_CROSS_ENTROPY_MAX_COST


def gpu_auto(nbytes: int | None = None) -> str:
    """The automatic backend on a CUDA device for an op that reads `nbytes` (None: a large
    problem): "cuda" below TRITON_MIN_BYTES when both GPU backends are built, "triton"
    from there on; otherwise whichever of the two is built, else "torch"."""
    has_triton, has_cuda = _REASONS["triton"] is None, _REASONS["cuda"] is None
    if has_triton and has_cuda:
        return "cuda" if nbytes is not None and nbytes < TRITON_MIN_BYTES else "triton"
    return "triton" if has_triton else "cuda" if has_cuda else "torch"


def resolve_for(tensor: torch.Tensor, nbytes: int | None = None) -> str:
    """The backend that runs an op on `tensor`, which reads `nbytes` (default: the
    tensor's own bytes; the automatic GPU choice goes by it).  Builds no device object for
    a CPU tensor: the losses call this on every step."""
    if tensor.is_cpu:
        name = _forced[-1] if _forced else _ENV
        if name is None:
            return _CPU_AUTO
        if name in _RUNS_ON_CPU:
            return name
    elif tensor.is_cuda and current() is None:
        return gpu_auto(tensor.numel() * tensor.element_size() if nbytes is None else nbytes)
    return resolve(tensor.device)


# The backends that can run on CPU tensors here: a forced one of these needs no further
# check per call.
_RUNS_ON_CPU = frozenset(name for name in NAMES if runs_on(name, "cpu"))


def resolve(device: torch.device) -> str:
    """The backend that runs an op on tensors of ``device`` (on a CUDA device: the one for
    a large problem; resolve_for knows the size)."""
    name = current()
    kind = device.type
    if name is not None:
        if _REASONS[name] is not None:
            raise BackendUnavailable(f"linclass backend {name!r} is not available: {_REASONS[name]}")
        devices = _DEVICES[name]
        if devices is not None and kind not in devices:
            raise BackendUnavailable(
                f"linclass backend {name!r} cannot run on {kind} tensors (it runs on {', '.join(devices)})"
            )
        return name
    if kind == "cpu":
        return "cpp" if _REASONS["cpp"] is None else "torch"
    if kind == "cuda":
        return gpu_auto()
    return "torch"


def cpu_isa() -> str | None:
    """The vector ISA of the CPU kernels in use ('avx512', 'avx2' or 'default'), or None
    when no CPU kernel module is loaded.

    At import linclass picks the widest ISA this CPU supports (as torch detects it, so
    ATEN_CPU_CAPABILITY lowers it too), or the one the environment variable
    LINCLASS_CPU_ISA names."""
    return _extension.cpu_isa()


def cpu_isas() -> list[str]:
    """The ISAs of the CPU kernels this CPU can run, widest first (installed or not)."""
    return _extension.supported_isas()


def set_cpu_isa(isa: str) -> str:
    """Switches every CPU op to the kernels compiled for `isa`; returns the previous ISA.

    For comparing ISAs on one machine (tests, benchmarks); ValueError when this CPU
    cannot run them."""
    return _extension.use_isa(isa)


def empty_cache() -> None:
    """Release the CPU gradient buffers that linclass keeps for reuse (see README)."""
    if _extension.HAS_CPP:
        torch.ops.linclass._buffer_cache_clear()
