"""``splitserve bench compare``: aggregated vs disaggregated serving on this machine — same model,
workload and client (``bench serve``'s) — over a sweep of request rates, on equal hardware: the
same number of engine processes with the same threads on both sides (DistServe compares per GPU;
here an engine is one process of ``ENGINE_THREADS`` torch threads)::

    aggregated     client ─> router ─┬─> engine A (decode worker)  each prefills its own prompts, chunks
                                     └─> engine B (decode worker)  sharing steps with its decodes
    disaggregated  client ─> router ─> prefill worker ─KV─> decode worker
                                       (--local-prefill-threshold 0: every prompt goes to the prefill worker,
                                       unless it would wait there longer than the TTFT SLO allows: then the
                                       decode worker prefills it, if it has less queued; --max-prefill-wait-ms)

(``--aggregated one-engine``: one aggregated engine with both engines' threads instead of two.)
Both stacks are plain processes (``splitserve worker`` / ``splitserve router``) started once and
kept up for the whole sweep; an idle stack only answers health checks. At each rate the two
systems run back to back on the same requests and arrival times, the order alternating from rate
to rate, so machine noise hits both alike.

The same command tells the same story on any CPU because nothing in it is an absolute time; all
is measured here first, on requests sent one at a time to the aggregated stack (one engine, no
other request: the reference with no disaggregation and no interference):

1. sizing (``--input-len auto``): a short prompt gives prefill seconds per token and TPOT; the
   mean prompt is sized so its prefill lasts ``PREFILL_IN_DECODE_STEPS`` decode steps — what one
   mixed-in prompt stalls the decodes beside it, the interference disaggregation removes.
2. SLOs (DistServe's SLO scale): mean-length requests alone give the zero-load TTFT (prefill only)
   and TPOT (decode only) of one engine; TTFT SLO = scale x that TTFT, TPOT SLO = scale x that
   TPOT, one scale for both and one pair of SLOs for both systems. The disaggregated stack's own
   zero-load TTFT is the same prefill plus the KV transfer: disaggregation's price, charged to it.
3. rates (``--rates auto``): fractions of one engine's prefill capacity, 1 / the disaggregated
   stack's zero-load TTFT, in steps of 0.1 so that goodput is resolved to ~10% of it; past the last
   fraction the sweep goes on in the same steps while either system still meets the SLOs, up to
   ``MAX_RATE_FRACTION`` (two engines' worth), so both goodputs are measured, not bounded.
4. the disaggregated router's ``--max-prefill-wait-ms`` (auto): the TTFT SLO less that stack's
   zero-load TTFT, the queueing a remote prefill can afford; a prompt that would wait longer behind
   the prefill worker's backlog is prefilled on the decode worker, if it has less queued
   (conditional disaggregation). ``0``: every prompt on the prefill worker.

Goodput (DistServe): the highest rate at which >= 90% of requests meet both the TTFT and the TPOT
SLO. From a sweep it is interpolated linearly between the last rate that reaches 90% and the
first that does not; a system that reaches 90% at every rate has goodput >= the highest rate.
The ratio is disaggregated / aggregated goodput from the same runs; the report also gives, from
those runs, attainment and goodput at other SLO scales and with the two scales apart.

What the machine allows: each system's cores busy (the whole machine's, router and client
included) against the requests/s it completed, fitted over the sweep as idle + per-request cores,
reach every core at that system's CPU ceiling. At the CPU per request measured, no schedule serves
more requests/s than that, so the disaggregated stack's ceiling over the aggregated stack's goodput
bounds the ratio this machine allows; a bound below the target says more cores or less CPU per
request are needed, not a better schedule of the same work.
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
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

import httpx

from bench.args import (
    Given,
    int_at_least,
    int_range,
    list_of,
    non_negative_float,
    or_word,
    positive_float,
    positive_int,
    refuse_beside_quick,
    share,
)
from bench.serve_bench import BenchRequest, RequestRecord, meets, random_dataset, run_load, summarize
from bench.sim.host import CpuMeter
from engine.config import DTYPES, add_prefill_chunk_argument
from engine.threads import engine_thread_name
from protos.cluster_auth import ensure_secret_in_env

ATTAINMENT_TARGET = 0.9
GOODPUT_RATIO_TARGET = 1.3
START_TIMEOUT_S = 240.0
WARMUP_REQUESTS = 2
ZERO_LOAD_REQUESTS = 3
TOGETHER_ROUNDS = 4  # of the baseline's zero-load requests sent as many at once as it has engines
SIZING_PROMPT_LEN = 256
SIZING_OUTPUT_LEN = 16
# The mean prompt's prefill on an aggregated engine, in its decode steps: a mixed-in prompt stalls
# the decodes beside it for about this many of their steps (on this machine kind, one thread:
# 0.34-0.45 ms/token beside 24-37 ms decode steps, as busy as the rest of the machine leaves it,
# gives ~1300-1700 tokens).
PREFILL_IN_DECODE_STEPS = 20.0
INPUT_LEN_BOUNDS = (128, 4096)
MAX_RATE_FRACTION = 2.0  # of one engine's prefill capacity: the sweep's ceiling (two engines' worth)
SLO_SCALES = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
GRID_TTFT_SCALES = (2.0, 4.0, 6.0, 8.0, 12.0)  # the ratio with the TTFT and TPOT scales apart
GRID_TPOT_SCALES = (1.5, 2.0, 3.0, 4.0, 6.0)
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
    max_prefill_wait_ms: float = 0.0  # the router's; the disaggregated stack gets its own once the SLOs are known


ENGINE_THREADS = 1
AGGREGATED_NAME, DISAGGREGATED_NAME = "aggregated", "disaggregated"
DISAGGREGATED = System(DISAGGREGATED_NAME, 1, 1, ENGINE_THREADS, ENGINE_THREADS, 0)
AGGREGATED_LAYOUTS = {
    # as many aggregated engines as the disaggregated stack has, each as big (the default)
    "replicas": System(AGGREGATED_NAME, 0, 2, None, ENGINE_THREADS, 0),
    # one aggregated engine with all their threads
    "one-engine": System(AGGREGATED_NAME, 0, 1, None, 2 * ENGINE_THREADS, 0),
}
BASELINE_NAME = AGGREGATED_NAME  # its zero-load latencies set the SLOs of both systems


@dataclass(frozen=True)
class CompareConfig:
    """What was asked; ``None`` input_len / rates: sized from this machine (``Plan``)."""

    model: str
    dtype: str
    aggregated: str  # a key of AGGREGATED_LAYOUTS
    rates: tuple[float, ...] | None
    rate_fractions: tuple[float, ...]
    num_prompts: int  # at least this many requests per rate and system
    duration_s: float  # ... and as many as arrive in this long at the rate
    input_len: int | None
    input_range_ratio: float
    output_range: tuple[int, int]
    slo_scale: float
    max_prefill_wait_ms: float | None  # None: the TTFT SLO's slack over the disaggregated stack's zero-load TTFT
    burstiness: float
    seed: int
    kv_cache_mb: int
    max_num_batched_tokens: int
    prefill_chunk_beside_decodes: int | None  # every worker's; None: the whole step budget
    vocab_size: int
    json_path: str | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CompareConfig:
        sizes = QUICK if args.quick else {name: getattr(args, name) for name in QUICK}
        return cls(
            args.model,
            args.dtype,
            args.aggregated,
            None if sizes["rates"] == "auto" else sizes["rates"],
            args.rate_fractions,
            sizes["num_prompts"],
            sizes["duration_s"],
            None if sizes["input_len"] == "auto" else sizes["input_len"],
            args.input_range_ratio,
            sizes["output_range"],
            args.slo_scale,
            None if args.max_prefill_wait_ms == "auto" else args.max_prefill_wait_ms,
            args.burstiness,
            args.seed,
            sizes["kv_cache_mb"],
            args.max_num_batched_tokens,
            args.prefill_chunk_beside_decodes,
            args.vocab_size,
            args.json_path,
        )

    @property
    def systems(self) -> list[System]:
        return [AGGREGATED_LAYOUTS[self.aggregated], DISAGGREGATED]

    @property
    def mean_output_len(self) -> int:
        return sum(self.output_range) // 2

    def count_at(self, rate: float) -> int:
        """Requests per run: enough that a busy run lasts ``duration_s`` (queues build over time)."""
        return max(self.num_prompts, round(rate * self.duration_s))

    def requests(self, count: int, seed: int, input_len: int) -> list[BenchRequest]:
        """``bench serve``'s random prompts; output lengths drawn uniformly from ``output_range``."""
        prompts = random_dataset(count, input_len, 1, self.input_range_ratio, 0, self.vocab_size, seed)
        rng = random.Random(seed + 1)
        return [dataclasses.replace(r, output_len=rng.randint(*self.output_range)) for r in prompts]


