"""A router stopped by SIGTERM (Kubernetes rolling a router Deployment) or Ctrl-C first serves on for its delay
(``--shutdown-delay``) while /ready and gRPC health say it is stopping, so that load balancers take it out before it
refuses anyone; then it closes its listeners and lets the requests in flight finish within its grace
(``--shutdown-grace``), where it used to cut every stream 2 s in. A second signal, or the end of the grace, cuts them:
each client gets an error naming the stop (an SSE error event, gRPC UNAVAILABLE), where a cut stream used to end in a
bare closed connection, and the decode worker stops and its KV blocks return to the pool.

A real `splitserve router` process over the shared workers; its client is the `openai` SDK, streaming."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contract.sampling import SamplingParams
from protos import common_pb2, generate_pb2, generate_pb2_grpc
from router.orchestrator import Delta, GenerationError
from tests.router.conftest import SERVED_MODEL, RouterProcess, free_port
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


def _start_router(checkpoint, cluster, *extra: str, grpc_port: int = 0) -> RouterProcess:
    return RouterProcess(
        *("--model", str(checkpoint.path), "--served-model-name", SERVED_MODEL),
        *("--prefill", cluster.prefills[0].address, "--decode", cluster.decode.address),
        *("--port", "0", "--grpc-port", str(grpc_port), *extra),
        timeout=START_TIMEOUT_S,
    )


def _refuses_connections(url: str) -> bool:
    port = int(url.rsplit(":", 1)[1])
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_stream_in_flight_at_sigterm_finishes_while_new_connections_are_refused(checkpoint, cluster, rng):
    router = _start_router(checkpoint, cluster, "--shutdown-grace", str(GRACE_S))
    try:
        client = StreamingClient(router.http, " ".join(str(rng.randrange(1000)) for _ in range(12)))
        client.start()
        assert client.first_chunk.wait(30) and client.error is None, client.error
        router.signal(signal.SIGTERM)
        wait_until(lambda: _refuses_connections(router.http), 10, what="the router's listener closed")
        assert client.is_alive(), "the stream ended before the test could see the listener closed"
        client.join(GRACE_S)
        assert client.error is None, f"the stream was cut: {client.error!r}"
        assert client.finish_reason == "length" and client.usage.completion_tokens == MAX_TOKENS
        assert router.wait(30) == 0
        output = router.stop()
        assert "1 request(s) in flight have up to" in output, output
        assert "Traceback" not in output, output
    finally:
        router.stop()


@pytest.mark.parametrize("how", ["second-signal", "grace-ends"])
def test_a_cut_ends_the_streams_in_flight_and_their_kv_returns_to_the_pool(checkpoint, cluster, rng, how):
    grace = GRACE_S if how == "second-signal" else 1
    router = _start_router(checkpoint, cluster, "--shutdown-grace", str(grace))
    try:
        clients = [
            StreamingClient(router.http, " ".join(str(rng.randrange(1000)) for _ in range(12))) for _ in range(2)
        ]
        for client in clients:
            client.start()
        for client in clients:
            assert client.first_chunk.wait(30) and client.error is None, client.error
        began = time.monotonic()
        router.signal(signal.SIGTERM)
        if how == "second-signal":
            wait_until(lambda: _refuses_connections(router.http), 10, what="the router's listener closed")
            router.signal(signal.SIGTERM)
        assert router.wait(30) == 0
        took = time.monotonic() - began
        assert took < 10, f"the router took {took:.1f} s to stop"
        when = "at once, as asked" if how == "second-signal" else "after its 1 s grace"
        for client in clients:
            client.join(10)
            assert not client.is_alive()
            assert isinstance(client.error, openai.APIError) and client.finish_reason is None, client.error
            assert f"the router is stopping: this request was cut {when}" in str(client.error), client.error
        output = router.stop()
        assert "Traceback" not in output, output
        for worker in (cluster.decode, *cluster.prefills):
            wait_idle(worker, timeout=30)  # nothing left running, every block back in the pool
    finally:
        router.stop()


def _ready(url: str) -> tuple[int, dict]:
    response = httpx.get(f"{url}/ready", timeout=5)
    return response.status_code, response.json()


def _health(grpc_port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_through_the_delay_the_router_says_it_is_stopping_and_still_serves(checkpoint, cluster, rng):
    """What a load balancer needs to take the router out of rotation before its listeners refuse anyone."""
    delay = 6
    grpc_port = free_port()
    router = _start_router(checkpoint, cluster, "--shutdown-delay", str(delay), grpc_port=grpc_port)
    try:
        wait_until(lambda: _ready(router.http)[0] == 200, START_TIMEOUT_S, what="/ready to say 200")
        assert _health(grpc_port) == health_pb2.HealthCheckResponse.SERVING
        began = time.monotonic()
        router.signal(signal.SIGTERM)
        wait_until(lambda: _ready(router.http)[0] == 503, 5, what="/ready to say 503")
        assert _ready(router.http)[1]["stopping"] is True
        assert _health(grpc_port) == health_pb2.HealthCheckResponse.NOT_SERVING
        client = openai.OpenAI(base_url=f"{router.http}/v1", api_key="none", max_retries=0, timeout=30)
        completion = client.completions.create(model=SERVED_MODEL, prompt="1 2 3", max_tokens=4, temperature=0)
        assert completion.usage.completion_tokens == 4  # a new request, served inside the delay
        assert time.monotonic() - began < delay, "the test was too slow to see the delay"
        assert not _refuses_connections(router.http)
        wait_until(lambda: _refuses_connections(router.http), delay + 10, what="the listener to close after the delay")
        assert time.monotonic() - began >= delay - 0.5
        assert router.wait(30) == 0
        output = router.stop()
        assert f"stopping in {delay} s" in output and "Traceback" not in output, output
    finally:
        router.stop()


def test_a_second_signal_in_the_delay_stops_at_once(checkpoint, cluster):
    router = _start_router(checkpoint, cluster, "--shutdown-delay", "120")
    try:
        wait_until(lambda: _ready(router.http)[0] == 200, START_TIMEOUT_S, what="/ready to say 200")
        router.signal(signal.SIGTERM)
        wait_until(lambda: _ready(router.http)[0] == 503, 5, what="/ready to say 503")
        assert not _refuses_connections(router.http)  # in the delay, where a stop without one has closed its listener
        began = time.monotonic()
        router.signal(signal.SIGTERM)
        assert router.wait(30) == 0
        assert time.monotonic() - began < 10
    finally:
        router.stop()


@contextlib.contextmanager
def _long_grpc_stream(grpc_port: int, rng):
    """A call to the router's public gRPC API streaming MAX_TOKENS tokens."""
    params = common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    prompt = " ".join(str(rng.randrange(1000)) for _ in range(12))
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        yield generate_pb2_grpc.GenerateStub(channel).Generate(
            generate_pb2.CompletionRequest(model=SERVED_MODEL, text=prompt, params=params), timeout=GRACE_S
        )


