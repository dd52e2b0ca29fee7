"""linclass as a user gets it: one wheel, installed into a fresh virtual environment
beside this environment's torch, run from outside the source tree, natively and on
emulated older CPUs (QEMU user mode: Haswell has AVX2 and no AVX-512, Nehalem is the
x86-64 baseline with no AVX)."""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "tests", "cpu_smoke.py")
QEMU = shutil.which("qemu-x86_64")

pytestmark = pytest.mark.skipif(os.environ.get("LINCLASS_NO_EXTENSION") == "1",
                                reason="built without the extension")


def _check(args, timeout, **kw):
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    assert out.returncode == 0, f"{args}: rc {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip wheel` builds from this tree (with the build's compiled objects
    reused where they are current)."""
    dist = tmp_path_factory.mktemp("dist")
    _check([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
            "--disable-pip-version-check", "-q", "-w", str(dist), ROOT], timeout=1800, cwd=ROOT)
    wheels = glob.glob(str(dist / "linclass-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh venv holding only the wheel; torch (and numpy) come from this
    environment's site-packages through a .pth line, so no download is needed."""
    env_dir = tmp_path_factory.mktemp("venv")
    _check([sys.executable, "-m", "venv", str(env_dir)], timeout=300)
    python = str(env_dir / "bin" / "python")
    site = _check([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                  timeout=60).strip()
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(site, "this-torch.pth"), "w") as f:
        f.write(torch_site + "\n")
    _check([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
            "--disable-pip-version-check", wheel], timeout=600)
    return env_dir


def test_one_limited_api_wheel_holds_every_cpu_isa(wheel):
    name = os.path.basename(wheel)
    assert "-abi3-" in name and name.startswith("linclass-"), name
    files = zipfile.ZipFile(wheel).namelist()
    libs = sorted(f for f in files if f.endswith(".so"))
    isas = ["avx512", "avx2", "default"] if sysconfig.get_platform().endswith("x86_64") else ["default"]
    assert libs == sorted(["linclass/_C.abi3.so"] + [f"linclass/_cpu_{i}.abi3.so" for i in isas]), libs
    assert "linclass/kernels/cross_entropy.py" in files  # the Triton kernels ship too
    assert "linclass/py.typed" in files  # type checkers read the annotations (PEP 561)


def test_sdist_holds_every_source_and_header(tmp_path):
    """The sdist builds the wheel anywhere: every file under csrc/ (headers and the CUDA
    sources included, which setup.py alone would leave out) and the Triton kernels."""
    _check([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], timeout=300, cwd=ROOT)
    (sdist,) = glob.glob(str(tmp_path / "linclass-*.tar.gz"))
    import tarfile

    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"),
                                                         recursive=True)}
    assert wanted and wanted <= names, sorted(wanted - names)
    assert {"setup.py", "pyproject.toml", "kernels/cross_entropy.py", "linclass/py.typed"} <= names


def test_sources_include_only_the_stable_abi():
    """csrc/ (CPU and CUDA) includes no ATen, c10 or libtorch C++ API header: the stable
    ABI's torch/csrc/stable, torch/headeronly and the AOTInductor C shim only."""
    unstable = re.compile(r'#\s*include\s*[<"](ATen/|c10/|torch/extension\.h|torch/all\.h|'
                          r'torch/library\.h|torch/torch\.h|torch/csrc/api/)')
    sources = [p for ext in ("h", "cpp", "cu", "cuh")
               for p in glob.glob(os.path.join(ROOT, "csrc", "**", f"*.{ext}"), recursive=True)]
    assert len(sources) > 10
    found = [f"{os.path.relpath(p, ROOT)}: {line.strip()}" for p in sources
             for line in open(p) if unstable.search(line)]
    assert not found, found


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_libraries_use_only_the_stable_abi(wheel, tmp_path):
    """No library in the wheel imports a libtorch C++ symbol (at::, c10::, torch::) or
    the Sleef functions libtorch bundles: it reaches libtorch only through the stable C
    shim (aoti_torch_*, torch_*), which is what lets one build load into every torch
    from pyproject.toml's lower bound on."""
    zipfile.ZipFile(wheel).extractall(tmp_path)
    libs = sorted(glob.glob(str(tmp_path / "linclass" / "*.so")))
    assert libs
    for lib in libs:
        undefined = _check(["nm", "-D", "--undefined-only", "-C", lib], timeout=60).splitlines()
        names = [line.split(None, 1)[-1] for line in undefined]
        cpp = [n for n in names if n.startswith(("at::", "c10::", "torch::", "Sleef_"))]
        assert not cpp, (os.path.basename(lib), cpp[:10])
        assert any(n.startswith(("aoti_torch_", "torch_")) for n in names), os.path.basename(lib)


def test_installed_wheel_runs_outside_the_tree(venv, tmp_path):
    out = _check([str(venv / "bin" / "python"), SMOKE, "--with-numpy"], timeout=300, cwd=tmp_path)
    assert "smoke ok" in out
    assert f"from {venv}" in out  # the installed copy, not the source tree
    cli = _check([str(venv / "bin" / "linclass"), "ops"], timeout=300, cwd=tmp_path)
    assert "cross_entropy" in cli


@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 is not installed (apt-get install qemu-user)")
@pytest.mark.parametrize("cpu, isa", [("Haswell", "avx2"), ("Nehalem", "default")])
def test_installed_wheel_runs_on_an_older_cpu(venv, tmp_path, cpu, isa):
    out = _check([QEMU, "-cpu", cpu, str(venv / "bin" / "python"), SMOKE], timeout=600, cwd=tmp_path)
    assert f"linclass CPU kernels: {isa}" in out and "smoke ok" in out
