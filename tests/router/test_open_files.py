"""A router started from a shell with a low soft limit on open files (256: macOS's; Linux's 1024) still takes every
client connection: it holds a socket per connection for as long as a streamed completion lasts, and the CLI raises its
soft limit to what the hard limit allows (cluster/cli.py ``raise_open_files_limit``)."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time

from tests.procfs import alive
from tests.router.conftest import free_port

SOFT_LIMIT = 256
CONNECTIONS = 400  # held open at once: beyond SOFT_LIMIT, less what the router itself has open
START_TIMEOUT_S = 30


def _start_router(port: int) -> subprocess.Popen:
    """From a shell that lowered its soft limit, as a user's would (not a preexec_fn: Python in a child forked from
    this process, whose gRPC threads run, crashed in gRPC's fork handler once)."""
    command = ["bash", "-c", f'ulimit -Sn {SOFT_LIMIT} && exec "$@"', "bash", sys.executable, "-m", "cluster.cli"]
    command += ["router", "--model", "demo", "--decode", "127.0.0.1:1", "--port", str(port), "--grpc-port", "0"]
    router = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return router
        except OSError:
            assert alive(router.pid), "the router exited"
            time.sleep(0.1)
    router.kill()
    raise AssertionError(f"the router did not listen within {START_TIMEOUT_S} s")


def test_a_router_started_under_a_low_open_files_limit_takes_every_connection():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard == resource.RLIM_INFINITY or hard >= CONNECTIONS + 200, f"this machine's hard limit is {hard}"
    port = free_port()
    router = _start_router(port)
    connections = []
    try:
        for _ in range(CONNECTIONS):  # every one open at once, each with a request in flight
            connection = socket.create_connection(("127.0.0.1", port), timeout=10)
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: router\r\n\r\n")
            connections.append(connection)
        answered = 0
        for connection in connections:
            try:
                answered += connection.recv(64).startswith(b"HTTP/1.1 200")
            except OSError:  # reset: the router could not take it
                pass
        assert answered == CONNECTIONS, f"{CONNECTIONS - answered} of {CONNECTIONS} connections were not answered"
    finally:
        for connection in connections:
            connection.close()
        router.terminate()
        router.wait(10)
