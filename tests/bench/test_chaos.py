"""`splitserve bench chaos` against a local `up --prefill 2 --decode 2`, one run per transport (~2 minutes each):
under worker kills, stalls, a lease-expiring stall and client disconnects, never a wrong answer, never a hang,
and no KV block left in use once the cluster is quiet.

On failure the message carries the command's own findings: each wrong answer with the position of its first
difference from the reference, whether the token ids matched, and the faults it ran through."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("transport", ["grpc", "nixl"])
def test_no_wrong_answer_no_hang_no_leak_under_faults(transport, tmp_path):
    result_path, log_path = tmp_path / "chaos.json", tmp_path / "up.log"
    # Faults every 12 s over 72 s: kill-prefill, kill-decode, kill-both, stall, lease, kill-prefill.
    command = [
        *("bench", "chaos", "--transport", transport, "--prefill", "2", "--decode", "2"),
        *("--duration", "72", "--kill-every", "12", "--clients", "4", "--disconnect-fraction", "0.1"),
        *("--prompts", "64", "--max-tokens", "48", "--request-timeout", "90", "--seed", "1"),
        *("--json", str(result_path), "--log", str(log_path)),
    ]
    run = subprocess.run(
        [sys.executable, "-m", "cluster.cli", *command], cwd=ROOT, capture_output=True, text=True, timeout=540
    )
    report = run.stdout[-4000:] + run.stderr[-8000:]
    assert result_path.exists(), f"exit {run.returncode}, no result:\n{report}"
    summary = json.loads(result_path.read_text())["summary"]

    assert summary["completed"] >= 50, report
    assert len(summary["faults"]) >= 4, f"faults were not injected: {summary['faults_failed_or_skipped']}\n{report}"
    assert summary["p_to_d_share"] >= 0.5, report
    assert summary["wrong"] == 0, report
    assert summary["hangs"] == 0, report
    assert summary["leaked_blocks"] == 0 and summary["router_in_flight_after"] == 0, report
    assert summary["unrecovered"] == 0, report
    assert run.returncode == 0, report
    # Every failure has a defined outcome: an OpenAI-shaped error, never a bare 500 (an unhandled exception).
    assert "HTTP 500" not in summary["errors_by_status"], report
