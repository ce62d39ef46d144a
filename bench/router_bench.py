"""``splitserve bench router``: what the router costs.

1. TTFT the router adds: the same 1-token request straight to the decode worker's gRPC Generate vs
   through the router's HTTP API (both from this process, alternating), p50 and p99.
2. The highest request rate one router process sustains without errors: 1-token requests at rising
   rates until requests fail or the router falls behind the arrivals.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np

from bench import processes
from bench.serve_bench import BenchRequest, run_load, summarize
from protos import common_pb2, decode_pb2, decode_pb2_grpc
from protos.cluster_auth import ClusterAuth

PROMPT = list(range(3, 35))


async def _direct(stub, index: int) -> float:
    start = time.perf_counter()
    request = decode_pb2.GenerateRequest(
        request_id=f"direct-{index}", prompt_token_ids=PROMPT, params=common_pb2.SamplingParams(max_tokens=1)
    )
    async for _ in stub.Generate(request, timeout=30):
        pass
    return time.perf_counter() - start


async def _routed(client: httpx.AsyncClient, url: str) -> float:
    start = time.perf_counter()
    reply = await client.post(
        f"{url}/v1/completions", json={"model": "demo", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    )
    reply.raise_for_status()
    return time.perf_counter() - start


async def measure_overhead(decode_address: str, url: str, samples: int) -> dict:
    async with ClusterAuth.from_env().aio_channel(decode_address) as channel, httpx.AsyncClient(timeout=30) as client:
        stub = decode_pb2_grpc.DecodeWorkerStub(channel)
        for index in range(5):  # warm both paths
            await _direct(stub, -index - 1)
            await _routed(client, url)
        direct, routed = [], []
        for index in range(samples):
            direct.append(await _direct(stub, index))
            routed.append(await _routed(client, url))
    ms = lambda values, q: float(np.percentile(np.array(values) * 1000, q))  # noqa: E731
    return {
        "samples": samples,
        "direct_p50_ms": ms(direct, 50),
        "direct_p99_ms": ms(direct, 99),
        "router_p50_ms": ms(routed, 50),
        "router_p99_ms": ms(routed, 99),
        "added_p50_ms": ms(routed, 50) - ms(direct, 50),
        "added_p99_ms": ms(routed, 99) - ms(direct, 99),
    }


def sustained_rate(url: str, rates: list[float], seconds: float) -> list[dict]:
    rows = []
    for rate in rates:
        count = max(10, int(rate * seconds))
        requests = [BenchRequest(PROMPT, len(PROMPT), 1)] * (count + 5)
        # Evenly spaced arrivals (gamma with a huge shape): the arrival window is count / rate exactly.
        records, duration = asyncio.run(run_load(f"{url}/v1", "demo", requests, rate, 1000.0, None, 5, seed=int(rate)))
        summary = summarize(records, duration)
        achieved = summary["completed"] / duration if duration else 0.0
        # Kept up: nothing failed and the last request finished within 10% (+0.5 s) of the arrival window.
        ok = summary["failed"] == 0 and duration <= 1.1 * count / rate + 0.5
        rows.append(
            {
                "offered_rps": rate,
                "achieved_rps": achieved,
                "failed": summary["failed"],
                "ttft_p99_ms": summary["ttft_ms"]["p99"],
                "sustained": ok,
            }
        )
        print(
            f"  offered {rate:7.1f} req/s  achieved {achieved:7.1f}  failed {summary['failed']:3d}  TTFT p99 "
            f"{summary['ttft_ms']['p99'] or 0:8.1f} ms  {'ok' if ok else 'NOT sustained'}",
            flush=True,
        )
        if not ok:
            break
    return rows


def run(args) -> int:
    decode, decode_address = processes.start_worker("decode", "--model", args.model, "--threads", "1")
    port = processes.free_port()
    router = processes.start_router(
        port,
        processes.free_port(),
        [],
        [decode_address],
        "--model",
        args.model,
        "--max-running",
        "1024",
        "--max-queued",
        "4096",
    )
    url = f"http://127.0.0.1:{port}"
    with processes.running(router, decode):
        overhead = asyncio.run(measure_overhead(decode_address, url, args.samples))
        print(f"router-added TTFT (1-token requests, {args.samples} samples each, alternating):")
        print(
            f"  direct to decode worker  p50 {overhead['direct_p50_ms']:.2f} ms  p99 {overhead['direct_p99_ms']:.2f} ms"
        )
        print(
            f"  through the router       p50 {overhead['router_p50_ms']:.2f} ms  p99 {overhead['router_p99_ms']:.2f} ms"
        )
        print(
            f"  added by the router      p50 {overhead['added_p50_ms']:.2f} ms  p99 {overhead['added_p99_ms']:.2f} ms"
        )
        print("sustained request rate of one router process:")
        rates = [float(r) for r in args.rates.split(",")]
        rows = sustained_rate(url, rates, args.seconds)
    best = max((r["offered_rps"] for r in rows if r["sustained"]), default=0.0)
    print(f"highest sustained rate: {best:.0f} req/s")
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump({"overhead": overhead, "rates": rows, "highest_sustained_rps": best}, handle, indent=1)
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="demo")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--rates", default="25,50,100,150,200,300,400")
    parser.add_argument("--seconds", type=float, default=8.0, help="per rate")
    parser.add_argument("--json", dest="json_path", default=None)
