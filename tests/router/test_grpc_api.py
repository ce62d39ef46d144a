"""The public gRPC API: the same tokens as HTTP, health checking, reflection, errors as status codes, and
clients' keepalive pings taken through a quiet call."""

from __future__ import annotations

import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import common_pb2, generate_pb2, generate_pb2_grpc
from tests.router.conftest import MAX_MODEL_LEN, SERVED_MODEL, free_port, random_prompt, token_ids

SERVICE = "splitserve.Generate"


@pytest.fixture
def channel(router):
    with grpc.insecure_channel(router.grpc) as channel:
        yield channel


def _generate(channel, request: generate_pb2.CompletionRequest, metadata=()) -> list[generate_pb2.CompletionChunk]:
    return list(generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=60, metadata=metadata))


def test_grpc_streams_the_same_tokens_as_http(router, channel, rng):
    prompt = random_prompt(rng, 70)
    params = common_pb2.SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=1)
    chunks = _generate(
        channel,
        generate_pb2.CompletionRequest(
            model=SERVED_MODEL, token_ids=generate_pb2.TokenIds(ids=prompt), params=params, request_id="grpc-1"
        ),
    )
    assert len(chunks) > 1, "the completion should stream in several chunks"
    assert all(c.request_id == "grpc-1" for c in chunks)
    grpc_ids = [t for c in chunks for t in c.token_ids]
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["length"] and chunks[-1].finish_reason == "length"
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (70, 20)
    assert [lp.token_id for c in chunks for lp in c.logprobs] == grpc_ids
    assert all(len(lp.top) == 1 for c in chunks for lp in c.logprobs)

    http = router.openai().completions.create(
        model=SERVED_MODEL,
        prompt=[prompt],
        max_tokens=20,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    assert token_ids(http.choices[0].logprobs.tokens) == grpc_ids
    assert "".join(c.text for c in chunks) == http.choices[0].text

    # Text and chat inputs are tokenized by the router, as over HTTP.
    text_chunks = _generate(
        channel,
        generate_pb2.CompletionRequest(
            text="hello there", params=common_pb2.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        ),
    )
    http_text = router.openai().completions.create(
        model=SERVED_MODEL, prompt="hello there", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert "".join(c.text for c in text_chunks) == http_text.choices[0].text
    chat = generate_pb2.ChatMessages(messages=[generate_pb2.ChatMessage(role="user", content="hi")])
    chat_chunks = _generate(
        channel,
        generate_pb2.CompletionRequest(
            chat=chat, params=common_pb2.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        ),
    )
    http_chat = router.openai().chat.completions.create(
        model=SERVED_MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.text for c in chat_chunks) == http_chat.choices[0].message.content
    assert chat_chunks[-1].usage.prompt_tokens == http_chat.usage.prompt_tokens


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = list(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    )
    services = {s.name for s in responses[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    described = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]), timeout=10
        )
    )
    assert described[0].file_descriptor_response.file_descriptor_proto, (
        "reflection should describe the Generate service"
    )


def _status(channel, request, metadata=()) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        _generate(channel, request, metadata)
    return caught.value.code()


def test_grpc_errors_are_status_codes(router, channel, rng):
    params = common_pb2.SamplingParams(max_tokens=4)
    assert (
        _status(channel, generate_pb2.CompletionRequest(model="gpt-17", text="x", params=params))
        == grpc.StatusCode.NOT_FOUND
    )
    too_long = generate_pb2.TokenIds(ids=random_prompt(rng, MAX_MODEL_LEN + 1))
    assert (
        _status(channel, generate_pb2.CompletionRequest(token_ids=too_long, params=params))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        _status(channel, generate_pb2.CompletionRequest(params=params)) == grpc.StatusCode.INVALID_ARGUMENT
    )  # no input
    bad = common_pb2.SamplingParams(max_tokens=4, temperature=5)
    assert _status(channel, generate_pb2.CompletionRequest(text="x", params=bad)) == grpc.StatusCode.INVALID_ARGUMENT
    assert len(_generate(channel, generate_pb2.CompletionRequest(text="fine", params=params))) >= 1


