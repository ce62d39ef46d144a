"""What ``splitserve simulate`` does with its arguments: builds the deployment and traffic, runs
the simulation and searches, prints and writes the report (``bench.simulator`` parses the flags)."""

from __future__ import annotations

import argparse
import json

from bench.args import Refused
from bench.sim import transfer
from bench.sim.cluster import Deployment, Link, WorkerSpec
from bench.sim.hardware import GPUS, resolve_model
from bench.sim.latency import FittedModel, ModelShape, RooflineModel, decode_step_s, prefill_s
from bench.sim.search import ATTAINMENT_TARGET, attainment, max_goodput, search_splits
from bench.sim.validate import print_validation, validate
from bench.sim.workload import TraceTraffic, Traffic, length_range, load_trace
from engine.config import STEP_LIMITS
from engine.errors import EngineError

MIB = 1024 * 1024


def run(args: argparse.Namespace) -> int:
    try:
        if args.transfer_table:
            return _run_transfer_table(args)
        if args.validate:
            return _run_validation(args)
        deployment = build_deployment(args)
        traffic = build_traffic(args)
    except (OSError, ValueError, KeyError, EngineError) as exc:  # a file or model the flags name, unusable
        raise Refused(str(exc)) from None
    slos = {"ttft": args.ttft_slo_ms, "tpot": args.tpot_slo_ms}
    report = simulate_report(deployment, traffic, slos, args)
    print_report(report)
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"wrote {args.json_path}")
    return 0


def build_deployment(args: argparse.Namespace) -> Deployment:
    config = resolve_model(args.model)
    shape = ModelShape.of(config, args.dtype)
    if args.hardware == "cpu":
        profile = _load(args.profile)
        prefill_model, decode_model = (
            FittedModel.from_profile(profile, t) for t in (args.prefill_threads, args.decode_threads)
        )
        capacity = args.kv_cache_mb * MIB // shape.kv_bytes_per_token
        link_bytes = profile["transfer"]["bytes_per_s"]
        prefill_capacity = decode_capacity = capacity
    else:
        gpu = GPUS[args.hardware]
        prefill_model = decode_model = RooflineModel(
            gpu, shape, args.tp, args.compute_efficiency, args.bandwidth_efficiency, args.step_overhead_ms / 1000
        )
        prefill_capacity = decode_capacity = decode_model.kv_capacity_tokens()
        link_bytes = gpu.nic_gbps * args.tp * 1e9 / 8
    if args.link_gbps is not None:
        link_bytes = args.link_gbps * 1e9 / 8
    limits = {name: getattr(args, name) for name in STEP_LIMITS}
    return Deployment(
        num_prefill=args.prefill,
        num_decode=args.decode,
        prefill=WorkerSpec(prefill_model, prefill_capacity, **limits),
        decode=WorkerSpec(decode_model, decode_capacity, **limits),
        num_layers=config.num_layers,
        kv_bytes_per_token=shape.kv_bytes_per_token,
        link=Link(link_bytes),
        local_prefill_threshold=args.local_prefill_threshold,
        prefill_saturation=args.prefill_saturation,
        max_prefill_wait_s=args.max_prefill_wait_ms / 1000.0,
        gpus_per_worker=args.tp if args.hardware != "cpu" else 1,
    )


DEFAULT_RATE = 4.0


def build_traffic(args: argparse.Namespace) -> Traffic | TraceTraffic:
    if args.trace:
        traffic = TraceTraffic(tuple(load_trace(args.trace)), args.seed)
        return traffic.at_rate(args.rate) if args.rate else traffic
    return Traffic(
        args.rate or DEFAULT_RATE,
        args.num_requests,
        length_range(args.input_len, args.input_range_ratio),
        length_range(args.output_len, args.output_range_ratio),
        args.burstiness,
        args.seed,
    )


def simulate_report(
    deployment: Deployment, traffic: Traffic | TraceTraffic, slos: dict[str, float], args: argparse.Namespace
) -> dict:
    requests = traffic.requests()
    report = {
        "model": args.model,
        "hardware": args.hardware,
        "tp": args.tp,
        "slos_ms": slos,
        "traffic": {
            "rate": traffic.rate,
            "requests": len(requests),
            "trace": args.trace,
            "input_range": [min(r.input_len for r in requests), max(r.input_len for r in requests)],
            "output_range": [min(r.output_len for r in requests), max(r.output_len for r in requests)],
            "burstiness": None if args.trace else args.burstiness,
            "seed": args.seed,
        },
        "deployment": {
            "prefill": deployment.num_prefill,
            "decode": deployment.num_decode,
            "link_gbps": deployment.link.bytes_per_s * 8 / 1e9,
            "local_prefill_threshold": deployment.local_prefill_threshold,
            "max_prefill_wait_ms": deployment.max_prefill_wait_s * 1000.0,
            "kv_capacity_tokens": deployment.decode.kv_capacity_tokens,
        },
        "latency_model": _latency_facts(deployment, round(sum(r.input_len for r in requests) / len(requests))),
        "summary": attainment(deployment, traffic, slos),
    }
    if args.goodput:
        report["goodput_rps"] = max_goodput(deployment, traffic, slos)
    if args.gpu_budget:
        report.update(_split_search(deployment, traffic, slos, args))
    return report


def _latency_facts(deployment: Deployment, mean_input: int) -> dict:
    """Zero-load numbers of the models, to sanity-check them against intuition."""
    p, d = deployment.prefill.latency, deployment.decode.latency
    prefill = prefill_s(p, mean_input)
    return {
        "prefill_name": p.name,
        "decode_name": d.name,
        "input_tokens": mean_input,
        "prefill_ms": prefill * 1e3,
        "exposed_transfer_ms": deployment.exposed_transfer_s(prefill, mean_input) * 1e3,
        "decode_step_ms_batch1": decode_step_s(d, 1, mean_input) * 1e3,
        "decode_step_ms_batch32": decode_step_s(d, 32, mean_input) * 1e3,
    }


