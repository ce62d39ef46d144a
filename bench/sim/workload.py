"""Traffic for the simulator: arrival times with input and output lengths.

Either drawn (Poisson or gamma arrivals as ``bench serve`` sends them, uniform lengths as its
random dataset draws them) or read from a trace file, one request a row::

    arrival_s,input_len,output_len          (CSV with this header, or JSON / JSON Lines objects
    0.000,1024,48                            with these keys; arrival_s from the trace's start)
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from bench.serve_bench import arrival_gaps


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_len: int
    output_len: int


@dataclass(frozen=True)
class Traffic:
    """A synthetic workload: ``count`` requests at ``rate``/s, lengths uniform in their ranges."""

    rate: float
    count: int
    input_range: tuple[int, int]
    output_range: tuple[int, int]
    burstiness: float = 1.0
    seed: int = 0

    def requests(self) -> list[TraceRequest]:
        rng = random.Random(self.seed)
        arrival, trace = 0.0, []
        for gap in arrival_gaps(self.count, self.rate, self.burstiness, self.seed):
            arrival += gap
            trace.append(TraceRequest(arrival, rng.randint(*self.input_range), rng.randint(*self.output_range)))
        return trace

    def at_rate(self, rate: float) -> Traffic:
        return Traffic(rate, self.count, self.input_range, self.output_range, self.burstiness, self.seed)


@dataclass(frozen=True)
class TraceTraffic:
    """Requests from a trace; ``at_rate`` stretches or squeezes its arrivals (the goodput search)."""

    trace: tuple[TraceRequest, ...]
    seed: int = 0

    @property
    def rate(self) -> float:
        span = self.trace[-1].arrival_s - self.trace[0].arrival_s if self.trace else 0.0
        return (len(self.trace) - 1) / span if span > 0 else float("inf")

    @property
    def count(self) -> int:
        return len(self.trace)

    def requests(self) -> list[TraceRequest]:
        return list(self.trace)

    def at_rate(self, rate: float) -> TraceTraffic:
        return TraceTraffic(tuple(scale_trace(list(self.trace), rate)), self.seed)


def length_range(mean: int, range_ratio: float) -> tuple[int, int]:
    """[mean (1 - r), mean (1 + r)], as ``bench serve``'s random dataset draws lengths."""
    return max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))


def load_trace(path: str) -> list[TraceRequest]:
    text = Path(path).read_text()
    if path.endswith(".csv"):
        rows = list(csv.DictReader(text.splitlines()))
    elif text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    try:
        trace = [TraceRequest(float(r["arrival_s"]), int(r["input_len"]), int(r["output_len"])) for r in rows]
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: each row needs arrival_s, input_len, output_len ({exc})") from exc
    return sorted(trace, key=lambda r: r.arrival_s)


def scale_trace(trace: list[TraceRequest], rate: float) -> list[TraceRequest]:
    """The same requests, arrivals stretched or squeezed to ``rate`` requests/s on average."""
    if len(trace) < 2 or trace[-1].arrival_s <= trace[0].arrival_s:
        return trace
    factor = (len(trace) - 1) / (trace[-1].arrival_s - trace[0].arrival_s) / rate
    first = trace[0].arrival_s
    return [TraceRequest((r.arrival_s - first) * factor, r.input_len, r.output_len) for r in trace]