def test_grpc_errors_name_the_request_field_and_a_corrupt_request_is_invalid(router, channel):
    """A status's message names the field as the proto spells it (the input's oneof, params.max_tokens), not as the
    router's record does; a request id must be printable ASCII, as over HTTP (it goes into log lines); bytes that are
    no CompletionRequest are INVALID_ARGUMENT, not grpcio's UNKNOWN."""
    params = common_pb2.SamplingParams(max_tokens=4)
    for request, field in [
        (generate_pb2.CompletionRequest(token_ids=generate_pb2.TokenIds(ids=[]), params=params), "token_ids.ids must"),
        (generate_pb2.CompletionRequest(token_ids=generate_pb2.TokenIds(ids=[10**9]), params=params), "token_ids.ids"),
        (generate_pb2.CompletionRequest(chat=generate_pb2.ChatMessages(), params=params), "chat.messages must not"),
        (generate_pb2.CompletionRequest(text="x", request_id="a\nb", params=params), "request_id must be printable"),
        (
            generate_pb2.CompletionRequest(text="x", params=common_pb2.SamplingParams(max_tokens=MAX_MODEL_LEN)),
            "params.max_tokens",
        ),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            _generate(channel, request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert field in caught.value.details() and not caught.value.details().startswith("prompt")
    generate = channel.unary_stream(f"/{SERVICE}/Generate")  # raw bytes out, parsed replies back
    for corrupt in [b"\xff\xff\xff\xff", generate_pb2.CompletionRequest(text="x").SerializeToString()[:-1] + b"\xff"]:
        with pytest.raises(grpc.RpcError) as caught:
            list(generate(corrupt, timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message" in caught.value.details()
    assert len(_generate(channel, generate_pb2.CompletionRequest(text="fine", params=params))) >= 1


def test_grpc_chat_turns_are_checked_as_over_http(router, channel):
    """A ChatMessage carries no tool calls or tool_call_id, so it cannot be a tool's result; an unknown role is no
    role."""
    params = common_pb2.SamplingParams(max_tokens=4)
    for role, field in (("tool", "chat.messages.1.role"), ("wizard", "chat.messages.1.role")):
        said = [generate_pb2.ChatMessage(role="user", content="hi"), generate_pb2.ChatMessage(role=role, content="x")]
        request = generate_pb2.CompletionRequest(chat=generate_pb2.ChatMessages(messages=said), params=params)
        with pytest.raises(grpc.RpcError) as caught:
            _generate(channel, request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in caught.value.details()


def test_grpc_api_key(make_router, cluster):
    router = make_router(cluster.prefills, [cluster.decode], api_keys=("sk-grpc",))
    request = generate_pb2.CompletionRequest(text="x", params=common_pb2.SamplingParams(max_tokens=2))
    with grpc.insecure_channel(router.grpc) as channel:
        assert _status(channel, request) == grpc.StatusCode.UNAUTHENTICATED
        assert _status(channel, request, [("authorization", "Bearer nope")]) == grpc.StatusCode.UNAUTHENTICATED
        chunks = _generate(channel, request, [("authorization", "Bearer sk-grpc")])
        assert chunks[-1].usage.completion_tokens == 2


def test_a_client_that_pings_every_3_s_through_a_quiet_call_keeps_it(router):
    """A client's keepalive pings every 3 s while the server sends nothing (a Health Watch, a long prefill): gRPC's
    default server counts each ping within 5 min of the last as a strike and ends the connection at the third ("too
    many pings", after ~9 s); the router takes one every 2.5 s (cluster_auth.server_options)."""
    options = [
        ("grpc.keepalive_time_ms", 3000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    with grpc.insecure_channel(router.grpc, options=options) as channel:
        began = time.monotonic()
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=11)
        assert next(call).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as ended:
            next(call)  # nothing more to say: the call runs to its deadline
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ended.value.details()
    assert time.monotonic() - began > 10


def test_health_says_what_ready_says(make_router, cluster):
    """gRPC health is the router's readiness, as /ready answers it: NOT_SERVING while no decode worker serves (a
    balancer checking it sends nothing there), SERVING once one does, each change told to a Watch stream."""
    router = make_router([], [f"127.0.0.1:{free_port()}"], ready=False)  # nothing listens there
    with grpc.insecure_channel(router.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING, service
        assert httpx.get(f"{router.http}/ready", timeout=10).status_code == 503
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        router.call(lambda: router.router.pool.add(cluster.decode.address, "decode"))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        assert httpx.get(f"{router.http}/ready", timeout=10).status_code == 200


def test_a_field_this_router_does_not_know_is_refused_naming_it(router, channel):
    """A client built from a newer .proto sends a field this router's protos lack (here number 99): refused, as HTTP
    refuses an unknown body field, where protobuf would set it aside and the request would run without it."""
    unknown = bytes([0x98, 0x06, 0x01])  # field 99, varint 1
    params = common_pb2.SamplingParams(max_tokens=2)
    generate = channel.unary_stream(
        f"/{SERVICE}/Generate", response_deserializer=generate_pb2.CompletionChunk.FromString
    )
    outer = generate_pb2.CompletionRequest(text="x", params=params).SerializeToString() + unknown
    inner = generate_pb2.CompletionRequest(text="x")
    inner.params.ParseFromString(params.SerializeToString() + unknown)
    turn = generate_pb2.CompletionRequest(params=params)
    turn.chat.messages.add().ParseFromString(
        generate_pb2.ChatMessage(role="user", content="hi").SerializeToString() + unknown
    )
    for request, named in (
        (outer, "CompletionRequest has field number(s) 99"),
        (inner.SerializeToString(), "params has field number(s) 99"),
        (turn.SerializeToString(), "chat.messages.0 has field number(s) 99"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            list(generate(request, timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert named in caught.value.details()
    assert len(list(generate(generate_pb2.CompletionRequest(text="x", params=params).SerializeToString(), timeout=30)))


def test_max_body_bytes_bounds_a_grpc_request_as_an_http_body(make_router, cluster):
    router = make_router(cluster.prefills, [cluster.decode], max_body_bytes=4096)
    request = generate_pb2.CompletionRequest(text="y" * 5000, params=common_pb2.SamplingParams(max_tokens=2))
    with grpc.insecure_channel(router.grpc) as channel:
        assert _status(channel, request) == grpc.StatusCode.RESOURCE_EXHAUSTED
        small = generate_pb2.CompletionRequest(text="y" * 100, params=common_pb2.SamplingParams(max_tokens=2))
        assert _generate(channel, small)[-1].usage.completion_tokens == 2
    response = httpx.post(f"{router.http}/v1/completions", json={"prompt": "y" * 5000, "max_tokens": 2}, timeout=30)
    assert response.status_code == 413


def test_a_sampling_fields_error_names_it_as_the_proto_spells_it(router, channel):
    """Over gRPC a sampling field is params.<name> (HTTP names it bare, in its param); a text prompt's context-length
    error names text, which its message's "context" had hidden from the check of whether it named it."""
    for params, named in (
        (common_pb2.SamplingParams(max_tokens=4, temperature=5), "params.temperature"),
        (common_pb2.SamplingParams(max_tokens=4, top_k=-7), "params.top_k"),
        (common_pb2.SamplingParams(max_tokens=4, min_tokens=9), "params.min_tokens"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            _generate(channel, generate_pb2.CompletionRequest(text="x", params=params))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(named), caught.value.details()
    long_text = generate_pb2.CompletionRequest(text="y" * (MAX_MODEL_LEN + 10), params=common_pb2.SamplingParams())
    with pytest.raises(grpc.RpcError) as caught:
        _generate(channel, long_text)
    assert caught.value.details().startswith("text: "), caught.value.details()
