"""Replays the runs of a ``bench compare`` report through the simulator and sets the predicted
TTFT and TPOT (p50, p90) beside the measured ones.

Each run is replayed as it happened: the same arrival times (as sent), prompt and output lengths,
worker counts, threads and token budget; the latency models are the ``bench profile`` fits for
the threads each worker ran with; the link is the profile's measured KV bytes/s.
"""

from __future__ import annotations

from bench.serve_bench import summarize
from bench.sim.cluster import Deployment, Link, WorkerSpec, simulate
from bench.sim.hardware import resolve_model
from bench.sim.latency import FittedModel, ModelShape
from bench.sim.workload import TraceRequest

TOLERANCE = 0.15
METRICS = (("ttft_ms", "median"), ("ttft_ms", "p90"), ("tpot_ms", "median"), ("tpot_ms", "p90"))


def deployment_for(system: dict, config: dict, profile: dict) -> Deployment:
    """The simulated twin of one ``bench compare`` system (its ``config.systems`` entry)."""
    shape = ModelShape.of(resolve_model(config["model"]), config["dtype"])
    capacity = config["kv_cache_mb"] * 1024 * 1024 // shape.kv_bytes_per_token
    budget = config["max_num_batched_tokens"]

    def spec(threads: int) -> WorkerSpec:
        return WorkerSpec(FittedModel.from_profile(profile, threads), capacity, budget)

    return Deployment(
        num_prefill=system["prefill_workers"], num_decode=system["decode_workers"],
        prefill=spec(system["prefill_threads"] or system["decode_threads"]), decode=spec(system["decode_threads"]),
        num_layers=resolve_model(config["model"]).num_layers, kv_bytes_per_token=shape.kv_bytes_per_token,
        link=Link(profile["transfer"]["bytes_per_s"]), local_prefill_threshold=system["local_prefill_threshold"],
    )


def trace_of(run: dict) -> list[TraceRequest]:
    return sorted((TraceRequest(r["start"], r["prompt_len"], r["output_len"]) for r in run["requests"]), key=lambda r: r.arrival_s)


def validate(compare: dict, profile: dict) -> dict:
    config = compare["config"]
    slos = config["slos"]
    rows = []
    for run in compare["runs"]:
        deployment = deployment_for(config["systems"][run["system"]], config, profile)
        result = simulate(deployment, trace_of(run), config["seed"])
        predicted = summarize(result.records, result.duration_s, slos)
        rows.append(_row(run, run["summary"], predicted))
    errors = [abs(row[f"{name}_{stat}"]["error"]) for row in rows for name, stat in METRICS if row[f"{name}_{stat}"]["error"] is not None]
    within = sum(e <= TOLERANCE for e in errors)
    return {"tolerance": TOLERANCE, "rows": rows, "within_tolerance": within, "compared": len(errors),
            "median_abs_error": sorted(errors)[len(errors) // 2] if errors else None}


def _row(run: dict, measured: dict, predicted: dict) -> dict:
    row = {"system": run["system"], "rate": run["rate"],
           "attainment": {"measured": measured.get("slo_attainment"), "predicted": predicted.get("slo_attainment")}}
    for name, stat in METRICS:
        have, want = measured[name][stat], predicted[name][stat]
        error = (want - have) / have if have and want is not None else None
        row[f"{name}_{stat}"] = {"measured": have, "predicted": want, "error": error}
    return row


def print_validation(report: dict) -> None:
    print(f"{'=' * 20} simulated vs measured (bench compare) {'=' * 20}")
    header = f"{'system':15} {'rate':>5} " + " ".join(f"{n.split('_')[0].upper() + ' ' + ('p50' if s == 'median' else s):>22}" for n, s in METRICS)
    print(header + f" {'attain meas/pred':>17}")
    for row in report["rows"]:
        cells = []
        for name, stat in METRICS:
            cell = row[f"{name}_{stat}"]
            error = f"{cell['error']:+.0%}" if cell["error"] is not None else "n/a"
            cells.append(f"{_ms(cell['measured'])}/{_ms(cell['predicted'])} {error:>5}".rjust(22))
        attain = row["attainment"]
        print(f"{row['system']:15} {row['rate']:5.2f} " + " ".join(cells) + f" {attain['measured']:>8.0%}/{attain['predicted']:.0%}")
    print(f"cells are measured/predicted ms and the prediction's error; within {report['tolerance']:.0%}: "
          f"{report['within_tolerance']} of {report['compared']}, median |error| {report['median_abs_error']:.0%}")


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"
