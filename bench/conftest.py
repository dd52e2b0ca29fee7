"""pytest-benchmark suite: `make bench` (see bench/report.py for the tables)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

THREADS = int(os.environ.get("LINCLASS_BENCH_THREADS", "2"))


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(THREADS)
    yield


def pytest_benchmark_update_machine_info(config, machine_info):
    import linclass

    machine_info["torch"] = torch.__version__
    machine_info["threads"] = THREADS
    machine_info["linclass_cpu_isa"] = linclass._extension.cpu_isa()
    machine_info["linclass_backends"] = linclass.backends.available()
    try:
        with open("/proc/cpuinfo") as f:
            machine_info["cpu_model"] = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
