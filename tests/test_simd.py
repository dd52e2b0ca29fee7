"""csrc/cpu/simd.h, the kernels' vector type, checked on its own for every ISA this CPU
runs: tests/simd_check.cpp is compiled with the flags setup.py gives that ISA's kernel
module and compares float64 exp/log with the C library over the whole double range
(within 1 ulp) and the lane semantics the kernels rely on (counted loads and stores,
set, with_lane, blendv, comparisons with NaN, horizontal sum and max)."""

import ast
import os
import shutil
import subprocess

import pytest

from linclass import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "c++"))


def _isa_flags() -> dict:
    """setup.py's ISA_FLAGS (read, not imported: importing setup.py runs the build)."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ISA_FLAGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no ISA_FLAGS")


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
@pytest.mark.parametrize("isa", backends.cpu_isas())
def test_vec_for_each_isa(isa, tmp_path):
    exe = tmp_path / f"simd_check_{isa}"
    build = subprocess.run([CXX, "-O2", "-std=c++17", "-I", os.path.join(ROOT, "csrc"),
                            *_isa_flags()[isa], os.path.join(ROOT, "tests", "simd_check.cpp"),
                            "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "simd ok" in run.stdout, run.stdout[-3000:]
    lanes, worst_exp, worst_log = run.stdout.split()[-3:]
    assert int(lanes) == {"avx512": 8, "avx2": 4, "default": 4}[isa]
    assert float(worst_exp) <= 1.0 and float(worst_log) <= 1.0
