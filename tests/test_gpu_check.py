"""bench/gpu_check.sh is complete even where no GPU is lent: its syntax, and the
benchmark + report code it runs, exercised on CPU (tiny shapes, Triton interpreter)."""

import json
import os
import subprocess
import sys

import pytest

import linclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


@pytest.mark.skipif("triton" not in linclass.backends.available(), reason="needs triton")
def test_cpu_smoke_run_writes_report(tmp_path):
    r = subprocess.run(["bash", SCRIPT, "--cpu-smoke", str(tmp_path)], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    data = json.loads((tmp_path / "gpu-cpu-smoke.json").read_text())
    impls = {rec["impl"] for rec in data["records"]}
    assert {"torch", "copy_", "linclass[triton]"} <= impls
    assert all("ms" in rec for rec in data["records"]), data["records"]
    report = (tmp_path / "gpu-cpu-smoke.md").read_text()
    assert "## Targets" in report and "cross_entropy 64x10 float32" in report