@dataclass(frozen=True)
class Plan:
    """The workload and SLOs as sized on this machine, and the measurements they came from."""

    input_len: int
    rates: tuple[float, ...]
    slos: dict  # milliseconds at the config's slo_scale: {"ttft": ..., "tpot": ...}
    baseline_ms: dict  # the aggregated stack's zero-load medians: {"ttft": ..., "tpot": ...}
    sizing: dict  # how input_len and rates were chosen

    def slos_at(self, scale: float) -> dict:
        return {name: scale * value for name, value in self.baseline_ms.items()}


def salted(requests: list[BenchRequest], salt: int) -> list[BenchRequest]:
    """The same lengths with a different first token: block hashes chain from the first block, so
    no run finds another run's prompts in a worker's prefix cache."""
    return [dataclasses.replace(r, prompt=[FIRST_REGULAR_TOKEN + salt, *r.prompt[1:]]) for r in requests]


# -- processes -------------------------------------------------------------------------------------


class Process:
    """A ``splitserve`` child process, waited for until it prints its ready line, then drained."""

    def __init__(
        self, name: str, argv: list[str], ready: str, threads: int | None = None, worker: tuple[str, int] | None = None
    ) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.name = name
        self.worker = worker  # (role, index) of a worker process; None for a router
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
    addresses: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # role -> its workers'
    meter: CpuMeter | None = None  # every stack's workers: what else used the cores during a run


def start_stacks(config: CompareConfig, systems: list[System]) -> list[Stack]:
    """Every worker of every system starts at once; then every router."""
    ensure_secret_in_env()  # the workers and routers started here inherit it
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
                    if config.prefill_chunk_beside_decodes is not None:
                        argv += ["--prefill-chunk-beside-decodes", str(config.prefill_chunk_beside_decodes)]
                    stack.processes.append(
                        Process(f"{stack.system.name} {role} worker {index}", argv, "READY ", threads, (role, index))
                    )
        for stack in stacks:
            for process in stack.processes:
                addresses[process.name] = json.loads(process.wait_ready().split("READY ", 1)[1])["address"]
        for stack in stacks:
            for role in ("prefill", "decode"):
                stack.addresses[role] = [addresses[p.name] for p in stack.processes if p.worker and p.worker[0] == role]
            stack.processes.append(_router_process(stack, config))
        for stack in stacks:
            _wait_router(stack)
        workers = [p.process.pid for stack in stacks for p in stack.processes if p.worker]
        for stack in stacks:
            engines = {}  # a worker's label in the engines column -> (pid, its engine thread's OS name)
            for p in stack.processes:
                if p.worker:
                    role, index = p.worker
                    engines[f"{role[0]}{index}"] = (p.process.pid, engine_thread_name(role))
            stack.meter = CpuMeter(workers, engines)
        return stacks
    except BaseException:
        stop_stacks(stacks)
        raise


