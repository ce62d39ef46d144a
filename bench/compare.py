"""``splitserve bench compare``: aggregated vs disaggregated serving on this machine — same model,
workload and client (``bench serve``'s) — over a sweep of request rates::

    aggregated     client ─> router ─> decode worker, --threads 2: prefill chunks share steps with decodes
    disaggregated  client ─> router ─> prefill worker, --threads 1 ─KV─> decode worker, --threads 1
                                       (--local-prefill-threshold 0: every prompt goes to the prefill worker)

Both stacks are plain processes (``splitserve worker`` / ``splitserve router``) started once and
kept up for the whole sweep; an idle stack only answers health checks. At each rate the two
systems run back to back on the same requests and arrival times, the order alternating from rate
to rate, so machine noise hits both alike. Before the sweep, a few requests go to each system
one at a time: the zero-load latencies (the SLO defaults are set from them; ``simulate
--validate`` calibrates from them).

Goodput (DistServe): the highest rate at which >= 90% of requests meet both the TTFT and the TPOT
SLO. From a sweep it is interpolated linearly between the last rate that reaches 90% and the
first that does not; a system that reaches 90% at every rate has goodput >= the highest rate.
The report also gives the goodput ratio under other SLOs, judged on the same runs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import queue
import random
import re
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

import httpx

from bench.serve_bench import BenchRequest, RequestRecord, meets, random_dataset, run_load, summarize

ATTAINMENT_TARGET = 0.9
GOODPUT_RATIO_TARGET = 1.3
START_TIMEOUT_S = 240.0
WARMUP_REQUESTS = 2
ZERO_LOAD_REQUESTS = 3
SENSITIVITY_TTFT_MS = (3000.0, 4000.0, 6000.0)
SENSITIVITY_TPOT_MS = (50.0, 60.0, 80.0, 100.0)
RECORD_FIELDS = {f.name for f in dataclasses.fields(RequestRecord)}
FIRST_REGULAR_TOKEN = 3  # ids below are pad/bos/eos in the presets' byte vocabulary


@dataclass(frozen=True)
class System:
    name: str
    prefill_workers: int
    decode_workers: int
    prefill_threads: int | None
    decode_threads: int
    local_prefill_threshold: int


AGGREGATED = System("aggregated", 0, 1, None, 2, 0)
DISAGGREGATED = System("disaggregated", 1, 1, 1, 1, 0)


@dataclass(frozen=True)
class CompareConfig:
    model: str
    dtype: str
    rates: tuple[float, ...]
    num_prompts: int  # at least this many requests per rate and system
    duration_s: float  # ... and as many as arrive in this long at the rate
    input_len: int
    input_range_ratio: float
    output_range: tuple[int, int]
    slos: dict  # milliseconds: {"ttft": ..., "tpot": ...}
    burstiness: float
    seed: int
    kv_cache_mb: int
    max_num_batched_tokens: int
    vocab_size: int
    json_path: str | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CompareConfig:
        quick = (
            dict(rates="1,2", num_prompts=4, duration_s=0.0, input_len=64, output_range="4,8", kv_cache_mb=64)
            if args.quick
            else {}
        )

        def pick(name: str):
            return quick.get(name, getattr(args, name))

        low, high = (int(part) for part in pick("output_range").split(","))
        return cls(
            args.model,
            args.dtype,
            tuple(float(r) for r in pick("rates").split(",")),
            pick("num_prompts"),
            pick("duration_s"),
            pick("input_len"),
            args.input_range_ratio,
            (low, high),
            {"ttft": args.ttft_slo_ms, "tpot": args.tpot_slo_ms},
            args.burstiness,
            args.seed,
            pick("kv_cache_mb"),
            args.max_num_batched_tokens,
            args.vocab_size,
            args.json_path,
        )

    def count_at(self, rate: float) -> int:
        """Requests per run: enough that a busy run lasts ``duration_s`` (queues build over time)."""
        return max(self.num_prompts, round(rate * self.duration_s))

    def requests(self, count: int, seed: int) -> list[BenchRequest]:
        """``bench serve``'s random prompts; output lengths drawn uniformly from ``output_range``."""
        prompts = random_dataset(count, self.input_len, 1, self.input_range_ratio, 0, self.vocab_size, seed)
        rng = random.Random(seed + 1)
        return [dataclasses.replace(r, output_len=rng.randint(*self.output_range)) for r in prompts]


