"""Structured output and tool calls through the real router and disaggregated workers (grpc and nixl).

The checkpoint is a random Qwen2 with a trained BPE tokenizer and a Qwen-style chat template that renders tools
with the Hermes ``<tool_call>`` syntax. Its random weights produce garbage: output that parses as JSON, validates
against a schema, matches a regex or names a tool does so only because the grammar masked every step — the first
token on the prefill worker, the rest on the decode worker, whose matcher accepted the prefill worker's token."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import jsonschema
import openai
import pytest
from tokenizers import Tokenizer as BackendTokenizer

from protos import common_pb2, generate_pb2, generate_pb2_grpc
from router.config import RouterConfig
from tests.checkpoints import write_checkpoint
from tests.engine.test_tokenizer import write_model_dir
from tests.router.conftest import RouterThread
from tests.router.test_errors import assert_error, post
from tests.workers.harness import WorkerProcess, start_workers, stop_workers, wait_idle

MODEL = "bpe-qwen"
# Qwen2.5's tool layout, shortened: tools in the system turn, calls as <tool_call>{json}</tool_call>.
QWEN_TOOLS_TEMPLATE = """{%- if tools %}
<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}
{% endif %}# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call a function as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}
<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{% for message in messages %}
{% if message['role'] != 'system' %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
        "role": {"enum": ["dev", "ops", "pm"]},
    },
    "required": ["name", "age", "admin", "role"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@dataclass
class Setup:
    model_dir: Path
    workers: dict[str, tuple[WorkerProcess, WorkerProcess]]  # transport -> (prefill, decode)
    routers: dict[str, RouterThread]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[Setup]:
    model_dir = write_model_dir(tmp_path_factory.mktemp("structured") / MODEL, chat_template=QWEN_TOOLS_TEMPLATE)
    vocab = BackendTokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    write_checkpoint(model_dir, "Qwen2ForCausalLM", seed=5, vocab_size=vocab, max_position_embeddings=2048)
    model = str(model_dir)
    started = start_workers(
        ("prefill", model, "grpc"), ("decode", model, "grpc"), ("prefill", model, "nixl"), ("decode", model, "nixl")
    )
    workers = {"grpc": tuple(started[:2]), "nixl": tuple(started[2:])}
    routers: dict[str, RouterThread] = {}
    try:
        for transport, (prefill, decode) in workers.items():
            config = RouterConfig(
                port=0,
                grpc_port=0,
                prefill_addresses=(prefill.address,),
                decode_addresses=(decode.address,),
                health_interval_s=0.2,
                request_timeout_s=60.0,
                local_prefill_threshold=1,  # every prompt is prefilled remotely: the KV crosses the transport
            )
            routers[transport] = RouterThread(config)
        yield Setup(model_dir, workers, routers)
    finally:
        for router in routers.values():
            router.stop()
        stop_workers(started)


def _client(setup: Setup, transport: str) -> openai.OpenAI:
    return setup.routers[transport].openai()


def _remote_only(setup: Setup, transport: str) -> None:
    decisions = setup.routers[transport].decisions()
    assert set(decisions) == {"remote_prefill"}, decisions
    for worker in setup.workers[transport]:
        wait_idle(worker)


# -- structured output ----------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["grpc", "nixl"])
def test_json_schema_output_validates_against_the_schema(setup, transport):
    client = _client(setup, transport)
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        out = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Describe person {seed} as JSON."}],
            max_tokens=120,
            temperature=1.0,
            seed=seed,
            response_format=response_format,
        )
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    free = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe person 0 as JSON."}], max_tokens=40, seed=0
    )
    with pytest.raises(ValueError):  # without the mask, the random model's text is not JSON
        json.loads(free.choices[0].message.content)
    _remote_only(setup, transport)


def test_a_responses_text_format_constrains_the_output_to_its_schema(setup):
    """The Responses API's json_schema format (its schema beside its name) is the same grammar as chat's; the SDK's
    ``responses.parse`` reads the answer back."""
    client = _client(setup, "grpc")
    text = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    for seed in range(2):
        response = client.responses.create(
            model=MODEL, input=f"Describe person {seed} as JSON.", max_output_tokens=120, temperature=1.0, text=text
        )
        assert response.status == "completed", response.output_text
        jsonschema.validate(json.loads(response.output_text), PERSON)
        assert response.text.format.type == "json_schema"
    free = client.responses.create(model=MODEL, input="Describe person 0 as JSON.", max_output_tokens=40)
    with pytest.raises(ValueError):  # without the mask, the random model's text is not JSON
        json.loads(free.output_text)


