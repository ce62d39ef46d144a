"""Requests that can never succeed are refused as the client's error, over both public APIs: HTTP 400 naming the
problem, gRPC INVALID_ARGUMENT naming the field; never a retryable 502 / UNAVAILABLE.

- a decode worker's own refusal on the path where it prefills for itself (no prefill worker): here, a prompt plus
  max_tokens within the model's context but more than the worker's KV pool holds;
- an empty chat (the template would render only the assistant's header);
- a gRPC request_id too long to echo in every chunk.
"""

from __future__ import annotations

import grpc
import httpx
import pytest

from contract.errors import MAX_REQUEST_ID_CHARS, FieldError
from protos import common_pb2, generate_pb2, generate_pb2_grpc
from tests.router.conftest import SERVED_MODEL, RouterThread, random_prompt, router_config
from tests.workers.harness import start_worker, stop_workers

SMALL_POOL_TOKENS = 256  # --kv-cache-mb 1 of the test checkpoint (4 KiB of KV per token)
OVER_THE_POOL = 1000  # max_tokens: within the model's 2048-token context, over the pool


@pytest.fixture(scope="module")
def small_decode(checkpoint):
    worker = start_worker("decode", str(checkpoint.path), "grpc", "--kv-cache-mb", "1")
    yield worker
    stop_workers([worker])


@pytest.fixture(scope="module")
def small_router(checkpoint, small_decode):
    # No --model: the router adopts the worker's card, so the test holds whether the worker refuses the request
    # (its pool) or advertises a context its pool holds (and the router refuses it first).
    router = RouterThread(router_config(checkpoint, [], [small_decode], model=None))
    yield router
    router.stop()


def _grpc_error(address: str, request: generate_pb2.CompletionRequest) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        list(generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=30))
    return caught.value


def _names_the_pool_or_context(message: str) -> bool:
    return "KV pool" in message or "context length" in message


@pytest.mark.parametrize("stream", [False, True])
def test_a_decode_workers_refusal_is_an_http_400(small_router, rng, stream):
    body = {
        "model": SERVED_MODEL,
        "prompt": [random_prompt(rng, 20)],
        "max_tokens": OVER_THE_POOL,
        "temperature": 0,
        "stream": stream,
    }
    response = httpx.post(f"{small_router.http}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error", error
    assert _names_the_pool_or_context(error["message"]), error
    # What fits is served.
    body.update(max_tokens=8, stream=False)
    assert httpx.post(f"{small_router.http}/v1/completions", json=body, timeout=30).status_code == 200


def test_a_decode_workers_refusal_is_invalid_argument_over_grpc(small_router, rng):
    request = generate_pb2.CompletionRequest(
        token_ids=generate_pb2.TokenIds(ids=random_prompt(rng, 20)),
        params=common_pb2.SamplingParams(max_tokens=OVER_THE_POOL),
    )
    error = _grpc_error(small_router.grpc, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert _names_the_pool_or_context(error.details()), error.details()


def test_an_empty_chat_is_refused_over_grpc(router):
    request = generate_pb2.CompletionRequest(
        chat=generate_pb2.ChatMessages(messages=[]), params=common_pb2.SamplingParams(max_tokens=4)
    )
    error = _grpc_error(router.grpc, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert "messages" in error.details()


def test_an_empty_chat_is_refused_by_the_frontend(router):
    """The one owner of the check, which both APIs call (HTTP's schema also refuses an empty list first)."""
    with pytest.raises(FieldError) as caught:  # a 400 naming the field, by the name each API gives it
        router.call(lambda: router.router.frontend.encode_chat([]))
    assert caught.value.field == "messages"


def test_a_grpc_request_id_is_bounded(router):
    params = common_pb2.SamplingParams(max_tokens=2)
    longest = "r" * MAX_REQUEST_ID_CHARS
    with grpc.insecure_channel(router.grpc) as channel:
        chunks = list(
            generate_pb2_grpc.GenerateStub(channel).Generate(
                generate_pb2.CompletionRequest(text="hi", params=params, request_id=longest), timeout=30
            )
        )
    assert chunks and all(chunk.request_id == longest for chunk in chunks)
    error = _grpc_error(router.grpc, generate_pb2.CompletionRequest(text="hi", params=params, request_id=longest + "r"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert "request_id" in error.details() and str(MAX_REQUEST_ID_CHARS) in error.details()
