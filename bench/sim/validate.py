"""Replays the runs of a ``bench compare`` report through the simulator and sets the predicted
TTFT and TPOT (p50, p90) beside the measured ones.

Each run is replayed as it happened: the same arrival times (as sent), prompt and output lengths,
worker counts, threads and token budget; the latency models are the ``bench profile`` fits for
the threads each worker ran with; the link is the profile's measured KV bytes/s.

Two predictions per run:

- ``raw``: the profile, the machine's cores and what the run measured of the other work on them —
  nothing fitted to the runs' latencies. The workers share the cores (``bench.sim.host``): a
  worker whose threads fill both cores (``--aggregated one-engine``) has its steps stalled by the
  router, the client and anything else running, prefill and decode alike; 1-thread workers are
  stalled only while both step. A KV push is the prefill worker's own CPU work, after its step.
  Machine facts come from the baseline's zero-load requests (sent one at a time, before the
  sweep): the lock-step stall of a worker filling every core, or else what serving adds to the
  engine's steps (``serving_overheads``): a request's path outside them (client, HTTP, router,
  gRPC hops) to its first token, and the worker's loop and token relay to each decoding step; and
  from the same requests sent as many at once as the baseline has engines, how much workers
  stepping on every core at once slow each other (``co_step_slowdown``, ``Host.co_step``).
- ``calibrated``: the raw model without the request overhead, with each system's prefill costs
  scaled by measured / simulated TTFT and measured - simulated TPOT added to each decoding step,
  from the report's zero-load requests (see ``calibrate``): each system's whole zero-load gap
  read as slower steps rather than as a fixed cost per request.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

from bench.serve_bench import RequestRecord, summarize
from bench.sim.cluster import Deployment, Link, WorkerSpec, simulate
from bench.sim.hardware import resolve_model
from bench.sim.host import Host
from bench.sim.latency import FittedModel, ModelShape
from bench.sim.workload import TraceRequest

TOLERANCE = 0.15
BASELINE = "aggregated"  # bench compare's baseline system
METRICS = (("ttft_ms", "median"), ("ttft_ms", "p90"), ("tpot_ms", "median"), ("tpot_ms", "p90"))
KINDS = ("raw", "calibrated")


def deployment_for(
    system: dict, config: dict, profile: dict, host: Host | None = None, request_overhead_s: float = 0.0
) -> Deployment:
    """The simulated twin of one ``bench compare`` system (its ``config.systems`` entry) on ``host``."""
    model = resolve_model(config["model"])
    shape = ModelShape.of(model, config["dtype"])
    capacity = config["kv_cache_mb"] * 1024 * 1024 // shape.kv_bytes_per_token
    budget = config["max_num_batched_tokens"]

    def spec(threads: int) -> WorkerSpec:
        return WorkerSpec(
            FittedModel.from_profile(profile, threads),
            capacity,
            budget,
            threads=threads,
            prefill_chunk_beside_decodes=config.get("prefill_chunk_beside_decodes"),
        )

    return Deployment(
        num_prefill=system["prefill_workers"],
        num_decode=system["decode_workers"],
        prefill=spec(system["prefill_threads"] or system["decode_threads"]),
        decode=spec(system["decode_threads"]),
        num_layers=model.num_layers,
        kv_bytes_per_token=shape.kv_bytes_per_token,
        link=Link(profile["transfer"]["bytes_per_s"]),
        local_prefill_threshold=system["local_prefill_threshold"],
        max_prefill_wait_s=system.get("max_prefill_wait_ms", 0.0) / 1000.0,
        request_overhead_s=request_overhead_s,
        host=host,
    )


def host_of(compare: dict, run: dict, stall_cores: float = 0.0, co_step: float = 0.0) -> Host | None:
    """The machine's cores; the other work: ``stall_cores`` plus what ``run`` measured beyond the
    baseline's zero-load requests (which ``stall_cores`` already stands for); ``co_step``."""
    cores = compare.get("machine", {}).get("cpu_count")
    if not cores:
        return None
    other = stall_cores + max(0.0, _other_cores(run) - _other_cores(_baseline_probe(compare)))
    return Host(cores, other, co_step)


