import os

# The Triton kernels run on CPU tensors only in interpreter mode, which must be chosen
# before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import linclass  # noqa: E402


# The fused kernels that run on CPU tensors here: C++, and Triton in interpreter mode.
KERNEL_BACKENDS = [b for b in ("cpp", "triton") if linclass.backends.runs_on(b, "cpu")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    """Each fused backend in turn, forced (so a test never silently runs another)."""
    with linclass.backends.use(request.param):
        yield request.param


def pytest_report_header(config):
    # tests/test_cpu_isa.py reads this line to know which kernels a run used.
    return f"linclass CPU kernels: {linclass.backends.cpu_isa()}"
