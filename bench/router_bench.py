"""``splitserve bench router``: what the router costs.

1. TTFT the router adds: the same 1-token request (same prompt, same sampling record on the wire) straight to the
   decode worker's gRPC Generate vs through the router's HTTP API, from this process, in rounds whose order is drawn
   at random; p50 and p99 of each path, their difference checked against the targets (1 ms p50, 2 ms p99). The router
   sends its requests on one stream per worker (router/worker_streams.py), a client's direct call is a call of its
   own: the same request straight on such a stream is measured too, and what the router's HTTP, validation and
   routing cost against it is printed apart. The HTTP side uses a minimal keep-alive HTTP/1.1 client, so that what is
   measured is the router and not an HTTP client library; what httpx would add on top is measured too.
2. The same for a disaggregated request (a router that sends every prompt to a prefill worker): through the router
   against a client that makes the same calls itself (Prefill beside Reserve, SendTicket, then the reserved Generate,
   each a call of its own, and on the workers' streams as the router sends them), prompts drawn at random (no prefix
   cache hit, so each request moves its KV); then the router's CPU per such request, over routed requests alone.
3. The highest request rate one router process sustains without errors: 1-token streamed requests at rising rates
   until requests fail or the router falls behind the arrivals. For each rate the CPU time per request of the
   router (all threads, and its event-loop thread alone), the decode worker and this load generator is measured
   from /proc: the event-loop thread's CPU per request bounds one router process at 1 / that rate on a whole core.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import time

import grpc
import httpx
import numpy as np

from bench import processes
from bench.args import list_of, positive_float, positive_int
from bench.serve_bench import BenchRequest, run_load, summarize
from bench.sim.host import stat_ticks
from contract.sampling import SamplingParams
from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from protos.cluster_auth import ClusterAuth
from router.worker_streams import GenerateLink, decode_calls, prefill_calls

PROMPT = list(range(3, 35))
DISAGGREGATED_PROMPT_TOKENS = 64  # 4 blocks of 16: a KV transfer to make, small beside the calls around it
TARGET_P50_MS = 1.0
TARGET_P99_MS = 2.0
WARMUP_PAIRS = 20


class HttpClient:
    """One keep-alive HTTP/1.1 connection that posts JSON and reads a Content-Length answer: about the least an HTTP
    client can do, so its own cost stays out of the router's."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> HttpClient:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc) -> None:
        self._writer.close()

    def request_bytes(self, path: str, payload: dict) -> bytes:
        body = json.dumps(payload).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def send(self, request: bytes) -> bytes:
        """Writes a prepared request; the answer's body. RuntimeError unless it is a 200 with a Content-Length."""
        self._writer.write(request)
        status = await self._reader.readline()
        length = None
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RuntimeError(f"answer without content-length: {status!r}")
        body = await self._reader.readexactly(length)
        if not status.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{status.decode().strip()}: {body[:300]!r}")
        return body


def _routed_payload() -> dict:
    return {"model": "demo", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}


def _direct_request(index: int) -> decode_pb2.GenerateRequest:
    # What the router sends for _routed_payload(): the same record, converted by the same code.
    params = SamplingParams(max_tokens=1, temperature=0.0).to_wire()
    return decode_pb2.GenerateRequest(request_id=f"direct-{index}", prompt_token_ids=PROMPT, params=params)


async def _timed(call) -> float:
    start = time.perf_counter()
    await call()
    return time.perf_counter() - start


async def _own_generate(stub, request: decode_pb2.GenerateRequest) -> None:
    """A Generate as a call of its own, read to its end."""
    async for _ in stub.Generate(request, timeout=30):
        pass


async def _streamed_generate(link: GenerateLink, request: decode_pb2.GenerateRequest) -> None:
    """A Generate on the worker's stream, as the router sends it, read to its end."""
    call = link.generate(request)
    while await call.read() is not grpc.aio.EOF:
        pass


