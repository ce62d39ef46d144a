"""Multi-turn tool use through the real router and a decode worker: the second turn an agent framework sends
(the assistant's ``tool_calls``, then ``role: tool`` results) reaches the model as transformers renders it.

The checkpoint is a random Qwen2 with a trained BPE tokenizer and Qwen2.5's tool template, shortened: calls are
written ``<tool_call>{"name": ..., "arguments": <tojson of the arguments object>}</tool_call>``, results inside
``<tool_response>`` in a user turn. Hugging Face templates take ``arguments`` as an object where OpenAI sends a
JSON string, so the oracle is transformers rendering the same conversation in Hugging Face's form."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import jsonschema
import pytest

from engine.tokenizer import HFTokenizer
from tests.engine.test_tokenizer import write_model_dir
from tests.router.conftest import TemplatedModel, greedy_ignoring_eos, templated_model, token_ids
from tests.router.test_errors import assert_error, post
from tests.router.test_structured_output import QWEN_TOOLS_TEMPLATE, WEATHER

MODEL = "bpe-qwen-tools"
QWEN25_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or
      (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
{{- tool_call.arguments | tojson + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

PARIS = {"city": "Paris", "unit": "celsius", "days": 2}
OSLO = {"city": "Oslo", "unit": "fahrenheit", "days": 1}


def second_turn(arguments=json.dumps) -> list[dict]:
    """The conversation an OpenAI-SDK agent sends after running two calls (``arguments=dict``: Hugging Face's form)."""
    calls = [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": arguments(PARIS)}},
        {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": arguments(OSLO)}},
    ]
    return [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_b", "content": '{"temp": 50}'},
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[TemplatedModel]:
    with templated_model(tmp_path_factory.mktemp("tool-messages") / MODEL, QWEN25_TEMPLATE, seed=7) as served:
        yield served


def test_a_second_turn_with_tool_results_is_the_prompt_transformers_renders(setup):
    http = httpx.post(
        f"{setup.router.http}/tokenize", json={"model": MODEL, "messages": second_turn()}, timeout=30
    ).raise_for_status()
    expected = setup.oracle_ids(second_turn(arguments=dict), add_generation_prompt=True)
    assert http.json()["tokens"] == expected
    text = setup.oracle.decode(expected)
    assert '"arguments": {"city": "Paris", "unit": "celsius", "days": 2}' in text  # an object, not a quoted string
    assert text.count("<tool_response>") == 2

    # The same turn through the OpenAI SDK, with the tool definitions: the model sees transformers' prompt.
    client = setup.router.openai()
    out = client.chat.completions.create(
        model=MODEL,
        messages=second_turn(),
        tools=[WEATHER],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    prompt = setup.oracle_ids(second_turn(arguments=dict), tools=[WEATHER], add_generation_prompt=True)
    assert out.usage.prompt_tokens == len(prompt) > len(expected)
    generated = token_ids([t.token for t in out.choices[0].logprobs.content])
    assert generated == greedy_ignoring_eos(setup.model, prompt, 8)


def test_a_responses_second_turn_is_the_chat_turn_of_its_items(setup):
    """The same second turn as Responses items (two function_call items in a row are one assistant turn, each
    function_call_output a tool message) reaches the model as the chat request's does, and answers alike."""
    said = second_turn()
    calls, results = said[2]["tool_calls"], said[3:]
    items = [
        *said[1:2],
        *({"type": "function_call", "call_id": c["id"], **c["function"]} for c in calls),
        *({"type": "function_call_output", "call_id": r["tool_call_id"], "output": r["content"]} for r in results),
    ]
    client = setup.router.openai()
    tool = {"type": "function", **WEATHER["function"]}
    response = client.responses.create(
        model=MODEL, instructions=said[0]["content"], input=items, tools=[tool], max_output_tokens=8, temperature=0
    )
    chat = client.chat.completions.create(model=MODEL, messages=said, tools=[WEATHER], max_tokens=8, temperature=0)
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.output_text == (chat.choices[0].message.content or "")
    bad = [*items[:-1], {**items[-1], "call_id": "call_zzz"}]  # answers no call that was made
    error = assert_error(post(setup.router, "/v1/responses", {"model": MODEL, "input": bad}), 400, param="input")
    assert "call_zzz" in error["message"]


def test_a_tool_loop_chained_by_previous_response_id_is_the_chat_turn_of_its_calls(setup):
    """The agent loop of OpenAI's Responses guide: the first response calls a function (a named tool_choice makes
    it); the next request sends only the call's output and the first response's id. The model sees the chat of the
    whole conversation (the call as the assistant's tool_calls, the output as a tool message) and answers alike."""
    client = setup.router.openai()
    tool = {"type": "function", **WEATHER["function"]}
    question = "Weather in Paris?"
    first = client.responses.create(
        model=MODEL,
        input=question,
        tools=[tool],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=200,
        temperature=0,
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    output = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, input=[output], tools=[tool], max_output_tokens=8, temperature=0
    )
    calls = [{"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]
    said = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 21}'},
    ]
    chat = client.chat.completions.create(model=MODEL, messages=said, tools=[WEATHER], max_tokens=8, temperature=0)
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == (chat.choices[0].message.content or "")
    items = client.responses.input_items.list(second.id, order="asc").data
    assert [item.type for item in items] == ["message", "function_call", "function_call_output"]


def test_an_anthropic_second_turn_is_the_chat_turn_of_its_blocks(setup):
    """The same second turn as Anthropic's Messages (tool_use blocks in the assistant's message, tool_result blocks
    in the next user message) reaches the model as the chat request's does and answers alike; a tool_choice of one
    tool answers with a tool_use block whose input follows the tool's input_schema, whole and streamed."""
    said = second_turn()
    calls, results = said[2]["tool_calls"], said[3:]
    messages = [
        said[1],
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": c["id"],
                    "name": c["function"]["name"],
                    "input": json.loads(c["function"]["arguments"]),
                }
                for c in calls
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": r["tool_call_id"], "content": r["content"]} for r in results
            ],
        },
    ]
    function = WEATHER["function"]
    tool = {"name": function["name"], "description": function["description"], "input_schema": function["parameters"]}
    client = anthropic.Anthropic(base_url=setup.router.http, api_key="unused", max_retries=0, timeout=60)
    args = dict(model=MODEL, max_tokens=8, system=said[0]["content"], messages=messages, tools=[tool])
    counted = client.messages.count_tokens(**{k: v for k, v in args.items() if k != "max_tokens"})
    prompt = setup.oracle_ids(second_turn(arguments=dict), tools=[WEATHER], add_generation_prompt=True)
    assert counted.input_tokens == len(prompt)
    message = client.messages.create(**args, extra_body={"temperature": 0})
    chat = setup.router.openai().chat.completions.create(
        model=MODEL, messages=said, tools=[WEATHER], max_tokens=8, temperature=0
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    assert text == (chat.choices[0].message.content or "")

    greedy = {"temperature": 0}  # as older SDKs send it: the two answers below are then the same call
    chosen = {**args, "max_tokens": 200, "tool_choice": {"type": "tool", "name": "get_weather"}, "extra_body": greedy}
    called = client.messages.create(**chosen)
    assert called.stop_reason == "tool_use" and [b.type for b in called.content] == ["tool_use"], called
    (use,) = called.content
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, function["parameters"])
    with client.messages.stream(**chosen) as stream:
        streamed = stream.get_final_message()
    assert [(b.type, b.name, b.input) for b in streamed.content] == [("tool_use", use.name, use.input)]
    assert streamed.stop_reason == "tool_use"
    bad = [*messages[:2], {"role": "user", "content": [{**messages[2]["content"][0], "tool_use_id": "toolu_zzz"}]}]
    answer = post(setup.router, "/v1/messages", {**args, "messages": bad})
    assert answer.status_code == 400 and "toolu_zzz" in answer.json()["error"]["message"], answer.text


def _changed(index: int, **changes) -> list[dict]:
    messages = second_turn()
    messages[index] = {**messages[index], **changes}
    return messages


_CALL = second_turn()[2]["tool_calls"][0]
_BAD_TURNS = {
    "messages.4.tool_call_id": _changed(4, tool_call_id="call_zzz"),  # answers no call that was made
    "messages.2.tool_call_id": second_turn()[:2] + second_turn()[3:4],  # answers before any call
    "messages.3.tool_call_id": _changed(3, tool_call_id=None),
    "messages.3.content": _changed(3, content=None),
    "messages.1.content": _changed(1, content=None),  # a user message that says nothing: not an empty one
    "messages.2.content": _changed(2, tool_calls=None),  # null content beside no calls
    "messages.1.tool_call_id": _changed(1, tool_call_id="call_a"),  # only tool messages answer
    "messages.1.tool_calls": _changed(1, tool_calls=[_CALL]),  # only assistants call
    "messages.2.tool_calls.0.function.arguments": _changed(
        2, tool_calls=[{**_CALL, "function": {"name": "get_weather", "arguments": "{city: Paris"}}]
    ),
    "messages.2.tool_calls.1.function.arguments": _changed(
        2, tool_calls=[_CALL, {**_CALL, "id": "call_b", "function": {"name": "get_weather", "arguments": "[1]"}}]
    ),
    "messages.2.tool_calls.1.id": _changed(2, tool_calls=[_CALL, _CALL]),
    "messages.2.tool_calls.0": _changed(2, tool_calls=[{"id": "call_a", "function": _CALL["function"]}]),
}


@pytest.mark.parametrize("param", list(_BAD_TURNS))
def test_tool_turns_that_do_not_add_up_are_a_400_naming_them(setup, param):
    body = {"model": MODEL, "messages": _BAD_TURNS[param], "max_tokens": 2}
    assert_error(post(setup.router, "/v1/chat/completions", body), 400, "invalid_request_error", param)


def test_a_template_that_cannot_render_tool_calls_refuses_them(router, tmp_path):
    """The shared checkpoint's built-in template renders neither tools nor calls: the turn is refused by name."""
    body = {"messages": second_turn(), "max_tokens": 2}
    error = assert_error(
        post(router, "/v1/chat/completions", body), 400, "invalid_request_error", "messages.2.tool_calls"
    )
    assert "does not render tool calls" in error["message"]
    # A template may render tool definitions and still drop earlier calls (it never reads tool_calls): refused too.
    tools_only = HFTokenizer.from_dir(write_model_dir(tmp_path / "tools-only", chat_template=QWEN_TOOLS_TEMPLATE))
    assert (tools_only.supports_tools, tools_only.supports_tool_calls) == (True, False)
    full = HFTokenizer.from_dir(write_model_dir(tmp_path / "full", chat_template=QWEN25_TEMPLATE))
    assert (full.supports_tools, full.supports_tool_calls) == (True, True)
