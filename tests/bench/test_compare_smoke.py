"""Smoke test of `splitserve bench compare --quick` on the demo preset: both stacks start as real
processes, serve every request at every rate, and the report has a row per (rate, system)."""

from __future__ import annotations

import json
import os
import threading
import time

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
        # the router's own counters: aggregated never prefills remotely; disaggregated does, unless a prompt would
        # wait past the TTFT SLO's slack on the prefill worker (4 short prompts: at most one, on a stalled machine)
        if run["system"] == "aggregated":
            assert run["routing"] == {"fallback": 4}, run["routing"]
        else:
            assert run["routing"].get("remote_prefill", 0) >= 3 and sum(run["routing"].values()) == 4, run["routing"]
    # equal hardware: as many engines, as many threads, on both sides
    systems = report["config"]["systems"]
    engines = {name: s["prefill_workers"] + s["decode_workers"] for name, s in systems.items()}
    assert engines == {"aggregated": 2, "disaggregated": 2}
    assert systems["aggregated"]["decode_threads"] == systems["disaggregated"]["prefill_threads"] == 1
    assert set(report["zero_load"]) == {"aggregated", "disaggregated"}
    # the baseline's requests also went two at once, one per replica (simulate --validate reads Host.co_step off them)
    together = report["zero_load_together"]["aggregated"]
    assert together["summary"]["completed"] == 8 and together["routing"] == {"fallback": 8}
    assert "zero load, aggregated, 2 at once" in printed
    # the disaggregated router was started again with the SLO's slack as its max prefill wait
    slack = report["config"]["slos"]["ttft"] - report["zero_load"]["disaggregated"]["summary"]["ttft_ms"]["median"]
    assert systems["disaggregated"]["max_prefill_wait_ms"] == pytest.approx(slack, abs=0.1) and slack > 0
    assert systems["aggregated"]["max_prefill_wait_ms"] == 0
    assert f"D prefills a prompt that would wait > {systems['disaggregated']['max_prefill_wait_ms']:g} ms" in printed
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
    # what the machine's cores allow each system, from the same runs (the busy cores grow with the load)
    assert set(report["cpu_ceilings"]) == {"aggregated", "disaggregated"}
    for fit in report["cpu_ceilings"].values():
        assert fit is None or (fit["ceiling_rps"] > 0 and fit["runs"] == len(rates)), fit
    assert f"what {report['machine']['cpu_count']} cores allow" in printed
    factors = report["target"]["factors"]
    if factors is not None:  # both fits and both goodputs measured: the factors multiply back to the ratio
        product = factors["ceilings"] * factors["disaggregated_share"] / factors["aggregated_share"]
        assert product == pytest.approx(report["goodput_ratio"]["low"]), factors
        assert "the ratio taken apart: ceilings" in printed
    # each worker's engine thread, found by its OS name: busy, never more than its one core
    for run in report["runs"]:
        expected = {"d0", "d1"} if run["system"] == "aggregated" else {"p0", "d0"}
        engines = run["cpu"]["engine_cores"]
        assert set(engines) == expected and all(0 <= cores <= 1.05 for cores in engines.values()), engines
        assert sum(engines.values()) > 0, engines
    assert "engines: each worker's engine thread" in printed


def test_the_cpu_meter_reads_each_engine_thread_by_its_os_name():
    """A thread named ``*-engine`` (as engine/loop.py names the engine's) is found in its process and
    metered alone: one spinning reads about a core, the process's other threads do not count. Each thread's
    name is its own: this pytest process may still hold a decode engine's thread of an earlier test, ending,
    and a joined thread's OS task can outlive its ``join`` for a moment (one CI run metered the spinning
    thread's task, which then vanished: KeyError)."""
    from bench.sim.host import CpuMeter
    from engine.threads import name_os_thread

    stop, named = threading.Event(), threading.Event()
    names = {True: "spin-engine", False: "idle-engine"}

    def engine(spin: bool) -> None:
        name_os_thread(names[spin])
        named.set()
        while not stop.is_set():
            if not spin:
                stop.wait(0.01)

    for spin in (True, False):
        stop.clear()
        named.clear()
        thread = threading.Thread(target=engine, args=(spin,))
        thread.start()
        assert named.wait(10)
        meter = CpuMeter([os.getpid()], {"d0": (os.getpid(), names[spin])})
        before = meter.sample()
        time.sleep(0.5)
        usage = meter.usage(before, meter.sample())
        stop.set()
        thread.join(10)
        assert not thread.is_alive()
        busy = usage["engine_cores"]["d0"]
        assert (busy > 0.3) if spin else (busy < 0.1), (spin, usage)


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


