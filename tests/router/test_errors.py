"""Every error leaves with the right status and OpenAI's error shape, and the router serves on afterwards."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tests.router.conftest import MAX_MODEL_LEN, SERVED_MODEL, free_port, random_prompt, wait_for


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, f"{response.status_code} != {status}: {response.text}"
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_serving(router) -> None:
    out = router.openai().completions.create(model=SERVED_MODEL, prompt="still here", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens >= 1


def post(router, path: str, body, **kwargs) -> httpx.Response:
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{router.http}{path}", content=body, headers=headers, timeout=30, **kwargs)


def test_malformed_json(router):
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert_error(post(router, path, b'{"model": "tiny-llama", "prompt": '), 400)
        assert_error(post(router, path, b"\xff\xfe not json"), 400)
    assert_serving(router)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": {"text": "hi"}}, "prompt"),  # a union: no member type in the param
        ("/v1/completions", {"max_tokens": 4}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "stop": 5}, "stop"),
        ("/v1/chat/completions", {"messages": "hello"}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": "two"}, "n"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages",
        ),
        ("/v1/chat/completions", {"messages": []}, "messages"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_wrong_types_and_shapes(router, path, body, param):
    error = assert_error(post(router, path, body), 400)
    if param is not None:
        assert error["param"] == param or error["param"].startswith(param + "."), error
    assert not re.search(r"\bstr\b|\[|[A-Z]", error["param"] or ""), error  # fields only: no union member types


def test_unknown_model(router):
    assert_error(post(router, "/v1/completions", {"model": "gpt-17", "prompt": "hi"}), 404, "model_not_found")
    assert_error(
        post(
            router,
            "/v1/chat/completions",
            {"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        ),
        404,
        "model_not_found",
    )
    with pytest.raises(openai.NotFoundError):
        router.openai().completions.create(model="gpt-17", prompt="hi", max_tokens=2)
    assert_serving(router)


def test_prompt_too_long(router, rng):
    too_long = random_prompt(rng, MAX_MODEL_LEN + 1)
    assert_error(
        post(router, "/v1/completions", {"prompt": [too_long], "max_tokens": 1}), 400, "context_length_exceeded"
    )
    # Prompt fits, prompt + max_tokens does not.
    assert_error(
        post(router, "/v1/completions", {"prompt": [too_long[: MAX_MODEL_LEN - 10]], "max_tokens": 11, "stream": True}),
        400,
        "context_length_exceeded",
    )
    assert_error(
        post(router, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * (MAX_MODEL_LEN * 2)}]}),
        400,
        "context_length_exceeded",
    )
    with pytest.raises(openai.BadRequestError) as caught:
        router.openai().completions.create(model=SERVED_MODEL, prompt=[too_long], max_tokens=1)
    assert caught.value.code == "context_length_exceeded"
    assert_serving(router)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 1.5),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0.0),
        ("max_tokens", -5),  # 0 is valid: it scores the prompt (tests/router/test_openai_contract.py)
        ("min_tokens", 5),  # more than max_tokens
        ("min_tokens", -1),
        ("best_of", 0),
        ("n", 0),
        ("n", 17),
        ("logprobs", 50),
        ("logprobs", -1),
        ("stop", ["s"] * 17),
        ("stop", [""]),
        ("stop", ""),  # as [""]: an empty stop string is none, refused rather than ignored
    ],
)
def test_params_out_of_range(router, field, value):
    body = {"model": SERVED_MODEL, "prompt": "range check", "max_tokens": 4, field: value}
    assert_error(post(router, "/v1/completions", body), 400, param=field)


def test_chat_params_out_of_range(router):
    base = {"messages": [{"role": "user", "content": "hi"}]}
    too_many = post(router, "/v1/chat/completions", {**base, "logprobs": True, "top_logprobs": 21})
    assert assert_error(too_many, 400, param="top_logprobs")["message"].startswith("top_logprobs must be")
    assert_error(post(router, "/v1/chat/completions", {**base, "top_logprobs": 2}), 400, param="top_logprobs")
    assert_error(post(router, "/v1/chat/completions", {**base, "max_completion_tokens": 0}), 400)
    assert_error(post(router, "/v1/completions", {"prompt": [[5, 10_000]]}), 400, param="prompt")
    assert_error(post(router, "/v1/completions", {"prompt": [[]]}), 400, param="prompt")
    assert_error(post(router, "/v1/chat/completions", {**base, "echo": True}), 400, param="echo")
    with pytest.raises(openai.BadRequestError):
        router.openai().chat.completions.create(model=SERVED_MODEL, messages=base["messages"], temperature=9)
    assert_serving(router)


def test_unknown_route_and_method(router):
    assert_error(httpx.get(f"{router.http}/v1/nothing-here", timeout=10), 404)
    assert_error(httpx.get(f"{router.http}/v1/completions", timeout=10), 405)


def test_api_keys_and_body_limit(make_router, cluster):
    router = make_router(cluster.prefills, [cluster.decode], api_keys=("sk-right",), max_body_bytes=8192)
    body = {"model": SERVED_MODEL, "prompt": "auth", "max_tokens": 2}
    assert_error(post(router, "/v1/completions", body), 401, "invalid_api_key")
    assert_error(
        post(router, "/v1/completions", body, headers={"authorization": "Bearer sk-wrong"}), 401, "invalid_api_key"
    )
    assert_error(httpx.get(f"{router.http}/v1/models", timeout=10), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        router.openai(api_key="sk-wrong").completions.create(model=SERVED_MODEL, prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        router.openai(api_key="sk-wrong").chat.completions.create(
            model=SERVED_MODEL, messages=[{"role": "user", "content": "x"}], stream=True
        )
    assert httpx.get(f"{router.http}/health", timeout=10).status_code == 200  # probes need no key
    good = router.openai(api_key="sk-right").completions.create(model=SERVED_MODEL, prompt="x", max_tokens=2)
    assert good.usage.completion_tokens == 2

    auth = {"authorization": "Bearer sk-right"}
    large = json.dumps({**body, "prompt": "y" * 20_000})
    assert_error(post(router, "/v1/completions", large, headers=auth), 413, "request_too_large")

    def chunked():  # no content-length: the router must count the bytes itself
        for i in range(0, len(large), 1000):
            yield large[i : i + 1000].encode()

    response = httpx.post(
        f"{router.http}/v1/completions",
        content=chunked(),
        headers={"content-type": "application/json", **auth},
        timeout=30,
    )
    assert_error(response, 413, "request_too_large")
    assert (
        router.openai(api_key="sk-right")
        .completions.create(model=SERVED_MODEL, prompt="x", max_tokens=2)
        .usage.completion_tokens
        == 2
    )


def test_overload_is_429_with_retry_after(make_router, cluster, rng):
    router = make_router([], [cluster.decode], max_running=1, max_queued=0)
    held_body = {
        "model": SERVED_MODEL,
        "prompt": [random_prompt(rng, 10)],
        "max_tokens": MAX_MODEL_LEN - 20,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    body = {"model": SERVED_MODEL, "prompt": "one too many", "max_tokens": 2}
    with (
        httpx.Client(timeout=30) as held_client,
        held_client.stream("POST", f"{router.http}/v1/completions", json=held_body) as held,
    ):
        assert held.status_code == 200
        lines = held.iter_lines()
        assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")  # the slot is taken

        for stream in (False, True):
            response = post(router, "/v1/completions", {**body, "stream": stream})
            assert_error(response, 429, "rate_limit_exceeded")
            assert int(response.headers["retry-after"]) >= 1
        with pytest.raises(openai.RateLimitError):
            router.openai().chat.completions.create(
                model=SERVED_MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2
            )
        assert next(line for line in lines if line.startswith("data: ")).startswith("data: {"), (
            "the held stream goes on"
        )

    # The held stream's client left: its slot comes back and the router serves again.
    def served():
        response = post(router, "/v1/completions", body)
        return response.status_code == 200

    wait_for(served, 10, "the slot of a disconnected stream to be released", interval=0.2)


def test_no_decode_worker_is_503(make_router, cluster):
    dead = f"127.0.0.1:{free_port()}"
    router = make_router(cluster.prefills, [dead], ready=False)
    body = {"model": SERVED_MODEL, "prompt": "nobody decodes", "max_tokens": 2}
    for stream in (False, True):
        assert_error(post(router, "/v1/completions", {**body, "stream": stream}), 503)
    assert_error(post(router, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}), 503)
    with pytest.raises(openai.InternalServerError) as caught:
        router.openai().completions.create(**body)
    assert caught.value.status_code == 503
    assert httpx.get(f"{router.http}/ready", timeout=10).status_code == 503
    assert httpx.get(f"{router.http}/health", timeout=10).status_code == 200


def test_shared_router_still_serves_after_every_error(router):
    assert_serving(router)
    assert httpx.get(f"{router.http}/ready", timeout=10).json()["ready"] is True


def _nested(depth: int):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_json_nested_past_what_is_read_is_a_400_never_a_500(router):
    """A body nested deeper than pydantic's parser reads took json.loads' path, whose value a field's check then
    walked with Python's recursion (a 500); JSON nested in a string field (a schema, tool-call arguments) overflowed
    json.loads itself, which raised RecursionError where only JSONDecodeError was caught (a 500)."""
    chat = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for body in (
        {**chat, "chat_template_kwargs": {"a": _nested(400)}},
        {
            "model": SERVED_MODEL,
            "prompt": "hi",
            "max_tokens": 2,
            "response_format": {"type": "json_object", "x": _nested(400)},
        },
    ):
        error = assert_error(
            post(router, "/v1/chat/completions" if "messages" in body else "/v1/completions", body), 400
        )
        assert "nests deeper than 201 levels" in error["message"]
    deep_text = "[" * 5000 + "]" * 5000
    error = assert_error(
        post(router, "/v1/chat/completions", {**chat, "guided_json": deep_text}), 400, param="guided_json"
    )
    assert "nests deeper" in error["message"]
    anthropic = {**chat, "metadata": {"user_id": _nested(400)}}
    response = post(router, "/v1/messages", anthropic)
    assert response.status_code == 400 and response.json()["type"] == "error", response.text
    assert_serving(router)


def test_a_body_not_sent_as_json_or_sent_compressed_is_refused_naming_the_header(router):
    """Valid JSON with no Content-Type, or curl -d's form type, was told it was "not a valid dictionary"; a
    Content-Encoding was ignored (gzip's bytes were a parse error, a plain body labelled gzip was served)."""
    body = json.dumps({"model": SERVED_MODEL, "prompt": "hi", "max_tokens": 2})
    for content_type in (None, "application/x-www-form-urlencoded", "text/plain"):
        headers = {} if content_type is None else {"content-type": content_type}
        response = httpx.post(f"{router.http}/v1/completions", content=body, headers=headers, timeout=30)
        assert response.status_code == 415, response.text
        message = response.json()["error"]["message"]
        assert "Content-Type: application/json" in message and (content_type or "no Content-Type") in message
    for encoding in ("gzip", "br"):
        response = post(router, "/v1/completions", body, headers={"content-encoding": encoding})
        error = assert_error(response, 415, param="Content-Encoding")
        assert encoding in error["message"]
    assert post(router, "/v1/completions", body, headers={"content-encoding": "identity"}).status_code == 200
