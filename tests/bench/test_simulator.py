"""The cluster simulator's bookkeeping: conservation, zero-load latency, monotonicity, split search,
and the validation path against a `bench compare` report."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bench.serve_bench import summarize
from bench.sim.cluster import Deployment, Link, WorkerSpec, simulate
from bench.sim.hardware import H100, H200, resolve_model
from bench.sim.host import Host
from bench.sim.latency import FittedModel, ModelShape, RooflineModel, decode_step_s, prefill_s
from bench.sim.search import max_goodput, search_splits
from bench.sim.validate import validate
from bench.sim.workload import TraceRequest, Traffic, load_trace, scale_trace
from cluster.cli import main

# Shaped like this CPU's fits: ~1.6 ms per prompt token, ~30 ms per decode step.
CPU_LIKE = FittedModel("test", prefill=(0.02, 1.5e-3, 1e-7, 3e-7), decode=(0.03, 2e-3, 1e-6))
LAYERS, KV_BYTES = 12, 12288


def deployment(
    num_prefill: int = 1,
    num_decode: int = 1,
    link_bytes_per_s: float = 1e9,
    capacity: int = 100_000,
    budget: int = 2048,
    threshold: int = 0,
    latency_s: float = 0.0,
) -> Deployment:
    spec = WorkerSpec(CPU_LIKE, capacity, budget)
    return Deployment(
        num_prefill, num_decode, spec, spec, LAYERS, KV_BYTES, Link(link_bytes_per_s, latency_s), threshold
    )


def traffic(rate: float = 0.5, count: int = 60, seed: int = 0) -> Traffic:
    return Traffic(rate, count, (512, 1536), (32, 64), seed=seed)


@pytest.mark.parametrize(
    "setup",
    [
        dict(num_prefill=0),  # aggregated
        dict(num_prefill=1),  # disaggregated
        dict(num_prefill=2, num_decode=2, threshold=1024),  # conditional: short prompts stay on D
        dict(num_prefill=1, budget=256),  # chunked prefill over many steps
        dict(num_prefill=1, capacity=4000),  # KV full: the router queues
        dict(num_prefill=0, capacity=4000, budget=300),
    ],
)
def test_every_request_finishes_with_all_its_tokens(setup):
    trace = traffic(rate=2.0).requests()  # overloaded: queues everywhere
    result = simulate(deployment(**setup), trace)

    assert all(r.success for r in result.records), [r.error for r in result.records if not r.success][:3]
    assert [r.output_tokens for r in result.records] == [t.output_len for t in trace]
    assert all(0 < r.ttft <= r.latency for r in result.records)
    assert sum(result.decisions.values()) == len(trace)


def test_a_request_that_fits_nowhere_fails_and_the_rest_finish():
    trace = [TraceRequest(0.0, 5000, 10), TraceRequest(0.1, 100, 10)]
    records = simulate(deployment(capacity=4000), trace).records
    assert [r.success for r in records] == [False, True]


@pytest.mark.parametrize("link_bytes_per_s", [1e10, 5e6])  # transfer hidden behind compute; transfer-bound
def test_zero_load_ttft_is_prefill_plus_exposed_transfer(link_bytes_per_s):
    tokens, latency = 1000, 0.003
    setup = deployment(link_bytes_per_s=link_bytes_per_s, latency_s=latency)
    record = simulate(setup, [TraceRequest(0.0, tokens, 8)]).records[0]

    prefill = prefill_s(CPU_LIKE, tokens)
    per_layer = tokens * KV_BYTES / LAYERS / link_bytes_per_s
    # Layer l leaves when computed ((l+1)/L of the prefill) or when the link is free, whichever is later.
    exposed = max(per_layer, LAYERS * per_layer - prefill * (LAYERS - 1) / LAYERS) + latency
    assert record.ttft == pytest.approx(prefill + exposed, rel=1e-9)
    assert setup.exposed_transfer_s(prefill, tokens) == pytest.approx(exposed, rel=1e-9)
    # The rest is one decode step per token, the batch of one.
    assert record.latency - record.ttft == pytest.approx(
        sum(decode_step_s(CPU_LIKE, 1, tokens + g) for g in range(1, 8)), rel=1e-9
    )


def test_zero_load_aggregated_ttft_is_the_prefill():
    record = simulate(deployment(num_prefill=0), [TraceRequest(0.0, 700, 4)]).records[0]
    assert record.ttft == pytest.approx(prefill_s(CPU_LIKE, 700), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_more_decode_workers_never_raise_tpot_at_fixed_load(seed):
    """Mean TPOT over the same requests; a single quantile may wobble with where requests land."""
    trace = traffic(rate=1.0, count=120, seed=seed).requests()
    tpots = []
    for num_decode in (1, 2, 3, 4, 6):
        summary = summarize(simulate(deployment(num_prefill=2, num_decode=num_decode), trace, seed).records, 1.0)
        tpots.append(summary["tpot_ms"])
    means = [t["mean"] for t in tpots]
    assert all(more <= fewer + 1e-9 for fewer, more in zip(means, means[1:])), means
    assert means[-1] < means[0] and tpots[-1]["p90"] < tpots[0]["p90"]


def test_prefills_mixed_into_decode_steps_raise_tpot():
    trace = traffic(rate=0.5).requests()
    aggregated = summarize(simulate(deployment(num_prefill=0, num_decode=2), trace).records, 1.0)
    disaggregated = summarize(simulate(deployment(num_prefill=1, num_decode=1), trace).records, 1.0)
    assert disaggregated["tpot_ms"]["p90"] < aggregated["tpot_ms"]["p90"]


def test_a_prompt_chunk_cap_beside_decodes_trades_ttft_for_tpot():
    trace = traffic(rate=0.5).requests()
    plain = deployment(num_prefill=0, num_decode=2, budget=512)
    capped = replace(plain, decode=replace(plain.decode, prefill_chunk_beside_decodes=64))
    before, after = (summarize(simulate(d, trace).records, 1.0) for d in (plain, capped))
    assert after["completed"] == before["completed"] == len(trace)
    assert after["tpot_ms"]["p99"] < before["tpot_ms"]["p99"]
    assert after["ttft_ms"]["mean"] > before["ttft_ms"]["mean"]
    with pytest.raises(ValueError, match="prefill_chunk_beside_decodes must be >= 1, got 0"):
        WorkerSpec(CPU_LIKE, 1000, prefill_chunk_beside_decodes=0)


def test_split_search_returns_a_feasible_split_within_budget():
    slos = {"ttft": 5000.0, "tpot": 60.0}
    load = traffic(rate=0.6, count=80)
    results, best, goodput = search_splits(deployment(), load, slos, gpu_budget=5)

    assert {(r.num_prefill, r.num_decode) for r in results} == {(p, t - p) for t in range(1, 6) for p in range(t)}
    assert best is not None and best.gpus <= 5 and best.attainment >= 0.9
    assert all(r.attainment < 0.9 for r in results if r.gpus < best.gpus)
    assert goodput >= load.rate  # feasible at the rate searched, so its goodput is at least that
    check = summarize(simulate(deployment(best.num_prefill, best.num_decode), load.requests()).records, 1.0, slos)
    assert check["slo_attainment"] >= 0.9


def test_split_search_says_none_when_no_split_can_meet_the_slos():
    _, best, goodput = search_splits(
        deployment(), traffic(rate=0.6, count=30), {"ttft": 1.0, "tpot": 1.0}, gpu_budget=3
    )
    assert best is None and goodput is None


def test_goodput_is_the_rate_where_attainment_crosses_90_percent():
    slos = {"ttft": 5000.0, "tpot": 60.0}
    load = traffic(count=80)
    rate = max_goodput(deployment(), load, slos)
    assert rate > 0
    at = lambda r: summarize(simulate(deployment(), load.at_rate(r).requests()).records, 1.0, slos)["slo_attainment"]  # noqa: E731
    assert at(rate) >= 0.9 and at(rate * 1.2) < 0.9


def test_roofline_decode_is_memory_bound_and_prefill_compute_bound():
    shape = ModelShape.of(resolve_model("llama-3.1-8b"))
    h100, h200 = RooflineModel(H100, shape, step_overhead_s=0.0), RooflineModel(H200, shape, step_overhead_s=0.0)
    weights_s = shape.weight_bytes / (3.35e12 * 0.8)
    assert decode_step_s(h100, 1, 1) == pytest.approx(weights_s, rel=0.01)
    assert decode_step_s(h200, 1, 1) == pytest.approx(decode_step_s(h100, 1, 1) * 3.35 / 4.8, rel=0.01)
    prefill_flops = 2 * shape.linear_params * 4096
    assert prefill_s(h100, 4096) > prefill_flops / (989e12 * 0.6)
    assert prefill_s(h100, 4096) == pytest.approx(prefill_s(h200, 4096), rel=1e-9)  # same compute
    with pytest.raises(ValueError):
        RooflineModel(H100, ModelShape.of(resolve_model("llama-3.1-70b"))).kv_capacity_tokens()  # 141 GB on 80 GB


def test_trace_files_load_and_rescale(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("arrival_s,input_len,output_len\n0.0,100,5\n2.0,200,6\n4.0,300,7\n")
    trace = load_trace(str(path))
    assert [r.input_len for r in trace] == [100, 200, 300]
    assert [r.arrival_s for r in scale_trace(trace, 1.0)] == [0.0, 1.0, 2.0]


def _compare_report(model: FittedModel, trace: list[TraceRequest], zero_load: list[TraceRequest]) -> dict:
    """A `bench compare` report whose "measurements" come from simulating ``model``."""
    config = {
        "model": "bench-125m",
        "dtype": "bfloat16",
        "kv_cache_mb": 512,
        "max_num_batched_tokens": 2048,
        "seed": 0,
        "slos": {"ttft": 4000.0, "tpot": 100.0},
        "systems": {
            "disaggregated": {
                "prefill_workers": 1,
                "decode_workers": 1,
                "prefill_threads": 1,
                "decode_threads": 1,
                "local_prefill_threshold": 0,
            }
        },
    }
    spec = WorkerSpec(model, 512 * 1024 * 1024 // KV_BYTES, 2048)
    truth = Deployment(1, 1, spec, spec, LAYERS, KV_BYTES, Link(1e9))

    def run(requests: list[TraceRequest], alone: bool) -> dict:
        records, rows = _replayed(truth, requests, alone)
        return {
            "system": "disaggregated",
            "rate": 0.5,
            "requests": rows,
            "summary": summarize(records, 1.0, config["slos"]),
        }

    return json.loads(
        json.dumps(
            {"config": config, "zero_load": {"disaggregated": run(zero_load, True)}, "runs": [run(trace, False)]}
        )
    )


PROFILE = {
    "model": "bench-125m",
    "transfer": {"bytes_per_s": 1e9},
    "fits": {
        str(t): {"prefill": dict(zip("abcd", CPU_LIKE.prefill)), "decode": dict(zip("abc", CPU_LIKE.decode))}
        for t in (1, 2)
    },
}


def test_validation_of_runs_the_simulator_itself_produced_has_no_error():
    report = _compare_report(CPU_LIKE, traffic(count=20).requests(), traffic(count=3, seed=5).requests())
    checked = validate(report, PROFILE)
    for kind in ("raw", "calibrated"):
        assert checked["agreement"][kind]["compared"] == 4 and checked["agreement"][kind]["within_tolerance"] == 4
        assert checked["agreement"][kind]["median_abs_error"] == pytest.approx(0.0, abs=1e-9)
    assert checked["factors"]["disaggregated"] == pytest.approx(
        {"prefill_factor": 1.0, "decode_step_overhead_s": 0.0}, abs=1e-9
    )


def test_calibration_recovers_a_slower_machine_from_zero_load_requests():
    slower = CPU_LIKE.calibrated(1.4, 0.012)  # prefill 40% slower, 12 ms more per decoding step
    report = _compare_report(slower, traffic(rate=0.4, count=30).requests(), traffic(count=5, seed=5).requests())
    checked = validate(report, PROFILE)
    factors = checked["factors"]["disaggregated"]
    assert factors["prefill_factor"] == pytest.approx(1.4, rel=0.03)
    assert factors["decode_step_overhead_s"] == pytest.approx(0.012, rel=0.05)
    assert checked["agreement"]["raw"]["median_abs_error"] > 0.15
    assert checked["agreement"]["calibrated"]["median_abs_error"] < 0.05


def test_simulate_cli_recommends_a_split_and_writes_json(tmp_path, capsys):
    path = tmp_path / "sim.json"
    code = main(
        [
            "simulate",
            "--model",
            "llama-3.1-8b",
            "--hardware",
            "h200",
            "--rate",
            "6",
            "--num-requests",
            "60",
            "--ttft-slo-ms",
            "500",
            "--tpot-slo-ms",
            "30",
            "--gpu-budget",
            "3",
            "--json",
            str(path),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(path.read_text())
    assert report["recommended"]["gpus"] <= 3 and "recommended:" in printed
    assert report["summary"]["completed"] == 60


# -- a CPU host shared by the workers ------------------------------------------------------------------


def test_host_slowdown_by_hand():
    """2 cores, 0.3 of a core of other work: the 2-thread worker fills both, so all of it stalls
    its steps; a lone 1-thread worker leaves a core for it; two 1-thread workers each take half."""
    host = Host(2, 0.3)
    assert host.slowdown(2, 2) == pytest.approx(1.3)
    assert host.slowdown(1, 1) == 1.0
    assert host.slowdown(1, 2) == pytest.approx(1.15)
    assert Host(2, 1.5).slowdown(1, 1) == pytest.approx(1.5)  # only the 0.5 beyond the idle core
    assert Host(2, 0.0).slowdown(2, 2) == 1.0
    # workers stepping on every core at once slow each other by co_step; a worker filling the cores alone does not
    crowded = Host(2, 0.3, co_step=0.12)
    assert crowded.crowding(1, 2) == pytest.approx(1.12)
    assert crowded.crowding(1, 1) == crowded.crowding(2, 2) == 1.0


def test_on_a_host_the_push_follows_the_prefill_and_contended_steps_stretch():
    spec = WorkerSpec(CPU_LIKE, 100_000, 4096, threads=1)
    setup = Deployment(1, 1, spec, spec, LAYERS, KV_BYTES, Link(1e8), host=Host(2, 0.5))
    record = simulate(setup, [TraceRequest(0.0, 1000, 4)]).records[0]
    # alone: (1 + 0.5 - 2) < 0, no slowdown; then the whole push, 1000 x 12288 B at 100 MB/s
    assert record.ttft == pytest.approx(prefill_s(CPU_LIKE, 1000) + 1000 * KV_BYTES / 1e8, rel=1e-9)

    both = replace(spec, threads=2)
    aggregated = Deployment(0, 1, both, both, LAYERS, KV_BYTES, Link(1e8), host=Host(2, 0.5))
    record = simulate(aggregated, [TraceRequest(0.0, 1000, 4)]).records[0]
    assert record.ttft == pytest.approx(1.5 * prefill_s(CPU_LIKE, 1000), rel=1e-9)
    assert record.latency - record.ttft == pytest.approx(
        1.5 * sum(decode_step_s(CPU_LIKE, 1, 1000 + g) for g in range(1, 4)), rel=1e-9
    )


def test_a_step_runs_slower_while_another_worker_steps_beside_it_and_faster_again_once_it_stops():
    """Two 1-thread replicas on 2 cores, co_step 0.5, each prompt a single prefill step of P seconds alone. A
    starts at 0, B at P/2 on the other replica: A does P/2 alone, then its other P/2 at 1.5x, ending at 1.25 P;
    by then B has done (1.25 - 0.5) P / 1.5 = P/2, and does the rest alone, ending at 1.75 P."""
    spec = WorkerSpec(CPU_LIKE, 100_000, 4096, threads=1)
    setup = Deployment(0, 2, spec, spec, LAYERS, KV_BYTES, Link(1e8), host=Host(2, co_step=0.5))
    p = prefill_s(CPU_LIKE, 1000)
    first, second = simulate(setup, [TraceRequest(0.0, 1000, 1), TraceRequest(p / 2, 1000, 1)]).records
    assert first.ttft == pytest.approx(1.25 * p, rel=1e-9)
    assert second.ttft == pytest.approx(1.25 * p, rel=1e-9)
    alone = simulate(setup, [TraceRequest(0.0, 1000, 1), TraceRequest(2 * p, 1000, 1)]).records
    assert [r.ttft for r in alone] == pytest.approx([p, p], rel=1e-9)


def test_profile_fits_lose_the_toll_of_the_other_work_measured_beside_them():
    profile = dict(PROFILE, machine={"cpu_count": 2})
    profile["fits"] = {k: dict(v, cpu={"other_cores": 0.25}) for k, v in PROFILE["fits"].items()}
    alone2, alone1 = FittedModel.from_profile(profile, 2), FittedModel.from_profile(profile, 1)
    assert alone2.prefill == pytest.approx(tuple(c / 1.25 for c in CPU_LIKE.prefill))
    assert alone2.decode == pytest.approx(tuple(c / 1.25 for c in CPU_LIKE.decode))
    assert alone1.prefill == pytest.approx(CPU_LIKE.prefill)  # one thread left a core for it


def _aggregated_compare_config(decode_workers: int, decode_threads: int) -> dict:
    """A ``bench compare`` report's config with only its aggregated system."""
    system = {
        "prefill_workers": 0,
        "decode_workers": decode_workers,
        "prefill_threads": None,
        "decode_threads": decode_threads,
        "local_prefill_threshold": 0,
    }
    return {
        "model": "bench-125m",
        "dtype": "bfloat16",
        "kv_cache_mb": 512,
        "max_num_batched_tokens": 2048,
        "seed": 0,
        "slos": {"ttft": 4000.0, "tpot": 100.0},
        "systems": {"aggregated": system},
    }


