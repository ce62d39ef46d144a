"""`splitserve bench chaos` against a local `up --prefill 2 --decode 2`, one run per transport, both at once (~2
minutes; the two clusters share the machine, which makes the faults land on busier workers): under worker kills,
stalls, a lease-expiring stall and client disconnects, never a wrong answer, never a hang, and no KV block left in
use once the cluster is quiet.

On failure the message carries the command's own findings: each wrong answer with the position of its first
difference from the reference, whether the token ids matched, and the faults it ran through."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRANSPORTS = ("grpc", "nixl")


def _start(transport: str, out: Path) -> subprocess.Popen:
    out.mkdir()
    # Faults every 12 s over 72 s: kill-prefill, kill-decode, kill-both, stall, lease, kill-prefill.
    command = [
        *("bench", "chaos", "--transport", transport, "--prefill", "2", "--decode", "2"),
        *("--duration", "72", "--kill-every", "12", "--clients", "4", "--disconnect-fraction", "0.1"),
        *("--prompts", "64", "--max-tokens", "48", "--request-timeout", "90", "--seed", "1"),
        *("--json", str(out / "chaos.json"), "--log", str(out / "up.log")),
    ]
    with (out / "stdout").open("w") as stdout, (out / "stderr").open("w") as stderr:  # the child keeps its copies
        return subprocess.Popen([sys.executable, "-m", "cluster.cli", *command], cwd=ROOT, stdout=stdout, stderr=stderr)


def _check(transport: str, returncode: int, out: Path) -> None:
    report = f"[{transport}] " + (out / "stdout").read_text()[-4000:] + (out / "stderr").read_text()[-8000:]
    result_path = out / "chaos.json"
    assert result_path.exists(), f"exit {returncode}, no result:\n{report}"
    summary = json.loads(result_path.read_text())["summary"]

    assert summary["completed"] >= 50, report
    assert len(summary["faults"]) >= 4, f"faults were not injected: {summary['faults_failed_or_skipped']}\n{report}"
    assert summary["p_to_d_share"] >= 0.5, report
    assert summary["wrong"] == 0, report
    assert summary["hangs"] == 0, report
    assert summary["leaked_blocks"] == 0 and summary["router_in_flight_after"] == 0, report
    assert summary["unrecovered"] == 0, report
    assert returncode == 0, report
    # Every failure has a defined outcome: an OpenAI-shaped error, never a bare 500 (an unhandled exception).
    assert "HTTP 500" not in summary["errors_by_status"], report


def test_no_wrong_answer_no_hang_no_leak_under_faults(tmp_path):
    runs = {transport: _start(transport, tmp_path / transport) for transport in TRANSPORTS}
    try:
        codes = {transport: run.wait(timeout=540) for transport, run in runs.items()}
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()
    for transport in TRANSPORTS:
        _check(transport, codes[transport], tmp_path / transport)
