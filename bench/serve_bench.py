"""``splitserve bench serve``: a load generator for any OpenAI-compatible endpoint.

Metrics follow vLLM's ``bench serve``: TTFT; TPOT = (latency - TTFT) / (output tokens - 1);
ITL = every gap between streamed chunks; E2EL; request/token throughput; goodput = completed
requests per second that meet every ``--goodput`` SLO.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass
class RequestRecord:
    prompt_len: int
    output_len: int  # requested
    success: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    start: float = 0.0

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


# -- datasets -------------------------------------------------------------------------------------


def random_dataset(
    count: int, input_len: int, output_len: int, range_ratio: float, prefix_len: int, vocab_size: int, seed: int
) -> list[BenchRequest]:
    """Token-id prompts (sent as such, so lengths are exact on any server) with lengths drawn
    uniformly from [len * (1 - range_ratio), len * (1 + range_ratio)], after a shared prefix."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab_size) for _ in range(prefix_len)]

    def length(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))))

    requests = []
    for _ in range(count):
        prompt = prefix + [rng.randrange(3, vocab_size) for _ in range(length(input_len))]
        requests.append(BenchRequest(prompt, len(prompt), length(output_len)))
    return requests


def sharegpt_dataset(path: str, count: int, seed: int, chars_per_token: float = 4.0) -> list[BenchRequest]:
    """First human turn as the prompt, the first reply's length (≈ chars / 4) as the output length."""
    with open(path) as handle:
        conversations = json.load(handle)
    pairs = []
    for item in conversations:
        turns = item.get("conversations") or item.get("conversation") or []
        if len(turns) >= 2 and turns[0].get("value") and turns[1].get("value"):
            pairs.append((turns[0]["value"], turns[1]["value"]))
    random.Random(seed).shuffle(pairs)
    return [
        BenchRequest(p, max(1, int(len(p) / chars_per_token)), max(1, int(len(r) / chars_per_token)))
        for p, r in pairs[:count]
    ]


# -- arrivals --------------------------------------------------------------------------------------