async def _alternate(paths: dict, samples: int, rng: random.Random) -> dict[str, list[float]]:
    """Each path's time, ``samples`` rounds after WARMUP_PAIRS, the order drawn each round: no path always runs first,
    or right after another."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for index in range(WARMUP_PAIRS + samples):
        order = list(paths)
        rng.shuffle(order)
        for name in order:
            elapsed = await _timed(paths[name])
            if index >= WARMUP_PAIRS:
                times[name].append(elapsed)
    return times


async def measure_overhead(decode_address: str, url: str, samples: int, seed: int = 0) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    async with (
        ClusterAuth.from_env().aio_channel(decode_address) as channel,
        HttpClient(host, int(port)) as http,
        httpx.AsyncClient(timeout=30) as library,
    ):
        routed_request = http.request_bytes("/v1/completions", _routed_payload())
        stub = decode_pb2_grpc.DecodeWorkerStub(channel)
        link = GenerateLink(stub)
        counter = itertools.count()

        async def direct() -> None:
            await _own_generate(stub, _direct_request(next(counter)))

        async def direct_stream() -> None:
            await _streamed_generate(link, _direct_request(next(counter)))

        async def routed() -> None:
            await http.send(routed_request)

        async def routed_httpx() -> None:
            (await library.post(f"{url}/v1/completions", json=_routed_payload())).raise_for_status()

        answer = json.loads(await http.send(routed_request))
        if answer["usage"]["completion_tokens"] != 1:
            raise RuntimeError(f"the routed request did not generate one token: {answer}")
        paths = {"direct": direct, "stream": direct_stream, "routed": routed, "httpx": routed_httpx}
        times = await _alternate(paths, samples, random.Random(seed))
    q = _percentiles(times)
    paired = (np.array(times["routed"]) - np.array(times["direct"])) * 1000
    return {
        "samples": samples,
        **q,
        "added_p50_ms": q["routed_p50_ms"] - q["direct_p50_ms"],
        "added_p99_ms": q["routed_p99_ms"] - q["direct_p99_ms"],
        "paired_added_p50_ms": float(np.median(paired)),
        "added_to_stream_p50_ms": q["routed_p50_ms"] - q["stream_p50_ms"],
        "added_to_stream_p99_ms": q["routed_p99_ms"] - q["stream_p99_ms"],
        "httpx_extra_p50_ms": q["httpx_p50_ms"] - q["routed_p50_ms"],
    }


def _percentiles(times: dict[str, list[float]]) -> dict:
    ms = {name: np.array(values) * 1000 for name, values in times.items()}
    return {f"{name}_p{p}_ms": float(np.percentile(values, p)) for name, values in ms.items() for p in (0, 50, 99)}


async def measure_disaggregated(
    prefill_address: str, decode_address: str, url: str, samples: int, meter: CpuMeter, seed: int = 0
) -> dict:
    """1-token requests with a prompt of their own, alternately through the router (which prefills every prompt on
    the prefill worker) and straight to the workers; the router's CPU over the routed requests."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    rng = random.Random(seed)
    params = SamplingParams(max_tokens=1, temperature=0.0).to_wire()
    auth = ClusterAuth.from_env()
    async with (
        auth.aio_channel(prefill_address) as p_channel,
        auth.aio_channel(decode_address) as d_channel,
        HttpClient(host, int(port)) as http,
    ):
        prefill, decode = prefill_pb2_grpc.PrefillWorkerStub(p_channel), decode_pb2_grpc.DecodeWorkerStub(d_channel)
        counter = itertools.count()

        def prompt() -> list[int]:
            return [rng.randrange(3, 250) for _ in range(DISAGGREGATED_PROMPT_TOKENS)]

        d_link, p_link = decode_calls(decode), prefill_calls(prefill)
        generate_link = GenerateLink(decode)

        async def by_hand(reserve, prefill_call, send_ticket, generate) -> None:
            """The calls the router makes, in its order: Prefill beside Reserve, SendTicket, the reserved Generate."""
            request_id, tokens = f"direct-{next(counter)}", prompt()
            prefilling = asyncio.ensure_future(
                prefill_call(
                    prefill_pb2.PrefillRequest(
                        request_id=request_id, prompt_token_ids=tokens, params=params, ticket_follows=True
                    )
                )
            )
            ticket = await reserve(
                decode_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=tokens, params=params)
            )
            await send_ticket(prefill_pb2.TicketDelivery(request_id=request_id, ticket=ticket))
            await prefilling
            await generate(decode_pb2.GenerateRequest(request_id=request_id, reserved=True, token=ticket.token))

        def direct():  # each a call of its own, as a client without the router's streams makes them
            return by_hand(
                lambda r: decode.Reserve(r, timeout=30),
                lambda r: prefill.Prefill(r, timeout=30),
                lambda r: prefill.SendTicket(r, timeout=30),
                lambda r: _own_generate(decode, r),
            )

        def direct_stream():  # on one stream per worker and kind, as the router sends them
            return by_hand(
                lambda r: d_link.call("Reserve", r, 30),
                lambda r: p_link.call("Prefill", r, 30),
                lambda r: p_link.call("SendTicket", r, 30),
                lambda r: _streamed_generate(generate_link, r),
            )

        async def routed() -> None:
            payload = {"model": "demo", "prompt": prompt(), "max_tokens": 1, "temperature": 0}
            await http.send(http.request_bytes("/v1/completions", payload))

        paths = {"direct": direct, "stream": direct_stream, "routed": routed}
        transfers = (await prefill.Stats(common_pb2.StatsRequest())).kv_transfers_completed
        times = await _alternate(paths, samples, rng)
        # The router's CPU over routed requests alone, back to back: between them, the requests made by hand would
        # cost it too (their KV events reach it).
        before = meter.sample()
        for _ in range(samples):
            await routed()
        after = meter.sample()
        transfers = (await prefill.Stats(common_pb2.StatsRequest())).kv_transfers_completed - transfers
    made = len(paths) * (WARMUP_PAIRS + samples) + samples
    if transfers != made:
        raise RuntimeError(f"{transfers} KV transfers for {made} requests: not all disaggregated")
    result = {"samples": samples, **_percentiles(times)}
    result["added_p50_ms"] = result["routed_p50_ms"] - result["direct_p50_ms"]
    result["added_p99_ms"] = result["routed_p99_ms"] - result["direct_p99_ms"]
    result["added_to_stream_p50_ms"] = result["routed_p50_ms"] - result["stream_p50_ms"]
    result["added_to_stream_p99_ms"] = result["routed_p99_ms"] - result["stream_p99_ms"]
    result["cpu_ms_per_request"] = {
        name: (after[name] - before[name]) * 1000 / samples if before[name] is not None else None
        for name in ("router", "router_loop")
    }
    return result


