"""``splitserve bench chaos``: never a wrong answer, never a hang — a soak test under faults.

Pointed at a deployment (``--url``, with ``--kill-hook`` etc. where its workers are not local processes)
or, by default, at a ``splitserve up`` it starts itself, it

1. takes a reference answer for every prompt of its mix, before any fault (greedy, fixed length, with the
   token ids);
2. replays the prompts from ``--clients`` concurrent clients for ``--duration`` seconds while, every
   ``--kill-every`` seconds, the next fault of ``--faults`` hits a worker: SIGKILL of a prefill worker, of a
   decode worker, of both at once, a SIGSTOP/SIGCONT stall, or a prefill worker frozen past the decode
   worker's lease; and ``--disconnect-fraction`` of the requests close their connection mid-stream. A client
   refused with a Retry-After waits that long before its next request, as the OpenAI SDK does (a client
   that retried at once would spin: thousands of refusals a second, on the CPUs the workers restart on);
3. judges every request: exactly its reference (text and token ids), or a clean error with a status; a
   request with no answer within ``--request-timeout`` is a hang;
4. once traffic stops and the cluster is quiet, counts the KV blocks still in use (leaks), and reports each
   fault's recovery time and the share of requests the router sent prefill → decode.

Exit status 1 on any wrong answer, hang, leak or worker that did not come back; 2 if the run could not be made.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench import processes
from bench.args import (
    Given,
    add_api_key_arguments,
    api_key_from,
    int_between,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    report_config,
    share,
)
from bench.chaos_faults import (
    FAULT_KINDS,
    ClusterView,
    Fault,
    Hooks,
    Injector,
    counter_deltas,
    inject,
    pick_victims,
    routing_share,
    settle,
    wait_recovered,
)
from bench.chaos_workload import Answer, Prompt, Reference, build_prompts, judge, stream
from contract.bounds import MAX_LEASE_MS
from router.config import admin_token_from_env

UP_READY = re.compile(r"splitserve is up: OpenAI API (http://\S+)/v1")
FAILURE_COUNTERS = ("migrations", "prefill_retries", "lease_expired_requests")
MAX_RETRY_AFTER_S = 60.0  # the OpenAI SDK honours a Retry-After up to a minute


@dataclass
class Record:
    """One request of the fault phase and its verdict."""

    prompt_id: int
    kind: str
    client: int
    start_s: float  # since the fault phase began
    elapsed_s: float = 0.0
    outcome: str = ""  # ok | wrong | near_tie | error | hang | disconnected
    error: str = ""
    error_key: str = ""
    disconnect_after: int | None = None
    chunks: int = 0
    faults_during: list[str] = field(default_factory=list)  # faults injected while it ran
    since_fault_s: float | None = None  # from the latest fault before it started
    evidence: dict = field(default_factory=dict)


@dataclass
class Run:
    """What the phases share: the target, the prompts and their references, the records, the faults."""

    args: object
    base_url: str
    model: str
    client: httpx.AsyncClient
    view: ClusterView
    prompts: list[Prompt]
    references: dict[int, Reference] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    phase_start: float = 0.0

    def since_start(self) -> float:
        return time.monotonic() - self.phase_start


# -- the local deployment ---------------------------------------------------------------------------------


@contextmanager
def local_up(args):
    """``splitserve up`` with the requested pools, its output in ``args.log`` (or a temporary file);
    yields the router's base URL. Stopped with SIGTERM (as Ctrl-C would), killed if it lingers."""
    args.admin_token = args.admin_token or secrets.token_urlsafe(24)
    workdir = Path(tempfile.mkdtemp(prefix="splitserve-chaos-"))
    config = workdir / "cluster.json"  # JSON is YAML: `up --config` reads it
    pool = {"min_replicas": 1, "kv_cache_mb": args.kv_cache_mb}
    config.write_text(
        json.dumps(
            {
                "model": args.model or "demo",
                "transport": args.transport,
                "lease_ms": args.lease_ms,
                "prefill": {**pool, "replicas": args.prefill, "max_replicas": max(args.prefill, 1)},
                "decode": {**pool, "replicas": args.decode, "max_replicas": max(args.decode, 1)},
            }
        )
    )
    log_path = Path(args.log) if args.log else workdir / "up.log"
    command = ["up", "--config", str(config), "--port", "0", "--grpc-port", "0", "--log-level", "WARNING"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", *command],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=processes.exits_with_this_process(  # an aborted run leaves no cluster behind
                dict(
                    os.environ,
                    PYTHONUNBUFFERED="1",
                    OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                    SPLITSERVE_ADMIN_TOKEN=args.admin_token,  # /admin/status (PIDs, stats) needs it
                )
            ),
        )
    try:
        url = _wait_for_up(process, log_path, args.up_timeout)
        print(
            f"started splitserve up ({args.prefill} prefill + {args.decode} decode, {args.transport}); log {log_path}"
        )
        yield url
    finally:
        _stop(process)
        if args.log:  # else the log printed above lives here: kept
            shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_up(process: subprocess.Popen, log_path: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if match := UP_READY.search(log_path.read_text(errors="replace")):
            return match.group(1)
        time.sleep(0.5)
    tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
    raise SystemExit(f"splitserve bench chaos: `splitserve up` did not come up in {timeout_s:g}s:\n{tail}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


# -- phases -----------------------------------------------------------------------------------------------


async def wait_serving(run: Run, expected: dict[str, int] | None, timeout_s: float) -> dict[str, int]:
    """Waits until the router routes to the expected workers (``None``: to at least one decode worker)."""
    deadline = time.monotonic() + timeout_s
    serving: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            serving = await run.view.serving()
        except httpx.HTTPError:
            serving = {}
        if serving and (
            all(serving[r] >= n for r, n in expected.items()) if expected else serving.get("decode", 0) > 0
        ):
            return serving
        await asyncio.sleep(0.5)
    raise SystemExit(f"splitserve bench chaos: the cluster is not serving {expected or ''}: {serving}")


async def reference_pass(run: Run) -> list[str]:
    """Each prompt once, fault-free, at the clients' concurrency; returns the failures (those prompts are
    left out of the replay)."""
    args = run.args
    semaphore = asyncio.Semaphore(args.clients)
    failures = []

    async def one(prompt: Prompt) -> None:
        async with semaphore:
            answer = Answer()
            try:
                await asyncio.wait_for(
                    stream(run.client, run.base_url, prompt, run.model, args.max_tokens, args.api_key, answer),
                    args.request_timeout,
                )
            except TimeoutError:
                answer.error = f"no answer within {args.request_timeout:g}s"
            if answer.error or answer.finish_reason is None:
                failures.append(f"prompt {prompt.prompt_id} ({prompt.kind}): {answer.error or 'no finish_reason'}")
            else:
                run.references[prompt.prompt_id] = Reference.of(answer)

    await asyncio.gather(*(one(p) for p in run.prompts))
    return failures


async def client_loop(run: Run, index: int, feed, end: float, rng: random.Random) -> None:
    args = run.args
    for _ in range(args.max_requests):  # a bound; the clock ends the loop first
        if time.monotonic() >= end:
            return
        prompt = next(feed)
        disconnect = rng.random() < args.disconnect_fraction
        disconnect_after = rng.randint(1, max(1, args.max_tokens // 2)) if disconnect else None
        record, retry_after = await one_request(run, prompt, index, disconnect_after)
        run.records.append(record)
        if retry_after:  # as the OpenAI SDK does: a refused client waits what the server asked before trying again
            await asyncio.sleep(min(retry_after, MAX_RETRY_AFTER_S, max(0.0, end - time.monotonic())))


async def one_request(
    run: Run, prompt: Prompt, client: int, disconnect_after: int | None
) -> tuple[Record, float | None]:
    """The request's record, and the seconds its refusal's Retry-After asked the client to wait (or None)."""
    args = run.args
    record = Record(prompt.prompt_id, prompt.kind, client, run.since_start(), disconnect_after=disconnect_after)
    earlier = [f.at_s for f in run.faults if f.at_s <= record.start_s]
    record.since_fault_s = record.start_s - earlier[-1] if earlier else None
    answer = Answer()
    try:
        await asyncio.wait_for(
            stream(
                run.client, run.base_url, prompt, run.model, args.max_tokens, args.api_key, answer, disconnect_after
            ),
            args.request_timeout,
        )
        hung = False
    except TimeoutError:
        hung = True
    record.elapsed_s = run.since_start() - record.start_s
    record.chunks = answer.chunks
    record.faults_during = [f.kind for f in run.faults if record.start_s <= f.at_s <= record.start_s + record.elapsed_s]
    if hung:
        record.outcome = "hang"
        record.evidence = {"http_status": answer.status, "chunks_before_hang": answer.chunks, "text": answer.text[-40:]}
    elif answer.disconnected:
        record.outcome = "disconnected"
    elif answer.error:
        record.outcome, record.error, record.error_key = "error", answer.error, answer.error_key
    else:
        record.outcome, record.evidence = judge(answer, run.references[prompt.prompt_id], args.tie_tolerance)
    return record, answer.retry_after_s


def prompt_feed(prompts: list[Prompt], rng: random.Random):
    """The prompts over and over, reshuffled each round: a prompt comes back only after all the others, by
    when the decode workers' small prefix caches have let it go (so it goes prefill → decode again)."""
    while True:
        order = list(prompts)
        rng.shuffle(order)
        yield from order


async def fault_loop(run: Run, injector: Injector, rng: random.Random, recoveries: list) -> None:
    args = run.args
    kinds = itertools.cycle(args.faults)
    for at in itertools.count(1):
        due = run.phase_start + at * args.kill_every
        if due >= run.phase_start + args.duration:
            return
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        fault = Fault(next(kinds), run.since_start())
        run.faults.append(fault)
        try:
            workers = await run.view.workers()
            wanted = await run.view.serving()
        except httpx.HTTPError as exc:
            fault.how, fault.error = "skipped", f"/admin/status failed: {exc}"
            continue
        victims = pick_victims(fault.kind, workers, rng)
        if not victims:
            fault.how = "skipped: no ready worker of that role"
            continue
        print(f"[{fault.at_s:6.1f}s] {fault.kind}: {', '.join(w.worker_id for w in victims)}", flush=True)
        recoveries.append(asyncio.create_task(_inject_and_recover(run, fault, victims, injector, wanted)))


async def _inject_and_recover(run: Run, fault: Fault, victims, injector: Injector, wanted: dict[str, int]) -> None:
    args = run.args
    await inject(fault, victims, injector, args.stall_seconds, args.lease_ms / 1000.0)
    if fault.error:
        print(f"  {fault.kind} failed: {fault.error}", file=sys.stderr, flush=True)
        return
    since = time.monotonic() if fault.kind in ("stall", "lease") else run.phase_start + fault.at_s
    killed = fault.kind.startswith("kill-")
    fault.recovery_s = list(
        await asyncio.gather(
            *(
                wait_recovered(
                    run.view, victim if killed else {**victim, "pid": 0}, wanted, since, args.recovery_timeout
                )
                for victim in fault.victims
            )
        )
    )


async def fault_phase(run: Run, injector: Injector) -> None:
    args = run.args
    rng = random.Random(args.seed + 1)
    feed = prompt_feed([p for p in run.prompts if p.prompt_id in run.references], rng)
    run.phase_start = time.monotonic()
    end = run.phase_start + args.duration
    recoveries: list[asyncio.Task] = []
    faults = asyncio.create_task(fault_loop(run, injector, random.Random(args.seed + 2), recoveries))
    clients = [client_loop(run, i, feed, end, random.Random(args.seed * 1000 + 10 + i)) for i in range(args.clients)]
    try:
        await asyncio.gather(*clients)
    finally:
        faults.cancel()
        await asyncio.gather(faults, return_exceptions=True)
    # Each recovery watch is bounded by --recovery-timeout; a stall still under way ends with it.
    await asyncio.gather(*recoveries, return_exceptions=True)


# -- the report -------------------------------------------------------------------------------------------


def summarize(run: Run, leaks: dict, routing: dict, failures: dict, reference_failures: list[str]) -> dict:
    outcomes = Counter(r.outcome for r in run.records)
    recoveries = [s for f in run.faults for s in f.recovery_s]
    back = [s for s in recoveries if s is not None]
    return {
        "requests": len(run.records),
        "completed": outcomes["ok"] + outcomes["wrong"] + outcomes["near_tie"],
        "exact": outcomes["ok"],
        "wrong": outcomes["wrong"],
        "near_ties": outcomes["near_tie"],
        "hangs": outcomes["hang"],
        "disconnects": outcomes["disconnected"],
        "errors_by_status": dict(Counter(r.error_key for r in run.records if r.outcome == "error").most_common()),
        "leaked_blocks": leaks["leaked_blocks"],
        "router_in_flight_after": leaks["router_in_flight"],
        "quiet_after_s": leaks["quiet_after_s"],
        "faults": dict(Counter(f.kind for f in run.faults if f.how in ("signal", "hook"))),
        "faults_failed_or_skipped": [
            f"{f.kind}: {f.how} {f.error}".strip() for f in run.faults if f.how not in ("signal", "hook")
        ],
        "recovery_s": {"min": min(back), "max": max(back)} if back else None,
        "unrecovered": sum(1 for s in recoveries if s is None),
        "p_to_d_share": routing["p_to_d_share"],
        "routing_decisions": routing["decisions"],
        **{name: value for name, value in failures.items()},
        "reference_prompts": len(run.references),
        "reference_failures": reference_failures,
    }


def print_summary(summary: dict, title: str) -> None:
    def row(name: str, value) -> None:
        print(f"{name:34} {value}")

    print(f"{'=' * 20} {title} {'=' * 20}")
    row("requests", f"{summary['requests']}  (replaying {summary['reference_prompts']} reference prompts)")
    row("completed / exact", f"{summary['completed']} / {summary['exact']}")
    row("WRONG (200, not the reference)", summary["wrong"])
    row("near ties (greedy float ties)", summary["near_ties"])
    row("HANGS", summary["hangs"])
    row("intended disconnects", summary["disconnects"])
    errors = ", ".join(f"{k} ×{v}" for k, v in summary["errors_by_status"].items()) or "none"
    row("errors by status", errors)
    row(
        "LEAKED KV blocks",
        f"{summary['leaked_blocks']}  (router requests in flight: {summary['router_in_flight_after']})",
    )
    row("faults injected", ", ".join(f"{k} ×{v}" for k, v in summary["faults"].items()) or "none")
    recovery = summary["recovery_s"]
    recovered = f"{recovery['min']:.1f}–{recovery['max']:.1f}" if recovery else "-"
    row("recovery (s), min–max", f"{recovered}  (not back in time: {summary['unrecovered']})")
    share = summary["p_to_d_share"]
    decisions = ", ".join(f"{k} {v:g}" for k, v in summary["routing_decisions"].items())
    row("prefill → decode share", f"{share:.0%}  ({decisions})" if share is not None else "-")
    row("migrations / prefill retries / lease expiries", " / ".join(f"{summary[n]:g}" for n in FAILURE_COUNTERS))


def print_findings(run: Run, summary: dict, limit: int = 5) -> None:
    """The evidence behind the failure counts: the first few of each kind."""
    for outcome in ("wrong", "near_tie", "hang", "error"):
        found = [r for r in run.records if r.outcome == outcome]
        if not found:
            continue
        print(f"\n{outcome} ({len(found)}), first {min(limit, len(found))}:", file=sys.stderr)
        for r in found[:limit]:
            where = f"prompt {r.prompt_id} ({r.kind}) at {r.start_s:.1f}s+{r.elapsed_s:.1f}s"
            where += f", faults during: {r.faults_during}, {r.since_fault_s}s after the last fault"
            detail = r.error if outcome == "error" else json.dumps(r.evidence, ensure_ascii=True)
            print(f"  {where}: {detail}", file=sys.stderr)
    for item in summary["faults_failed_or_skipped"]:
        print(f"fault not injected: {item}", file=sys.stderr)
    if summary["leaked_blocks"] or summary["router_in_flight_after"]:
        print(f"still held once quiet: {summary['held']}", file=sys.stderr)


def failed(summary: dict) -> bool:
    return bool(
        summary["wrong"]
        or summary["hangs"]
        or summary["leaked_blocks"]
        or summary["router_in_flight_after"]
        or summary["unrecovered"]
    )


# -- the command ------------------------------------------------------------------------------------------


async def chaos(args, base_url: str) -> int:
    limits = httpx.Limits(max_connections=args.clients * 2 + 8, max_keepalive_connections=args.clients * 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout, connect=10.0), limits=limits) as client:
        view = ClusterView(client, base_url, args.admin_token)
        run = Run(args, base_url, "", client, view, build_prompts(args.prompts, args.prompt_len, args.seed))
        expected = None if args.url else {"prefill": args.prefill, "decode": args.decode}
        before_faults = await wait_serving(run, expected, args.up_timeout)
        run.model = args.served_model or await _first_model(client, base_url, args.api_key)
        print(f"serving {run.model} with {before_faults}; reference pass over {len(run.prompts)} prompts", flush=True)
        reference_failures = await reference_pass(run)
        if not run.references:
            print(f"splitserve bench chaos: every reference request failed: {reference_failures[:3]}", file=sys.stderr)
            return 2
        injector = Injector(
            Hooks(args.kill_hook, args.restart_hook, args.stall_hook), _signals_allowed(args), random.Random(args.seed)
        )
        counters_before = await view.counters()
        print(
            f"fault phase: {args.duration:g}s, {args.clients} clients, a fault every {args.kill_every:g}s", flush=True
        )
        try:
            await fault_phase(run, injector)
        finally:
            injector.release_all()
        leaks = await settle(view, args.settle_timeout)
        counters_after = await view.counters()
    routing = routing_share(counters_before, counters_after)
    failures = counter_deltas(counters_before, counters_after, FAILURE_COUNTERS)
    summary = summarize(run, leaks, routing, failures, reference_failures)
    summary["held"] = leaks["held"]
    title = f"chaos: {args.url or f'local up {args.prefill}P+{args.decode}D {args.transport}'}"
    print_summary(summary, title)
    print_findings(run, summary)
    if args.json_path:
        _write_json(args, run, summary)
    return 1 if failed(summary) else 0


def _signals_allowed(args) -> bool:
    """Signals reach workers of a local `up`, or of a --url on this host, unless hooks are given."""
    host = httpx.URL(args.url).host if args.url else "127.0.0.1"
    return host in ("127.0.0.1", "localhost", "::1")


async def _first_model(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = await client.get(base_url + "/v1/models", headers=headers, timeout=10.0)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def _write_json(args, run: Run, summary: dict) -> None:
    with open(args.json_path, "w") as handle:
        json.dump(
            {
                "config": report_config(args),
                "summary": summary,
                "faults": [asdict(f) for f in run.faults],
                "requests": [asdict(r) for r in run.records],
            },
            handle,
            indent=1,
        )


LOCAL_UP_ONLY = ("prefill_flag", "decode_flag", "transport_flag", "kv_cache_mb", "log")


def check_args(args, given: Given) -> None:
    if args.url:
        given.refuse(LOCAL_UP_ONLY, "for the local up this command starts; not with --url")


def run(args) -> int:
    args.prefill = args.prefill_flag if args.prefill_flag is not None else 2
    args.decode = args.decode_flag if args.decode_flag is not None else 2
    args.transport = args.transport_flag or "grpc"
    args.served_model = args.model if args.url else None
    args.settle_timeout = args.settle_timeout or 2 * args.lease_ms / 1000.0 + 20.0
    args.admin_token = admin_token_from_env()  # $SPLITSERVE_ADMIN_TOKEN[_FILE]; a local up gets one of ours
    args.api_key = api_key_from(args)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.url:
            return asyncio.run(chaos(args, args.url.rstrip("/").removesuffix("/v1")))
        with local_up(args) as url:
            return asyncio.run(chaos(args, url))
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: stalled workers continued, the local up stopped


def _fault_list(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"takes a comma-separated list of {', '.join(FAULT_KINDS)}; got {text!r}")
    return kinds


def add_arguments(parser) -> None:
    target = parser.add_argument_group("deployment (default: a local `splitserve up` started and stopped here)")
    target.add_argument("--url", default=None, help="an existing deployment's router, http://HOST:PORT")
    target.add_argument(
        "--prefill",
        dest="prefill_flag",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="local up: prefill workers (2)",
    )
    target.add_argument(
        "--decode",
        dest="decode_flag",
        type=positive_int,
        default=None,
        metavar="N",
        help="local up: decode workers (2)",
    )
    target.add_argument(
        "--transport", dest="transport_flag", choices=["grpc", "nixl"], default=None, help="local up: (grpc)"
    )
    target.add_argument("--model", default=None, help="local up: the model (demo); --url: the served name to ask for")
    target.add_argument(
        "--kv-cache-mb",
        type=positive_int,
        default=8,
        help="local up: each worker's KV pool; small, so replayed prompts leave the prefix caches and go P→D",
    )
    target.add_argument(
        "--lease-ms",
        type=int_between(1, MAX_LEASE_MS),
        default=5000,
        help="the decode workers' reservation lease (local up: set to this)",
    )
    target.add_argument("--log", default=None, help="local up: write its output here (default: a temporary file)")
    target.add_argument("--up-timeout", type=positive_float, default=240.0, help="seconds for the cluster to serve")
    add_api_key_arguments(target, "file with the router's API key (default: $SPLITSERVE_API_KEYS[_FILE])")
    hooks = parser.add_argument_group(
        "hooks: shell templates with {worker_id} {role} {address} {host} {port} {pid} {seconds}; "
        "default: signals to the PIDs /admin/status reports (local processes only)"
    )
    hooks.add_argument("--kill-hook", default=None, help="kills a worker, e.g. 'kubectl delete pod {worker_id}'")
    hooks.add_argument("--restart-hook", default=None, help="run after each kill, where nothing restarts workers")
    hooks.add_argument("--stall-hook", default=None, help="freezes a worker for {seconds} and returns after")
    load = parser.add_argument_group("load and faults")
    load.add_argument("--duration", type=positive_float, default=300.0, help="seconds of traffic under faults")
    load.add_argument("--clients", type=positive_int, default=6, help="concurrent clients")
    load.add_argument("--kill-every", type=positive_float, default=45.0, help="seconds between faults")
    load.add_argument(
        "--faults", type=_fault_list, default=list(FAULT_KINDS), help=f"cycled in order: {','.join(FAULT_KINDS)}"
    )
    load.add_argument("--stall-seconds", type=positive_float, default=6.0, help="how long a `stall` freezes its worker")
    load.add_argument("--disconnect-fraction", type=share, default=0.1, help="requests closed after a few chunks")
    load.add_argument("--prompts", type=positive_int, default=64, help="distinct prompts, each with its reference")
    load.add_argument(
        "--prompt-len", type=positive_int, default=320, help="bytes of a long prompt (demo model: tokens)"
    )
    load.add_argument("--max-tokens", type=positive_int, default=48)
    load.add_argument("--request-timeout", type=positive_float, default=120.0, help="no answer within this: a hang")
    load.add_argument(
        "--recovery-timeout", type=positive_float, default=120.0, help="a worker not back within this: a failure"
    )
    load.add_argument("--settle-timeout", type=positive_float, default=None, help="default: 2 leases + 20 s")
    load.add_argument(
        "--tie-tolerance",
        type=non_negative_float,
        default=1e-4,
        help="a token mismatch where the reference's best two logprobs were this close is a near tie, not wrong",
    )
    load.add_argument(
        "--max-requests", type=positive_int, default=100_000, help="per client, a bound besides --duration"
    )
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--json", dest="json_path", default=None, help="write the summary, faults and requests here")
