"""The CPU kernels exist once per vector ISA (linclass._cpu_<isa>), chosen at import.

Every ISA this machine runs is checked: in process (switching with set_cpu_isa) and by
the CPU kernel test files rerun under LINCLASS_CPU_ISA.  tests/test_wheel.py runs the
installed wheel on emulated older CPUs."""

import os
import subprocess
import sys

import pytest
import cpu_smoke

import linclass
from linclass import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNABLE = backends.cpu_isas()
needs_cpp = pytest.mark.skipif("cpp" not in backends.available(), reason="needs the C++ CPU kernels")


def _run(code_or_args, env=None, timeout=300):
    args = code_or_args if isinstance(code_or_args, list) else [sys.executable, "-c", code_or_args]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


@needs_cpp
def test_the_widest_runnable_isa_is_chosen():
    wanted = os.environ.get("LINCLASS_CPU_ISA")
    assert backends.cpu_isa() == (wanted if wanted in RUNNABLE else RUNNABLE[0])


@needs_cpp
@pytest.mark.parametrize("isa", RUNNABLE)
def test_each_isa_matches_float64(isa):
    old = backends.set_cpu_isa(isa)
    try:
        assert backends.cpu_isa() == isa
        cpu_smoke.check()
    finally:
        backends.set_cpu_isa(old)


def test_set_cpu_isa_rejects_bad_names():
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        backends.set_cpu_isa("avx3")


def test_set_cpu_isa_rejects_an_isa_the_cpu_lacks(monkeypatch):
    monkeypatch.setattr(linclass._extension, "supported_isas", lambda: ["default"])
    with pytest.raises(ValueError, match="cannot run the avx2 kernels"):
        backends.set_cpu_isa("avx2")


@needs_cpp
def test_environment_variable_is_checked():
    out = _run("import linclass", env={"LINCLASS_CPU_ISA": "sse9"})
    assert out.returncode != 0 and "LINCLASS_CPU_ISA='sse9' is not a CPU ISA" in out.stderr


@needs_cpp
@pytest.mark.skipif("avx2" not in RUNNABLE, reason="needs an AVX2 CPU")
def test_an_isa_beyond_the_cpu_falls_back_with_a_warning():
    # torch's ATEN_CPU_CAPABILITY caps what linclass believes the CPU runs.
    out = _run("import linclass; print(linclass.backends.cpu_isa())",
               env={"LINCLASS_CPU_ISA": "avx512", "ATEN_CPU_CAPABILITY": "avx2"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "avx2"
    assert "asks for kernels this CPU cannot run" in out.stderr


# The CPU kernel tests, rerun under each ISA that this process is not using.
KERNEL_TEST_FILES = ["tests/test_cross_entropy.py", "tests/test_cross_entropy_probs.py",
                     "tests/test_multi_margin.py",
                     "tests/test_linear_loss.py", "tests/test_sharded_phases.py",
                     "tests/test_errors.py", "tests/test_properties.py", "tests/test_classifiers.py"]


@needs_cpp
@pytest.mark.parametrize("isa", [i for i in RUNNABLE if i != backends.cpu_isa()])
def test_cpu_kernel_tests_pass_under(isa):
    out = _run([sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider",
                "-k", "not triton", *KERNEL_TEST_FILES], env={"LINCLASS_CPU_ISA": isa}, timeout=900)
    assert f"linclass CPU kernels: {isa}" in out.stdout
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