def print_disaggregated(result: dict) -> None:
    r, cpu = result, result["cpu_ms_per_request"]
    print(
        f"a disaggregated request ({r['samples']} samples per path, {DISAGGREGATED_PROMPT_TOKENS}-token prompts drawn "
        "at random, 1 token; the prefill worker computes each prompt and moves its KV):"
    )
    print(f"  straight to the workers (4 calls) p50 {r['direct_p50_ms']:.2f} ms  p99 {r['direct_p99_ms']:.2f} ms")
    print(f"  through the router (HTTP)         p50 {r['routed_p50_ms']:.2f} ms  p99 {r['routed_p99_ms']:.2f} ms")
    p50, p99 = r["added_p50_ms"], r["added_p99_ms"]
    print(
        f"  added by the router               p50 {p50:.2f} ms ({_verdict(p50, TARGET_P50_MS)})  "
        f"p99 {p99:.2f} ms ({_verdict(p99, TARGET_P99_MS)})"
    )
    print(
        f"  straight on the workers' streams (as the router sends) p50 {r['stream_p50_ms']:.2f} ms  p99 "
        f"{r['stream_p99_ms']:.2f} ms: the router's HTTP, validation and routing add p50 "
        f"{r['added_to_stream_p50_ms']:.2f} ms, p99 {r['added_to_stream_p99_ms']:.2f} ms to it"
    )
    print(
        f"  the router's CPU per request: {_ms(cpu['router'])} ms (event loop {_ms(cpu['router_loop'])} ms: one "
        f"router process tops out near {1000 / cpu['router_loop']:.0f} such req/s with a whole core to itself)"
        if cpu["router_loop"]
        else "  the router's CPU per request: n/a (no /proc here)"
    )


