"""Every HTTP answer names its request in X-Request-Id, as OpenAI's API does (its SDKs read it as `_request_id`): the
client's own id, as a proxy in front (Envoy, nginx) sets it, or one the router makes; streams and errors too. An id
longer than gRPC's request_id may be is refused naming the header, the one limit both APIs share; the request's trace
span carries the id (tests/router/test_tracing.py)."""

from __future__ import annotations

import logging
import re

import grpc
import httpx
import openai
import pytest

from contract.errors import MAX_REQUEST_ID_CHARS
from protos import common_pb2, generate_pb2, generate_pb2_grpc
from tests.router.conftest import SERVED_MODEL
from tests.workers.harness import wait_until

MADE = re.compile(r"req_[0-9a-f]{32}")


@pytest.fixture(scope="module")
def client(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.http}/v1", api_key="none", max_retries=0, timeout=60)


def test_the_clients_request_id_comes_back_on_a_completion_and_a_stream(client):
    completion = client.completions.create(
        model=SERVED_MODEL, prompt="1 2 3", max_tokens=3, temperature=0, extra_headers={"X-Request-Id": "client-7 a"}
    )
    assert completion._request_id == "client-7 a"
    assert _streamed_chat_request_id(client, extra_headers={"X-Request-Id": "stream-8"}) == "stream-8"


def _streamed_chat_request_id(client: openai.OpenAI, **extra) -> str:
    """A streamed chat completion's X-Request-Id, once its stream ended."""
    with client.chat.completions.with_streaming_response.create(
        model=SERVED_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True, **extra
    ) as response:
        assert "data: [DONE]" in response.read().decode()
        return response.headers["x-request-id"]


def test_without_one_the_router_makes_a_fresh_id_for_each_answer(client, router):
    first = client.completions.create(model=SERVED_MODEL, prompt="1 2 3", max_tokens=2, temperature=0)
    second = client.completions.create(model=SERVED_MODEL, prompt="1 2 3", max_tokens=2, temperature=0)
    assert MADE.fullmatch(first._request_id) and MADE.fullmatch(second._request_id), (first, second)
    assert first._request_id != second._request_id
    for path in ("/health", "/ready", "/v1/models", "/no/such/path"):
        assert MADE.fullmatch(httpx.get(f"{router.http}{path}", timeout=10).headers["x-request-id"]), path


