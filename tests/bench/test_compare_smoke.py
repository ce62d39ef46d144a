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
    # equal hardware: as many engines, as many threads, on both sides
    systems = report["config"]["systems"]
    engines = {name: s["prefill_workers"] + s["decode_workers"] for name, s in systems.items()}
    assert engines == {"aggregated": 2, "disaggregated": 2}
    assert systems["aggregated"]["decode_threads"] == systems["disaggregated"]["prefill_threads"] == 1
    assert set(report["zero_load"]) == {"aggregated", "disaggregated"}
    assert set(report["goodput"]) == {"aggregated", "disaggregated"}
    assert "goodput" in printed and "disaggregated / aggregated" in printed
    # SLOs: the scale (default 4) x the aggregated stack's zero-load medians, judged per request
    baseline = report["zero_load"]["aggregated"]["summary"]
    assert report["config"]["slos"] == pytest.approx(
        {"ttft": 4 * baseline["ttft_ms"]["median"], "tpot": 4 * baseline["tpot_ms"]["median"]}
    )
    # a looser SLO never lowers a system's attainment at any rate
    curve = report["slo_scales"]
    assert [row["scale"] for row in curve] == sorted(row["scale"] for row in curve) and len(curve) >= 5
    for system in ("aggregated", "disaggregated"):
        for rate in rates:
            attained = [row["attainment"][system][str(rate)] for row in curve]
            assert attained == sorted(attained), (system, rate, attained)
    assert "SLO attainment (aggregated/disaggregated) by SLO scale" in printed and "with the scales apart" in printed
    assert "SLO rule: scale x one engine's zero-load latency" in printed and "(target >= 1.3x: " in printed
    assert all(run["cpu"]["measured_cores"] >= 0 and run["cpu"]["other_cores"] >= 0 for run in report["runs"])


def test_workload_is_sized_from_the_measured_speeds():
    """Prompt length: its prefill lasts ~20 decode steps; rates: fractions of the prefill capacity."""
    from bench.cli import build_bench_parser
    from bench.compare import CompareConfig, input_len_for, make_plan

    assert input_len_for(1.0, 40.0) == (768, 800.0)  # 20 x 40 ms at 1 ms/token, to a multiple of 64
    assert input_len_for(0.01, 40.0)[0] == 4096 and input_len_for(10.0, 10.0)[0] == 128  # bounded

    args = build_bench_parser().parse_args(["compare", "--slo-scale", "2", "--rate-fractions", "0.5,1"])
    config = CompareConfig.from_args(args)
    assert config.rates is None and config.input_len is None
    probes = {
        "aggregated": {"summary": {"ttft_ms": {"median": 400.0}, "tpot_ms": {"median": 40.0}}},
        "disaggregated": {"summary": {"ttft_ms": {"median": 800.0}, "tpot_ms": {"median": 30.0}}},
    }
    plan = make_plan(config, 1024, {}, probes)
    assert plan.rates == (0.625, 1.25)  # 1 / 0.8 s = 1.25 req/s of prefill capacity
    assert plan.slos == {"ttft": 800.0, "tpot": 80.0}  # 2 x the aggregated stack's, for both systems
    assert plan.slos_at(3) == {"ttft": 1200.0, "tpot": 120.0}


def test_goodput_is_the_highest_rate_reaching_90_percent_interpolated_to_the_next():
    from bench.compare import goodput

    assert goodput([(0.2, 1.0), (0.4, 0.95), (0.6, 0.45)])["rps"] == pytest.approx(0.4 + 0.2 * 0.05 / 0.5)
    dipped = goodput([(0.2, 0.85), (0.4, 0.95), (0.6, 0.45)])  # a burst at the lowest rate
    assert dipped["rps"] == pytest.approx(0.42) and not dipped["monotone"]
    assert goodput([(0.2, 0.95), (0.4, 0.9)])["bound"].startswith(">= 0.4")
    assert goodput([(0.2, 0.5), (0.4, 0.2)])["rps"] == 0.0
