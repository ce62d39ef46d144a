"""A client that reads the start of a long stream, then nothing for a while (its window full, the server's send
waits), then the rest: for tests/router/test_stalled_client.py.

    python -m tests.router.stalled_client grpc|http ADDRESS MAX_TOKENS PAUSE_S [MODEL]

Prints ``READ`` once the stream's first chunk came, then, after the pause, how the stream ended: ``ENDED OK``,
``ENDED <gRPC status code name>``, or ``ENDED CUT`` for an HTTP stream whose connection closed before its end.
``grpc``: the router's public gRPC API, with a 1 KiB HTTP/2 window; ``http``: its chat completions API (ADDRESS is
its host:port) with a 4 KiB socket receive buffer, each streamed token carrying its 20 likeliest alternatives.
"""

from __future__ import annotations

import json
import socket
import sys
import time

import grpc

from protos import common_pb2, generate_pb2, generate_pb2_grpc

PROMPT = [5, 6, 7, 8]


def _grpc(address: str, max_tokens: int, pause_s: float) -> str:
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    params = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=20)
    request = generate_pb2.CompletionRequest(token_ids=generate_pb2.TokenIds(ids=PROMPT), params=params)
    with grpc.insecure_channel(address, options=options) as channel:
        chunks = generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=120)
        next(chunks)
        print("READ", flush=True)
        time.sleep(pause_s)
        try:
            for _ in chunks:
                pass
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def _http(address: str, max_tokens: int, pause_s: float, model: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "stall"}],
        "max_tokens": max_tokens,
        "stream": True,
        "logprobs": True,
        "top_logprobs": 20,
        "ignore_eos": True,
        "temperature": 0,
    }
    payload = json.dumps(body).encode()
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        sock.recv(1024)
        print("READ", flush=True)
        time.sleep(pause_s)
        received = b""
        sock.settimeout(30)
        while chunk := sock.recv(1 << 16):
            received = received[-64:] + chunk  # the stream's end is all that tells
    return "OK" if received.endswith(b"data: [DONE]\n\n0\r\n\r\n") else "CUT"


def main(argv: list[str]) -> int:
    kind, address, max_tokens, pause_s = argv[0], argv[1], int(argv[2]), float(argv[3])
    ended = _grpc(address, max_tokens, pause_s) if kind == "grpc" else _http(address, max_tokens, pause_s, argv[4])
    print(f"ENDED {ended}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