def co_step_slowdown(compare: dict, profile: dict) -> float:
    """How much longer a 1-thread worker's step takes while the others step on every other core
    (``Host.co_step``), a machine fact: the baseline's zero-load requests sent as many at once as it has
    engines (``bench compare``'s ``zero_load_together``: every engine prefilling, nothing queued) against the
    same requests sent one at a time, each simulated alone with the cores to itself; the medians of measured
    over simulated TTFT, one over the other, less 1. TTFT, not the whole latency: a zero-load request's first
    token is its prompt's step, while each of its later steps decodes one token, and relaying that token (the
    worker's stream, the router, the client) finds no idle core either: other work, which each run's measured
    other CPU stands for. 0 where the report has no such requests, or the baseline's own threads fill every
    core (the lock-step stall stands for that)."""
    baseline = _baseline_alone(compare, profile, fills_cores=False)
    together = compare.get("zero_load_together", {}).get(BASELINE)
    if baseline is None or not together or not compare.get("machine", {}).get("cpu_count"):
        return 0.0
    probe, alone = baseline

    def slower(requests: dict) -> float:
        return statistics.median(
            row["ttft"] / simulated.ttft for row, simulated in _measured_and_alone(alone, requests)
        )

    return max(0.0, slower(together) / slower(probe) - 1.0)


def lockstep_stall(compare: dict, profile: dict) -> float:
    """The other work, in cores, that a worker whose torch threads fill every core behaves as if it
    shared them with when served: its threads step in lock step, so each wakeup of another thread
    (the router, the client, every process's gRPC pollers — little CPU time, which the cores'
    accounting shows as ~0) stalls the whole step. A machine fact, measured once: the baseline's
    zero-load requests, end-to-end latency measured / simulated with the cores to itself. 0 when
    the baseline leaves a core idle (the 1-thread workers see no such stall) or has no probes."""
    baseline = _baseline_alone(compare, profile, fills_cores=True)
    if baseline is None:
        return 0.0
    probe, alone = baseline
    ratios = [row["latency"] / simulated.latency for row, simulated in _measured_and_alone(alone, probe)]
    return max(0.0, statistics.median(ratios) - 1.0) if ratios else 0.0


def serving_overheads(compare: dict, profile: dict) -> dict:
    """What serving adds to the engine's steps, two machine facts measured once from the baseline's
    zero-load requests, each simulated alone with the cores to itself (medians):

    - ``request_overhead_s``: what a request's path outside the engine steps (client, HTTP, router,
      gRPC hops, the step loop's wakeup) adds to its first token: TTFT measured - simulated;
    - ``decode_step_overhead_s``: what serving adds to each step that decodes (the worker's loop and
      its gRPC stream sharing the interpreter with the engine thread, the router and client relaying
      each token): TPOT measured - simulated.

    Both 0 where the baseline fills every core (the lock-step stall stands for the gaps) or has no probes."""
    baseline = _baseline_alone(compare, profile, fills_cores=False)
    if baseline is None:
        return {"request_overhead_s": 0.0, "decode_step_overhead_s": 0.0}
    probe, alone = baseline
    pairs = _measured_and_alone(alone, probe)
    ttft = [row["ttft"] - simulated.ttft for row, simulated in pairs]
    tpot = _decode_gaps(pairs)
    return {
        "request_overhead_s": max(0.0, statistics.median(ttft)) if ttft else 0.0,
        "decode_step_overhead_s": max(0.0, statistics.median(tpot)) if tpot else 0.0,
    }


def _baseline_probe(compare: dict) -> dict | None:
    return compare.get("zero_load", {}).get(BASELINE)


def _baseline_alone(compare: dict, profile: dict, fills_cores: bool) -> tuple[dict, Deployment] | None:
    """The baseline's zero-load requests and its simulated twin with the cores to itself, where its own threads fill
    every core (``fills_cores``) or leave one idle (not; also where the report does not say the machine's cores);
    None without such requests or where the layout is the other one."""
    probe, cores = _baseline_probe(compare), compare.get("machine", {}).get("cpu_count")
    system = compare["config"]["systems"].get(BASELINE)
    if not probe or not system:
        return None
    fills = bool(cores) and system["decode_threads"] >= cores
    if fills != fills_cores:
        return None
    return probe, deployment_for(system, compare["config"], profile, Host(cores) if cores else None)