def salted(requests: list[BenchRequest], salt: int) -> list[BenchRequest]:
    """The same lengths with a different first token: block hashes chain from the first block, so
    no run finds another run's prompts in a worker's prefix cache."""
    return [dataclasses.replace(r, prompt=[FIRST_REGULAR_TOKEN + salt, *r.prompt[1:]]) for r in requests]


# -- processes -------------------------------------------------------------------------------------


class Process:
    """A ``splitserve`` child process, waited for until it prints its ready line, then drained."""

    def __init__(self, name: str, argv: list[str], ready: str, threads: int | None = None) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.name = name
        self.ready = ready
        self.tail: deque[str] = deque(maxlen=40)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.tail.append(line.rstrip())
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> str:
        """The ready line; raises with the process's last output if it exits or times out first."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.process.wait()}):\n" + "\n".join(self.tail))
            if self.ready in line:
                threading.Thread(target=self._discard, daemon=True).start()
                return line.strip()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n" + "\n".join(self.tail))

    def _discard(self) -> None:
        while self._lines.get() is not None:
            pass

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@dataclass
class Stack:
    system: System
    processes: list[Process]
    base_url: str = ""


def start_stacks(config: CompareConfig, systems: list[System]) -> list[Stack]:
    """Every worker of every system starts at once; then every router."""
    stacks = [Stack(system, []) for system in systems]
    try:
        addresses = {}
        for stack in stacks:
            for role, count, threads in (
                ("prefill", stack.system.prefill_workers, stack.system.prefill_threads),
                ("decode", stack.system.decode_workers, stack.system.decode_threads),
            ):
                for index in range(count):
                    argv = [
                        "worker",
                        role,
                        "--model",
                        config.model,
                        "--dtype",
                        config.dtype,
                        "--threads",
                        str(threads),
                        "--port",
                        "0",
                        "--kv-cache-mb",
                        str(config.kv_cache_mb),
                        "--max-num-batched-tokens",
                        str(config.max_num_batched_tokens),
                    ]
                    stack.processes.append(
                        Process(f"{stack.system.name} {role} worker {index}", argv, "READY ", threads)
                    )
        for stack in stacks:
            for process in stack.processes:
                addresses[process.name] = json.loads(process.wait_ready().split("READY ", 1)[1])["address"]
        routers = []
        for stack in stacks:
            prefill = [addresses[p.name] for p in stack.processes if " prefill " in p.name]
            decode = [addresses[p.name] for p in stack.processes if " decode " in p.name]
            argv = [
                "router",
                "--model",
                config.model,
                "--decode",
                *decode,
                "--port",
                "0",
                "--grpc-port",
                "0",
                "--local-prefill-threshold",
                str(stack.system.local_prefill_threshold),
                "--log-level",
                "WARNING",
            ]
            if prefill:
                argv[3:3] = ["--prefill", *prefill]
            router = Process(f"{stack.system.name} router", argv, "OpenAI API at")
            stack.processes.append(router)
            routers.append((stack, router))
        for stack, router in routers:
            stack.base_url = re.search(r"OpenAI API at (\S+/v1)", router.wait_ready()).group(1).rstrip(",")
        return stacks
    except BaseException:
        stop_stacks(stacks)
        raise


def stop_stacks(stacks: list[Stack]) -> None:
    for stack in stacks:
        for process in reversed(stack.processes):
            process.stop()


# -- the sweep -------------------------------------------------------------------------------------


def run_system(
    stack: Stack,
    config: CompareConfig,
    requests: list[BenchRequest],
    rate: float,
    arrival_seed: int,
    max_concurrency: int | None = None,
) -> dict:
    load_before = os.getloadavg()[0]
    decisions_before = routing_decisions(stack)
    records, duration = asyncio.run(
        run_load(stack.base_url, config.model, requests, rate, config.burstiness, max_concurrency, 0, arrival_seed)
    )
    decisions = {
        k: v - decisions_before.get(k, 0) for k, v in routing_decisions(stack).items() if v > decisions_before.get(k, 0)
    }
    summary = summarize(records, duration, config.slos)
    first = min((r.start for r in records), default=0.0)
    rows = [dict(asdict(r), start=r.start - first, tpot=r.tpot) for r in records]
    return {
        "system": stack.system.name,
        "rate": rate,
        "load_1min_before": load_before,
        "routing": decisions,
        "summary": summary,
        "requests": rows,
    }


def routing_decisions(stack: Stack) -> dict[str, float]:
    """The router's routing-decision counters (Prometheus), by decision."""
    text = httpx.get(stack.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^splitserve_routing_decisions_total\{decision="(\w+)"\} (\S+)$', text, re.M)
    }


