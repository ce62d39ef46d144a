"""A router stopped by SIGTERM (Kubernetes rolling a router Deployment) or Ctrl-C closes its listeners at once and lets
the requests in flight finish within its grace (``--shutdown-grace``), where it used to cut every stream 2 s in; a
second signal, or the end of the grace, ends them as if their clients had gone: the decode worker stops and its KV
blocks return to the pool.

A real `splitserve router` process over the shared workers; its client is the `openai` SDK, streaming."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import openai
import pytest

from protos import common_pb2, generate_pb2, generate_pb2_grpc
from tests.router.conftest import SERVED_MODEL, free_port
from tests.workers.harness import wait_idle, wait_until

MAX_TOKENS = 1900  # with the prompt, within the test model's 2048: a stream of seconds on the shared workers
START_TIMEOUT_S = 60
GRACE_S = 120  # longer than any stream here: the graceful stop must not lean on it


class StreamingClient(threading.Thread):
    """One streamed completion; records its chunks' token counts and how it ended."""

    def __init__(self, url: str, prompt: str) -> None:
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=GRACE_S)
        self.prompt = prompt
        self.first_chunk = threading.Event()
        self.chunks = 0
        self.finish_reason = None
        self.usage = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            stream = self.client.completions.create(
                model=SERVED_MODEL,
                prompt=self.prompt,
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            for chunk in stream:
                if chunk.choices:
                    self.chunks += 1
                    self.finish_reason = chunk.choices[0].finish_reason or self.finish_reason
                    self.first_chunk.set()
                if chunk.usage is not None:
                    self.usage = chunk.usage
        except Exception as exc:  # the cut: the connection closed mid-stream
            self.error = exc
        finally:
            self.first_chunk.set()


def _start_router(checkpoint, cluster, *extra: str, grpc_port: int = 0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "cluster.cli", "router", "--model", str(checkpoint.path)]
    command += ["--served-model-name", SERVED_MODEL, "--prefill", cluster.prefills[0].address]
    command += ["--decode", cluster.decode.address, "--port", str(port), "--grpc-port", str(grpc_port), *extra]
    router = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=5)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert router.poll() is None, router.stdout.read()
        try:
            client.models.list()
            return router, url
        except openai.APIError:
            assert time.monotonic() < deadline, "the router did not become ready"
            time.sleep(0.2)


def _refuses_connections(url: str) -> bool:
    port = int(url.rsplit(":", 1)[1])
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _stop(router: subprocess.Popen) -> str:
    if router.poll() is None:
        router.kill()
    return router.communicate(timeout=30)[0]


def test_a_stream_in_flight_at_sigterm_finishes_while_new_connections_are_refused(checkpoint, cluster, rng):
    router, url = _start_router(checkpoint, cluster, "--shutdown-grace", str(GRACE_S))
    try:
        client = StreamingClient(url, " ".join(str(rng.randrange(1000)) for _ in range(12)))
        client.start()
        assert client.first_chunk.wait(30) and client.error is None, client.error
        router.send_signal(signal.SIGTERM)
        wait_until(lambda: _refuses_connections(url), 10, what="the router's listener closed")
        assert client.is_alive(), "the stream ended before the test could see the listener closed"
        client.join(GRACE_S)
        assert client.error is None, f"the stream was cut: {client.error!r}"
        assert client.finish_reason == "length" and client.usage.completion_tokens == MAX_TOKENS
        assert router.wait(30) == 0
        output = _stop(router)
        assert "1 request(s) in flight have up to" in output, output
        assert "Traceback" not in output, output
    finally:
        _stop(router)


@pytest.mark.parametrize("how", ["second-signal", "grace-ends"])
def test_a_cut_ends_the_streams_in_flight_and_their_kv_returns_to_the_pool(checkpoint, cluster, rng, how):
    grace = GRACE_S if how == "second-signal" else 1
    router, url = _start_router(checkpoint, cluster, "--shutdown-grace", str(grace))
    try:
        clients = [StreamingClient(url, " ".join(str(rng.randrange(1000)) for _ in range(12))) for _ in range(2)]
        for client in clients:
            client.start()
        for client in clients:
            assert client.first_chunk.wait(30) and client.error is None, client.error
        began = time.monotonic()
        router.send_signal(signal.SIGTERM)
        if how == "second-signal":
            wait_until(lambda: _refuses_connections(url), 10, what="the router's listener closed")
            router.send_signal(signal.SIGTERM)
        assert router.wait(30) == 0
        took = time.monotonic() - began
        assert took < 10, f"the router took {took:.1f} s to stop"
        for client in clients:
            client.join(10)
            assert not client.is_alive()
            assert client.error is not None or client.finish_reason is None, "a cut stream claimed to have finished"
        output = _stop(router)
        assert "Traceback" not in output, output
        for worker in (cluster.decode, *cluster.prefills):
            wait_idle(worker, timeout=30)  # nothing left running, every block back in the pool
    finally:
        _stop(router)


def test_a_grpc_stream_in_flight_at_sigterm_finishes(checkpoint, cluster, rng):
    """The public gRPC API stops as the HTTP one does: its listener closes, the call in flight has the grace."""
    grpc_port = free_port()
    router, _ = _start_router(checkpoint, cluster, "--shutdown-grace", str(GRACE_S), grpc_port=grpc_port)
    try:
        params = common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        prompt = " ".join(str(rng.randrange(1000)) for _ in range(12))
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stream = generate_pb2_grpc.GenerateStub(channel).Generate(
                generate_pb2.CompletionRequest(model=SERVED_MODEL, text=prompt, params=params), timeout=GRACE_S
            )
            chunks = [next(stream)]
            router.send_signal(signal.SIGTERM)
            chunks += list(stream)  # raises grpc.RpcError if the call was cut
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == MAX_TOKENS
        assert router.wait(30) == 0
        assert "Traceback" not in _stop(router)
    finally:
        _stop(router)