def test_a_cut_grpc_call_ends_unavailable_naming_the_stop(checkpoint, cluster, rng):
    grpc_port = free_port()
    router = _start_router(checkpoint, cluster, "--shutdown-grace", "1", grpc_port=grpc_port)
    try:
        with _long_grpc_stream(grpc_port, rng) as stream:
            next(stream)
            router.signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as cut:
                list(stream)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "the router is stopping: this request was cut after its 1 s grace" in cut.value.details(), cut.value
        assert router.wait(30) == 0
        assert "Traceback" not in router.stop()
        for worker in (cluster.decode, *cluster.prefills):
            wait_idle(worker, timeout=30)
    finally:
        router.stop()


def test_a_grpc_stream_in_flight_at_sigterm_finishes(checkpoint, cluster, rng):
    """The public gRPC API stops as the HTTP one does: its listener closes, the call in flight has the grace."""
    grpc_port = free_port()
    router = _start_router(checkpoint, cluster, "--shutdown-grace", str(GRACE_S), grpc_port=grpc_port)
    try:
        with _long_grpc_stream(grpc_port, rng) as stream:
            chunks = [next(stream)]
            router.signal(signal.SIGTERM)
            chunks += list(stream)  # raises grpc.RpcError if the call was cut
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == MAX_TOKENS
        assert router.wait(30) == 0
        assert "Traceback" not in router.stop()
    finally:
        router.stop()


def test_a_cut_while_a_delta_arrives_ends_the_stream_with_the_stop_not_in_the_callers_send(make_router, cluster):
    """A cut brings a waiting request's deadline forward; its timeout fires a loop turn later. When the request's
    next delta arrives in between, the request must end with the stop there and then: handed to the caller, the
    delta would be followed by the timeout's cancel landing in the caller's own send (a gRPC call's write, which
    then never ends with the stop's status: test_a_cut_grpc_call_ends_unavailable_naming_the_stop did so under
    load)."""
    router = make_router(cluster.prefills, [cluster.decode])
    frontend = router.router.frontend

    async def scenario() -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        second = loop.create_future()
        stream = _scripted_stream(frontend, second)
        await anext(stream)
        # Once the request waits for its next delta: that delta, then the cut, in the same loop turn.
        loop.call_soon(lambda: (second.set_result(Delta((6,), "b")), frontend.cut("stopping now")))
        try:
            await anext(stream)
        except GenerationError as exc:
            outcome = f"ended: {exc}"
        else:
            outcome = "delta handed to the caller"
        return outcome, await _send(stream, 0.05)

    assert router.run(scenario(), 10) == ("ended: stopping now", "the caller's send went on")


def test_a_request_whose_time_runs_out_while_its_caller_sends_a_delta_times_out_after_the_send(make_router, cluster):
    """The request's own deadline waits while its caller sends a delta, for the same reason, and ends the request
    at its next step if it passed meanwhile."""
    router = make_router(cluster.prefills, [cluster.decode], request_timeout_s=0.2)
    frontend = router.router.frontend

    async def scenario() -> tuple[str, str]:
        stream = _scripted_stream(frontend, asyncio.get_running_loop().create_future())  # no second delta
        await anext(stream)
        sent = await _send(stream, 0.4)  # a send longer than the request's whole time
        try:
            await anext(stream)
        except TimeoutError:
            return sent, "timed out at its next step"
        return sent, "went on"

    assert router.run(scenario(), 10) == ("the caller's send went on", "timed out at its next step")


def _scripted_stream(frontend, second: asyncio.Future):
    """``frontend.stream`` of a request whose deltas are one at once, then ``second``'s when it is set."""

    async def generate(request):
        yield Delta((5,), "a")
        yield await second

    frontend.orchestrator.generate = generate
    return frontend.stream(frontend.build([3, 4, 5], SamplingParams(max_tokens=4)))


async def _send(stream, seconds: float) -> str:
    """The caller sending what it got (a write that takes ``seconds``): whether the request's deadline cancelled it."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        await stream.aclose()
        return "the caller's send was cancelled"
    return "the caller's send went on"
