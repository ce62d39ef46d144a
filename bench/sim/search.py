"""Searches over the simulator: the highest rate a deployment sustains (goodput), and the
prefill:decode split to deploy on a GPU budget.

Goodput follows DistServe: the highest request rate at which at least ``target`` (90%) of requests
meet both the TTFT and the TPOT SLO.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.serve_bench import summarize
from bench.sim.cluster import Deployment, simulate
from bench.sim.workload import TraceTraffic, Traffic

ATTAINMENT_TARGET = 0.9


def attainment(deployment: Deployment, traffic: Traffic | TraceTraffic, slos: dict[str, float]) -> dict:
    """``bench serve``'s summary (milliseconds) of one simulated run, plus the routing decisions."""
    result = simulate(deployment, traffic.requests(), traffic.seed)
    summary = summarize(result.records, result.duration_s, slos)
    summary["decisions"] = result.decisions
    return summary


def max_goodput(
    deployment: Deployment,
    traffic: Traffic | TraceTraffic,
    slos: dict[str, float],
    target: float = ATTAINMENT_TARGET,
    low: float = 0.01,
    iterations: int = 8,
) -> float:
    """The highest rate with attainment >= target: doubles until it fails, then bisects.
    Arrivals at every rate are the same draws scaled, so attainment falls (nearly) monotonically."""

    def passes(rate: float) -> bool:
        return attainment(deployment, traffic.at_rate(rate), slos)["slo_attainment"] >= target

    if not passes(low):
        return 0.0
    high = low * 2
    while passes(high):
        low, high = high, high * 2
        if high > 1e6:
            return float("inf")
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if passes(middle) else (low, middle)
    return low


@dataclass(frozen=True)
class SplitResult:
    num_prefill: int
    num_decode: int
    gpus: int
    summary: dict

    @property
    def attainment(self) -> float:
        return self.summary["slo_attainment"]

    def to_json(self) -> dict:
        return {
            "prefill": self.num_prefill,
            "decode": self.num_decode,
            "gpus": self.gpus,
            "slo_attainment": self.attainment,
            "ttft_ms": self.summary["ttft_ms"],
            "tpot_ms": self.summary["tpot_ms"],
            "decisions": self.summary["decisions"],
        }


def search_splits(
    deployment: Deployment,
    traffic: Traffic | TraceTraffic,
    slos: dict[str, float],
    gpu_budget: int,
    target: float = ATTAINMENT_TARGET,
) -> tuple[list[SplitResult], SplitResult | None, float | None]:
    """Every split with at least one decode worker within ``gpu_budget`` GPUs (0 prefill workers:
    every decode worker prefills its own prompts), at ``traffic``'s rate.

    Recommended: of the feasible splits (attainment >= target) with the fewest GPUs, the one with
    the highest goodput (so the most room to grow), ties to the higher attainment. Returns every
    split, the recommended one (None if none is feasible) and its goodput."""
    workers = gpu_budget // deployment.gpus_per_worker
    results = []
    for total in range(1, workers + 1):
        for num_prefill in range(total):
            candidate = deployment.with_counts(num_prefill, total - num_prefill)
            results.append(
                SplitResult(num_prefill, total - num_prefill, candidate.gpus, attainment(candidate, traffic, slos))
            )
    feasible = [r for r in results if r.attainment >= target]
    if not feasible:
        return results, None, None
    fewest = min(r.gpus for r in feasible)
    scored = [
        (max_goodput(deployment.with_counts(r.num_prefill, r.num_decode), traffic, slos, target), r.attainment, r)
        for r in feasible
        if r.gpus == fewest
    ]
    goodput, _, best = max(scored, key=lambda item: item[:2])
    return results, best, goodput
