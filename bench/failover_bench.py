"""``splitserve bench failover``: time to the next token after the decode worker dies mid-decode.

A long prompt is prefilled remotely and streamed; after ``--kill-after`` tokens the serving decode worker is
killed (SIGSTOP, then SIGKILL once what it had sent arrived; the clock starts at the kill) and the router
migrates the request. Two policies side by side, each on fresh workers:

- ``prefill`` (default): a prefill worker re-pushes the KV; its prefix cache holds the prompt, so only the
  generated tokens are computed;
- ``local``: the new decode worker recomputes prompt + generated tokens itself.

Reported per policy: the gap from the kill to the next token (median of ``--repeats``), and whether every
output equals the no-fault output (greedy).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import threading
import time

import httpx

from bench import processes
from bench.args import Given, Refused, positive_int, report_config
from engine.config import DTYPES
from protos import common_pb2, decode_pb2_grpc
from protos.cluster_auth import ClusterAuth

POLICIES = ("local", "prefill")
FREEZE_S = 0.3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="bench-125m")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--prompt-len", type=positive_int, default=2000)
    parser.add_argument("--max-tokens", type=positive_int, default=64)
    parser.add_argument(
        "--kill-after",
        type=positive_int,
        default=16,
        help="tokens streamed before the decode worker dies (fewer than --max-tokens)",
    )
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--worker-threads", type=positive_int, default=1)
    parser.add_argument("--kv-cache-mb", type=positive_int, default=512)
    parser.add_argument("--json", dest="json_path", default=None)


def check_args(args: argparse.Namespace, given: Given) -> None:
    if args.kill_after >= args.max_tokens:
        raise Refused(
            f"--kill-after {args.kill_after} must be below --max-tokens {args.max_tokens}: "
            "the stream would end before the kill"
        )


def run(args: argparse.Namespace) -> int:
    processes.ensure_secret_in_env()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 259) for _ in range(args.prompt_len)] for _ in range(args.repeats)]
    results = {policy: [] for policy in POLICIES}
    for index, prompt in enumerate(prompts):
        for policy in POLICIES:  # alternating, so drift in the machine's load hits both alike
            results[policy].append(_one_failover(args, policy, prompt))
            row = results[policy][-1]
            print(
                f"repeat {index} {policy:8s} next token after kill {row['gap_ms']:8.1f} ms  "
                f"(ITL before {row['itl_ms']:.1f} ms)  same output as no fault: {row['identical']}",
                flush=True,
            )
    summary = {
        policy: {
            "gap_ms_median": statistics.median(r["gap_ms"] for r in rows),
            "itl_ms_median": statistics.median(r["itl_ms"] for r in rows),
            "identical": all(r["identical"] for r in rows),
        }
        for policy, rows in results.items()
    }
    ratio = summary["local"]["gap_ms_median"] / summary["prefill"]["gap_ms_median"]
    print(json.dumps(summary, indent=2))
    print(f"time to next token after a decode kill: local recompute / KV from the prefill worker = {ratio:.2f}x")
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump({"args": report_config(args), "runs": results, "summary": summary, "ratio": ratio}, out, indent=2)
    return 0 if all(s["identical"] for s in summary.values()) else 1


def _worker_args(args) -> list[str]:
    return [
        "--model",
        args.model,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.worker_threads),
        "--kv-cache-mb",
        str(args.kv_cache_mb),
    ]


def _one_failover(args, policy: str, prompt: list[int]) -> dict:
    """One kill on fresh workers and router; the no-fault output is the same request again, afterwards."""
    prefill, prefill_address = processes.start_worker("prefill", *_worker_args(args))
    d1, d1_address = processes.start_worker("decode", *_worker_args(args))
    d2, d2_address = processes.start_worker("decode", *_worker_args(args))
    port = processes.free_port()
    router = processes.start_router(
        port,
        processes.free_port(),
        [prefill_address],
        [d1_address, d2_address],
        "--migration-policy",
        policy,
        "--local-prefill-threshold",
        "32",
    )
    with processes.running(prefill, d1, d2, router):
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {
            "model": "x",
            "prompt": prompt,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        }
        body["model"] = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"][0]["id"]
        arrivals: list[tuple[float, int]] = []
        killed: dict = {}
        decodes = {d1_address: d1, d2_address: d2}

        def kill_when_due() -> None:
            while len(arrivals) < args.kill_after:
                time.sleep(0.001)
            victim = decodes[_serving(decodes)]
            victim.send_signal(signal.SIGSTOP)  # frozen first, so tokens already on the wire arrive before the clock
            time.sleep(FREEZE_S)
            victim.kill()
            killed["at"], killed["tokens"] = time.perf_counter(), len(arrivals)

        killer = threading.Thread(target=kill_when_due, daemon=True)
        killer.start()
        tokens = _stream(url, body, arrivals)
        killer.join(5)
        after = [t for t, _ in arrivals[killed["tokens"] :] if t > killed["at"]]
        before = [t for t, _ in arrivals[: killed["tokens"]]]
        itl = (before[-1] - before[1]) / max(1, len(before) - 2) if len(before) > 2 else float("nan")
        reference = _stream(url, body, [])  # no fault now: the survivor serves it whole
    return {
        "gap_ms": (after[0] - killed["at"]) * 1000.0,
        "itl_ms": itl * 1000.0,
        "killed_after_tokens": killed["tokens"],
        "identical": tokens == reference and len(tokens) == args.max_tokens,
    }


def _serving(decodes: dict) -> str:
    """The decode worker running our request (the only one with a running sequence)."""
    auth = ClusterAuth.from_env()
    for address in decodes:
        with auth.channel(address) as channel:
            stats = decode_pb2_grpc.DecodeWorkerStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)
        if stats.running:
            return address
    raise RuntimeError("no decode worker is running the request")


def _stream(url: str, body: dict, arrivals: list) -> list[int]:
    tokens: list[int] = []
    with httpx.Client(timeout=600) as client, client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                ids = [int(t.removeprefix("token_id:")) for t in (choice.get("logprobs") or {}).get("tokens", [])]
                now = time.perf_counter()
                for token_id in ids:
                    tokens.append(token_id)
                    arrivals.append((now, token_id))
    return tokens
