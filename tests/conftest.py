import os

# The Triton kernels run on CPU tensors only in interpreter mode, which must be chosen
# before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import helpers  # noqa: E402
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


@pytest.fixture(params=[0, 7], ids=["pairs", "permutes"])
def lane_permutes(request):
    """The C++ lane path's few-class tiles moved by pair transposes (0) or by vector
    permutes up to 7 classes: by default the CPU's vendor picks (transpose.h), so both
    are forced here on any CPU."""
    with helpers.cpp_knob("_lane_permute_classes", request.param):
        yield request.param


@pytest.fixture(params=[39, 47], ids=["groups-from-40", "lanes-to-47"])
def cross_entropy_lanes(request):
    """Cross-entropy rows of 40-47 classes in the C++ group path (39) or the lane path
    (47): the CPU's vendor picks by default (row_driver.h), so both are forced here."""
    with helpers.cpp_knob("_cross_entropy_lane_classes", request.param):
        yield request.param


def pytest_report_header(config):
    # tests/test_cpu_isa.py reads this line to know which kernels a run used.
    return f"linclass CPU kernels: {linclass.backends.cpu_isa()}"
