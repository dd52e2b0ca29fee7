"""Build linclass and its kernel library linclass._C.

linclass._C holds the op registrations (csrc/*.cpp), the C++ CPU kernels (csrc/cpu/)
and, when CUDA is available or FORCE_CUDA=1, the CUDA kernels (csrc/cuda/).  The Triton kernels in kernels/
are plain Python, shipped as the package linclass.kernels.

Environment:
  FORCE_CUDA=1            compile csrc/cuda/*.cu even without a visible GPU (needs nvcc)
  CUDA_HOME               CUDA toolkit; default /usr/local/cuda when it exists
  TORCH_CUDA_ARCH_LIST    GPU architectures; default "8.0;9.0"
  LINCLASS_CPU_ISA        avx512 | avx2 | default; default: the best the build machine has
  LINCLASS_NO_EXTENSION=1 skip the extension (ops then use the torch backend)
  DEBUG=1                 -O0 -g
"""

import glob
import os
import shutil

from setuptools import setup

# torch.utils.cpp_extension reads CUDA_HOME when it is imported, and otherwise guesses
# it from the `nvcc` on PATH, which on some machines is a wrapper script outside the
# toolkit.  Point it at the real toolkit first.
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

HERE = os.path.dirname(os.path.abspath(__file__))

# at::vec picks its implementation from these macros; the whole library is compiled
# for one ISA (x86 only; other architectures use at::vec's default path).
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
}


def build_machine_isa():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags):
        return "avx512"
    if {"avx2", "fma", "f16c"} <= set(flags):
        return "avx2"
    return "default"


def want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1" or torch.cuda.is_available():
        if CUDA_HOME and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")):
            return True
        print("linclass: CUDA requested but no nvcc under CUDA_HOME; building CPU kernels only")
    return False


def extensions():
    if os.environ.get("LINCLASS_NO_EXTENSION") == "1":
        return []
    debug = os.environ.get("DEBUG") == "1"
    isa = os.environ.get("LINCLASS_CPU_ISA", build_machine_isa())
    if isa not in ISA_FLAGS:
        raise SystemExit(f"LINCLASS_CPU_ISA must be one of {sorted(ISA_FLAGS)}, got {isa!r}")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # The C++ standard is left to torch.utils.cpp_extension: it matches the torch build.
    cxx = opt + ["-fopenmp", "-Wno-unknown-pragmas"] + ISA_FLAGS[isa]
    nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    use_cuda = bool(cuda_sources) and want_cuda()
    ext = CUDAExtension if use_cuda else CppExtension
    if use_cuda:
        cxx.append("-DLINCLASS_WITH_CUDA")
        nvcc.append("-DLINCLASS_WITH_CUDA")
    print(f"linclass: building _C for CPU ISA {isa}, CUDA {'on' if use_cuda else 'off'}")
    return [
        ext(
            "linclass._C",
            sources + (cuda_sources if use_cuda else []),
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ]


setup(
    packages=["linclass", "linclass.workflow", "linclass.kernels"],
    package_dir={"linclass": "linclass", "linclass.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