@pytest.mark.parametrize("transport", ["grpc", "nixl"])
def test_vllm_guided_fields_constrain_completions_and_streams(setup, transport):
    client = _client(setup, transport)
    base = dict(model=MODEL, prompt="Pick one:", max_tokens=40, temperature=1.0)
    choices = ["red", "green", "blue sky"]
    for seed in range(3):
        out = client.completions.create(**base, seed=seed, extra_body={"guided_choice": choices})
        assert (out.choices[0].text, out.choices[0].finish_reason) in {(c, "stop") for c in choices}
    out = client.completions.create(**base, seed=1, extra_body={"guided_regex": r"[a-z]{2,5}-[0-9]{3}"})
    assert re.fullmatch(r"[a-z]{2,5}-[0-9]{3}", out.choices[0].text), out.choices[0].text
    out = client.completions.create(**base, seed=2, extra_body={"guided_grammar": 'start: "yes" | "no" | "maybe"'})
    assert out.choices[0].text in {"yes", "no", "maybe"}
    for extra in ({"guided_json": PERSON}, {"structured_outputs": {"json": PERSON}}):
        out = client.completions.create(**{**base, "max_tokens": 120}, seed=3, extra_body=extra)
        jsonschema.validate(json.loads(out.choices[0].text), PERSON)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=120,
        seed=4,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    assert chunks[-1].choices[0].finish_reason == "stop"
    _remote_only(setup, transport)


def test_json_object_is_a_json_object(setup):
    client = _client(setup, "grpc")
    parsed = 0
    for seed in range(4):
        out = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=200, seed=seed, response_format={"type": "json_object"}
        )
        choice = out.choices[0]
        if choice.finish_reason == "stop":  # an unconstrained object may outgrow max_tokens
            assert isinstance(json.loads(choice.message.content), dict)
            parsed += 1
        else:
            assert choice.message.content.startswith("{")
    assert parsed, "no json_object output finished within max_tokens"


def test_grpc_grammar_continues_after_accepted_prompt_tokens(setup):
    """The public gRPC API's Grammar: the prompt's last tokens are already in the grammar (as after a migration)."""
    tokenizer = BackendTokenizer.from_file(str(setup.model_dir / "tokenizer.json"))
    head, accepted = tokenizer.encode("Code:").ids, tokenizer.encode("ab-").ids
    grammar = common_pb2.Grammar(kind="regex", text="ab-[0-9]{4}", accepted_prompt_tokens=len(accepted))
    params = common_pb2.SamplingParams(max_tokens=20, temperature=1.0, seed=9, grammar=grammar)
    request = generate_pb2.CompletionRequest(token_ids=generate_pb2.TokenIds(ids=head + accepted), params=params)
    with grpc.insecure_channel(setup.routers["grpc"].grpc) as channel:
        chunks = list(generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=60))
    text = "".join(c.text for c in chunks)
    assert re.fullmatch("[0-9]{4}", text), text
    assert chunks[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}, None),
        ("response_format", {"type": "xml"}, None),
        ("guided_json", {"type": "object", "properties": {"a": {"type": 5}}}, None),
        ("guided_regex", "a(b", None),
        ("guided_choice", [], None),
        ("guided_grammar", "start: (", None),
        ("structured_outputs", {"regex": "[", "json": None}, "structured_outputs.regex"),
        ("structured_outputs", {"backend": "xgrammar"}, "structured_outputs.backend"),
    ],
)
def test_invalid_grammars_are_a_400_naming_the_field(setup, field, value, param):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, field: value}
    assert_error(post(setup.routers["grpc"], "/v1/chat/completions", body), 400, param=param or field)


def test_two_constraints_are_a_400(setup):
    router = setup.routers["grpc"]
    body = {"model": MODEL, "messages": ASK, "response_format": {"type": "json_object"}, "guided_regex": "a+"}
    assert_error(post(router, "/v1/chat/completions", body), 400, param="guided_regex")
    body = {"model": MODEL, "messages": ASK, "tools": [WEATHER], "tool_choice": "required", "guided_regex": "a+"}
    assert_error(post(router, "/v1/chat/completions", body), 400, param="tool_choice")