def _other_cores(run: dict | None) -> float:
    return ((run or {}).get("cpu") or {}).get("other_cores", 0.0)


def _measured_and_alone(deployment: Deployment, probe: dict) -> list[tuple[dict, RequestRecord]]:
    """Each successful zero-load request of ``probe`` beside its simulated twin, sent alone at time 0."""
    return [
        (row, simulate(deployment, [TraceRequest(0.0, row["prompt_len"], row["output_len"])]).records[0])
        for row in probe["requests"]
        if row["success"]
    ]


def _decode_gaps(pairs: list[tuple[dict, RequestRecord]]) -> list[float]:
    """TPOT measured - simulated of each pair that decoded more than one token on both sides."""
    return [row["tpot"] - simulated.tpot for row, simulated in pairs if row["tpot"] and simulated.tpot]


def trace_of(run: dict) -> list[TraceRequest]:
    return sorted(
        (TraceRequest(r["start"], r["prompt_len"], r["output_len"]) for r in run["requests"]), key=lambda r: r.arrival_s
    )


def calibrate(deployment: Deployment, probe: dict) -> tuple[Deployment, dict]:
    """Scales prefill costs by measured / simulated TTFT and adds measured - simulated TPOT to every
    step that decodes (medians over the zero-load requests, each simulated alone). Multiplicative
    for prefill: what slows it here (KV pushes and checksums on the engine thread, CPU taken by
    other processes) grows with the prompt. Per step for decode: the gap (~18 ms with 2 threads,
    far more than the ~1 ms of CPU a streamed token costs the router and client) is a step's
    threads being descheduled by that other work on the same 2 cores, paid once per step."""
    pairs = _measured_and_alone(deployment, probe)
    ttft = [row["ttft"] / simulated.ttft for row, simulated in pairs]
    tpot = _decode_gaps(pairs)
    factors = {
        "prefill_factor": statistics.median(ttft) if ttft else 1.0,
        "decode_step_overhead_s": statistics.median(tpot) if tpot else 0.0,
    }
    return calibrated(deployment, factors), factors


def calibrated(deployment: Deployment, factors: dict) -> Deployment:
    def adjust(spec: WorkerSpec) -> WorkerSpec:
        return replace(
            spec, latency=spec.latency.calibrated(factors["prefill_factor"], factors["decode_step_overhead_s"])
        )

    return replace(deployment, prefill=adjust(deployment.prefill), decode=adjust(deployment.decode))


def validate(compare: dict, profile: dict) -> dict:
    config = compare["config"]
    slos = config["slos"]
    notes = []
    if profile.get("max_num_batched_tokens", config["max_num_batched_tokens"]) != config["max_num_batched_tokens"]:
        notes.append(
            f"the profile ran a {profile['max_num_batched_tokens']}-token budget, the runs "
            f"{config['max_num_batched_tokens']}"
        )
    if not compare.get("machine", {}).get("cpu_count") or not all(run.get("cpu") for run in compare["runs"]):
        notes.append("the report has no CPU usage of the runs: no other work on the cores assumed")
    stall, co_step = lockstep_stall(compare, profile), co_step_slowdown(compare, profile)
    overheads = serving_overheads(compare, profile)
    factors = {}
    for name, system in config["systems"].items():
        probe = compare.get("zero_load", {}).get(name)
        factors[name] = (
            calibrate(deployment_for(system, config, profile, host_of(compare, probe, stall, co_step)), probe)[1]
            if probe
            else {"prefill_factor": 1.0, "decode_step_overhead_s": 0.0}
        )
    rows = []
    for run in compare["runs"]:
        bare = deployment_for(config["systems"][run["system"]], config, profile, host_of(compare, run, stall, co_step))
        raw = calibrated(
            replace(bare, request_overhead_s=overheads["request_overhead_s"]),
            {"prefill_factor": 1.0, "decode_step_overhead_s": overheads["decode_step_overhead_s"]},
        )
        predicted = {}
        for kind, deployment in (("raw", raw), ("calibrated", calibrated(bare, factors[run["system"]]))):
            result = simulate(deployment, trace_of(run), config["seed"])
            predicted[kind] = summarize(result.records, result.duration_s, slos)
        rows.append(_row(run, run["summary"], predicted))
    return {
        "tolerance": TOLERANCE,
        "lockstep_stall_cores": stall,
        "co_step": co_step,
        **overheads,
        "factors": factors,
        "notes": notes,
        "rows": rows,
        "agreement": {kind: _agreement(rows, kind) for kind in KINDS},
    }


