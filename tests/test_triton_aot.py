"""Every Triton kernel launch linclass makes on a GPU compiles for sm_90 and sm_80, with
no register spills, checked here without a GPU (tests/triton_aot.py: the launches are
recorded from the real launchers, compiled ahead of time with triton.compile, and the
cubins' resource usage read with Triton's cuobjdump)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = {"_cross_entropy_tile_kernel", "_cross_entropy_loop_kernel", "_cross_entropy_consts_kernel", "_multi_margin_tile_kernel",
           "_multi_margin_loop_kernel", "_linear_tile_kernel", "_scale_kernel", "_ce_stats_kernel",
           "_ce_grad_kernel", "_mm_grad_kernel", "_ce_probs_stats_kernel", "_ce_probs_grad_kernel"}


def _nvidia_tools():
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                       "cuobjdump"))


@pytest.fixture(scope="module")
def compiled():
    if not _nvidia_tools():
        pytest.skip("this Triton has no NVIDIA backend (ptxas, cuobjdump)")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, os.path.join(HERE, "triton_aot.py"), "--arch", "90", "--arch", "80"],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)["launches"]


def test_every_kernel_is_launched_and_compiles(compiled):
    assert {r["kernel"].rsplit(".", 1)[1] for r in compiled} == KERNELS
    assert {r["arch"] for r in compiled} == {80, 90}
    errors = [f"sm_{r['arch']} {r['kernel']} {r['constexprs']}: {r['error']}" for r in compiled if r["error"]]
    assert not errors, "\n".join(errors)


def test_no_register_spills(compiled):
    # A kernel's stack holds only spills (Triton keeps no local arrays).  The launches are
    # specialized as the JIT does (unit strides as constexprs, 16-byte alignment): without
    # that, the per-element 64-bit addresses of a runtime stride made ptxas spill a few
    # bytes in kernels that do not spill on the GPU (an H200 run's compile: none of 19).
    spills = [f"sm_{r['arch']} {r['kernel']} warps={r['num_warps']} {r['constexprs']}: "
              f"{r['regs']} registers, {r['stack']} bytes of stack"
              for r in compiled if not r["error"] and r["stack"]]
    assert not spills, "\n".join(spills)
