"""Anthropic's Messages API through Anthropic's own SDK (`client.messages.create`, `.stream`, `.count_tokens`) on
the shared router: an answer is the chat completion of the turns its system and messages say, token for token, in
the Messages shape (text content, stop_reason, usage with cache reads apart); its stream is the event sequence whose
text deltas make the same text; errors come in Anthropic's error shape, and what it cannot do (server tools,
thinking, images) is a 400 naming it. Tool use (tool_use and tool_result blocks, tool_choice):
tests/router/test_tool_messages.py."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest

from router import openai_api
from tests.router.conftest import SERVED_MODEL
from tests.router.test_errors import post
from tests.router.test_openai_api import _stop_string_for

SYSTEM = "Answer in numbers."
QUESTION = "5 7 11 13"
LIMIT = 12
GREEDY = {"temperature": 0}  # current SDKs no longer offer temperature: sent as older ones send it


@pytest.fixture(scope="module")
def client(router) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=router.http, api_key="unused", max_retries=0, timeout=60)


def _chat(router, messages: list[dict], max_tokens: int = LIMIT, **fields):
    return router.openai().chat.completions.create(
        model=SERVED_MODEL, messages=messages, max_tokens=max_tokens, temperature=0, **fields
    )


@pytest.mark.parametrize(
    ("system", "content"),
    [(SYSTEM, QUESTION), ([{"type": "text", "text": SYSTEM}], [{"type": "text", "text": QUESTION}])],
    ids=["strings", "blocks"],
)
def test_a_message_is_the_chat_completion_of_its_system_and_messages(router, client, system, content):
    chat = _chat(router, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
    message = client.messages.create(
        model=SERVED_MODEL,
        max_tokens=LIMIT,
        system=system,
        messages=[{"role": "user", "content": content}],
        metadata={"user_id": "u-1"},
        cache_control={"type": "ephemeral"},  # a hint: every prompt's prefix is cached anyway
        extra_body=GREEDY,
    )
    choice = chat.choices[0]
    assert (message.type, message.role, message.model) == ("message", "assistant", SERVED_MODEL)
    assert message.id.startswith("msg_")
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == choice.message.content
    assert message.stop_reason == ("max_tokens" if choice.finish_reason == "length" else "end_turn")
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert usage.output_tokens == chat.usage.completion_tokens
    assert (
        client.messages.count_tokens(
            model=SERVED_MODEL, system=system, messages=[{"role": "user", "content": content}]
        ).input_tokens
        == chat.usage.prompt_tokens
    )


def test_a_streamed_message_is_the_event_sequence_of_the_same_text(client):
    args = dict(
        model=SERVED_MODEL, max_tokens=LIMIT, messages=[{"role": "user", "content": QUESTION}], extra_body=GREEDY
    )
    whole = client.messages.create(**args)
    with client.messages.stream(**args) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == whole.content[0].text
    assert (final.stop_reason, final.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)
    # The usage the stream ends with is whole: its prompt's cached part apart, as a message's after it says. (The
    # stream's message_start counted the prompt before the prefix cache said what it held.)
    after = client.messages.create(**args)
    assert after.usage.cache_read_input_tokens > 0
    assert final.usage == after.usage
    kinds = [event.type for event in client.messages.create(**args, stream=True)]
    assert kinds[:2] == ["message_start", "content_block_start"]  # then a ping, which the SDK keeps to itself
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}


def test_stop_sequences_and_an_assistant_turn(router, client):
    said = [
        {"role": "user", "content": "1 2 3"},
        {"role": "assistant", "content": [{"type": "text", "text": "4 5 6"}]},
        {"role": "user", "content": QUESTION},
    ]
    plain = _chat(router, said, max_tokens=40, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = _stop_string_for(plain)
    chat = _chat(router, said, max_tokens=40, stop=[stop]).choices[0]
    message = client.messages.create(
        model=SERVED_MODEL, max_tokens=40, messages=said, stop_sequences=[stop], extra_body=GREEDY
    )
    assert message.content[0].text == chat.message.content == plain[: plain.index(stop)]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    # The sampling fields older SDKs send (current ones no longer offer them): top_k 1 keeps the most likely token.
    sampled = client.messages.create(
        model=SERVED_MODEL, max_tokens=8, messages=said, extra_body={"temperature": 1.0, "top_p": 0.9, "top_k": 1}
    )
    greedy = client.messages.create(model=SERVED_MODEL, max_tokens=8, messages=said, extra_body=GREEDY)
    assert sampled.content == greedy.content


def test_a_last_assistant_message_is_the_start_of_the_answer(router, client):
    """Anthropic's prefill: the model continues the assistant's words (chat's continue_final_message), where a chat
    completion would close that turn and open another."""
    said = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "17 19"}]
    chat = _chat(router, said, extra_body={"continue_final_message": True, "add_generation_prompt": False})
    message = client.messages.create(model=SERVED_MODEL, max_tokens=LIMIT, messages=said, extra_body=GREEDY)
    assert message.content[0].text == chat.choices[0].message.content
    counted = client.messages.count_tokens(model=SERVED_MODEL, messages=said).input_tokens
    assert counted == chat.usage.prompt_tokens
    closed = _chat(router, said)  # the turn closed and a new one opened: another prompt
    assert closed.usage.prompt_tokens != counted
    # Only the final assistant turn may be empty: the answer starts from nothing after the opened turn.
    opened = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ""}]
    empty = client.messages.create(model=SERVED_MODEL, max_tokens=LIMIT, messages=opened, extra_body=GREEDY)
    assert empty.content and empty.content[0].text


def test_output_config_format_constrains_the_text_to_a_json_schema(client):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    message = client.messages.create(
        model=SERVED_MODEL,
        max_tokens=40,
        messages=[{"role": "user", "content": QUESTION}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
        extra_body=GREEDY,  # sampled, an integer of many digits now and then ran past max_tokens
    )
    assert message.stop_reason == "end_turn", message
    jsonschema.validate(json.loads(message.content[0].text), schema)


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tools"),  # this template renders none
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "--reasoning-parser none"),  # a model that does
        ({"thinking": {"type": "adaptive"}}, "--reasoning-parser none"),  # not think is only asked not to
        ({"thinking": {"type": "on"}}, "thinking.type"),
        ({"thinking": {"type": "disabled", "budget_tokens": 5}}, "thinking.budget_tokens"),
        ({"output_config": {"effort": "high"}}, "output_config.effort"),
        ({"output_config": {"format": {"type": "json_schema", "schema": {"type": 7}}}}, "output_config.format"),
        ({"cache_control": {"type": "persistent"}}, "cache_control"),
        ({"speed": "fast"}, "speed"),
        ({"temperature": 1.5}, "temperature must lie in [0, 1.0]"),
        ({"temperature": -0.1}, "temperature must lie in [0, 1.0]"),  # the record's range would say 2
        ({"stop_sequences": [""]}, "stop_sequences must be"),  # the record calls them stop
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages.0.content.0"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "x"}]}]}, "messages.0.content.0"),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]}]},
            "messages.0.content.0",
        ),
        ({"messages": [{"role": "user", "content": ""}]}, "messages.0.content must not be empty"),
        ({"messages": [{"role": "user", "content": []}]}, "messages.0.content must not be empty"),
        (
            {"messages": [{"role": "assistant", "content": ""}, {"role": "user", "content": "hi"}]},
            "messages.0.content must not be empty",  # only a final assistant turn may be empty
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]}, "messages.0.content.0.text"),
        ({"system": [{"type": "text", "text": ""}]}, "system.0.text"),
        ({"metadata": {"user_id": "u", "team": "t"}}, "metadata.team"),
        ({"max_tokens": None}, "max_tokens"),
        ({"bogus_field": 1}, "bogus_field"),
        ({"model": "claude-other"}, "claude-other"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_what_a_message_cannot_do_is_an_error_in_anthropics_shape(router, client, body, names):
    request = {"model": SERVED_MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "1 2"}], **body}
    request = {k: v for k, v in request.items() if v is not None}
    answer = post(router, "/v1/messages", request)
    assert answer.status_code == (404 if names == "claude-other" else 400), answer.text
    error = answer.json()
    assert set(error) == {"type", "error"} and error["type"] == "error"
    kind = "not_found_error" if names == "claude-other" else "invalid_request_error"
    assert error["error"]["type"] == kind and names in error["error"]["message"], error
    assert answer.headers["x-request-id"]
    if "max_tokens" not in request:
        return  # the SDK will not send that one
    named = {k: request[k] for k in ("model", "max_tokens", "messages")}
    with pytest.raises(anthropic.APIStatusError) as raised:  # the SDK reads it as Anthropic's own
        client.messages.create(**named, extra_body={k: v for k, v in request.items() if k not in named})
    assert raised.value.status_code == answer.status_code and names in raised.value.message


def test_each_api_documents_the_error_shape_it_sends(router):
    """The OpenAPI document's 400 of each route is the schema its error answers validate against: Anthropic's
    shape on the Messages API's routes (where OpenAI's was documented), OpenAI's elsewhere."""
    document = httpx.get(f"{router.http}/openapi.json", timeout=10).json()
    messages = {"model": SERVED_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "1"}]}
    bad = {
        "/v1/messages": {**messages, "speed": "fast"},
        "/v1/messages/count_tokens": {**messages, "bogus": 1},
        "/v1/chat/completions": {"model": SERVED_MODEL, "messages": [], "max_tokens": 2},
        "/v1/responses": {"model": SERVED_MODEL, "input": []},
    }
    shapes = {}
    for path, body in bad.items():
        documented = document["paths"][path]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
        shapes[path] = {**documented, "components": document["components"]}
        answer = post(router, path, body)
        assert answer.status_code == 400, answer.text
        jsonschema.validate(answer.json(), shapes[path])
    with pytest.raises(jsonschema.ValidationError):  # OpenAI's shape is not what the Messages API documents
        jsonschema.validate(post(router, "/v1/responses", bad["/v1/responses"]).json(), shapes["/v1/messages"])


