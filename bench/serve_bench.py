"""``splitserve bench serve``: a load generator for any OpenAI-compatible endpoint.

Metrics follow vLLM's ``bench serve``: TTFT; TPOT = (latency - TTFT) / (output tokens - 1);
ITL = every gap between streamed chunks; E2EL; request/token throughput; goodput = completed
requests per second that meet every ``--goodput`` SLO.

Invoked as vLLM's is: ``--base-url http://HOST:PORT`` (``/v1`` may be included or left out),
``--endpoint /v1/completions`` or ``/v1/chat/completions``, ``--backend openai|openai-chat|vllm``;
the model defaults to the first the server lists at ``GET /v1/models``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

from bench.args import (
    Given,
    Refused,
    add_api_key_arguments,
    api_key_from,
    int_at_least,
    int_between,
    non_negative_int,
    or_inf,
    positive_float,
    positive_int,
    report_config,
    share,
)
from router.config import API_KEY_SOURCES

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
# vLLM's backends that speak the OpenAI API, and the endpoint each posts to by default.
BACKEND_ENDPOINTS = {"openai": COMPLETIONS, "vllm": COMPLETIONS, "openai-chat": CHAT_COMPLETIONS}


@dataclass(frozen=True)
class Target:
    """Where the load goes: the server's base URL (no ``/v1``) and the API path requests are posted to."""

    base_url: str
    endpoint: str = COMPLETIONS

    @classmethod
    def of(cls, base_url: str, endpoint: str = COMPLETIONS) -> Target:
        """Takes the base URL as vLLM users write it (``http://host:port``) or as OpenAI clients do (``.../v1``)."""
        base = base_url.rstrip("/").removesuffix("/v1")
        return cls(base, endpoint if endpoint.startswith("/") else "/" + endpoint)

    @property
    def url(self) -> str:
        return self.base_url + self.endpoint

    @property
    def models_url(self) -> str:
        return self.base_url + "/v1/models"

    @property
    def chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")


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
    status: int = 0  # HTTP status of a failed request (200: an error in the stream); 0: no response
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


def request_body(target: Target, model: str, request: BenchRequest) -> dict:
    """A streamed completion of ``output_len`` tokens. Chat messages carry text, so a token-id prompt
    goes as its ids written out; the server's usage then gives the prompt's real length."""
    body = {
        "model": model,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if target.chat:
        prompt = request.prompt if isinstance(request.prompt, str) else " ".join(map(str, request.prompt))
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = request.prompt
    return body


def _is_token_chunk(chunk: dict) -> bool:
    """Whether a streamed chunk carries output; a chat stream opens with a chunk announcing the role."""
    choices = chunk.get("choices")
    if not choices:
        return False
    delta = choices[0].get("delta")
    return not (delta and "role" in delta and not delta.get("content"))


async def send(
    client: httpx.AsyncClient, target: Target, model: str, request: BenchRequest, api_key: str | None
) -> RequestRecord:
    record = RequestRecord(request.prompt_len, request.output_len)
    body = request_body(target, model, request)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    record.start = start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", target.url, json=body, headers=headers) as response:
            if response.status_code != 200:
                record.status = response.status_code
                text = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:500]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record.status = response.status_code
                    record.error = chunk["error"].get("message", "error")
                    return record
                now = time.perf_counter()
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]
                    record.prompt_len = chunk["usage"].get("prompt_tokens") or record.prompt_len
                if not _is_token_chunk(chunk):
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
    endpoint: str = COMPLETIONS,
) -> tuple[list[RequestRecord], float]:
    """Sends warmup requests (unrecorded), then the rest on the arrival schedule; returns records and duration.

    ``base_url`` may end in ``/v1`` or not; requests go to ``endpoint`` under it."""
    target = Target.of(base_url, endpoint)
    limits = httpx.Limits(max_connections=max_concurrency or 1000, max_keepalive_connections=max_concurrency or 1000)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(send(client, target, model, r, api_key) for r in requests[:warmup]))
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def limited(request: BenchRequest) -> RequestRecord:
            if semaphore is None:
                return await send(client, target, model, request, api_key)
            async with semaphore:
                return await send(client, target, model, request, api_key)

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


