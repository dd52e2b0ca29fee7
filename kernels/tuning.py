"""Launch configurations of the Triton loss kernels.

MEASURED holds the fastest correct configuration per "<family> <C> <element size>" found
by bench/tune_gpu.py on an NVIDIA H200 (triton 3.6; bench/results/tune-NVIDIA-H200.md has
every candidate's time at every shape, bench/results/tune-walks-NVIDIA-H200.md the
cross-entropy row walks with their options, 2026-11-27).  Other shapes use the rules in
tile_config / loop_config, read off the same sweeps.  LINCLASS_TRITON_TUNED=<tuned.json>
(written by bench/tune_gpu.py on another GPU) takes precedence.
"""

import functools
import json
import os

import torch

# Cross-entropy's row walks: (BLOCK_C, num_warps, reverse, evict), see
# kernels/cross_entropy.py's launch.  Cross-entropy at C = 10: the fastest at 3355443
# rows (bench/tune_gpu.py --shapes, bench/results/tune-tall-NVIDIA-H200.md); a sweep at
# 65536 rows times host cost, not the kernel.
MEASURED: dict = {
    "cross_entropy 10 4": (64, 8),
    "multi_margin 10 4": (16, 4),
    "cross_entropy 10 2": (64, 8),
    "multi_margin 10 2": (16, 4),
    "cross_entropy 32000 4": (8192, 16, False, True),
    "multi_margin 32000 4": (2048, 8),
    "cross_entropy 32000 2": (4096, 8, True, True),
    "multi_margin 32000 2": (2048, 8),
    "cross_entropy 128256 4": (8192, 16, True, True),
    "multi_margin 128256 4": (2048, 16),
    "cross_entropy 128256 2": (4096, 8, True, True),
    "multi_margin 128256 2": (2048, 8),
}


@functools.lru_cache(maxsize=None)
def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (the fused linear kernel's grid); 2
    elsewhere (the Triton interpreter on CPU tensors, where it only sizes the tests' grids)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_pow2(n: int) -> int:
    """triton.next_power_of_2 in plain Python: the triton one is a constexpr function,
    whose wrapper costs microseconds per host call (a few per launch)."""
    return n if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _from_env():
    path = os.environ.get("LINCLASS_TRITON_TUNED")
    if not path:
        return {}
    with open(path) as f:
        return {k: tuple(v) for k, v in json.load(f).items()}


TUNED = {**{k: tuple(v) for k, v in MEASURED.items()}, **_from_env()}


# Both are called on every launch: cached (TUNED is fixed at import).
@functools.lru_cache(maxsize=1024)
def tile_config(C, elem, family="cross_entropy"):
    """(BLOCK_M rows per program, num_warps) of the one-tile kernels (C <= TILE_MAX_C)."""
    block_c = max(next_pow2(C), 2)
    return TUNED.get(f"{family} {C} {elem}") or (max(1, min(64, 4096 // block_c)), 4)


# bench/tune_gpu.py also tries whole-row blocks (one read) for cross-entropy up to this
# many classes.  None won at C = 32000 on the H200; a default block covers a row only
# when the row is short (C up to the block width below).
ROW_MAX_C = 32768


@functools.lru_cache(maxsize=1024)
def loop_config(C, elem, family="cross_entropy"):
    """(BLOCK_C, num_warps[, reverse, evict]) of the one-row-per-program
    kernels (large C); a block that covers the row (BLOCK_C >= C) means one read of it.
    From the H200 sweeps: where the row is walked, cross-entropy (two passes) likes
    4096-wide 16-bit blocks with 8 warps and 8192-wide float32 blocks with 16 warps, with
    L2 eviction hints and the gradient pass reversed (float64: untimed, the plain walk);
    the one-pass hinge 2048-wide blocks with 8 warps.  See kernels/cross_entropy.py's
    launch for the walk options."""
    if f"{family} {C} {elem}" in TUNED:
        return TUNED[f"{family} {C} {elem}"]
    walk = ()
    if family == "multi_margin":
        block, warps = 2048, 8
    elif elem <= 2:
        block, warps, walk = 4096, 8, (True, True)
    elif elem == 4:
        block, warps, walk = 8192, 16, (True, True)
    else:
        block, warps = 4096, 8
    return (min(next_pow2(C), block), warps, *walk)