def zero_load(stacks: list[Stack], config: CompareConfig) -> dict:
    """Warm-up, then ``ZERO_LOAD_REQUESTS`` requests one at a time per system: the latencies
    with no queueing and no interference (``simulate --validate`` calibrates from them)."""
    probes = salted(config.requests(ZERO_LOAD_REQUESTS, config.seed + 2000), len(config.rates))
    out = {}
    for stack in stacks:
        warmup = config.requests(WARMUP_REQUESTS, config.seed + 1000)
        asyncio.run(run_load(stack.base_url, config.model, warmup, float("inf"), 1.0, None, 0, config.seed))
        out[stack.system.name] = run_system(stack, config, probes, float("inf"), config.seed, max_concurrency=1)
        s = out[stack.system.name]["summary"]
        print(
            f"zero load, {stack.system.name}: TTFT p50 {_fmt(s['ttft_ms']['median'])} ms, TPOT p50 "
            f"{_fmt(s['tpot_ms']['median'])} ms",
            flush=True,
        )
    return out


def sweep(stacks: list[Stack], config: CompareConfig) -> list[dict]:
    base = config.requests(max(config.count_at(rate) for rate in config.rates), config.seed)
    runs = []
    for index, rate in enumerate(config.rates):
        # Both systems of a rate get the same prompts and arrival times; each rate its own arrival
        # draw, and its own first token so no run finds another's prompts in a prefix cache.
        requests = salted(base[: config.count_at(rate)], index)
        order = stacks if index % 2 == 0 else stacks[::-1]
        for stack in order:
            print(f"rate {rate:g} req/s: {stack.system.name} ({len(requests)} requests) ...", flush=True)
            run = run_system(stack, config, requests, rate, config.seed + index)
            s = run["summary"]
            print(
                f"  attainment {s['slo_attainment']:.0%}, TTFT p50 {_fmt(s['ttft_ms']['median'])} ms, TPOT "
                f"p50 {_fmt(s['tpot_ms']['median'])} ms, "
                f"load {run['load_1min_before']:.2f}",
                flush=True,
            )
            runs.append(run)
    return runs


def goodput(points: list[tuple[float, float]], target: float = ATTAINMENT_TARGET) -> dict:
    """From (rate, attainment) points: the highest swept rate with attainment >= ``target``,
    interpolated linearly towards the next (failing) rate. ``bound`` says if it is a bound only;
    ``monotone`` is False when a lower rate failed (noise: a burst of arrivals, a busy machine)."""
    points = sorted(points)
    passing = [i for i, (_, attained) in enumerate(points) if attained >= target]
    if not passing:
        return {
            "rps": 0.0,
            "low": 0.0,
            "high": points[0][0],
            "highest_passing_rate": None,
            "monotone": True,
            "bound": f"< {points[0][0]:g} (fails at every rate swept)",
        }
    last = passing[-1]
    rate, attained = points[last]
    monotone = len(passing) == last + 1
    if last == len(points) - 1:
        return {
            "rps": rate,
            "low": rate,
            "high": float("inf"),
            "highest_passing_rate": rate,
            "monotone": monotone,
            "bound": f">= {rate:g} (passes at the highest rate swept)",
        }
    next_rate, next_attained = points[last + 1]
    interpolated = rate + (next_rate - rate) * (attained - target) / (attained - next_attained)
    return {
        "rps": interpolated,
        "low": interpolated,
        "high": interpolated,
        "highest_passing_rate": rate,
        "monotone": monotone,
        "bound": None,
    }