def _router_process(stack: Stack, config: CompareConfig) -> Process:
    argv = [
        "router",
        "--model",
        config.model,
        "--decode",
        *stack.addresses["decode"],
        "--port",
        "0",
        "--grpc-port",
        "0",
        "--local-prefill-threshold",
        str(stack.system.local_prefill_threshold),
        "--max-prefill-wait-ms",
        str(stack.system.max_prefill_wait_ms),
        "--log-level",
        "WARNING",
    ]
    if stack.addresses["prefill"]:
        argv[3:3] = ["--prefill", *stack.addresses["prefill"]]
    return Process(f"{stack.system.name} router", argv, "OpenAI API at")


def _wait_router(stack: Stack) -> None:
    router = stack.processes[-1]
    stack.base_url = re.search(r"OpenAI API at (\S+/v1)", router.wait_ready()).group(1).rstrip(",")


def set_max_prefill_wait(stack: Stack, config: CompareConfig, wait_ms: float) -> None:
    """The stack's router again, with ``--max-prefill-wait-ms wait_ms`` (its workers stay up)."""
    stack.processes.pop().stop()
    stack.system = dataclasses.replace(stack.system, max_prefill_wait_ms=round(wait_ms, 1))
    stack.processes.append(_router_process(stack, config))
    _wait_router(stack)


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
    slos: dict | None = None,
    max_concurrency: int | None = None,
    at_once: int | None = None,
) -> dict:
    """``requests`` at ``rate``; or, with ``at_once``, in groups of that many sent together, each group once the
    one before it finished."""
    load_before = os.getloadavg()[0]
    decisions_before = routing_decisions(stack)
    cpu_before = stack.meter.sample()
    groups = [requests] if at_once is None else [requests[i : i + at_once] for i in range(0, len(requests), at_once)]
    records, duration = [], 0.0
    for group in groups:
        got, seconds = asyncio.run(
            run_load(stack.base_url, config.model, group, rate, config.burstiness, max_concurrency, 0, arrival_seed)
        )
        records, duration = records + got, duration + seconds
    cpu = stack.meter.usage(cpu_before, stack.meter.sample())
    decisions = {
        k: v - decisions_before.get(k, 0) for k, v in routing_decisions(stack).items() if v > decisions_before.get(k, 0)
    }
    summary = summarize(records, duration, slos)
    first = min((r.start for r in records), default=0.0)
    rows = [dict(asdict(r), start=r.start - first, tpot=r.tpot) for r in records]
    return {
        "system": stack.system.name,
        "rate": rate,
        "load_1min_before": load_before,
        # cores busy during the run: the workers (measured_cores) and everything else (router,
        # client, the idle stack, other users); ``simulate --validate`` models the latter
        "cpu": cpu,
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


def _one_at_a_time(stack: Stack, config: CompareConfig, requests: list[BenchRequest]) -> dict:
    """``requests`` sent one at a time after a warm-up: latencies with no queueing, no interference."""
    warmup = config.requests(WARMUP_REQUESTS, config.seed + 1000, SIZING_PROMPT_LEN)
    asyncio.run(run_load(stack.base_url, config.model, warmup, float("inf"), 1.0, None, 0, config.seed))
    return run_system(stack, config, requests, float("inf"), config.seed, max_concurrency=1)


def _fixed_length(count: int, input_len: int, output_len: int, config: CompareConfig, salt: int) -> list[BenchRequest]:
    """Probes of one length; salts from the top of the vocabulary, the sweep's runs take them from the bottom."""
    prompts = random_dataset(count, input_len, output_len, 0.0, 0, config.vocab_size, config.seed + salt)
    return salted(prompts, config.vocab_size - FIRST_REGULAR_TOKEN - salt)


def size_input_len(stacks: dict[str, Stack], config: CompareConfig) -> tuple[int, dict]:
    """The mean prompt length whose prefill lasts ``PREFILL_IN_DECODE_STEPS`` of the baseline's
    decode steps, from short requests sent to it one at a time (prefill taken as linear in length)."""
    if config.input_len is not None:
        return config.input_len, {"input_len": "--input-len"}
    probes = _fixed_length(ZERO_LOAD_REQUESTS, SIZING_PROMPT_LEN, SIZING_OUTPUT_LEN, config, 1)
    summary = _one_at_a_time(stacks[BASELINE_NAME], config, probes)["summary"]
    ttft_ms, tpot_ms = summary["ttft_ms"]["median"], summary["tpot_ms"]["median"]
    per_token_ms = ttft_ms / SIZING_PROMPT_LEN
    input_len, wanted = input_len_for(per_token_ms, tpot_ms)
    print(
        f"sizing, {BASELINE_NAME}: {SIZING_PROMPT_LEN}-token prompt TTFT {ttft_ms:.0f} ms "
        f"({per_token_ms:.2f} ms/token), TPOT {tpot_ms:.1f} ms -> mean prompt {input_len} tokens "
        f"(prefill ~{PREFILL_IN_DECODE_STEPS:g} decode steps)",
        flush=True,
    )
    return input_len, {
        "input_len": "auto",
        "probe_prompt_len": SIZING_PROMPT_LEN,
        "probe_ttft_ms": ttft_ms,
        "probe_tpot_ms": tpot_ms,
        "prefill_in_decode_steps": PREFILL_IN_DECODE_STEPS,
        "wanted_input_len": wanted,
    }


def input_len_for(prefill_ms_per_token: float, tpot_ms: float) -> tuple[int, float]:
    """The mean prompt whose prefill lasts ``PREFILL_IN_DECODE_STEPS`` decode steps, in multiples
    of 64 within ``INPUT_LEN_BOUNDS``; and the unrounded length."""
    wanted = PREFILL_IN_DECODE_STEPS * tpot_ms / prefill_ms_per_token
    low, high = INPUT_LEN_BOUNDS
    return int(min(high, max(low, round(wanted / 64) * 64))), wanted


def zero_load(stacks: dict[str, Stack], config: CompareConfig, input_len: int) -> dict:
    """``ZERO_LOAD_REQUESTS`` mean-length requests, one at a time, per system."""
    probes = _fixed_length(ZERO_LOAD_REQUESTS, input_len, config.mean_output_len, config, 2)
    out = {}
    for name, stack in stacks.items():
        out[name] = _one_at_a_time(stack, config, probes)
        s = out[name]["summary"]
        print(
            f"zero load, {name}: {input_len}-token prompts, TTFT p50 {_fmt(s['ttft_ms']['median'])} ms, "
            f"TPOT p50 {_fmt(s['tpot_ms']['median'], '.1f')} ms",
            flush=True,
        )
    return out


def zero_load_together(stacks: dict[str, Stack], config: CompareConfig, input_len: int) -> dict:
    """The baseline's mean-length requests in rounds of as many at once as it has engines, each round once the one
    before it finished, so that every engine prefills beside the others with nothing queued: how much they slow
    each other (``simulate --validate`` reads it as ``Host.co_step``). Empty where the baseline has one engine (its
    own threads fill the cores)."""
    stack = stacks[BASELINE_NAME]
    engines = stack.system.decode_workers
    if engines < 2:
        return {}
    probes = _fixed_length(TOGETHER_ROUNDS * engines, input_len, config.mean_output_len, config, 3)
    run = run_system(stack, config, probes, float("inf"), config.seed, at_once=engines)
    s = run["summary"]
    print(
        f"zero load, {BASELINE_NAME}, {engines} at once: TTFT p50 {_fmt(s['ttft_ms']['median'])} ms, "
        f"TPOT p50 {_fmt(s['tpot_ms']['median'], '.1f')} ms",
        flush=True,
    )
    return {BASELINE_NAME: run}


def make_plan(config: CompareConfig, input_len: int, sizing: dict, probes: dict) -> Plan:
    baseline = probes[BASELINE_NAME]["summary"]
    baseline_ms = {"ttft": baseline["ttft_ms"]["median"], "tpot": baseline["tpot_ms"]["median"]}
    if None in baseline_ms.values():
        raise RuntimeError(f"no zero-load latency from the {BASELINE_NAME} stack: {baseline}")
    rates = config.rates
    if rates is None:
        # The prefill worker's capacity: one mean prompt at a time, back to back.
        capacity = 1000.0 / probes[DISAGGREGATED_NAME]["summary"]["ttft_ms"]["median"]
        rates = tuple(round(capacity * fraction, 3) for fraction in config.rate_fractions)
        sizing = dict(sizing, rates="auto", prefill_capacity_rps=capacity, rate_fractions=config.rate_fractions)
    else:
        sizing = dict(sizing, rates="--rates")
    slos = {name: config.slo_scale * value for name, value in baseline_ms.items()}
    return Plan(input_len, rates, slos, baseline_ms, sizing)


def sweep(stacks: dict[str, Stack], config: CompareConfig, plan: Plan) -> tuple[list[dict], Plan]:
    """The runs, and the plan with the rates swept: with ``--rates auto`` the sweep goes on past the planned rates,
    in the same steps, while a system still meets the SLOs at the last one (up to ``MAX_RATE_FRACTION`` of one
    engine's prefill capacity), so that both goodputs are measured rather than bounded."""
    rates = list(plan.rates)
    ceiling = rates[-1]
    if config.rates is None and len(rates) > 1:
        ceiling = plan.sizing["prefill_capacity_rps"] * MAX_RATE_FRACTION
    base = config.requests(max(config.count_at(rate) for rate in (*rates, ceiling)), config.seed, plan.input_len)
    order = list(stacks.values())
    runs = []
    for index, rate in enumerate(rates):  # grows below while a system still passes
        # Both systems of a rate get the same prompts and arrival times; each rate its own arrival
        # draw, and its own first token so no run finds another's prompts in a prefix cache.
        requests = salted(base[: config.count_at(rate)], index)
        for stack in order if index % 2 == 0 else order[::-1]:
            print(f"rate {rate:g} req/s: {stack.system.name} ({len(requests)} requests) ...", flush=True)
            run = run_system(stack, config, requests, rate, config.seed + index, plan.slos)
            s = run["summary"]
            print(
                f"  attainment {s['slo_attainment']:.0%}, TTFT p50 {_fmt(s['ttft_ms']['median'])} ms, TPOT "
                f"p50 {_fmt(s['tpot_ms']['median'])} ms, "
                f"load {run['load_1min_before']:.2f}",
                flush=True,
            )
            runs.append(run)
        if index == len(rates) - 1 and (more := next_rate(rates, runs, [s.system for s in order], plan.slos, ceiling)):
            rates.append(more)
    return runs, dataclasses.replace(plan, rates=tuple(rates))


def next_rate(rates: list[float], runs: list[dict], systems: list[System], slos: dict, ceiling: float) -> float | None:
    """One step past the last rate, if a system met the SLOs there and the step stays within ``ceiling``."""
    if len(rates) < 2:
        return None
    last, step = rates[-1], rates[-1] - rates[-2]
    if step <= 0 or last + step > ceiling * (1 + 1e-9):
        return None
    at_last = goodputs([r for r in runs if r["rate"] == last], systems, slos)
    return round(last + step, 3) if any(g["highest_passing_rate"] == last for g in at_last.values()) else None


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
    aggregated, disaggregated = good[AGGREGATED_NAME], good[DISAGGREGATED_NAME]
    low = disaggregated["low"] / aggregated["high"] if aggregated["high"] else float("inf")
    high = disaggregated["high"] / aggregated["low"] if aggregated["low"] else float("inf")
    return {"low": low, "high": high}


def _ratio_text(ratio: dict) -> str:
    low, high = ratio["low"], ratio["high"]
    if low == 0 and high == float("inf"):
        return "n/a"  # both fail at every rate swept
    if low == high:
        return f"{low:.2f}x"
    if high == float("inf"):
        return f">= {low:.2f}x"
    return f"<= {high:.2f}x" if low == 0 else f"{low:.2f}-{high:.2f}x"


def cpu_ceilings(runs: list[dict], systems: list[System], cores: int | None) -> dict[str, dict | None]:
    """Per system: the machine's busy cores against requests/s completed, least squares over its runs
    (idle cores + cores per request/s), and the requests/s at which that reaches ``cores``. None
    without the runs' CPU usage, two distinct throughputs, or busy cores that grow with the load."""
    out: dict[str, dict | None] = {}
    for system in systems:
        points = [
            (run["summary"]["request_throughput"], run["cpu"]["machine_cores"])
            for run in runs
            if run["system"] == system.name and run.get("cpu")
        ]
        fit = None
        if cores and len({rps for rps, _ in points}) >= 2:
            per_request, idle = statistics.linear_regression(*zip(*points))
            if per_request > 0:
                fit = {
                    "idle_cores": idle,
                    "core_seconds_per_request": per_request,
                    "ceiling_rps": (cores - idle) / per_request,
                    "runs": len(points),
                }
        out[system.name] = fit
    return out


def ratio_bound(ceilings: dict[str, dict | None], good: dict) -> float | None:
    """The most disaggregated / aggregated goodput these cores allow: the disaggregated stack's CPU
    ceiling over the aggregated stack's goodput (None where either is unknown or zero)."""
    ceiling, aggregated = ceilings.get(DISAGGREGATED_NAME), good[AGGREGATED_NAME]["low"]
    return ceiling["ceiling_rps"] / aggregated if ceiling and aggregated > 0 else None


def ratio_factors(ceilings: dict[str, dict | None], good: dict) -> dict | None:
    """The goodput ratio taken apart: the ceilings' ratio (what each stack's idle and per-request CPU allow,
    one over the other) times the disaggregated goodput's share of its ceiling, over the aggregated goodput's share
    of its own (how close each schedule gets to its cores before the SLOs fail). Their product is the
    ratio; None where a ceiling is unknown, a goodput only a bound, or the aggregated goodput zero."""
    shares = {}
    for name in (AGGREGATED_NAME, DISAGGREGATED_NAME):
        fit = ceilings.get(name)
        if not fit or good[name]["low"] != good[name]["high"]:
            return None
        shares[name] = good[name]["low"] / fit["ceiling_rps"]
    if not shares[AGGREGATED_NAME]:
        return None
    return {
        "ceilings": ceilings[DISAGGREGATED_NAME]["ceiling_rps"] / ceilings[AGGREGATED_NAME]["ceiling_rps"],
        "aggregated_share": shares[AGGREGATED_NAME],
        "disaggregated_share": shares[DISAGGREGATED_NAME],
    }


def attainment_of(run: dict, slos: dict) -> float:
    records = [RequestRecord(**{k: v for k, v in row.items() if k in RECORD_FIELDS}) for row in run["requests"]]
    return sum(meets(r, slos) for r in records) / len(records)


def scale_curve(runs: list[dict], systems: list[System], plan: Plan, default_scale: float) -> list[dict]:
    """Per SLO scale (``SLO_SCALES`` and the default): each system's attainment at each rate, goodput,
    and the goodput ratio."""
    rows = []
    for scale in sorted({*SLO_SCALES, default_scale}):
        slos = plan.slos_at(scale)
        good = goodputs(runs, systems, slos)
        attained = {
            s.name: {str(run["rate"]): attainment_of(run, slos) for run in runs if run["system"] == s.name}
            for s in systems
        }
        rows.append({"scale": scale, "slos_ms": slos, "attainment": attained, "goodput": good, "ratio": ratio_of(good)})
    return rows


def ratio_grid(runs: list[dict], systems: list[System], plan: Plan) -> list[dict]:
    """The goodput ratio had the TTFT and TPOT SLOs been set at different scales, from the same runs."""
    rows = []
    for ttft_scale in GRID_TTFT_SCALES:
        for tpot_scale in GRID_TPOT_SCALES:
            slos = {"ttft": ttft_scale * plan.baseline_ms["ttft"], "tpot": tpot_scale * plan.baseline_ms["tpot"]}
            rows.append(
                {"ttft_scale": ttft_scale, "tpot_scale": tpot_scale, "ratio": ratio_of(goodputs(runs, systems, slos))}
            )
    return rows


def build_report(
    config: CompareConfig,
    plan: Plan,
    systems: list[System],
    probes: dict,
    together: dict,
    runs: list[dict],
    seconds: float,
) -> dict:
    good = goodputs(runs, systems, plan.slos)
    ratio = ratio_of(good)
    cores = os.cpu_count()
    ceilings = cpu_ceilings(runs, systems, cores)
    config_json = {k: v for k, v in asdict(config).items() if k != "json_path"}
    # What ran: the sized workload and the SLOs in milliseconds (``simulate --validate`` reads these).
    config_json.update(input_len=plan.input_len, rates=plan.rates, slos=plan.slos)
    config_json["systems"] = {s.name: asdict(s) for s in systems}
    return {
        "config": config_json,
        "plan": asdict(plan),
        "machine": {"cpu_count": cores, "cpu_model": _cpu_model(), "wall_seconds": seconds},
        "zero_load": probes,
        "zero_load_together": together,
        "runs": runs,
        "goodput": good,
        "goodput_ratio": ratio,
        "slo_scales": scale_curve(runs, systems, plan, config.slo_scale),
        "ratio_grid": ratio_grid(runs, systems, plan),
        "cpu_ceilings": ceilings,
        "target": {
            "ratio": GOODPUT_RATIO_TARGET,
            "met": ratio["low"] >= GOODPUT_RATIO_TARGET,
            "machine_bound": ratio_bound(ceilings, good),
            "factors": ratio_factors(ceilings, good),
        },
    }


def print_report(report: dict) -> None:
    config, plan = report["config"], report["plan"]
    print(f"{'=' * 20} bench compare: {config['model']} {config['dtype']}, aggregated vs disaggregated {'=' * 20}")
    low, high = (
        int(config["input_len"] * (1 - config["input_range_ratio"])),
        int(config["input_len"] * (1 + config["input_range_ratio"])),
    )
    counts = sorted({len(run["requests"]) for run in report["runs"]})
    base = plan["baseline_ms"]
    machine = report["machine"]
    print(f"machine: {machine['cpu_count']} CPUs, {machine['cpu_model'] or 'unknown model'}")
    for name, system in config["systems"].items():
        print(f"  {name:14} {_layout(system)}")
    print(
        f"workload: {counts[0]}-{counts[-1]} requests/run, input {low}-{high} tokens "
        f"({_input_source(plan['sizing'])}), output {config['output_range'][0]}-{config['output_range'][1]}, "
        f"Poisson arrivals (burstiness {config['burstiness']}); rates {_rates_source(plan['sizing'])}"
    )
    print(
        f"SLO rule: scale x one engine's zero-load latency (mean-length requests alone on the {BASELINE_NAME} "
        f"stack): TTFT {base['ttft']:.0f} ms (prefill only), TPOT {base['tpot']:.1f} ms (decode only); "
        "the same SLOs for both systems"
    )
    print(
        f"SLOs at scale {config['slo_scale']:g}: TTFT <= {config['slos']['ttft']:.0f} ms and TPOT <= "
        f"{config['slos']['tpot']:.0f} ms, both per request; goodput: the highest rate at which >= "
        f"{ATTAINMENT_TARGET:.0%} of requests meet both"
    )
    print(
        f"{'rate':>6} {'system':15} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
        f"{'attain':>7} {'done':>5} {'load':>5} {'other':>5}  {'engines':15} routing"
    )
    zero = [dict(run, rate=0.0) for run in report["zero_load"].values()]
    for run in sorted(zero + report["runs"], key=lambda r: r["rate"]):
        s = run["summary"]
        attained = attainment_of(run, config["slos"])
        print(
            f"{run['rate'] or 'zero':>6} {run['system']:15} {_fmt(s['ttft_ms']['median']):>9} "
            f"{_fmt(s['ttft_ms']['p99']):>9} "
            f"{_fmt(s['tpot_ms']['median']):>9} {_fmt(s['tpot_ms']['p99']):>9} {attained:>7.0%} "
            f"{s['completed']:>5} {run['load_1min_before']:>5.2f} {_other_cores(run):>5}  {_engine_cores(run):15} "
            f"{','.join(f'{k}:{v:.0f}' for k, v in run['routing'].items())}"
        )
    print(
        "zero: the mean-length requests, sent one at a time; load: 1-minute load average before the run; "
        "other: cores busy with anything but the workers during it; engines: each worker's engine thread "
        "(p: prefill, d: decode), cores busy during it (1.00: it never waited)"
    )
    for name, good in report["goodput"].items():
        notes = [good["bound"]] if good["bound"] else []
        notes += [] if good["monotone"] else ["attainment dips below 90% at a lower rate"]
        print(
            f"goodput @{ATTAINMENT_TARGET:.0%} attainment, {name:14}: {good['rps']:.3f} req/s"
            + (f"  ({'; '.join(notes)})" if notes else "")
        )
    for name, warnings in report.get("router_warnings", {}).items():
        if warnings:
            print(f"router warnings, {name} ({len(warnings)}, last): {warnings[-1]}")
    ratio, target = report["goodput_ratio"], report["target"]
    print(
        f"disaggregated / aggregated goodput at SLO scale {config['slo_scale']:g}, same runs: {_ratio_text(ratio)} "
        f"(target >= {target['ratio']}x: {'met' if target['met'] else 'MISSED'})"
    )
    print_cpu_ceilings(report.get("cpu_ceilings", {}), target, machine["cpu_count"])
    print_scale_curve(report["slo_scales"], config["rates"], config["slo_scale"])
    print_ratio_grid(report["ratio_grid"])


def print_scale_curve(rows: list[dict], rates: list[float], default_scale: float) -> None:
    print("SLO attainment (aggregated/disaggregated) by SLO scale, from the same runs (* the default scale):")
    print(
        f"{'scale':>5} {'TTFT ms':>8} {'TPOT ms':>8} "
        + "".join(f"{f'@{rate:g}/s':>11}" for rate in rates)
        + f" {'goodput a/d req/s':>18} {'ratio':>10}"
    )
    for row in rows:
        cells = [
            f"{row['attainment'][AGGREGATED_NAME][str(rate)]:.0%}/{row['attainment'][DISAGGREGATED_NAME][str(rate)]:.0%}"
            for rate in rates
        ]
        good = row["goodput"]
        print(
            f"{'*' if row['scale'] == default_scale else ' '}{row['scale']:>4g} "
            f"{row['slos_ms']['ttft']:>8.0f} {row['slos_ms']['tpot']:>8.0f} "
            + "".join(f"{cell:>11}" for cell in cells)
            + f" {good[AGGREGATED_NAME]['rps']:>8.3f}/{good[DISAGGREGATED_NAME]['rps']:<9.3f} "
            f"{_ratio_text(row['ratio']):>10}"
        )


def print_cpu_ceilings(ceilings: dict[str, dict | None], target: dict, cores: int) -> None:
    print(f"what {cores} cores allow (busy cores vs requests/s completed, fitted over each system's runs):")
    for name, fit in ceilings.items():
        if fit is None:
            print(f"  {name:14} n/a (no CPU usage, or too few runs)")
            continue
        print(
            f"  {name:14} {fit['idle_cores']:.2f} cores idle + {fit['core_seconds_per_request']:.3f} "
            f"core-s per request: at most {fit['ceiling_rps']:.2f} req/s"
        )
    bound = target.get("machine_bound")
    if bound is None:
        return
    verdict = (
        "below the target: more cores or less CPU per request are needed, not a better schedule of the same work"
        if bound < target["ratio"]
        else "the target is within reach of these cores"
    )
    print(f"  so the ratio can be at most {bound:.2f}x here (disaggregated ceiling / aggregated goodput): {verdict}")
    factors = target.get("factors")
    if factors:
        print(
            f"  the ratio taken apart: ceilings {factors['ceilings']:.2f}x apart (idle and per-request CPU) x "
            f"disaggregated at {factors['disaggregated_share']:.0%} of its ceiling / aggregated at "
            f"{factors['aggregated_share']:.0%} of its own (where each schedule's SLOs fail)"
        )


def _other_cores(run: dict) -> str:
    return "n/a" if not run.get("cpu") else f"{run['cpu']['other_cores']:.2f}"


def _engine_cores(run: dict) -> str:
    """Each worker's engine thread, cores busy during the run (1.00: it stepped all the time)."""
    engines = (run.get("cpu") or {}).get("engine_cores") or {}
    return " ".join(f"{name} {cores:.2f}" for name, cores in sorted(engines.items(), reverse=True)) or "n/a"


def print_ratio_grid(rows: list[dict]) -> None:
    print("disaggregated / aggregated goodput with the scales apart (rows: TTFT scale, columns: TPOT scale):")
    tpot_scales = sorted({row["tpot_scale"] for row in rows})
    print(f"{'':>6}" + "".join(f"{scale:>10g}" for scale in tpot_scales))
    for ttft_scale in sorted({row["ttft_scale"] for row in rows}):
        cells = [_ratio_text(r["ratio"]).replace(" ", "") for r in rows if r["ttft_scale"] == ttft_scale]
        print(f"{ttft_scale:>6g}" + "".join(f"{cell:>10}" for cell in cells))


def _layout(system: dict) -> str:
    engines = system["prefill_workers"] + system["decode_workers"]
    threads = (
        system["prefill_workers"] * (system["prefill_threads"] or 0)
        + system["decode_workers"] * system["decode_threads"]
    )
    if system["prefill_workers"]:
        wait = system.get("max_prefill_wait_ms", 0.0)
        shape = (
            f"{system['prefill_workers']} prefill x {system['prefill_threads']} thread(s) -KV-> "
            f"{system['decode_workers']} decode x {system['decode_threads']}; "
            + (f"D prefills a prompt that would wait > {wait:g} ms on P" if wait else "every prompt prefilled on P")
        )
    else:
        shape = f"{system['decode_workers']} x {system['decode_threads']} thread(s), each prefilling beside its decodes"
    return f"{engines} engine(s), {threads} thread(s): {shape}"


def _input_source(sizing: dict) -> str:
    if sizing.get("input_len") != "auto":
        return "from --input-len"
    return (
        f"mean sized from {sizing['probe_ttft_ms']:.0f} ms for {sizing['probe_prompt_len']} tokens and "
        f"{sizing['probe_tpot_ms']:.1f} ms TPOT: prefill ~{sizing['prefill_in_decode_steps']:g} decode steps"
    )


def _rates_source(sizing: dict) -> str:
    if sizing.get("rates") != "auto":
        return "from --rates"
    fractions = ", ".join(f"{f:g}" for f in sizing["rate_fractions"])
    return (
        f"{fractions} x one engine's prefill capacity {sizing['prefill_capacity_rps']:.3f} req/s "
        f"(then on while a system meets the SLOs, up to {MAX_RATE_FRACTION:g} x)"
    )


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        return ""


QUICK = dict(rates=(1.0, 2.0), num_prompts=4, duration_s=0.0, input_len=64, output_range=(4, 8), kv_cache_mb=64)


def check_args(args: argparse.Namespace, given: Given) -> None:
    refuse_beside_quick(given, QUICK)
    if args.rates != "auto":
        given.refuse(["rate_fractions"], "sizes --rates auto only; not with --rates N,...")


def run(args: argparse.Namespace) -> int:
    config = CompareConfig.from_args(args)
    systems = config.systems
    started = time.perf_counter()
    stack_list = start_stacks(config, systems)
    stacks = {stack.system.name: stack for stack in stack_list}
    try:
        input_len, sizing = size_input_len(stacks, config)
        probes = zero_load(stacks, config, input_len)
        together = zero_load_together(stacks, config, input_len)
        plan = make_plan(config, input_len, sizing, probes)
        wait_ms = config.max_prefill_wait_ms
        if wait_ms is None:  # the TTFT a remote prefill may still spend queued on P
            wait_ms = max(0.0, plan.slos["ttft"] - probes[DISAGGREGATED_NAME]["summary"]["ttft_ms"]["median"])
        if wait_ms:
            set_max_prefill_wait(stacks[DISAGGREGATED_NAME], config, wait_ms)
        systems = [stack.system for stack in stack_list]
        print(
            f"plan: mean prompt {plan.input_len} tokens, rates {', '.join(f'{r:g}' for r in plan.rates)} req/s, "
            f"SLOs TTFT {plan.slos['ttft']:.0f} ms, TPOT {plan.slos['tpot']:.0f} ms (scale {config.slo_scale:g}), "
            f"max prefill wait {stacks[DISAGGREGATED_NAME].system.max_prefill_wait_ms:g} ms",
            flush=True,
        )
        runs, plan = sweep(stacks, config, plan)
    finally:
        stop_stacks(stack_list)
    report = build_report(config, plan, systems, probes, together, runs, time.perf_counter() - started)
    # e.g. "worker marked unhealthy": the router then prefills locally, which the routing counts show
    report["router_warnings"] = {
        s.system.name: [line for p in s.processes if p.name.endswith("router") for line in p.tail if "WARNING" in line]
        for s in stack_list
    }
    print_report(report)
    if config.json_path:
        with open(config.json_path, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"wrote {config.json_path}")
    return 0 if all(r["summary"]["completed"] for r in runs) else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="bench-125m")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument(
        "--rates",
        type=or_word("auto", list_of(positive_float)),
        default="auto",
        help="requests/s, comma-separated; auto: --rate-fractions x the prefill capacity",
    )
    parser.add_argument(
        "--rate-fractions",
        type=list_of(positive_float),
        default="0.3,0.4,0.5,0.6,0.7,0.8,0.9",
        help="with --rates auto: rates as fractions of one engine's prefill capacity (1 / the disaggregated "
        "stack's zero-load TTFT); its prefill worker saturates below 1 (it shares the machine with the rest)",
    )
    parser.add_argument(
        "--num-prompts", type=positive_int, default=16, help="at least this many requests per rate and system"
    )
    parser.add_argument(
        "--duration-s",
        type=non_negative_float,
        default=32.0,
        help="... or as many as arrive in this long at the rate, if more",
    )
    parser.add_argument(
        "--input-len",
        type=or_word("auto", positive_int),
        default="auto",
        help="mean prompt tokens; auto: its prefill lasts as long as ~20 decode steps of an aggregated engine here",
    )
    parser.add_argument("--input-range-ratio", type=share, default=0.5, help="inputs uniform in len * [1 - r, 1 + r]")
    parser.add_argument("--output-range", type=int_range, default="32,64", help="outputs uniform in LOW,HIGH tokens")
    parser.add_argument(
        "--slo-scale",
        type=positive_float,
        default=4.0,
        help="SLOs = this x one engine's zero-load TTFT and TPOT, measured on the aggregated stack (DistServe's "
        "SLO scale)",
    )
    parser.add_argument(
        "--aggregated",
        default="replicas",
        choices=sorted(AGGREGATED_LAYOUTS),
        help="replicas: as many 1-thread engines as the disaggregated stack has (equal engines and cores); "
        "one-engine: one engine with all their threads",
    )
    parser.add_argument(
        "--max-prefill-wait-ms",
        type=or_word("auto", non_negative_float),
        default="auto",
        help="the disaggregated router's (conditional disaggregation); auto: the TTFT SLO less the disaggregated "
        "stack's zero-load TTFT; 0: every prompt prefilled on the prefill worker",
    )
    parser.add_argument("--burstiness", type=positive_float, default=1.0, help="1 = Poisson")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-mb", type=positive_int, default=512, help="KV pool of each worker")
    parser.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=512,
        help="every worker's step token budget; longer prompts prefill in chunks. Small enough that a step "
        "stays well under the router's 2 s Stats deadline, which marks a slower worker unhealthy",
    )
    add_prefill_chunk_argument(parser, "every worker's: ")
    parser.add_argument(
        "--vocab-size",
        type=int_at_least(FIRST_REGULAR_TOKEN + 1),
        default=256,
        help="prompt token ids are drawn from [3, vocab)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run: 2 rates x 4 short requests; refused beside a size flag it sets (rather than overriding it)",
    )
    parser.add_argument("--json", dest="json_path", default=None)
