"""A client that stops reading its stream: its send waits on flow control (an HTTP/2 window, a TCP window). Over
gRPC the router's request timeout waited with it, so the client held its slot for as long as it read nothing, and
with --max-running slots all taken every other client waited: its call now ends at its time, DEADLINE_EXCEEDED
(queued behind what the client has yet to read). The HTTP APIs read a stream's deltas ahead of the client's send,
so its time ran out there already; the test holds them to it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest

from protos import common_pb2, generate_pb2, generate_pb2_grpc
from tests.router.conftest import SERVED_MODEL, wait_for

ROOT = Path(__file__).resolve().parents[2]
# The router's request timeout: long enough that the stalled stream fills what its connection holds first, short
# enough that gRPC's keepalive ping (every 5 s), which can let a waiting send go once, comes after it.
TIMEOUT_S = {"grpc": 1.0, "http": 3.0}
PAUSE_S = 20.0  # the client reads nothing for this long: far past its timeout
SEND_BUFFER_BYTES = 8192  # the router's HTTP connections' kernel send buffer: what a stalled client leaves unread


def _small_send_buffers(router) -> None:
    """The router's HTTP connections get a small kernel send buffer (Linux copies the listener's to each connection it
    accepts): else the kernel takes megabytes a stalled client does not read, and the router's send never waits."""
    for server in router.router._http.servers:
        for listener in server.sockets:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)


def _next_request_s(kind: str, router) -> float:
    """How long a small request took, waiting for the router's only slot."""
    began = time.monotonic()
    if kind == "grpc":
        request = generate_pb2.CompletionRequest(text="next", params=common_pb2.SamplingParams(max_tokens=2))
        with grpc.insecure_channel(router.grpc) as channel:
            chunks = list(generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=60))
        assert chunks[-1].usage.completion_tokens == 2
    else:
        body = {"model": SERVED_MODEL, "prompt": "next", "max_tokens": 2}
        response = httpx.post(f"{router.http}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
    return time.monotonic() - began


@pytest.mark.parametrize("kind", ["grpc", "http"])
def test_a_client_that_stops_reading_is_ended_at_its_request_timeout(make_router, cluster, kind):
    router = make_router(cluster.prefills, [cluster.decode], request_timeout_s=TIMEOUT_S[kind], max_running=1)
    router.call(lambda: _small_send_buffers(router))
    address = router.grpc if kind == "grpc" else router.http.removeprefix("http://")
    command = [sys.executable, "-m", "tests.router.stalled_client", kind, address, "1900", str(PAUSE_S), SERVED_MODEL]
    client = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "READ"
        took = _next_request_s(kind, router)
        assert took < TIMEOUT_S[kind] + 2.5, f"the next request waited {took:.1f} s for the slot a stalled client held"
        wait_for(lambda: router.running() == 0, 10, "the router's slot to be free")
        ended = client.stdout.readline().strip()
    finally:
        client.kill()
        client.wait(10)
    assert ended == ("ENDED DEADLINE_EXCEEDED" if kind == "grpc" else "ENDED CUT")