def goodputs(runs: list[dict], systems: list[System], slos: dict) -> dict:
    """Goodput per system under ``slos``, judged on the runs' per-request records."""
    out = {}
    for system in systems:
        points = []
        for run in (r for r in runs if r["system"] == system.name):
            records = [RequestRecord(**{k: v for k, v in row.items() if k in RECORD_FIELDS}) for row in run["requests"]]
            points.append((run["rate"], sum(meets(r, slos) for r in records) / len(records)))
        out[system.name] = goodput(points)
    return out


def ratio_of(good: dict) -> dict:
    """Disaggregated / aggregated goodput, as bounds where a goodput is only a bound."""
    aggregated, disaggregated = good[AGGREGATED.name], good[DISAGGREGATED.name]
    low = disaggregated["low"] / aggregated["high"] if aggregated["high"] else float("inf")
    high = disaggregated["high"] / aggregated["low"] if aggregated["low"] else float("inf")
    return {"low": low, "high": high}


def _ratio_text(ratio: dict) -> str:
    low, high = ratio["low"], ratio["high"]
    if low == high:
        return f"{low:.2f}x"
    if high == float("inf"):
        return f">= {low:.2f}x"
    return f"<= {high:.2f}x" if low == 0 else f"{low:.2f}-{high:.2f}x"


def sensitivity(runs: list[dict], systems: list[System]) -> list[dict]:
    """The goodput ratio had other SLOs been chosen, from the same runs."""
    rows = []
    for ttft in SENSITIVITY_TTFT_MS:
        for tpot in SENSITIVITY_TPOT_MS:
            good = goodputs(runs, systems, {"ttft": ttft, "tpot": tpot})
            rows.append({"ttft_ms": ttft, "tpot_ms": tpot, "goodput": good, "ratio": ratio_of(good)})
    return rows


def build_report(config: CompareConfig, systems: list[System], probes: dict, runs: list[dict], seconds: float) -> dict:
    good = goodputs(runs, systems, config.slos)
    ratio = ratio_of(good)
    config_json = {k: v for k, v in asdict(config).items() if k != "json_path"}
    config_json["systems"] = {s.name: asdict(s) for s in systems}
    return {
        "config": config_json,
        "machine": {"cpu_count": os.cpu_count(), "wall_seconds": seconds},
        "zero_load": probes,
        "runs": runs,
        "goodput": good,
        "goodput_ratio": ratio,
        "sensitivity": sensitivity(runs, systems),
        "target": {"ratio": GOODPUT_RATIO_TARGET, "met": ratio["low"] >= GOODPUT_RATIO_TARGET},
    }