def test_an_error_answer_names_the_request_too(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(
            model=SERVED_MODEL,
            prompt="1 2 3",
            max_tokens=2,
            extra_body={"bogus_field": 1},
            extra_headers={"X-Request-Id": "bad-9"},
        )
    assert refused.value.request_id == "bad-9"
    assert "bogus_field" in str(refused.value)


def test_a_request_id_longer_than_the_shared_limit_is_refused_naming_the_header(client):
    longest = "r" * MAX_REQUEST_ID_CHARS
    completion = client.completions.create(
        model=SERVED_MODEL, prompt="1 2 3", max_tokens=2, temperature=0, extra_headers={"X-Request-Id": longest}
    )
    assert completion._request_id == longest
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(
            model=SERVED_MODEL, prompt="1 2 3", max_tokens=2, extra_headers={"X-Request-Id": longest + "r"}
        )
    error = refused.value.body
    assert error["param"] == "x-request-id" and str(MAX_REQUEST_ID_CHARS) in error["message"], error
    assert MADE.fullmatch(refused.value.request_id)  # not the refused one echoed back


def test_the_access_log_has_a_line_per_request_naming_its_id_and_is_off_by_default(
    make_router, cluster, router, caplog
):
    logged = make_router(cluster.prefills, [cluster.decode], access_log=True)
    client = openai.OpenAI(base_url=f"{logged.http}/v1", api_key="none", max_retries=0, timeout=60)
    with caplog.at_level(logging.DEBUG, logger="splitserve.access"):
        client.completions.create(
            model=SERVED_MODEL, prompt="1 2 3", max_tokens=2, extra_headers={"X-Request-Id": "logged-1"}
        )
        refused = httpx.post(f"{logged.http}/v1/completions", json={"prompt": "1", "bogus_field": 1}, timeout=10)
        quiet = httpx.get(f"{router.http}/v1/models", headers={"X-Request-Id": "not-logged"}, timeout=10)
        with grpc.insecure_channel(logged.grpc) as channel:
            stub = generate_pb2_grpc.GenerateStub(channel)
            params = common_pb2.SamplingParams(max_tokens=2)
            list(
                stub.Generate(generate_pb2.CompletionRequest(text="1 2", params=params, request_id="rpc-1"), timeout=30)
            )
            unnamed = list(stub.Generate(generate_pb2.CompletionRequest(text="1 2", params=params), timeout=30))
            with pytest.raises(grpc.RpcError):
                list(stub.Generate(generate_pb2.CompletionRequest(model="other", text="1"), timeout=30))
        wait_until(lambda: len(_access_lines(caplog)) >= 5, 10, what="five access log lines")
    lines = _access_lines(caplog)
    calls = [line for line in lines if "gRPC" in line]
    assert re.fullmatch(
        r'ipv4:127\.0\.0\.1:\d+ "gRPC splitserve.Generate/Generate" OK [\d.]+ ms request_id=rpc-1', calls[0]
    ), calls
    given = unnamed[0].request_id  # a call that named none is logged by the id its chunks carry
    assert re.fullmatch(rf'\S+ "gRPC splitserve.Generate/Generate" OK [\d.]+ ms request_id={given}', calls[1]), calls
    assert re.fullmatch(r'\S+ "gRPC splitserve.Generate/Generate" NOT_FOUND [\d.]+ ms request_id=-', calls[2]), calls
    lines = [line for line in lines if "gRPC" not in line]
    assert re.fullmatch(r'127\.0\.0\.1:\d+ "POST /v1/completions" 200 [\d.]+ ms request_id=logged-1', lines[0]), lines
    made = refused.headers["x-request-id"]
    assert re.fullmatch(rf'127\.0\.0\.1:\d+ "POST /v1/completions" 400 [\d.]+ ms request_id={made}', lines[1]), lines
    assert quiet.status_code == 200 and not [line for line in lines if "not-logged" in line]


def _access_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "splitserve.access"]


def test_vllms_request_id_field_names_the_request_as_the_header_does(make_router, cluster, caplog):
    """vLLM's body field ``request_id`` is the client's name for the request, as X-Request-Id is: it comes back in
    the answer's header and names the request in the access log; refused by name where the header names the
    request otherwise, or where it could not go out as a header."""
    logged = make_router(cluster.prefills, [cluster.decode], access_log=True)
    client = openai.OpenAI(base_url=f"{logged.http}/v1", api_key="none", max_retries=0, timeout=60)
    with caplog.at_level(logging.DEBUG, logger="splitserve.access"):
        completion = client.completions.create(
            model=SERVED_MODEL, prompt="1 2 3", max_tokens=2, temperature=0, extra_body={"request_id": "body-1"}
        )
        wait_until(lambda: _access_lines(caplog), 10, what="the access log line")
    assert completion._request_id == "body-1"
    assert re.fullmatch(
        r'127\.0\.0\.1:\d+ "POST /v1/completions" 200 [\d.]+ ms request_id=body-1', _access_lines(caplog)[0]
    )
    same = {"extra_body": {"request_id": "body-2"}, "extra_headers": {"X-Request-Id": "body-2"}}  # one name, twice
    assert _streamed_chat_request_id(client, **same) == "body-2"
    for request_id, header in [("body-3", "other-3"), ("é-4", None), ("line\n5", None), ("r" * 257, None), (6, None)]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(
                model=SERVED_MODEL,
                prompt="1",
                max_tokens=1,
                extra_body={"request_id": request_id},
                extra_headers={"X-Request-Id": header} if header else None,
            )
        assert refused.value.body["param"] == "request_id", (request_id, refused.value.body)
        assert refused.value.request_id == header or MADE.fullmatch(refused.value.request_id)