def _split_search(
    deployment: Deployment, traffic: Traffic | TraceTraffic, slos: dict[str, float], args: argparse.Namespace
) -> dict:
    results, best, goodput = search_splits(deployment, traffic, slos, args.gpu_budget)
    out = {"gpu_budget": args.gpu_budget, "splits": [r.to_json() for r in results], "recommended": None}
    if best:
        out["recommended"] = {
            "prefill": best.num_prefill,
            "decode": best.num_decode,
            "gpus": best.gpus,
            "goodput_rps": goodput,
        }
        aggregated = deployment.with_counts(0, best.num_prefill + best.num_decode)
        out["aggregated_same_gpus_goodput_rps"] = max_goodput(aggregated, traffic, slos)
    return out


def print_report(report: dict) -> None:
    facts, summary, deployment = report["latency_model"], report["summary"], report["deployment"]
    print(f"{'=' * 20} simulate: {report['model']} on {report['hardware']} {'=' * 20}")
    print(
        f"latency model: prefill {facts['input_tokens']} tok = {facts['prefill_ms']:.1f} ms "
        f"(+{facts['exposed_transfer_ms']:.2f} ms exposed KV transfer); "
        f"decode step = {facts['decode_step_ms_batch1']:.2f} ms @1, {facts['decode_step_ms_batch32']:.2f} ms @32"
    )
    print(
        f"deployment: {deployment['prefill']} prefill : {deployment['decode']} decode, link "
        f"{deployment['link_gbps']:.1f} Gb/s, "
        f"KV capacity {deployment['kv_capacity_tokens']} tokens/worker"
    )
    traffic = report["traffic"]
    print(
        f"traffic: {traffic['requests']} requests at {traffic['rate']:.2f}/s, input "
        f"{traffic['input_range'][0]}-{traffic['input_range'][1]}, "
        f"output {traffic['output_range'][0]}-{traffic['output_range'][1]} tokens"
        + (f" from {traffic['trace']}" if traffic["trace"] else "")
    )
    print(
        f"SLOs: TTFT <= {report['slos_ms']['ttft']:.0f} ms, TPOT <= {report['slos_ms']['tpot']:.0f} ms; "
        f"routing {summary['decisions']}"
    )
    for name in ("ttft", "tpot"):
        s = summary[f"{name}_ms"]
        if s["mean"] is not None:
            print(
                f"{name.upper() + ' (ms)':12} mean {s['mean']:.1f}  p50 {s['median']:.1f}  p90 {s['p90']:.1f} "
                f" p99 {s['p99']:.1f}"
            )
    print(
        f"SLO attainment {summary['slo_attainment']:.1%}  ({summary['completed']} completed, "
        f"{summary['failed']} failed)"
    )
    if "goodput_rps" in report:
        print(f"goodput (max rate at >= {ATTAINMENT_TARGET:.0%} attainment): {report['goodput_rps']:.2f} req/s")
    if "splits" in report:
        print(f"--- splits within {report['gpu_budget']} GPUs at {traffic['rate']:.2f} req/s ---")
        print(f"{'P:D':>7} {'GPUs':>5} {'attain':>7} {'TTFT p90':>9} {'TPOT p90':>9}")
        for split in report["splits"]:
            print(
                f"{split['prefill']:>3}:{split['decode']:<3} {split['gpus']:>5} {split['slo_attainment']:>7.1%} "
                f"{_ms(split['ttft_ms']['p90']):>9} {_ms(split['tpot_ms']['p90']):>9}"
            )
        best = report["recommended"]
        if best is None:
            print(
                f"recommended: none — no split within {report['gpu_budget']} GPUs reaches "
                f"{ATTAINMENT_TARGET:.0%} attainment"
            )
        else:
            print(
                f"recommended: {best['prefill']} prefill : {best['decode']} decode ({best['gpus']} GPUs), "
                f"goodput {best['goodput_rps']:.2f} req/s "
                f"vs {report['aggregated_same_gpus_goodput_rps']:.2f} with every GPU aggregated"
            )


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _run_validation(args: argparse.Namespace) -> int:
    report = validate(_load(args.validate), _load(args.profile))
    print_validation(report)
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"wrote {args.json_path}")
    return 0


def _run_transfer_table(args: argparse.Namespace) -> int:
    transports = (
        transfer.transports_from_report(args.transfer_json)
        if args.transfer_json
        else transfer.transports_from_flags(args.transport_gbps)
    )
    rows = transfer.table(
        transports,
        args.transfer_prompt_lens,
        step_overhead_s=args.step_overhead_ms / 1000,
        compute_efficiency=args.compute_efficiency,
        bandwidth_efficiency=args.bandwidth_efficiency,
    )
    print(
        f"Exposed KV transfer / TTFT of a lone prompt, layer-wise / whole-request push (roofline prefill: "
        f"{args.step_overhead_ms:g} ms step overhead, {args.compute_efficiency:.0%} of peak FLOP/s, "
        f"{args.bandwidth_efficiency:.0%} of peak HBM bytes/s):"
    )
    for t in transports:
        print(f"- {t.name}: {t.bytes_per_s * 8 / 1e9:.1f} Gb/s per GPU link ({t.source})")
    print(transfer.markdown(rows, transports))
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump({"transports": [vars(t) for t in transports], "rows": rows}, handle, indent=1)
        print(f"wrote {args.json_path}")
    return 0


def _load(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)
