"""Build linclass and its kernel library linclass._C.

linclass._C holds the op registrations and host logic (csrc/*.cpp) and, when CUDA is
available or FORCE_CUDA=1, the CUDA kernels (csrc/cuda/).  The C++ CPU kernels
(csrc/cpu/) are compiled once per x86 vector ISA, each into a module linclass._cpu_<isa>
linked against _C; linclass picks the best one the running CPU supports when it is
imported (csrc/cpu/ops.h says why they are separate modules).  The Triton kernels in
kernels/ are plain Python, shipped as the package linclass.kernels.

Environment:
  FORCE_CUDA=1            compile csrc/cuda/*.cu even without a visible GPU (needs nvcc)
  CUDA_HOME               CUDA toolkit; default /usr/local/cuda when it exists
  TORCH_CUDA_ARCH_LIST    GPU architectures; default "8.0;9.0"
  LINCLASS_CPU_ISAS       the CPU kernel modules to build, e.g. "avx2,default"; default:
                          avx512,avx2,default on x86-64, default elsewhere (which ISA runs
                          is chosen at import: LINCLASS_CPU_ISA, see linclass.backends)
  LINCLASS_NO_EXTENSION=1 skip the extension (ops then use the torch backend)
  DEBUG=1                 -O0 -g
"""

import glob
import os
import platform
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

# Host code that both linclass._C and every CPU kernel module need (no process state).
HOST_HELPERS = ["csrc/common.cpp", "csrc/linear_blocks.cpp", "csrc/tensor_ops.cpp"]

# The oldest torch the libraries load into: the stable-ABI headers then call only the
# C shim functions that torch already had (torch/csrc/stable/version.h encodes
# major.minor as major << 56 | minor << 48).  pyproject.toml declares the same bound.
OLDEST_TORCH = (2, 11)
TARGET_VERSION = f"-DTORCH_TARGET_VERSION=0x{(OLDEST_TORCH[0] << 56) | (OLDEST_TORCH[1] << 48):016x}ULL"

# csrc/cpu/simd.h picks its Vec implementation from these macros.  LINCLASS_ISA names the module.
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    # -Wno-psabi: GCC notes that 32-byte vector arguments pass differently without AVX;
    # every such function is internal to one module.
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT", "-Wno-psabi"],
}


def cpu_isas():
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    names = os.environ.get("LINCLASS_CPU_ISAS", "avx512,avx2,default" if x86 else "default")
    isas = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in isas if n not in ISA_FLAGS or (n != "default" and not x86)]
    if bad or not isas:
        raise SystemExit(f"LINCLASS_CPU_ISAS: {names!r}; choose from {sorted(ISA_FLAGS)} "
                         "(avx2 and avx512 on x86-64 only)")
    return isas


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
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # The C++ standard is left to torch.utils.cpp_extension: it matches the torch build.
    # Hidden visibility: each library exports only its PyInit and the C interface of
    # csrc/shared_state.h, so no other library can bind to a copy of an inline function
    # compiled for an ISA the CPU may lack, or for another torch's stable-ABI headers.
    # -ffp-contract=off: no a * b + c fused behind the code's back.  GCC's default fuses
    # where its inlining lets it, so the same kernel source rounded differently in two
    # instantiations (the hinge's row path for float16 rows and for float32 rows, after
    # an unrelated change to another path moved the inlining); the kernels write their
    # fused multiply-adds explicitly (cpu::fmadd), so each piece of math rounds one way.
    cxx = opt + ["-fopenmp", "-Wno-unknown-pragmas", "-fvisibility=hidden", "-ffp-contract=off",
                 TARGET_VERSION]
    nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler", "-fvisibility=hidden",
                  TARGET_VERSION]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    use_cuda = bool(cuda_sources) and want_cuda()
    host_cxx = cxx + (["-DLINCLASS_WITH_CUDA"] if use_cuda else [])
    if use_cuda:
        nvcc.append("-DLINCLASS_WITH_CUDA")
    isas = cpu_isas()
    print(f"linclass: building _C (CUDA {'on' if use_cuda else 'off'}) and CPU kernels for {', '.join(isas)}")
    common = dict(include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"],
                  py_limited_api=True)
    host = (CUDAExtension if use_cuda else CppExtension)(
        "linclass._C",
        sorted(glob.glob("csrc/*.cpp")) + (cuda_sources if use_cuda else []),
        extra_compile_args={"cxx": host_cxx, "nvcc": nvcc},
        **common,
    )
    # The host helpers the kernels call are compiled into each module (csrc/shared_state.h:
    # a C++ function taking a stable-ABI tensor cannot cross between libraries).
    kernels = [
        CppExtension(
            f"linclass._cpu_{isa}",
            sorted(glob.glob("csrc/cpu/*.cpp")) + HOST_HELPERS,
            extra_compile_args={"cxx": cxx + ISA_FLAGS[isa] + [f"-DLINCLASS_ISA={isa}"]},
            **common,
        )
        for isa in isas
    ]
    return [host] + kernels


class BuildExtensions(BuildExtension):
    """Links each CPU kernel module against linclass._C (built first, same folder), and
    gives each module its own object folder: HOST_HELPERS are compiled once per module,
    with that module's ISA flags."""

    def build_extension(self, ext):
        if ext.name != "linclass._C":
            host = self.get_ext_fullpath("linclass._C")
            ext.library_dirs = [*ext.library_dirs, os.path.dirname(host)]
            ext.extra_link_args = [*ext.extra_link_args, f"-l:{os.path.basename(host)}",
                                   "-Wl,-rpath,$ORIGIN"]
        shared_temp = self.build_temp
        self.build_temp = os.path.join(shared_temp, ext.name.rsplit(".", 1)[-1])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared_temp


setup(
    packages=["linclass", "linclass.workflow", "linclass.kernels"],
    package_dir={"linclass": "linclass", "linclass.kernels": "kernels"},
    package_data={"linclass": ["py.typed"]},  # PEP 561: the annotations are the API's
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtensions},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