def print_overhead(overhead: dict) -> None:
    o = overhead
    print(
        f"router-added TTFT (1-token requests, {o['samples']} samples per path, order drawn at random per round; "
        "the same prompt and sampling record both ways):"
    )
    print(f"  direct to decode worker (gRPC)  p50 {o['direct_p50_ms']:.2f} ms  p99 {o['direct_p99_ms']:.2f} ms")
    print(f"  through the router (HTTP)       p50 {o['routed_p50_ms']:.2f} ms  p99 {o['routed_p99_ms']:.2f} ms")
    p50, p99 = o["added_p50_ms"], o["added_p99_ms"]
    print(
        f"  added by the router             p50 {p50:.2f} ms ({_verdict(p50, TARGET_P50_MS)})  "
        f"p99 {p99:.2f} ms ({_verdict(p99, TARGET_P99_MS)})"
    )
    print(f"  (median of the per-round differences: {o['paired_added_p50_ms']:.2f} ms)")
    print(
        f"  direct on a stream (as the router sends) p50 {o['stream_p50_ms']:.2f} ms  p99 {o['stream_p99_ms']:.2f} ms: "
        f"the router's HTTP, validation and routing add p50 {o['added_to_stream_p50_ms']:.2f} ms, "
        f"p99 {o['added_to_stream_p99_ms']:.2f} ms to it"
    )
    print(
        f"  an httpx client costs {o['httpx_extra_p50_ms']:.2f} ms more at p50 (p50 {o['httpx_p50_ms']:.2f} ms, "
        f"p99 {o['httpx_p99_ms']:.2f} ms): the client's own time, not the router's"
    )


def _verdict(value_ms: float, target_ms: float) -> str:
    return f"{'met' if value_ms <= target_ms else 'MISSED'}: target <= {target_ms:g} ms"


class CpuMeter:
    """CPU seconds used so far by processes (all their threads) and by single threads, from /proc (Linux)."""

    def __init__(self, **pids: int) -> None:
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK")

    def _read(self, path: str) -> float | None:
        try:
            return stat_ticks(path) / self.tick
        except OSError:
            return None

    def sample(self) -> dict[str, float | None]:
        used = {name: self._read(f"/proc/{pid}/stat") for name, pid in self.pids.items()}
        # The router's main thread runs its event loop: HTTP, validation, routing and gRPC's Python side.
        used["router_loop"] = self._read(f"/proc/{self.pids['router']}/task/{self.pids['router']}/stat")
        return used


def sustained_rate(url: str, rates: list[float], seconds: float, meter: CpuMeter) -> list[dict]:
    rows = []
    for rate in rates:
        count = max(10, int(rate * seconds))
        requests = [BenchRequest(PROMPT, len(PROMPT), 1)] * (count + 5)
        # Evenly spaced arrivals (gamma with a huge shape): the arrival window is count / rate exactly.
        before = meter.sample()
        records, duration = asyncio.run(run_load(f"{url}/v1", "demo", requests, rate, 1000.0, None, 5, seed=int(rate)))
        after = meter.sample()
        summary = summarize(records, duration)
        achieved = summary["completed"] / duration if duration else 0.0
        # Kept up: nothing failed and the last request finished within 10% (+0.5 s) of the arrival window.
        ok = summary["failed"] == 0 and duration <= 1.1 * count / rate + 0.5
        # CPU per request over the whole run (its 5 warm-up requests included, hence count + 5).
        per_request = {
            name: (after[name] - before[name]) * 1000 / (count + 5) if before[name] is not None else None
            for name in before
        }
        rows.append(
            {
                "offered_rps": rate,
                "achieved_rps": achieved,
                "failed": summary["failed"],
                "ttft_p99_ms": summary["ttft_ms"]["p99"],
                "sustained": ok,
                "cpu_ms_per_request": per_request,
                "router_cores": (after["router"] - before["router"]) / duration if before["router"] else None,
            }
        )
        print(
            f"  offered {rate:6.1f} req/s  achieved {achieved:6.1f}  failed {summary['failed']:3d}  TTFT p99 "
            f"{summary['ttft_ms']['p99'] or 0:7.1f} ms  CPU ms/request: router {_ms(per_request['router'])} "
            f"(event loop {_ms(per_request['router_loop'])}), decode worker {_ms(per_request['decode'])}, load "
            f"generator {_ms(per_request['client'])}  {'ok' if ok else 'NOT sustained'}",
            flush=True,
        )
        if not ok:
            break
    return rows


