"""Smoke test of `splitserve bench compare --quick` on the demo preset: both stacks start as real
processes, serve every request at every rate, and the report has a row per (rate, system)."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main


def test_quick_compare_writes_a_run_per_rate_and_system(tmp_path, capsys):
    path = tmp_path / "compare.json"
    code = main(["bench", "compare", "--model", "demo", "--quick", "--json", str(path)])
    printed = capsys.readouterr().out

    assert code == 0, printed
    report = json.loads(path.read_text())
    rates = report["config"]["rates"]
    assert sorted((r["rate"], r["system"]) for r in report["runs"]) == sorted(
        (rate, s) for rate in rates for s in ("aggregated", "disaggregated")
    )
    for run in report["runs"]:
        summary = run["summary"]
        assert summary["completed"] == report["config"]["num_prompts"] and summary["failed"] == 0, run
        assert (
            summary["ttft_ms"]["p99"] > 0 and summary["tpot_ms"]["median"] > 0 and 0 <= summary["slo_attainment"] <= 1
        )
        assert all(r["success"] and r["start"] >= 0 for r in run["requests"])
        # the router's own counters: disaggregated prefills every prompt remotely, aggregated never
        assert run["routing"] == ({"remote_prefill": 4} if run["system"] == "disaggregated" else {"fallback": 4}), run[
            "routing"
        ]
    assert set(report["zero_load"]) == {"aggregated", "disaggregated"}
    assert set(report["goodput"]) == {"aggregated", "disaggregated"}
    assert "goodput" in printed and "disaggregated / aggregated" in printed


def test_goodput_is_the_highest_rate_reaching_90_percent_interpolated_to_the_next():
    from bench.compare import goodput

    assert goodput([(0.2, 1.0), (0.4, 0.95), (0.6, 0.45)])["rps"] == pytest.approx(0.4 + 0.2 * 0.05 / 0.5)
    dipped = goodput([(0.2, 0.85), (0.4, 0.95), (0.6, 0.45)])  # a burst at the lowest rate
    assert dipped["rps"] == pytest.approx(0.42) and not dipped["monotone"]
    assert goodput([(0.2, 0.95), (0.4, 0.9)])["bound"].startswith(">= 0.4")
    assert goodput([(0.2, 0.5), (0.4, 0.2)])["rps"] == 0.0
