"""A caller that vanishes mid-stream (its host's link down: every packet dropped, no FIN, no RST ever arrives) is let
go within ~10 s, and the decode worker stops the stream, with every block back in its pool; before, the decode worker
decoded on to max_tokens for nobody (minutes here).

- a router that vanished, seen by its decode worker: the worker's gRPC server pings the connections of calls in
  flight (cluster_auth.server_options; a ping unanswered for KEEPALIVE_TIMEOUT_MS ends the connection);
- a client of the router's public gRPC API: the router's server pings it the same way, and the router cancels the
  decode worker's call when the stream is closed unfinished (prefilled by the decode worker, or by a prefill worker
  that pushed its KV);
- a client of the router's HTTP API: the router ends its connection once it has acknowledged nothing for
  cluster_auth.PEER_SILENCE_S while SSE chunks wait for it (router/http_protocol.py), or, waiting for a completion
  not streamed, once it has not answered TCP keepalive probes for as long. A client that only stops reading for
  longer than that is kept (its kernel acknowledges the window probes), and reads on.

A client of the public gRPC API that cancels its stream (no fault) stops its decode at once.

Test host: a network namespace joined to this one by a veth pair (tests/netns.py). The vanishing caller runs inside
it (tests/router/stream_client.py) and reaches the server it calls, here, on this namespace's end of the pair.
Needs root; everything is torn down at the end, also on failure.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from protos import common_pb2, generate_pb2, generate_pb2_grpc
from protos.cluster_auth import PEER_SILENCE_S
from tests.checkpoints import write_checkpoint
from tests.netns import NetnsHost, subnets
from tests.router.conftest import SERVED_MODEL, Checkpoint
from tests.router.stream_client import PROMPT
from tests.workers.harness import launch_worker, stop_workers, wait_idle, wait_ready, wait_until

# A model whose decode step reads ~90 MB of weights (~90-130 tokens/s on one core of a 2-core EPYC) with room for a
# 12,000-token output (6 KiB of KV a token): a stream that lasts minutes, far past the bound.
LONG_STREAM_SHAPE = dict(
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=12288,
)
MAX_TOKENS = 12000
POOL_MB = "128"
# A ping (or a check of the client's acknowledgements) within a few seconds of the cut, PEER_SILENCE_S of silence.
BOUND_S = PEER_SILENCE_S + 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Checkpoint:
    """This module's model, for its workers and for the conftest's ``make_router`` (no transformers oracle: no test
    here compares tokens)."""
    path = tmp_path_factory.mktemp("long-stream") / "llama"
    write_checkpoint(path, "LlamaForCausalLM", seed=5, **LONG_STREAM_SHAPE)
    return Checkpoint(path, None)


def _decode_worker(checkpoint: Checkpoint, *extra: str):
    launched = [launch_worker("decode", str(checkpoint.path), "grpc", "--kv-cache-mb", POOL_MB, *extra)]
    try:
        yield wait_ready(launched[0])
    finally:
        stop_workers(launched)


@pytest.fixture
def decode(checkpoint):
    """A decode worker of the long-stream model, on loopback."""
    yield from _decode_worker(checkpoint)


@pytest.fixture
def prefill(checkpoint):
    """A prefill worker of the long-stream model, on loopback."""
    launched = [launch_worker("prefill", str(checkpoint.path), "grpc", "--kv-cache-mb", POOL_MB)]
    try:
        yield wait_ready(launched[0])
    finally:
        stop_workers(launched)


@pytest.fixture
def far_host():
    host = NetnsHost(subnets(1)[0])
    yield host
    host.close()


@pytest.fixture
def decode_on_test_link(far_host, checkpoint):
    """A decode worker listening on this namespace's end of the test host's link."""
    yield from _decode_worker(checkpoint, "--host", far_host.gateway)


def _client(host: NetnsHost, kind: str, address: str) -> subprocess.Popen:
    """tests/router/stream_client.py on the test host."""
    command = [*host.prefix, sys.executable, "-m", "tests.router.stream_client", kind, address, str(MAX_TOKENS)]
    return subprocess.Popen(
        [*command, SERVED_MODEL], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=Path(__file__).parents[2],
    )  # fmt: skip


def _stream_from(host: NetnsHost, kind: str, address: str) -> subprocess.Popen:
    """The stream client on the test host, once it streams (within 120 s), its stream checked to outlast the bound."""
    client = _client(host, kind, address)
    timer = threading.Timer(120, client.kill)
    timer.start()
    line = client.stdout.readline()
    timer.cancel()
    assert line.startswith("STREAMING "), f"the client did not stream: {line}{client.stdout.read()}"
    rate = float(line.split()[1])
    assert MAX_TOKENS / rate > 3 * BOUND_S, f"at {rate} tokens/s the stream would end on its own"
    return client


def _cut(host: NetnsHost, decode, what: str) -> None:
    host.set_link(False)
    cut = time.monotonic()
    wait_idle(decode, BOUND_S)
    print(f"{what}: the decode worker stopped the stream {time.monotonic() - cut:.1f} s after the link went down")


def test_a_decode_worker_whose_router_vanished_stops_its_stream(far_host, decode_on_test_link):
    client = _stream_from(far_host, "decode", decode_on_test_link.address)
    try:
        _cut(far_host, decode_on_test_link, "router")
    finally:
        client.kill()


@pytest.mark.parametrize("api", ["http", "grpc"])
def test_a_client_that_vanished_mid_stream_stops_its_decode(make_router, far_host, decode, api):
    router = make_router([], [decode], host=far_host.gateway)
    if api == "http":
        client = _stream_from(far_host, api, f"http://{far_host.gateway}:{router.router.http_port}")
    else:
        client = _stream_from(far_host, api, f"{far_host.gateway}:{router.router.grpc_port}")
    try:
        _cut(far_host, decode, f"{api} client")
        assert router.worker_active()[decode.address] == 0
    finally:
        client.kill()


@pytest.mark.parametrize("api", ["http", "grpc"])
def test_a_client_that_vanished_from_a_remotely_prefilled_stream_stops_its_decode(
    make_router, far_host, prefill, decode, api
):
    """The same over the disaggregated path: P prefilled the prompt and pushed its KV to D's reservation, D streams."""
    router = make_router([prefill], [decode], host=far_host.gateway, local_prefill_threshold=1)
    address = f"{far_host.gateway}:{router.router.grpc_port}"
    client = _stream_from(
        far_host, api, f"http://{far_host.gateway}:{router.router.http_port}" if api == "http" else address
    )
    try:
        assert router.decisions().get("remote_prefill") == 1, router.decisions()
        _cut(far_host, decode, f"{api} client of a remotely prefilled stream")
        assert router.worker_active() == {decode.address: 0, prefill.address: 0}
        wait_idle(prefill, 5)
    finally:
        client.kill()