def _replayed(truth: Deployment, trace: list[TraceRequest], alone: bool) -> tuple[list, list[dict]]:
    """``trace`` simulated on ``truth`` (each request by itself if ``alone``): its records and the report rows."""
    records = (
        [simulate(truth, [replace(r, arrival_s=0.0)]).records[0] for r in trace]
        if alone
        else simulate(truth, trace).records
    )
    rows = [
        dict(
            start=r.start,
            prompt_len=r.prompt_len,
            output_len=r.output_len,
            success=r.success,
            ttft=r.ttft,
            tpot=r.tpot,
            latency=r.latency,
        )
        for r in records
    ]
    return records, rows


def test_raw_validation_replays_each_runs_measured_other_work():
    """Runs "measured" on a 2-core host: the aggregated worker's two threads fill it, so it steps as
    if 0.3 cores of other work shared it (the lock-step stall, seen on its zero-load requests),
    plus each run's measured other work. The raw model recovers the stall from the zero-load
    requests alone and, given the cores and each run's other work, reproduces the runs."""
    truth_spec = WorkerSpec(CPU_LIKE, 512 * 1024 * 1024 // KV_BYTES, 2048, threads=2)
    config = _aggregated_compare_config(decode_workers=1, decode_threads=2)

    def measured(trace: list[TraceRequest], other: float, rate: float, alone: bool = False) -> dict:
        truth = Deployment(0, 1, truth_spec, truth_spec, LAYERS, KV_BYTES, Link(1e9), host=Host(2, 0.3 + other))
        records, rows = _replayed(truth, trace, alone)
        summary = summarize(records, 1.0, config["slos"])
        return {
            "system": "aggregated",
            "rate": rate,
            "requests": rows,
            "summary": summary,
            "cpu": {"other_cores": other},
        }

    runs = [measured(traffic(rate=rate, count=20).requests(), other, rate) for rate, other in ((0.3, 0.2), (0.6, 0.5))]
    zero = measured(traffic(count=3, seed=5).requests(), 0.0, float("inf"), alone=True)
    report = json.loads(
        json.dumps({"config": config, "machine": {"cpu_count": 2}, "zero_load": {"aggregated": zero}, "runs": runs})
    )

    checked = validate(report, PROFILE)
    assert checked["lockstep_stall_cores"] == pytest.approx(0.3, rel=1e-6)
    assert checked["agreement"]["raw"]["median_abs_error"] == pytest.approx(0.0, abs=1e-6)
    blind = dict(report, machine={})
    assert validate(blind, PROFILE)["agreement"]["raw"]["median_abs_error"] > 0.1


# -- exposed transfer at GPU scale ---------------------------------------------------------------------


def _four_layers(link_bytes_per_s: float) -> Deployment:
    spec = WorkerSpec(CPU_LIKE, 100_000)
    return Deployment(1, 1, spec, spec, 4, 1000, Link(link_bytes_per_s))


def test_exposed_transfer_shares_and_needed_links_by_hand():
    """4 layers, 1000 tokens x 1000 KV bytes = 1 MB over 100 MB/s, after a 40 ms prefill.

    whole request: 10 ms after the prefill            -> 10 / 50 = 20% of TTFT
    layer-wise:    2.5 ms a layer; layer 3 is done at 40 ms, the link is free by then (layers 0-2
                   left by 32.5 ms), so 2.5 ms remain         -> 2.5 / 42.5 = 5.88%
    5% of TTFT:    exposed <= 40 ms * 0.05 / 0.95 = 2.105 ms
                   whole: 1 MB / 2.105 ms = 475 MB/s; layer: 0.25 MB / 2.105 ms = 118.75 MB/s
                   (the other layer-wise bound, 1 MB / (2.105 + 30) ms = 31 MB/s, is looser)
    """
    from bench.sim.transfer import exposed_s, needed_bytes_per_s, share

    setup, prefill, tokens = _four_layers(100e6), 0.040, 1000
    assert exposed_s(setup, prefill, tokens, "request") == pytest.approx(0.010)
    assert exposed_s(setup, prefill, tokens, "layer") == pytest.approx(0.0025)
    assert share(setup, prefill, tokens, "request") == pytest.approx(0.20)
    assert share(setup, prefill, tokens, "layer") == pytest.approx(2.5 / 42.5)
    budget = prefill * 0.05 / 0.95
    assert needed_bytes_per_s(setup, prefill, tokens, "request") == pytest.approx(1e6 / budget, rel=1e-6)
    assert needed_bytes_per_s(setup, prefill, tokens, "layer") == pytest.approx(0.25e6 / budget, rel=1e-6)


def test_transfer_table_from_a_bench_transfer_report(tmp_path, capsys):
    """The gRPC and NIXL rows with checksums, largest size; the line-rate column of Llama-3-8B on an
    H100 by hand: 131072 KV bytes/token (32 layers x 2 x 8 heads x 128 x 2 B) over 50 GB/s."""
    from bench.sim.transfer import table, transports_from_report

    report = {
        "bandwidth": [
            {"path": "grpc", "checksums": True, "size_bytes": 16 << 20, "size_mib": 16, "gb_s": 0.5},
            {"path": "grpc", "checksums": True, "size_bytes": 64 << 20, "size_mib": 64, "gb_s": 1.0},
            {"path": "grpc", "checksums": False, "size_bytes": 64 << 20, "size_mib": 64, "gb_s": 9.0},
            {"path": "nixl", "checksums": True, "size_bytes": 64 << 20, "size_mib": 64, "gb_s": 5.0},
            {"path": "tcp", "checksums": None, "size_bytes": 64 << 20, "size_mib": 64, "gb_s": 7.0},
        ]
    }
    path = tmp_path / "transfer.json"
    path.write_text(json.dumps(report))
    transports = transports_from_report(str(path))
    assert [(t.name, t.bytes_per_s) for t in transports] == [("grpc", 1e9), ("nixl", 5e9)]
    report["bandwidth"].append({"path": "bulk", "checksums": True, "size_bytes": 64 << 20, "size_mib": 64, "gb_s": 3.0})
    path.write_text(json.dumps(report))  # workers move gRPC-transport KV on the bulk links: that rate counts
    assert [(t.name, t.bytes_per_s) for t in transports_from_report(str(path))] == [("grpc", 3e9), ("nixl", 5e9)]

    row = table(transports, prompt_lens=(1024,), shapes=(("llama-3-8b", 1, 1),))[0]
    kv = 1024 * 131072
    assert row["kv_mb"] == pytest.approx(kv / 1e6)
    prefill = row["prefill_ms"] / 1e3
    whole = kv / 50e9
    assert row["shares"]["line rate"]["request"] == pytest.approx(whole / (prefill + whole))
    assert row["shares"]["grpc"]["request"] == pytest.approx((kv / 1e9) / (prefill + kv / 1e9))
    assert row["needed_gbps_per_gpu"]["request"] == pytest.approx(kv * 0.95 / (0.05 * prefill) * 8 / 1e9, rel=1e-6)

    assert main(["simulate", "--transfer-table", "--transfer-json", str(path), "--transfer-prompt-lens", "1024"]) == 0
    printed = capsys.readouterr().out
    assert "| llama-3-70b | h200 | 2 | 1024 |" in printed and "grpc layer / whole" in printed
    assert main(["simulate", "--transfer-json", str(path)]) == 2  # refused without --transfer-table


def test_raw_validation_takes_the_serving_overheads_from_the_baselines_zero_load_requests():
    """1-thread aggregated replicas leave no lock-step stall; what the client, HTTP, router and gRPC
    hops add to a first token, and what serving adds to each decoding step, are read off the
    baseline's zero-load requests and replayed."""
    served = replace(CPU_LIKE, decode=(CPU_LIKE.decode[0] + 0.006, *CPU_LIKE.decode[1:]))  # 6 ms more a step
    spec = WorkerSpec(served, 512 * 1024 * 1024 // KV_BYTES, 2048, threads=1)
    truth = Deployment(0, 2, spec, spec, LAYERS, KV_BYTES, Link(1e9), host=Host(2), request_overhead_s=0.05)
    config = _aggregated_compare_config(decode_workers=2, decode_threads=1)

    def measured(trace: list[TraceRequest], rate: float, alone: bool = False) -> dict:
        records, rows = _replayed(truth, trace, alone)
        return {"system": "aggregated", "rate": rate, "requests": rows, "summary": summarize(records, 1.0)}

    zero = measured(traffic(count=3, seed=5).requests(), float("inf"), alone=True)
    report = {
        "config": config,
        "machine": {"cpu_count": 2},
        "zero_load": {"aggregated": zero},
        "runs": [measured(traffic(rate=0.4, count=20).requests(), 0.4)],
    }

    checked = validate(json.loads(json.dumps(report)), PROFILE)
    assert checked["lockstep_stall_cores"] == 0.0
    assert checked["request_overhead_s"] == pytest.approx(0.05, rel=1e-6)
    assert checked["decode_step_overhead_s"] == pytest.approx(0.006, rel=1e-6)
    assert checked["agreement"]["raw"]["median_abs_error"] == pytest.approx(0.0, abs=1e-6)


def test_raw_validation_takes_the_co_step_slowdown_from_zero_load_requests_sent_together():
    """Two 1-thread aggregated replicas on 2 cores whose steps take 15% longer while both step: the baseline's
    zero-load requests, sent one at a time and then two at once, say so before any run is replayed, and the raw
    model then reproduces runs where the replicas often step together; a report without the requests sent together
    (as ``bench compare`` wrote before) is replayed as before, optimistic."""
    spec = WorkerSpec(CPU_LIKE, 512 * 1024 * 1024 // KV_BYTES, 2048, threads=1)
    truth = Deployment(0, 2, spec, spec, LAYERS, KV_BYTES, Link(1e9), host=Host(2, co_step=0.15))
    config = _aggregated_compare_config(decode_workers=2, decode_threads=1)

    def measured(trace: list[TraceRequest], rate: float, alone: bool = False) -> dict:
        records, rows = _replayed(truth, trace, alone)
        return {"system": "aggregated", "rate": rate, "requests": rows, "summary": summarize(records, 1.0)}

    probes = [TraceRequest(0.0, 1024, 48)] * 3  # mean-length requests, as bench compare sends them
    pairs = [TraceRequest(100.0 * (i // 2), 1024, 48) for i in range(6)]
    report = {
        "config": config,
        "machine": {"cpu_count": 2},
        "zero_load": {"aggregated": measured(probes, float("inf"), alone=True)},
        "zero_load_together": {"aggregated": measured(pairs, float("inf"))},
        "runs": [measured(traffic(rate=rate, count=30).requests(), rate) for rate in (0.6, 1.2)],
    }

    checked = validate(json.loads(json.dumps(report)), PROFILE)
    assert checked["co_step"] == pytest.approx(0.15, rel=1e-6)
    assert checked["agreement"]["raw"]["median_abs_error"] == pytest.approx(0.0, abs=1e-6)
    before = validate(json.loads(json.dumps(dict(report, zero_load_together={}))), PROFILE)
    assert before["co_step"] == 0.0
    assert before["agreement"]["raw"]["median_abs_error"] > 0.03


def test_a_max_prefill_wait_sends_the_overflow_to_the_decode_worker_and_raises_ttft_bound_goodput():
    # Prompts ~1.5 s of prefill each: a lone prefill worker at 0.6 req/s queues them for seconds; with a 1 s wait
    # allowed, the decode worker takes the prompts that would wait longer, and the TTFT SLO holds at higher rates.
    slos = {"ttft": 6000.0, "tpot": 200.0}
    load = traffic(rate=0.6, count=80)
    strict = deployment()
    overflowing = replace(strict, max_prefill_wait_s=1.0)
    trace = load.requests()
    strict_run, overflow_run = simulate(strict, trace), simulate(overflowing, trace)
    fallbacks = [run.decisions.get("fallback", 0) for run in (strict_run, overflow_run)]
    assert fallbacks[0] + 5 < fallbacks[1] < len(trace) / 2, fallbacks  # strict: only past prefill_saturation
    p90 = [summarize(run.records, 1.0)["ttft_ms"]["p90"] for run in (strict_run, overflow_run)]
    assert p90[1] < p90[0] / 2, p90
    assert max_goodput(overflowing, load, slos) > 1.2 * max_goodput(strict, load, slos)
    with pytest.raises(ValueError, match="max_prefill_wait_s"):
        replace(strict, max_prefill_wait_s=-1.0)
