"""The public HTTP server's read deadlines (router/http_protocol.py) against slow clients on raw sockets: unfinished
headers and unfinished bodies are answered 408 and closed within their bound; a slow but progressing response is not.

A real Router (its uvicorn server, no workers needed: nothing here reaches a worker) with short deadlines.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
from urllib.parse import urlparse

import pytest

from router.config import RouterConfig
from router.http_protocol import MAX_HEADER_BYTES
from tests.router.conftest import RouterThread

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.5
SLACK_S = 1.0  # scheduling on a loaded machine


@pytest.fixture(scope="module")
def router():
    config = RouterConfig(
        decode_addresses=("127.0.0.1:9",),  # never reached
        port=0,
        grpc_port=0,
        header_timeout_s=HEADER_TIMEOUT_S,
        body_timeout_s=BODY_TIMEOUT_S,
    )
    router = RouterThread(config, ready=False)
    yield router
    router.stop()


def connect(router) -> socket.socket:
    url = urlparse(router.http)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    return sock


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and the seconds that took; fails past ``limit_s``."""
    start, received = time.monotonic(), b""
    sock.settimeout(limit_s)
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the server held the connection for {limit_s:.1f} s; got {received[:200]!r}")
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return received, time.monotonic() - start
        received += chunk


def trickle(sock: socket.socket, data: bytes, every_s: float, until_s: float) -> None:
    """Sends ``data`` a byte every ``every_s`` until it is sent, ``until_s`` passed, or the server closes."""
    deadline = time.monotonic() + until_s
    for byte in data:
        if time.monotonic() > deadline:
            return
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return
        time.sleep(every_s)


def assert_408(response: bytes, what: str) -> None:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), response[:200]
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["type"] == "request_timeout" and what in error["message"]


def test_a_connection_that_sends_nothing_is_closed(router):
    with connect(router) as sock:
        response, took = read_until_closed(sock, HEADER_TIMEOUT_S + SLACK_S)
    assert_408(response, "headers")
    assert took >= HEADER_TIMEOUT_S - 0.2


def test_headers_sent_a_byte_at_a_time_get_408_within_the_bound(router):
    """Slowloris: every byte arrives well within any idle timeout, the headers never finish in time."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"
    with connect(router) as sock:
        start = time.monotonic()
        trickle(sock, request, every_s=0.1, until_s=HEADER_TIMEOUT_S + SLACK_S)
        response, _ = read_until_closed(sock, SLACK_S)
    assert_408(response, "headers")
    assert time.monotonic() - start <= HEADER_TIMEOUT_S + 2 * SLACK_S


def test_slow_headers_of_a_second_request_on_a_kept_alive_connection(router):
    with connect(router) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # ... and no more
        response, took = read_until_closed(sock, HEADER_TIMEOUT_S + SLACK_S)
    assert_408(response, "headers")


def test_a_partial_body_gets_408_within_the_bound(router):
    headers = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    with connect(router) as sock:
        sock.sendall(headers + b'{"prompt": "')
        response, took = read_until_closed(sock, BODY_TIMEOUT_S + SLACK_S)
    assert_408(response, "body")
    assert took >= BODY_TIMEOUT_S - 0.2


def test_a_trickling_body_is_bounded_in_total_not_per_byte(router):
    headers = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
    )
    with connect(router) as sock:
        sock.sendall(headers)
        start = time.monotonic()
        trickle(sock, b"x" * 500, every_s=0.1, until_s=BODY_TIMEOUT_S + SLACK_S)
        response, _ = read_until_closed(sock, SLACK_S)
    assert_408(response, "body")
    assert time.monotonic() - start <= BODY_TIMEOUT_S + 2 * SLACK_S


def test_a_chunked_body_that_never_ends_gets_408(router):
    headers = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    with connect(router) as sock:
        sock.sendall(headers + b'5\r\n{"a":\r\n')
        response, _ = read_until_closed(sock, BODY_TIMEOUT_S + SLACK_S)
    assert_408(response, "body")


def test_a_slow_but_progressing_response_is_not_cut(router):
    """The dashboard's event stream sends one event a second: it outlives both deadlines, uncut."""
    lasting_s = HEADER_TIMEOUT_S + BODY_TIMEOUT_S + 1.5
    with connect(router) as sock:
        sock.sendall(b"GET /dashboard/events HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        received, start = b"", time.monotonic()
        while time.monotonic() - start < lasting_s:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed a progressing stream after {time.monotonic() - start:.1f} s"
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")
    assert received.count(b"data: ") >= 3


def test_a_normal_request_with_a_body_is_answered(router):
    body = json.dumps({"model": "nothing-served", "prompt": "hi", "max_tokens": 1}).encode()
    with connect(router) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        response, took = read_until_closed(sock, 10)
    assert not response.startswith(b"HTTP/1.1 408 "), response[:200]
    assert took < HEADER_TIMEOUT_S  # answered at once, not by a deadline


def test_headers_past_the_size_cap_get_431_at_once(router):
    """A header that grows within the deadline: refused once the headers pass MAX_HEADER_BYTES, long before the
    megabytes sent (each parsed at a cost that grows with the square of its length, on the router's one loop)."""
    with connect(router) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        start, sent = time.monotonic(), 0
        try:
            while sent < 64 * MAX_HEADER_BYTES:
                sock.sendall(b"a" * 16384)
                sent += 16384
        except (BrokenPipeError, ConnectionResetError):
            pass
        response, _ = read_until_closed(sock, SLACK_S)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), response[:200]
    assert str(MAX_HEADER_BYTES) in json.loads(body)["error"]["message"]
    assert time.monotonic() - start < HEADER_TIMEOUT_S  # refused as it grew, not at the deadline


def test_headers_under_the_cap_and_bodies_past_it_are_answered(router):
    """The cap counts a request's line and headers only: large headers under it, and a body many times its size
    with a pipelined request behind it, are served."""
    under = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(MAX_HEADER_BYTES // 1100))
    body = json.dumps({"model": "nothing-served", "prompt": "x" * (4 * MAX_HEADER_BYTES)}).encode()
    post = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with connect(router) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + under + b"\r\n")
        sock.sendall(post + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response, _ = read_until_closed(sock, 10)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", response)
    assert statuses == [b"200", b"503", b"200"], response[:300]  # 503: this router serves no model


# struct tcp_info (linux/tcp.h): tcpi_data_segs_in, the segments with data this end has received.
_DATA_SEGS_IN = struct.Struct("=152xI")


def _data_segments_received(sock: socket.socket) -> int:
    return _DATA_SEGS_IN.unpack_from(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256))[0]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["200", "400"],
)
def test_a_response_leaves_in_one_segment(router, request_bytes):
    """uvicorn writes a response's head and its body apart; with TCP_NODELAY that is two segments and two wake-ups of
    the client. The router's transport sends them together (router/http_protocol.py, _HeadJoinsBody)."""
    with connect(router) as sock:
        for _ in range(3):  # the first request on the connection, and kept-alive ones after it
            before = _data_segments_received(sock)
            sock.sendall(request_bytes)
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            head, _, body = head.partition(b"\r\n\r\n")
            length = int(
                next(
                    v for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"
                )
            )
            while len(body) < length:
                body += sock.recv(65536)
            assert len(body) == length and json.loads(body)
            assert _data_segments_received(sock) - before == 1, head