def test_the_sweep_goes_on_while_a_system_meets_the_slos_up_to_its_ceiling():
    from bench.compare import AGGREGATED_LAYOUTS, DISAGGREGATED, next_rate

    systems = [AGGREGATED_LAYOUTS["replicas"], DISAGGREGATED]
    slos = {"ttft": 1000.0, "tpot": 50.0}

    def run(system, rate, ttft_ms):
        request = dict(prompt_len=8, output_len=11, success=True, ttft=ttft_ms / 1000, latency=ttft_ms / 1000 + 0.4)
        request.update(output_tokens=11)
        return {"system": system.name, "rate": rate, "requests": [request] * 10}

    rates = [0.5, 1.0]
    passing = [run(s, rate, 500) for s in systems for rate in rates]
    assert next_rate(rates, passing, systems, slos, ceiling=2.0) == 1.5
    assert next_rate(rates, passing, systems, slos, ceiling=1.2) is None, "past the ceiling"
    one_passes = [run(systems[0], 1.0, 500), run(systems[1], 1.0, 3000)]
    assert next_rate(rates, one_passes, systems, slos, ceiling=2.0) == 1.5, "one system still passing is enough"
    both_fail = [run(s, 1.0, 3000) for s in systems]
    assert next_rate(rates, both_fail, systems, slos, ceiling=2.0) is None


def test_the_cpu_ceiling_is_where_the_fitted_busy_cores_reach_every_core():
    """Busy cores = idle + per-request cores x requests/s, fitted over a system's runs; the ratio this machine
    allows is the disaggregated ceiling over the aggregated goodput."""
    from bench.compare import AGGREGATED_LAYOUTS, DISAGGREGATED, cpu_ceilings, ratio_bound, ratio_factors

    systems = [AGGREGATED_LAYOUTS["replicas"], DISAGGREGATED]

    def run(system, rps, cores):
        return {"system": system.name, "summary": {"request_throughput": rps}, "cpu": {"machine_cores": cores}}

    runs = [run(systems[0], rps, 0.5 + 0.75 * rps) for rps in (0.5, 1.0, 1.5)]  # 2 cores at 2.0 req/s
    runs += [run(systems[1], rps, 0.4 + 0.6 * rps) for rps in (0.5, 1.5)]  # 2 cores at 2.667 req/s
    ceilings = cpu_ceilings(runs, systems, cores=2)
    assert ceilings["aggregated"]["ceiling_rps"] == pytest.approx(2.0)
    assert ceilings["aggregated"]["idle_cores"] == pytest.approx(0.5)
    assert ceilings["disaggregated"]["core_seconds_per_request"] == pytest.approx(0.6)
    assert ceilings["disaggregated"]["ceiling_rps"] == pytest.approx(1.6 / 0.6)
    good = {"aggregated": {"low": 1.8, "high": 1.8}, "disaggregated": {"low": 1.9, "high": 1.9}}
    assert ratio_bound(ceilings, good) == pytest.approx(1.6 / 0.6 / 1.8)
    assert ratio_bound(ceilings, {**good, "aggregated": {"low": 0.0}}) is None
    # the ratio taken apart: ceilings 1.333x apart, disaggregated at 71% of its ceiling, aggregated at 90%
    factors = ratio_factors(ceilings, good)
    assert factors == pytest.approx(
        {"ceilings": 4 / 3, "aggregated_share": 0.9, "disaggregated_share": 1.9 * 0.6 / 1.6}
    )
    product = factors["ceilings"] * factors["disaggregated_share"] / factors["aggregated_share"]
    assert product == pytest.approx(1.9 / 1.8)
    assert ratio_factors(ceilings, {**good, "aggregated": {"low": 0.0, "high": 0.0}}) is None
    assert ratio_factors(ceilings, {**good, "disaggregated": {"low": 1.9, "high": 2.1}}) is None, "only a bound"

    # one throughput, no CPU usage, or cores that do not grow with the load: no ceiling
    flat = [run(systems[1], rps, 1.0) for rps in (0.5, 1.5)] + [run(systems[0], 1.0, 1.0), run(systems[0], 1.0, 1.2)]
    assert cpu_ceilings(flat, systems, cores=2) == {"aggregated": None, "disaggregated": None}
    assert cpu_ceilings(runs, systems, cores=None) == {"aggregated": None, "disaggregated": None}
    assert ratio_bound({"aggregated": None, "disaggregated": None}, good) is None
    assert ratio_factors({"aggregated": ceilings["aggregated"], "disaggregated": None}, good) is None
