"""A cluster member that stalls (SIGSTOP: its kernel still acknowledges TCP, its gRPC answers no ping) ends a call
in flight with it within ~PEER_SILENCE_S, in both directions: a channel of ours calling a stalled server, and a
server of ours streaming to a stalled caller. gRPC times an unanswered ping by its HTTP/2 ping timeout (60 s unless
set), so this holds only with that set as well as the keepalive timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc

from protos.cluster_auth import PEER_SILENCE_S, ClusterAuth, server_options

METHOD = "/keepalive.Test/Stream"
BOUND_S = PEER_SILENCE_S + 5  # a ping within KEEPALIVE_TIME_MS, unanswered for KEEPALIVE_TIMEOUT_MS; gRPC's default: 60

# Either end in a process of its own (the one the test stalls): argv[1] is "server" or "client ADDRESS".
_PEER = """
import sys, time
from concurrent import futures
import grpc
from protos.cluster_auth import ClusterAuth, server_options

def stream(request, context):
    while context.is_active():
        yield b"x"
        time.sleep(0.05)

if sys.argv[1] == "server":
    server = grpc.server(futures.ThreadPoolExecutor(4), options=server_options())
    handler = grpc.unary_stream_rpc_method_handler(stream)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("keepalive.Test", {"Stream": handler})])
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    server.wait_for_termination()
else:
    channel = ClusterAuth(secret=None).channel(sys.argv[2])
    for i, _ in enumerate(channel.unary_stream("/keepalive.Test/Stream")(b"", timeout=120)):
        if i == 10:
            print("reading", flush=True)
"""


def _peer(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _PEER, *args], stdout=subprocess.PIPE, text=True)


def _end(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGCONT)
    process.kill()
    process.wait(10)


def test_a_call_to_a_stalled_server_ends_within_peer_silence():
    server = _peer("server")
    try:
        port = int(server.stdout.readline())
        channel = ClusterAuth(secret=None).channel(f"127.0.0.1:{port}")
        call = channel.unary_stream(METHOD)(b"", timeout=BOUND_S + 10)
        stopped = None
        try:
            for i, _ in enumerate(call):
                if i == 10:
                    os.kill(server.pid, signal.SIGSTOP)
                    stopped = time.monotonic()
        except grpc.RpcError as exc:
            waited = time.monotonic() - stopped
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, (exc.code(), exc.details(), waited)
        assert stopped is not None
        assert waited < BOUND_S, f"the call to a stalled server ended only after {waited:.1f}s"
        channel.close()
    finally:
        _end(server)


def test_a_stream_to_a_stalled_caller_ends_within_peer_silence():
    ended = threading.Event()

    def stream(request, context):
        while context.is_active():
            yield b"x"
            time.sleep(0.05)
        ended.set()

    server = grpc.server(futures.ThreadPoolExecutor(4), options=server_options())
    handler = grpc.unary_stream_rpc_method_handler(stream)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("keepalive.Test", {"Stream": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = _peer("client", f"127.0.0.1:{port}")
    try:
        assert client.stdout.readline().strip() == "reading"
        os.kill(client.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        assert ended.wait(BOUND_S + 10), "the server streamed on to a stalled caller"
        waited = time.monotonic() - stopped
        assert waited < BOUND_S, f"the server let a stalled caller go only after {waited:.1f}s"
    finally:
        _end(client)
        server.stop(0)