def arrival_gaps(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds between request starts: gamma with shape ``burstiness`` (1 = Poisson), mean 1/rate."""
    if rate == float("inf"):
        return [0.0] * count
    rng = np.random.default_rng(seed)
    return list(rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count))


# -- one request -------------------------------------------------------------------------------------


async def send(
    client: httpx.AsyncClient, base_url: str, model: str, request: BenchRequest, api_key: str | None
) -> RequestRecord:
    record = RequestRecord(request.prompt_len, request.output_len)
    body = {
        "model": model,
        "prompt": request.prompt,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    record.start = start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", f"{base_url}/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record.error = chunk["error"].get("message", "error")
                    return record
                now = time.perf_counter()
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                if last is None:
                    record.ttft = now - start
                else:
                    record.itl.append(now - last)
                last = now
        record.latency = time.perf_counter() - start
        record.output_tokens = record.output_tokens or len(record.itl) + 1
        record.success = last is not None
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    return record


# -- a run -------------------------------------------------------------------------------------------


async def run_load(
    base_url: str,
    model: str,
    requests: list[BenchRequest],
    rate: float,
    burstiness: float,
    max_concurrency: int | None,
    warmup: int,
    seed: int,
    api_key: str | None = None,
    timeout_s: float = 600.0,
) -> tuple[list[RequestRecord], float]:
    """Sends warmup requests (unrecorded), then the rest on the arrival schedule; returns records and duration."""
    limits = httpx.Limits(max_connections=max_concurrency or 1000, max_keepalive_connections=max_concurrency or 1000)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(send(client, base_url, model, r, api_key) for r in requests[:warmup]))
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def limited(request: BenchRequest) -> RequestRecord:
            if semaphore is None:
                return await send(client, base_url, model, request, api_key)
            async with semaphore:
                return await send(client, base_url, model, request, api_key)

        measured = requests[warmup:]
        tasks = []
        started = time.perf_counter()
        for request, gap in zip(measured, arrival_gaps(len(measured), rate, burstiness, seed)):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(request)))
        records = await asyncio.gather(*tasks)
        return list(records), time.perf_counter() - started


def _stats(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    array = np.array(values) * scale
    return {
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "p90": float(np.percentile(array, 90)),
        "p99": float(np.percentile(array, 99)),
    }


def summarize(records: list[RequestRecord], duration: float, goodput: dict[str, float] | None = None) -> dict:
    """Aggregate metrics (milliseconds for latencies), as vLLM's bench serve reports them."""
    done = [r for r in records if r.success]
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_len for r in done)
    summary = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_token_throughput": output / duration if duration else 0.0,
        "total_token_throughput": (output + prompt) / duration if duration else 0.0,
        "ttft_ms": _stats([r.ttft for r in done]),
        "tpot_ms": _stats([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": _stats([gap for r in done for gap in r.itl]),
        "e2el_ms": _stats([r.latency for r in done]),
    }
    if goodput:
        good = [r for r in done if meets(r, goodput)]
        summary["goodput"] = len(good) / duration if duration else 0.0
        summary["slo_attainment"] = len(good) / len(records) if records else 0.0
    return summary


def meets(record: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a completed request meets every SLO given in milliseconds (ttft, tpot, e2el)."""
    values = {"ttft": record.ttft * 1000, "tpot": (record.tpot or 0.0) * 1000, "e2el": record.latency * 1000}
    return record.success and all(values[name] <= limit for name, limit in slos.items())


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    slos = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput takes ttft:MS tpot:MS e2el:MS, got {item!r}")
        slos[name] = float(value)
    return slos


def print_summary(summary: dict, title: str = "serving benchmark") -> None:
    print(f"{'=' * 20} {title} {'=' * 20}")
    print(f"{'completed / failed':32} {summary['completed']} / {summary['failed']}")
    print(f"{'duration (s)':32} {summary['duration_s']:.2f}")
    print(f"{'request throughput (req/s)':32} {summary['request_throughput']:.2f}")
    print(f"{'output token throughput (tok/s)':32} {summary['output_token_throughput']:.1f}")
    print(f"{'total token throughput (tok/s)':32} {summary['total_token_throughput']:.1f}")
    if "goodput" in summary:
        print(f"{'goodput (req/s)':32} {summary['goodput']:.2f}  (SLO attainment {summary['slo_attainment']:.0%})")
    for name in ("ttft", "tpot", "itl", "e2el"):
        s = summary[f"{name}_ms"]
        if s["mean"] is None:
            continue
        print(
            f"{name.upper() + ' (ms)':32} mean {s['mean']:.1f}  median {s['median']:.1f}  p90 {s['p90']:.1f}  "
            f"p99 {s['p99']:.1f}"
        )


def run(args) -> int:
    if args.dataset == "sharegpt":
        if not args.dataset_path:
            raise SystemExit("splitserve: --dataset sharegpt needs --dataset-path FILE")
        requests = sharegpt_dataset(args.dataset_path, args.num_prompts + args.warmup, args.seed)
    else:
        requests = random_dataset(
            args.num_prompts + args.warmup,
            args.input_len,
            args.output_len,
            args.range_ratio,
            args.prefix_len,
            args.vocab_size,
            args.seed,
        )
    goodput = parse_goodput(args.goodput)
    records, duration = asyncio.run(
        run_load(
            args.base_url.rstrip("/"),
            args.model,
            requests,
            args.request_rate,
            args.burstiness,
            args.max_concurrency,
            args.warmup,
            args.seed,
            args.api_key,
        )
    )
    summary = summarize(records, duration, goodput)
    print_summary(summary)
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(
                {
                    "config": {k: v for k, v in vars(args).items() if k != "run"},
                    "summary": summary,
                    "requests": [asdict(r) for r in records],
                },
                handle,
                indent=1,
            )
    return 0 if summary["completed"] else 1


def add_arguments(parser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--dataset", choices=["random", "sharegpt"], default="random")
    parser.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--range-ratio", type=float, default=0.0)
    parser.add_argument("--prefix-len", type=int, default=0, help="tokens shared by every prompt")
    parser.add_argument("--vocab-size", type=int, default=256, help="random prompts draw token ids from [3, vocab)")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s; inf = all at once")
    parser.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson; < 1 burstier, > 1 steadier")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--goodput", nargs="*", default=None, metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50")
    parser.add_argument("--json", dest="json_path", default=None)