def goodput_slo(text: str) -> tuple[str, float]:
    """One --goodput item, NAME:MS: an SLO in milliseconds on ttft, tpot or e2el."""
    name, _, value = text.partition(":")
    if name not in ("ttft", "tpot", "e2el") or not value:
        raise argparse.ArgumentTypeError(f"takes ttft:MS tpot:MS e2el:MS, got {text!r}")
    return name, positive_float(value)


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


# -- the command ------------------------------------------------------------------------------------


def resolve_target(args) -> Target:
    """vLLM's rules: ``--base-url`` (else ``--host`` and ``--port``) plus ``--endpoint``, whose default
    follows ``--backend``. A backend and an endpoint that speak different APIs are refused."""
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    if args.endpoint is None:
        return Target.of(base_url, BACKEND_ENDPOINTS[args.backend or "openai"])
    target = Target.of(base_url, args.endpoint)
    if args.backend is not None and target.chat != (BACKEND_ENDPOINTS[args.backend] == CHAT_COMPLETIONS):
        raise Refused(
            f"--backend {args.backend} speaks {BACKEND_ENDPOINTS[args.backend]}, "
            f"not --endpoint {args.endpoint}: change one of them, or leave --backend out"
        )
    return target


def served_models(target: Target, api_key: str | None) -> list[str]:
    """The model ids at the server's ``GET /v1/models``; raises httpx.HTTPError or ValueError."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(target.models_url, headers=headers, timeout=30)
    response.raise_for_status()
    try:
        return [model["id"] for model in response.json()["data"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{target.models_url} answered no OpenAI model list: {response.text[:200]}") from exc


def default_model(target: Target, api_key: str | None) -> str:
    """The first model the server lists, as vLLM's ``bench serve`` picks it when no ``--model`` is given."""
    try:
        models = served_models(target, api_key)
    except (httpx.HTTPError, ValueError) as exc:
        raise SystemExit(
            f"splitserve bench serve: no --model given, and GET {target.models_url} failed: {exc}\n"
            "pass --model NAME, or check --base-url (http://HOST:PORT, with or without /v1)"
        ) from None
    if not models:
        raise SystemExit(f"splitserve bench serve: {target.models_url} lists no model; pass --model NAME")
    return models[0]


def advice(record: RequestRecord, target: Target, model: str, api_key: str | None) -> str | None:
    """What to change after ``record`` failed, where its error says."""
    if record.status == 0:
        return f"is the server up at {target.base_url}? --base-url takes http://HOST:PORT, with or without /v1"
    if record.status in (401, 403):
        return f"the server wants an API key: give it in {API_KEY_SOURCES}"
    if record.status not in (404, 405):
        return None
    try:
        models = served_models(target, api_key)
    except (httpx.HTTPError, ValueError):
        return (
            f"GET {target.models_url} fails too: is {target.base_url} the server's base URL? "
            "--base-url takes http://HOST:PORT, with or without /v1"
        )
    if model not in models:
        return (
            f"model {model!r} is not served; the server lists {', '.join(models) or 'none'}: "
            f"pass --model {models[0] if models else 'NAME'}, or leave --model out"
        )
    others = " or ".join(path for path in (COMPLETIONS, CHAT_COMPLETIONS) if path != target.endpoint)
    return f"the server has no {target.endpoint}: pass --endpoint {others}"


def report_failures(records: list[RequestRecord], target: Target, model: str, api_key: str | None) -> None:
    """Prints the first failed request's error, and what to change where the error says."""
    failed = [r for r in records if not r.success]
    if not failed:
        return
    print(f"{len(failed)} of {len(records)} requests failed; the first, POST {target.url}:", file=sys.stderr)
    print(f"  {failed[0].error}", file=sys.stderr)
    if hint := advice(failed[0], target, model, api_key):
        print(f"  {hint}", file=sys.stderr)


async def send_one(target: Target, model: str, request: BenchRequest, api_key: str | None) -> RequestRecord:
    async with httpx.AsyncClient(timeout=600.0) as client:
        return await send(client, target, model, request, api_key)


RANDOM_ONLY = ("input_len", "output_len", "range_ratio", "prefix_len", "vocab_size")