def print_report(report: dict) -> None:
    config = report["config"]
    print(f"{'=' * 20} bench compare: {config['model']} {config['dtype']}, aggregated vs disaggregated {'=' * 20}")
    low, high = (
        int(config["input_len"] * (1 - config["input_range_ratio"])),
        int(config["input_len"] * (1 + config["input_range_ratio"])),
    )
    counts = sorted({len(run["requests"]) for run in report["runs"]})
    print(
        f"workload: {counts[0]}-{counts[-1]} requests/run, input {low}-{high} tokens, output "
        f"{config['output_range'][0]}-{config['output_range'][1]}, "
        f"Poisson arrivals (burstiness {config['burstiness']}); SLOs: TTFT <= {config['slos']['ttft']:.0f} "
        f"ms, TPOT <= {config['slos']['tpot']:.0f} ms"
    )
    print(
        f"{'rate':>5} {'system':15} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
        f"{'attain':>7} {'done':>5} {'load':>5}  routing"
    )
    zero = [dict(run, rate=0.0) for run in report["zero_load"].values()]
    for run in sorted(zero + report["runs"], key=lambda r: r["rate"]):
        s = run["summary"]
        print(
            f"{run['rate'] or 'zero':>5} {run['system']:15} {_fmt(s['ttft_ms']['median']):>9} "
            f"{_fmt(s['ttft_ms']['p99']):>9} "
            f"{_fmt(s['tpot_ms']['median']):>9} {_fmt(s['tpot_ms']['p99']):>9} {s['slo_attainment']:>7.0%} "
            f"{s['completed']:>5} {run['load_1min_before']:>5.2f}  "
            f"{','.join(f'{k}:{v:.0f}' for k, v in run['routing'].items())}"
        )
    print("zero: the zero-load requests, sent one at a time; load: 1-minute load average before the run")
    for name, good in report["goodput"].items():
        notes = [good["bound"]] if good["bound"] else []
        notes += [] if good["monotone"] else ["attainment dips below 90% at a lower rate"]
        print(
            f"goodput @{ATTAINMENT_TARGET:.0%} attainment, {name:14}: {good['rps']:.3f} req/s"
            + (f"  ({'; '.join(notes)})" if notes else "")
        )
    ratio, target = report["goodput_ratio"], report["target"]
    for name, warnings in report.get("router_warnings", {}).items():
        if warnings:
            print(f"router warnings, {name} ({len(warnings)}, last): {warnings[-1]}")
    print(
        f"disaggregated / aggregated goodput: {_ratio_text(ratio)} (target >= {target['ratio']}x: "
        f"{'met' if target['met'] else 'NOT met'})"
    )
    print("the ratio under other SLOs, from the same runs (rows: TTFT SLO ms, columns: TPOT SLO ms):")
    print(f"{'':>8}" + "".join(f"{tpot:>11.0f}" for tpot in SENSITIVITY_TPOT_MS))
    for ttft in SENSITIVITY_TTFT_MS:
        cells = [row for row in report["sensitivity"] if row["ttft_ms"] == ttft]
        print(f"{ttft:>8.0f}" + "".join(f"{_ratio_cell(row):>11}" for row in cells))


def _ratio_cell(row: dict) -> str:
    return _ratio_text(row["ratio"]).removesuffix("x").replace(" ", "")


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def run(args: argparse.Namespace) -> int:
    config = CompareConfig.from_args(args)
    systems = [AGGREGATED, DISAGGREGATED]
    started = time.perf_counter()
    stacks = start_stacks(config, systems)
    try:
        probes = zero_load(stacks, config)
        runs = sweep(stacks, config)
    finally:
        stop_stacks(stacks)
    report = build_report(config, systems, probes, runs, time.perf_counter() - started)
    # e.g. "worker marked unhealthy": the router then prefills locally, which the routing counts show
    report["router_warnings"] = {
        s.system.name: [line for p in s.processes if p.name.endswith("router") for line in p.tail if "WARNING" in line]
        for s in stacks
    }
    print_report(report)
    if config.json_path:
        with open(config.json_path, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"wrote {config.json_path}")
    return 0 if all(r["summary"]["completed"] for r in runs) else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="bench-125m")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rates", default="0.25,0.5,0.75,1.0", help="requests/s, comma-separated")
    parser.add_argument("--num-prompts", type=int, default=20, help="at least this many requests per rate and system")
    parser.add_argument(
        "--duration-s", type=float, default=40.0, help="... or as many as arrive in this long at the rate, if more"
    )
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--input-range-ratio", type=float, default=0.5, help="inputs uniform in len * [1 - r, 1 + r]")
    parser.add_argument("--output-range", default="32,64", help="outputs uniform in LOW,HIGH tokens")
    # Each default SLO is twice the slower system's zero-load latency here (TTFT of a 1536-token
    # prompt on the 1-thread prefill worker ~1.9 s; median TPOT of the 2-thread aggregated worker
    # ~40 ms): both systems meet both at zero load with room; prefills mixed into decodes break TPOT.
    parser.add_argument("--ttft-slo-ms", type=float, default=4000.0)
    parser.add_argument("--tpot-slo-ms", type=float, default=80.0)
    parser.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-mb", type=int, default=512, help="KV pool of each worker")
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="every worker's step token budget; longer prompts prefill in chunks. Small enough that a step "
        "stays well under the router's 2 s Stats deadline, which marks a slower worker unhealthy",
    )
    parser.add_argument("--vocab-size", type=int, default=256, help="prompt token ids are drawn from [3, vocab)")
    parser.add_argument("--quick", action="store_true", help="a tiny run: 2 rates x 4 short requests")
    parser.add_argument("--json", dest="json_path", default=None)
