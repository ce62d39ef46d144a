"""`splitserve bench router`, quick: real workers and routers, every path measured and reported, the disaggregated one
checked by the bench itself to have moved every request's KV through the prefill worker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_router_bench_measures_every_path(tmp_path):
    out = tmp_path / "router.json"
    command = [sys.executable, "-m", "cluster.cli", "bench", "router", "--samples", "20", "--rates", "20"]
    done = subprocess.run(
        [*command, "--seconds", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())

    overhead, disaggregated = report["overhead"], report["disaggregated"]
    for path in ("direct", "stream", "routed", "httpx"):
        assert 0 < overhead[f"{path}_p50_ms"] <= overhead[f"{path}_p99_ms"], path
    for path in ("direct", "stream", "routed"):
        assert 0 < disaggregated[f"{path}_p50_ms"] <= disaggregated[f"{path}_p99_ms"], path
    # A disaggregated request does more than an aggregated one: a prefill worker's call, a KV transfer, a commit. The
    # fastest of each, not the medians: 20 samples each, at different moments of a busy machine, let those cross.
    assert disaggregated["routed_p0_ms"] > overhead["routed_p0_ms"]
    assert disaggregated["cpu_ms_per_request"]["router_loop"] > 0
    assert report["rates"][0]["offered_rps"] == 20 and report["rates"][0]["failed"] == 0
    assert "a disaggregated request" in done.stdout and "added by the router" in done.stdout