def test_a_grammar_that_the_other_fields_leave_no_token_is_the_clients_400(setup):
    """The regex allows only digits and allowed_token_ids only a letter: no token is left to sample. That is the
    request's own contradiction, found where the worker samples: a 400 naming no worker's request id, not a 502."""
    router = setup.routers["grpc"]
    letter = BackendTokenizer.from_file(str(setup.model_dir / "tokenizer.json")).encode("a").ids
    body = {"model": MODEL, "prompt": "Code:", "max_tokens": 4, "guided_regex": "[0-9]+", "allowed_token_ids": letter}
    answer = post(router, "/v1/completions", body)
    assert_error(answer, 400)
    assert "no token to sample" in answer.json()["error"]["message"] and "engine error" not in answer.text
    fine = post(router, "/v1/completions", {**body, "guided_regex": "a+"})
    assert fine.status_code == 200 and set(fine.json()["choices"][0]["text"]) == {"a"}, fine.text


# -- tools ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["grpc", "nixl"])
def test_named_tool_choice_returns_a_call_whose_arguments_validate(setup, transport):
    client = _client(setup, transport)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(2):
        out = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[CLOCK, WEATHER], tool_choice=named, max_tokens=150, seed=seed
        )
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        (call,) = choice.message.tool_calls
        assert (call.type, call.function.name) == ("function", "get_weather")
        assert call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        assert choice.message.content is None
    _remote_only(setup, transport)


RESPONSES_WEATHER = {"type": "function", **WEATHER["function"]}  # the Responses API's flat function tool


def test_a_responses_named_tool_choice_makes_a_function_call_item_whose_arguments_validate(setup):
    """Responses' function tools are chat's (flat where chat nests them in ``function``); its second turn, the call
    and its output sent back as items: tests/router/test_tool_messages.py."""
    client = _client(setup, "grpc")
    named = {"type": "function", "name": "get_weather"}
    for seed in range(2):
        response = client.responses.create(
            model=MODEL, input=ASK, tools=[RESPONSES_WEATHER], tool_choice=named, max_output_tokens=150, temperature=1.0
        )
        assert response.status == "completed"
        (call,) = response.output
        assert (call.type, call.name, call.status) == ("function_call", "get_weather", "completed")
        assert call.call_id.startswith("call_") and call.id.startswith("fc_")
        jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
        assert response.tool_choice.name == "get_weather" and response.tools[0].name == "get_weather"


def test_a_streamed_response_sends_its_function_calls_as_items_at_the_end(setup):
    client = _client(setup, "grpc")
    named = {"type": "function", "name": "get_weather"}
    args = dict(model=MODEL, input=ASK, tools=[RESPONSES_WEATHER], tool_choice=named, max_output_tokens=150)
    whole = client.responses.create(**args, temperature=0)
    events = list(client.responses.create(**args, temperature=0, stream=True))
    kinds = [event.type for event in events]
    # The text was held to the end, where the calls were read out of it: at most one delta, the message's whole text.
    texts = [item.content[0].text for item in whole.output if item.type == "message"]
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == texts, (kinds, whole.output)
    done = [event.arguments for event in events if event.type == "response.function_call_arguments.done"]
    assert done == [item.arguments for item in whole.output if item.type == "function_call"] and done
    assert kinds[-1] == f"response.{whole.status}" == "response.completed"
    assert [item.type for item in events[-1].response.output] == [item.type for item in whole.output]


def test_tool_calls_stream_at_the_end(setup):
    client = _client(setup, "grpc")
    asked = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=150, seed=3)
    stream = client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True})
    everything = list(stream)
    chunks = [c for c in everything if c.choices]
    # The usage counts every token, the ones held back with the text too (it counted 2 of 40).
    whole = client.chat.completions.create(**asked)
    assert everything[-1].usage.completion_tokens == whole.usage.completion_tokens > 2
    last = chunks[-1].choices[0]
    assert last.finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.tool_calls for c in chunks[:-1])
    calls = last.delta.tool_calls
    assert calls and [c.index for c in calls] == list(range(len(calls)))
    for call in calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_tools_reach_the_template_and_auto_or_none_leave_text(setup):
    client = _client(setup, "grpc")
    args = dict(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    plain = client.chat.completions.create(**args)
    auto = client.chat.completions.create(**args, tools=[WEATHER])
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens  # the template rendered the tool definitions
    none = client.chat.completions.create(**args, tools=[WEATHER], tool_choice="none")
    assert none.usage.prompt_tokens == auto.usage.prompt_tokens
    for out in (auto, none):
        assert out.choices[0].message.tool_calls is None  # garbage text is no call
        assert out.choices[0].finish_reason in ("stop", "length")
    serial = client.chat.completions.create(
        **{**args, "max_tokens": 150}, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, seed=1
    )
    assert len(serial.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_malformed_tools_are_a_400_naming_them(setup, body, param):
    request = {"model": MODEL, "messages": ASK, "max_tokens": 4, **body}
    assert_error(post(setup.routers["grpc"], "/v1/chat/completions", request), 400, param=param)
