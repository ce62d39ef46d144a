"""Smoke test of `splitserve bench compare --quick` on the demo preset: both stacks start as real
processes, serve every request at every rate, and the report has a row per (rate, system)."""

from __future__ import annotations

import json

from cluster.cli import main


def test_quick_compare_writes_a_run_per_rate_and_system(tmp_path, capsys):
    path = tmp_path / "compare.json"
    code = main(["bench", "compare", "--model", "demo", "--quick", "--json", str(path)])
    printed = capsys.readouterr().out

    assert code == 0, printed
    report = json.loads(path.read_text())
    rates = report["config"]["rates"]
    assert sorted((r["rate"], r["system"]) for r in report["runs"]) == sorted((rate, s) for rate in rates for s in ("aggregated", "disaggregated"))
    for run in report["runs"]:
        summary = run["summary"]
        assert summary["completed"] == report["config"]["num_prompts"] and summary["failed"] == 0, run
        assert summary["ttft_ms"]["p99"] > 0 and summary["tpot_ms"]["median"] > 0 and 0 <= summary["slo_attainment"] <= 1
        assert all(r["success"] and r["start"] >= 0 for r in run["requests"])
    assert set(report["goodput"]) == {"aggregated", "disaggregated"}
    assert "goodput" in printed and "disaggregated / aggregated" in printed
