"""The short request path of the generating routes (router/json_route.py) answers every body as FastAPI's own route
does: one app serves the same endpoint, with the router's request model and error handlers, both ways, over real
HTTP; each body below must get the same status and the same answer from both, and the OpenAPI document must describe
both routes' request bodies alike. Two kinds of body it answers in words of its own: one not sent as JSON (a 415
naming its Content-Type, where FastAPI says it is no object) and one nested past what pydantic's parser reads (a 400
saying so, where FastAPI's path walks it with Python's recursion)."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from router.json_route import JsonBodyRoute
from router.openai_api import ChatBody, CompletionBody, _install_errors
from tests.asgi_server import serve_app

VALID = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4}

# (body, content type): what a client may send, well or badly
CASES = {
    "valid": (json.dumps(VALID), "application/json"),
    "charset": (json.dumps(VALID), "application/json; charset=utf-8"),
    "upper case": (json.dumps(VALID), "APPLICATION/JSON"),
    "+json": (json.dumps(VALID), "application/vnd.api+json"),
    "not json type": (json.dumps(VALID), "text/plain"),
    "x-json": (json.dumps(VALID), "application/x-json"),
    "two slashes": (json.dumps(VALID), "application/json/x"),
    "no content type": (json.dumps(VALID), None),
    "empty": (b"", "application/json"),
    "truncated": (b'{"model": "m", "prompt": ', "application/json"),
    "not utf-8": (b"\xff\xfe not json", "application/json"),
    "nested past the parser": (b"[" * 100_000, "application/json"),
    "nested past pydantic's parser": (
        json.dumps({**VALID, "stop": json.loads("[" * 300 + "]" * 300)}),
        "application/json",
    ),
    "array": (b"[1, 2]", "application/json"),
    "unknown field": (json.dumps({**VALID, "bogus_field": 1}), "application/json"),
    "wrong type": (json.dumps({**VALID, "max_tokens": "many"}), "application/json"),
    "missing prompt": (json.dumps({"model": "m"}), "application/json"),
    "lone surrogate": ('{"model": "m", "prompt": "\\ud800"}', "application/json"),
    "NaN": ('{"model": "m", "prompt": [1], "temperature": NaN}', "application/json"),  # the sampling record refuses it
    "Infinity": ('{"model": "m", "prompt": [1], "temperature": -Infinity}', "application/json"),
    "duplicate key": ('{"model": "m", "prompt": [1], "prompt": "the last one"}', "application/json"),
    "null field": (json.dumps({**VALID, "stop": None, "seed": None}), "application/json"),
    "big int": (json.dumps({**VALID, "seed": 2**80}), "application/json"),
    "float for an int": (json.dumps({**VALID, "max_tokens": 4.0}), "application/json"),
    "escapes": (json.dumps({**VALID, "prompt": "caf\u00e9 \n \ud83d\ude00", "stop": ["\t"]}), "application/json"),
}
ACCEPTED = {"valid", "charset", "upper case", "+json", "NaN", "Infinity", "duplicate key", "null field", "big int"}
ACCEPTED |= {"escapes"}
# Answered in the short route's own words: (status, what its message says)
OWN_WORDS = {
    "not json type": (415, "(Content-Type text/plain was sent)"),
    "x-json": (415, "(Content-Type application/x-json was sent)"),
    "two slashes": (415, "(Content-Type application/json/x was sent)"),
    "no content type": (415, "(no Content-Type was sent)"),
    "nested past pydantic's parser": (400, "nests deeper than 201 levels"),
}


HELLO = {"role": "user", "content": "hello"}
# Chat bodies: nested models, each with its own refusals and validators
CHAT_CASES = {
    "valid": {"model": "m", "messages": [HELLO]},
    "content parts": {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
    "null content": {"model": "m", "messages": [{"role": "assistant", "content": None}, HELLO]},
    "tool exchange": {
        "model": "m",
        "messages": [
            HELLO,
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "42"},
        ],
    },
    "no messages": {"model": "m", "messages": []},
    "unknown role": {"model": "m", "messages": [{"role": "narrator", "content": "once"}]},
    "unknown message field": {"model": "m", "messages": [{**HELLO, "bogus": 1}]},
    "message not an object": {"model": "m", "messages": ["hello"]},
    "lone surrogate in a part": {"model": "m", "messages": [{"role": "user", "content": [{"text": "\ud800"}]}]},
    "content a number": {"model": "m", "messages": [{"role": "user", "content": 7}]},
}
CHAT_ACCEPTED = {"valid", "content parts", "null content", "tool exchange"}


async def echo(body: CompletionBody, request: Request):
    # the whole validated body, as Python writes it (NaN and all): both routes must make the same one
    return JSONResponse(
        {"fields": sorted(body.model_fields_set), "body": repr(body.model_dump()), "method": request.method}
    )


async def echo_chat(body: ChatBody, request: Request):
    return JSONResponse({"fields": sorted(body.model_fields_set), "body": repr(body.model_dump())})


@pytest.fixture(scope="module")
def server():
    app = FastAPI()
    _install_errors(app)
    app.router.add_api_route("/fastapi", echo, methods=["POST"])
    app.router.add_api_route("/short", echo, methods=["POST"], route_class_override=JsonBodyRoute)
    app.router.add_api_route("/fastapi/chat", echo_chat, methods=["POST"])
    app.router.add_api_route("/short/chat", echo_chat, methods=["POST"], route_class_override=JsonBodyRoute)
    with serve_app(app) as url:
        yield app, url


@pytest.mark.parametrize("case", list(CASES))
def test_the_short_route_answers_as_fastapis_own(server, case):
    _, url = server
    body, content_type = CASES[case]
    headers = {"content-type": content_type} if content_type else {}
    with httpx.Client(timeout=30) as client:
        # httpx sets no content type for raw content, so "no content type" really sends none
        answers = [client.post(f"{url}{path}", content=body, headers=headers) for path in ("/fastapi", "/short")]
    expected, got = answers
    assert expected.status_code == (200 if case in ACCEPTED else 400), expected.text
    if case in OWN_WORDS:
        status, says = OWN_WORDS[case]
        assert got.status_code == status and says in got.json()["error"]["message"], got.text
        return
    assert (got.status_code, got.json()) == (expected.status_code, expected.json()), case


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_the_short_route_answers_chat_bodies_as_fastapis_own(server, case):
    _, url = server
    body = json.dumps(CHAT_CASES[case])
    with httpx.Client(timeout=30) as client:
        answers = [
            client.post(f"{url}{path}/chat", content=body, headers={"content-type": "application/json"})
            for path in ("/fastapi", "/short")
        ]
    expected, got = answers
    assert (got.status_code, got.json()) == (expected.status_code, expected.json()), case
    assert expected.status_code == (200 if case in CHAT_ACCEPTED else 400), expected.text


def test_the_short_route_is_documented_as_fastapis(server):
    app, _ = server
    paths = app.openapi()["paths"]
    assert paths["/short"]["post"]["requestBody"] == paths["/fastapi"]["post"]["requestBody"]
    assert "CompletionBody" in json.dumps(paths["/short"]["post"]["requestBody"])


def test_an_endpoint_with_other_parameters_is_refused():
    async def with_query(body: CompletionBody, limit: int):
        return JSONResponse({})

    with pytest.raises(TypeError, match="one body model and the request"):
        FastAPI().router.add_api_route("/x", with_query, methods=["POST"], route_class_override=JsonBodyRoute)