def _row(run: dict, measured: dict, predicted: dict[str, dict]) -> dict:
    row = {
        "system": run["system"],
        "rate": run["rate"],
        "attainment": {
            "measured": measured.get("slo_attainment"),
            **{k: p.get("slo_attainment") for k, p in predicted.items()},
        },
    }
    for name, stat in METRICS:
        have = measured[name][stat]
        cell = {"measured": have}
        for kind, summary in predicted.items():
            want = summary[name][stat]
            cell[kind] = want
            cell[f"{kind}_error"] = (want - have) / have if have and want is not None else None
        row[f"{name}_{stat}"] = cell
    return row


def _agreement(rows: list[dict], kind: str) -> dict:
    errors = [
        abs(row[f"{n}_{s}"][f"{kind}_error"])
        for row in rows
        for n, s in METRICS
        if row[f"{n}_{s}"][f"{kind}_error"] is not None
    ]
    return {
        "compared": len(errors),
        "within_tolerance": sum(e <= TOLERANCE for e in errors),
        "median_abs_error": statistics.median(errors) if errors else None,
    }


def print_validation(report: dict) -> None:
    print(f"{'=' * 20} simulated vs measured (bench compare runs) {'=' * 20}")
    print(
        f"raw: the profile's fits, the machine's cores, each run's measured other CPU, and the lock-step "
        f"stall of a worker filling every core ({report['lockstep_stall_cores']:.2f} cores' worth, from the "
        f"{BASELINE} stack's zero-load requests), or else what serving adds to the engine's steps, from the same "
        f"requests: {report['request_overhead_s'] * 1e3:.0f} ms to a first token (the request's path outside the "
        f"engine), {report['decode_step_overhead_s'] * 1e3:.1f} ms to each step that decodes; a step "
        f"{report['co_step']:.0%} longer while other workers step on every other core (the same requests sent "
        "together); nothing from the other system's runs"
    )
    for name, f in report["factors"].items():
        print(
            f"calibration from zero-load requests, {name}: prefill costs x{f['prefill_factor']:.2f}, "
            f"{f['decode_step_overhead_s'] * 1e3:+.1f} ms per decoding step"
        )
    for note in report["notes"]:
        print(f"note: {note}")
    labels = [f"{n.split('_')[0].upper()} {'p50' if s == 'median' else s}" for n, s in METRICS]
    print(
        f"{'system':14} {'rate':>5} " + " ".join(f"{label:>27}" for label in labels) + f" {'attain meas/raw/cal':>20}"
    )
    for row in report["rows"]:
        cells = []
        for name, stat in METRICS:
            c = row[f"{name}_{stat}"]
            times = f"{_ms(c['measured'])}/{_ms(c['raw'])}/{_ms(c['calibrated'])}"
            cells.append(f"{times} {_pct(c['raw_error'])}/{_pct(c['calibrated_error'])}".rjust(27))
        a = row["attainment"]
        print(
            f"{row['system']:14} {row['rate']:5.2f} "
            + " ".join(cells)
            + f" {a['measured']:>8.0%}/{a['raw']:.0%}/{a['calibrated']:.0%}"
        )
    print("cells: measured/raw/calibrated ms, then raw/calibrated error of the prediction")
    for kind, agreement in report["agreement"].items():
        print(
            f"{kind:>10}: within {report['tolerance']:.0%} in {agreement['within_tolerance']} of "
            f"{agreement['compared']} cells, "
            f"median |error| {_pct(agreement['median_abs_error'], signed=False)}"
        )


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _pct(value: float | None, signed: bool = True) -> str:
    return "n/a" if value is None else (f"{value:+.0%}" if signed else f"{value:.0%}")
