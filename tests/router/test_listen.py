"""A router or worker told to listen where another server already does refuses to start, naming the address and the
flag that moves it: never a port shared with the other (gRPC's default SO_REUSEPORT would have the kernel split new
connections between the two servers, each answering as itself), never a traceback after Ray and the workers
started."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.cluster_auth import ListenError, bind_tcp
from router.config import RouterConfig
from router.server import Router
from tests.router.conftest import free_port

CLI_TIMEOUT_S = 60
QUICK_S = 20  # `up` refuses before Ray starts: imports only (~1 s here); Ray and the workers take far longer


def _serving_at(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_a_second_router_on_a_taken_grpc_port_refuses_to_start():
    """Both are gRPC servers of ours: the one case a plain listener does not show (gRPC servers made with SO_REUSEPORT
    share a port)."""
    grpc_port = free_port()

    async def scenario() -> None:
        first = Router(RouterConfig(model="demo", port=0, grpc_port=grpc_port))
        await first.start()
        try:
            second = Router(RouterConfig(model="demo", port=0, grpc_port=grpc_port))
            with pytest.raises(ListenError) as refused:
                await second.start()
            assert f"cannot listen on 127.0.0.1:{grpc_port}: Address already in use" in str(refused.value)
            assert "(the gRPC API, --grpc-port)" in str(refused.value)
            # the first answers on (NOT_SERVING: no decode worker, as its /ready says)
            assert await asyncio.to_thread(_serving_at, grpc_port) == "NOT_SERVING"
        finally:
            await first.stop()

    asyncio.run(scenario())


def test_a_router_whose_grpc_port_is_taken_leaves_its_http_port_free():
    """It bound its HTTP socket first: refused on gRPC, it must not keep that one."""
    http_port = free_port()
    with bind_tcp("127.0.0.1", 0) as taken:
        taken.listen()
        config = RouterConfig(model="demo", port=http_port, grpc_port=taken.getsockname()[1])
        with pytest.raises(ListenError):
            asyncio.run(Router(config).start())
    bind_tcp("127.0.0.1", http_port).close()  # raises if the refused router still held it


def _cli(*args: str) -> tuple[int, str, float]:
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env=dict(os.environ, SPLITSERVE_CLUSTER_SECRET="test-listen"),
    )
    return done.returncode, done.stderr, time.monotonic() - began


@pytest.mark.parametrize(
    ("command", "port_flag", "what"),
    [
        (("up", "--model", "demo", "--grpc-port", "0"), "--port", "the OpenAI API"),
        (("up", "--model", "demo", "--port", "0"), "--grpc-port", "the gRPC API"),
        (("router", "--model", "demo", "--decode", "127.0.0.1:1", "--grpc-port", "0"), "--port", "the OpenAI API"),
        (("router", "--model", "demo", "--decode", "127.0.0.1:1", "--port", "0"), "--grpc-port", "the gRPC API"),
    ],
    ids=["up-http", "up-grpc", "router-http", "router-grpc"],
)
def test_the_cli_refuses_a_taken_port_at_once_naming_it(command, port_flag, what):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        status, stderr, seconds = _cli(*command, port_flag, str(port))
    assert status == 2, stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use ({what}, {port_flag})" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert seconds < QUICK_S, f"refused after {seconds:.1f} s"


def test_a_worker_refuses_a_taken_port_naming_it():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        status, stderr, _ = _cli("worker", "--model", "demo", "--port", str(port), "decode")
    assert status == 2, stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use (the worker's gRPC API, --port)" in stderr
    assert "Traceback" not in stderr, stderr


def test_a_worker_refuses_a_taken_metrics_port_naming_it():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        status, stderr, _ = _cli("worker", "--model", "demo", "--port", "0", "--metrics-port", str(port), "decode")
    assert status == 2, stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use (metrics, --metrics-port)" in stderr, stderr
    assert "Traceback" not in stderr, stderr


def _get_health(connection: socket.socket) -> bytes:
    connection.sendall(b"GET /health HTTP/1.1\r\nHost: router\r\n\r\n")
    answer = b""
    while not answer.endswith(b'{"status":"ok"}'):
        chunk = connection.recv(4096)
        assert chunk, f"the router closed the connection mid-answer: {answer!r}"
        answer += chunk
    return answer


def test_an_idle_connection_stays_open_for_keep_alive_s_then_closes():
    """--keep-alive: what a load balancer that reuses connections needs the router to honour (uvicorn's own is 5 s)."""
    keep_alive = 1.5

    def client(port: int) -> float:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            assert _get_health(connection).startswith(b"HTTP/1.1 200")
            time.sleep(keep_alive / 2)
            assert _get_health(connection).startswith(b"HTTP/1.1 200")  # the same connection, reused while idle
            answered = time.monotonic()
            assert connection.recv(1) == b"", "the router sent more than its answer"
            return time.monotonic() - answered

    async def scenario() -> float:
        router = Router(RouterConfig(model="demo", port=0, grpc_port=0, keep_alive_s=keep_alive))
        await router.start()
        try:
            return await asyncio.to_thread(client, router.http_port)
        finally:
            await router.stop()

    idle = asyncio.run(scenario())
    assert keep_alive - 0.2 < idle < keep_alive + 1.5, f"the idle connection closed after {idle:.2f} s"
