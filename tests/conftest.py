import os

# The Triton kernels run on CPU tensors only in interpreter mode, which must be chosen
# before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import linclass  # noqa: E402


def cpu_backends():
    """Backends that run on CPU tensors in this test session."""
    names = ["cpp", "torch"]
    if "triton" in linclass.backends.available():
        names.append("triton")
    return names


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["cpp"])
def kernel_backend(request):
    """The fused C++ backend, forced (so a test never silently runs another)."""
    with linclass.backends.use(request.param):
        yield request.param