def check_args(args: argparse.Namespace, given: Given) -> None:
    if args.dataset == "sharegpt":
        if not args.dataset_path:
            raise Refused("--dataset sharegpt needs --dataset-path FILE")
        given.refuse(RANDOM_ONLY, "for --dataset random; not with --dataset sharegpt")
    elif args.dataset_path:
        raise Refused("--dataset-path is the ShareGPT file: it goes with --dataset sharegpt")
    if args.base_url:
        given.refuse(("host", "port"), "--base-url names the server; not with --host/--port")


def build_requests(args) -> list[BenchRequest]:
    if args.dataset == "sharegpt":
        try:
            return sharegpt_dataset(args.dataset_path, args.num_prompts + args.warmup, args.seed)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as exc:
            raise Refused(f"--dataset-path {args.dataset_path}: not a readable ShareGPT JSON list ({exc})") from None
    return random_dataset(
        args.num_prompts + args.warmup,
        args.input_len,
        args.output_len,
        args.range_ratio,
        args.prefix_len,
        args.vocab_size,
        args.seed,
    )


def run(args) -> int:
    target = resolve_target(args)
    requests = build_requests(args)
    api_key = api_key_from(args)
    model = args.model or default_model(target, api_key)
    goodput = dict(args.goodput or ())
    print(f"benchmarking model {model} at {target.url}", flush=True)
    # One request first, as vLLM's bench does: a misconfigured run fails once, with advice.
    probe = asyncio.run(send_one(target, model, requests[0], api_key))
    if not probe.success:
        report_failures([probe], target, model, api_key)
        return 1
    records, duration = asyncio.run(
        run_load(
            target.base_url,
            model,
            requests,
            args.request_rate,
            args.burstiness,
            args.max_concurrency,
            args.warmup,
            args.seed,
            api_key,
            endpoint=target.endpoint,
        )
    )
    summary = summarize(records, duration, goodput)
    print_summary(summary)
    report_failures(records, target, model, api_key)
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(
                {
                    "config": {**report_config(args), "model": model, "url": target.url},
                    "summary": summary,
                    "requests": [asdict(r) for r in records],
                },
                handle,
                indent=1,
            )
    return 0 if summary["completed"] else 1


def add_arguments(parser) -> None:
    """vLLM ``bench serve``'s spelling; the shorter names this command had first still work."""
    parser.add_argument(
        "--backend",
        choices=sorted(BACKEND_ENDPOINTS),
        default=None,
        help="the API spoken: openai and vllm post to /v1/completions, openai-chat to /v1/chat/completions",
    )
    parser.add_argument(
        "--base-url", default=None, help="the server, http://HOST:PORT (with or without /v1); default: --host, --port"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int_between(1, 65535), default=8000)
    parser.add_argument(
        "--endpoint", default=None, help=f"{COMPLETIONS} or {CHAT_COMPLETIONS}; default: the --backend's"
    )
    parser.add_argument("--model", default=None, help="default: the first model the server lists at /v1/models")
    add_api_key_arguments(
        parser, "a file holding the API key to send; default: the first of $SPLITSERVE_API_KEYS[_FILE]"
    )
    parser.add_argument("--dataset", "--dataset-name", choices=["random", "sharegpt"], default="random")
    parser.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file")
    parser.add_argument("--num-prompts", type=positive_int, default=100)
    parser.add_argument("--input-len", "--random-input-len", type=positive_int, default=256)
    parser.add_argument("--output-len", "--random-output-len", type=positive_int, default=64)
    parser.add_argument("--range-ratio", "--random-range-ratio", type=share, default=0.0)
    parser.add_argument(
        "--prefix-len", "--random-prefix-len", type=non_negative_int, default=0, help="tokens shared by every prompt"
    )
    parser.add_argument(
        "--vocab-size", type=int_at_least(4), default=256, help="random prompts draw token ids from [3, vocab)"
    )
    parser.add_argument(
        "--request-rate", type=or_inf(positive_float), default=float("inf"), help="requests/s; inf = all at once"
    )
    parser.add_argument(
        "--burstiness", type=positive_float, default=1.0, help="1 = Poisson; < 1 burstier, > 1 steadier"
    )
    parser.add_argument("--max-concurrency", type=positive_int, default=None)
    parser.add_argument("--warmup", "--num-warmups", type=non_negative_int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--goodput", nargs="*", type=goodput_slo, default=None, metavar="NAME:MS", help="SLOs, e.g. ttft:500 tpot:50"
    )
    parser.add_argument("--json", dest="json_path", default=None)