@pytest.mark.parametrize("field", sorted(openai_api.ANTHROPIC_REFUSED))
def test_each_refused_field_is_a_400_naming_it(router, field):
    value = "non-default"
    assert openai_api.ANTHROPIC_REFUSED[field].refuses(value)
    request = {"model": SERVED_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "1"}], field: value}
    answer = post(router, "/v1/messages", request)
    assert answer.status_code == 400 and f"{field} is not supported" in answer.json()["error"]["message"], answer.text
    if field in openai_api.ANTHROPIC_COUNT_REFUSED:
        del request["max_tokens"]
        answer = post(router, "/v1/messages/count_tokens", request)
        assert answer.status_code == 400 and f"{field} is not supported" in answer.json()["error"]["message"]
    neutral = {"service_tier": "auto", "mcp_servers": [], "speed": "standard"}
    if field in neutral:  # what clients send by default asks nothing
        assert post(router, "/v1/messages", {**request, "max_tokens": 2, field: neutral[field]}).status_code == 200


def test_the_api_key_goes_in_x_api_key(make_router, cluster, tmp_path):
    keys = make_router(cluster.prefills, [cluster.decode], api_keys=("sk-anthropic",))
    args = dict(model=SERVED_MODEL, max_tokens=2, messages=[{"role": "user", "content": "1 2"}])
    good = anthropic.Anthropic(base_url=keys.http, api_key="sk-anthropic", max_retries=0, timeout=60)
    assert good.messages.create(**args).usage.output_tokens == 2
    with pytest.raises(anthropic.AuthenticationError) as refused:
        anthropic.Anthropic(base_url=keys.http, api_key="sk-wrong", max_retries=0, timeout=60).messages.create(**args)
    assert refused.value.body["error"]["type"] == "authentication_error"
    # The OpenAI routes keep OpenAI's shape, whichever header carries the key.
    answer = httpx.post(f"{keys.http}/v1/completions", json={"prompt": "1"}, headers={"x-api-key": "no"}, timeout=10)
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"


def test_a_messages_api_path_this_server_lacks_is_a_404_in_anthropics_shape(router):
    """Message Batches (and any other path under /v1/messages) is not served: its 404 is one an Anthropic SDK reads."""
    answer = post(router, "/v1/messages/batches", {"requests": []})
    assert answer.status_code == 404
    assert answer.json()["type"] == "error" and answer.json()["error"]["type"] == "not_found_error", answer.text