def _ms(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "n/a"


def print_bound(rows: list[dict]) -> None:
    """What bounds the sustained rate: CPU per request of the router's event-loop thread, against one core."""
    sustained = [r for r in rows if r["sustained"] and r["cpu_ms_per_request"]["router_loop"] is not None]
    if not sustained:
        return
    top = max(sustained, key=lambda r: r["offered_rps"])
    cpu = top["cpu_ms_per_request"]
    loop_ms = cpu["router_loop"]
    total_ms = sum(cpu[name] for name in ("router", "decode", "client") if cpu[name] is not None)
    cores = len(os.sched_getaffinity(0))
    print("what bounds the sustained rate (CPU per request at the highest sustained rate):")
    print(
        f"  the router's event loop (one thread: HTTP, validation, routing, gRPC's Python side) uses {loop_ms:.2f} ms "
        f"per request: one router process tops out near {1000 / loop_ms:.0f} req/s with a whole core to itself"
    )
    print(
        f"  router, decode worker and load generator together use {total_ms:.2f} ms per request: "
        f"the {cores} cores here run out near {1000 * cores / total_ms:.0f} req/s"
    )


def run(args) -> int:
    if args.samples < 500:
        print(f"note: {args.samples} samples per path; a p99 of fewer than 500 rests on its 5 largest values or fewer")
    decode, decode_address = processes.start_worker("decode", "--model", args.model, "--threads", "1")
    prefill, prefill_address = processes.start_worker("prefill", "--model", args.model, "--threads", "1")
    with processes.running(decode, prefill):
        port = processes.free_port()
        # Every prompt on the prefill worker (none is short enough to stay on the decode worker).
        router = processes.start_router(
            port, processes.free_port(), [prefill_address], [decode_address], "--model", args.model,
            "--local-prefill-threshold", "1",
        )  # fmt: skip
        with processes.running(router):
            meter = CpuMeter(router=router.pid)
            url = f"http://127.0.0.1:{port}"
            disaggregated = asyncio.run(
                measure_disaggregated(prefill_address, decode_address, url, args.samples, meter)
            )
        processes.stop(prefill)  # out of the way of what follows
        port = processes.free_port()
        router = processes.start_router(
            port, processes.free_port(), [], [decode_address], "--model", args.model,
            "--max-running", "1024", "--max-queued", "4096",
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        with processes.running(router):
            overhead = asyncio.run(measure_overhead(decode_address, url, args.samples))
            print_overhead(overhead)
            print_disaggregated(disaggregated)
            print("sustained request rate of one router process (streamed 1-token requests, httpx load generator):")
            meter = CpuMeter(router=router.pid, decode=decode.pid, client=os.getpid())
            rows = sustained_rate(url, list(args.rates), args.seconds, meter)
    best = max((r["offered_rps"] for r in rows if r["sustained"]), default=0.0)
    print(f"highest sustained rate: {best:.0f} req/s")
    print_bound(rows)
    if args.json_path:
        with open(args.json_path, "w") as handle:
            report = {
                "overhead": overhead,
                "disaggregated": disaggregated,
                "rates": rows,
                "highest_sustained_rps": best,
            }
            json.dump(report, handle, indent=1)
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="demo")
    parser.add_argument(
        "--samples", type=positive_int, default=1000, help="timed requests per path (500 or more for a p99)"
    )
    parser.add_argument(
        "--rates", type=list_of(positive_float), default="50,100,200,300,400,500,600,800", help="requests/s"
    )
    parser.add_argument("--seconds", type=positive_float, default=6.0, help="per rate")
    parser.add_argument("--json", dest="json_path", default=None)