def test_a_client_that_vanished_waiting_for_a_whole_completion_stops_its_decode(make_router, far_host, decode):
    router = make_router([], [decode], host=far_host.gateway)
    client = _client(far_host, "http-whole", f"http://{far_host.gateway}:{router.router.http_port}")
    try:
        wait_until(lambda: decode.stats().running == 1, 60, what="the completion to start decoding")
        time.sleep(2.0)  # decoding, nothing sent to the client yet: its connection is idle
        _cut(far_host, decode, "http client of a whole completion")
        assert router.worker_active()[decode.address] == 0
    finally:
        client.kill()


def test_a_grpc_client_that_cancels_its_stream_stops_its_decode(make_router, decode):
    router = make_router([], [decode])
    with grpc.insecure_channel(router.grpc) as channel:
        request = generate_pb2.CompletionRequest(
            token_ids=generate_pb2.TokenIds(ids=PROMPT),
            params=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
        )
        call = generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=600)
        count = 0
        for chunk in call:
            count += len(chunk.token_ids)
            if count >= 100:
                break
        call.cancel()
        wait_idle(decode, 5)
    assert router.worker_active()[decode.address] == 0


def test_an_http_client_that_stops_reading_is_kept(make_router, decode):
    """Its window shuts while it does not read (a small receive buffer), for longer than the silence bound; its kernel
    still acknowledges the router's window probes, so it is kept and reads on (TCP_USER_TIMEOUT would end it)."""
    router = make_router([], [decode])
    body = {"model": SERVED_MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True}
    body = json.dumps(body | {"temperature": 0, "ignore_eos": True}).encode()
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.settimeout(30)
        client.connect(("127.0.0.1", router.router.http_port))
        head = "POST /v1/completions HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\n"
        client.sendall(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
        assert b" 200 " in client.recv(4096).split(b"\r\n", 1)[0]
        time.sleep(PEER_SILENCE_S + 4)  # not reading: the window shuts, the router's writes wait
        received = b""
        while received.count(b"data: {") < 300:
            chunk = client.recv(65536)
            assert chunk, "the router ended the connection of a client that only stopped reading"
            received += chunk
    wait_idle(decode, 5)  # closed now: its stream stops
