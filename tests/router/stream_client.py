"""One long greedy stream, read by a client inside a test host (``ip netns exec``) for
tests/router/test_vanished_client.py: prints ``STREAMING <tokens/s>`` after 200 tokens, then reads on until its
link goes down (or it is killed).

    python -m tests.router.stream_client decode|grpc|http|http-whole ADDRESS MAX_TOKENS [MODEL]

``decode``: a decode worker's Generate, as a router calls it; ``grpc``: the router's public gRPC API; ``http``: the
router's OpenAI completions API (ADDRESS is then its base URL, MODEL the served name), server-sent events;
``http-whole``: the same, not streamed (nothing is printed: the answer would come only at the end).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import grpc
import httpx

from protos import common_pb2, decode_pb2, generate_pb2, generate_pb2_grpc
from tests.workers.harness import WorkerProcess

PROMPT = [5, 6, 7, 8]
SHOWN_AFTER = 200


def _chunks(kind: str, address: str, max_tokens: int, model: str = "") -> Iterator[int]:
    """Tokens per chunk received."""
    params = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    if kind == "decode":
        request = decode_pb2.GenerateRequest(request_id="vanishing", prompt_token_ids=PROMPT, params=params)
        for response in WorkerProcess("decode", address, None).stub.Generate(request, timeout=600):
            yield len(response.token_ids)
    elif kind == "grpc":
        request = generate_pb2.CompletionRequest(token_ids=generate_pb2.TokenIds(ids=PROMPT), params=params)
        for chunk in generate_pb2_grpc.GenerateStub(grpc.insecure_channel(address)).Generate(request, timeout=600):
            yield len(chunk.token_ids)
    else:
        body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "stream": kind == "http"}
        body |= {"temperature": 0, "ignore_eos": True}
        if kind == "http-whole":
            yield httpx.post(f"{address}/v1/completions", json=body, timeout=600).json()["usage"]["completion_tokens"]
            return
        with httpx.stream("POST", f"{address}/v1/completions", json=body, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    yield 1  # one token per event


def main(argv: list[str]) -> int:
    began, count = time.monotonic(), 0
    for tokens in _chunks(argv[0], argv[1], int(argv[2]), *argv[3:]):
        count += tokens
        if count - tokens < SHOWN_AFTER <= count:
            print(f"STREAMING {count / (time.monotonic() - began):.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
