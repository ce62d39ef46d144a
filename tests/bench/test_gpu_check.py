"""scripts/gpu_check.sh's Python parts run on CPU (DRAM instead of VRAM), so CI proves the script
is not broken: two worker processes over NIXL and gRPC token-identical to transformers, the pool
transfer intact, the decode row and roofline computed."""

from __future__ import annotations

import json
import subprocess
import sys


def test_gpu_check_runs_on_cpu(tmp_path):
    report = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--quick", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(report.read_text())
    assert [row["identical"] for row in result["disaggregated"]] == [True, True]
    assert result["transfer"]["intact"]
    assert 0 < result["decode"]["roofline_fraction"] <= 1.5


def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", "scripts/gpu_check.sh"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
