"""OpenAI's Responses API (`client.responses.create`, streamed or not) on the shared router: a response is the chat
completion of the messages its instructions and input say, token for token, in the Responses shape the SDK parses
(output_text, status incomplete at the limit, usage in input/output tokens); its stream is the typed event sequence,
whose deltas make the same text; what it cannot do (other item types, built-in tools) is a 400 naming it. Stored
responses: tests/router/test_stored_responses.py.
Structured output through text.format: tests/router/test_structured_output.py."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from router import openai_api
from router.orchestrator import Delta, GenerationError
from router.responses_api import LOGPROBS_INCLUDE, MAX_METADATA_KEYS, ResponseShape, events
from tests.router.conftest import SERVED_MODEL
from tests.router.test_errors import assert_error, post

INSTRUCTIONS = "Answer in numbers."
QUESTION = "5 7 11 13"
LIMIT = 12


@pytest.fixture(scope="module")
def client(router) -> openai.OpenAI:
    return router.openai()


def _chat(client: openai.OpenAI, messages: list[dict], max_tokens: int = LIMIT):
    return client.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=max_tokens, temperature=0)


def _status(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


@pytest.mark.parametrize(
    "input_",
    [
        QUESTION,
        [{"role": "user", "content": QUESTION}],
        [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
    ],
    ids=["text", "message", "parts"],
)
def test_a_response_is_the_chat_completion_of_its_instructions_and_input(client, input_):
    chat = _chat(client, [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}])
    response = client.responses.create(
        model=SERVED_MODEL, instructions=INSTRUCTIONS, input=input_, max_output_tokens=LIMIT, temperature=0
    )
    choice = chat.choices[0]
    assert response.output_text == choice.message.content and response.output_text
    assert response.status == _status(choice.finish_reason)
    assert (response.incomplete_details is not None) == (response.status == "incomplete")
    (message,) = response.output
    assert (message.type, message.role, message.status) == ("message", "assistant", response.status)
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.total_tokens == chat.usage.total_tokens
    assert (response.instructions, response.max_output_tokens, response.model) == (INSTRUCTIONS, LIMIT, SERVED_MODEL)
    assert response.store is True and response.id.startswith("resp_")  # stored by default, as OpenAI stores


def test_a_conversation_with_a_developer_message_and_an_assistant_turn(client):
    said = [
        {"role": "developer", "content": INSTRUCTIONS},
        {"role": "user", "content": "1 2 3"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "4 5 6"}]},
        {"role": "user", "content": QUESTION},
    ]
    as_chat = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in said]
    as_chat[2] = {"role": "assistant", "content": "4 5 6"}
    chat = _chat(client, as_chat)
    response = client.responses.create(model=SERVED_MODEL, input=said, max_output_tokens=LIMIT, temperature=0)
    assert response.output_text == chat.choices[0].message.content


def test_a_streamed_response_is_the_typed_event_sequence_of_the_same_text(client):
    whole = client.responses.create(model=SERVED_MODEL, input=QUESTION, max_output_tokens=LIMIT, temperature=0)
    events = list(
        client.responses.create(model=SERVED_MODEL, input=QUESTION, max_output_tokens=LIMIT, temperature=0, stream=True)
    )
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{whole.status}",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == events[-4].text == whole.output_text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens
    assert events[0].response.status == "in_progress" and final.id == events[0].response.id


def test_included_logprobs_are_the_chat_completions_whole_and_streamed(client):
    messages = [{"role": "user", "content": QUESTION}]
    chat = client.chat.completions.create(
        model=SERVED_MODEL, messages=messages, max_tokens=LIMIT, temperature=0, logprobs=True, top_logprobs=3
    )
    expected = [entry.model_dump() for entry in chat.choices[0].logprobs.content]
    assert len(expected) == chat.usage.completion_tokens and all(len(e["top_logprobs"]) == 3 for e in expected)
    asked = dict(model=SERVED_MODEL, input=QUESTION, max_output_tokens=LIMIT, temperature=0, top_logprobs=3)
    response = client.responses.create(**asked, include=[LOGPROBS_INCLUDE])
    (part,) = response.output[0].content
    assert [entry.model_dump() for entry in part.logprobs] == expected
    assert response.top_logprobs == 3 and response.output_text == chat.choices[0].message.content
    streamed = list(client.responses.create(**asked, include=[LOGPROBS_INCLUDE], stream=True))
    deltas = [lp.model_dump() for e in streamed if e.type == "response.output_text.delta" for lp in e.logprobs]
    (done,) = [e for e in streamed if e.type == "response.output_text.done"]
    assert deltas == [lp.model_dump() for lp in done.logprobs] == expected
    plain = client.responses.create(**{**asked, "top_logprobs": 0})  # not included: none
    assert plain.output[0].content[0].logprobs == []


def test_metadata_comes_back_and_is_bounded(client):
    response = client.responses.create(
        model=SERVED_MODEL, input=QUESTION, max_output_tokens=2, metadata={"ticket": "T-7"}, user="u1"
    )
    assert response.metadata == {"ticket": "T-7"}
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(
            model=SERVED_MODEL,
            input=QUESTION,
            max_output_tokens=2,
            metadata={f"k{i}": "v" for i in range(MAX_METADATA_KEYS + 1)},
        )
    assert refused.value.body["param"] == "metadata"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [{"type": "image_generation_call", "id": "ig_1"}]}, "input.0.type"),
        ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "gAAA"}]}, "input.0.encrypted_content"),
        (
            {"input": [{"type": "reasoning", "summary": "garbage"}, {"role": "assistant", "content": "1"}]},
            "input.0.summary",
        ),
        # A reasoning item leads the assistant turn right after it: before a user's message, or last, it leads none.
        ({"input": [{"type": "reasoning", "content": []}, {"role": "user", "content": "1"}]}, "input.0"),
        ({"input": [{"role": "user", "content": "1"}, {"type": "reasoning", "content": []}]}, "input.1"),
        ({"input": "1 2", "text": {"format": {"type": "json_schema", "name": 123, "schema": {}}}}, "text.format.name"),
        (
            {"input": "1 2", "text": {"format": {"type": "json_schema", "strict": "yes", "schema": {}}}},
            "text.format.strict",
        ),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0"),
        ({"input": [{"role": "tool", "content": "1"}]}, "input.0.role"),
        ({"input": [{"role": "user", "content": "1", "name": "bob"}]}, "input.0.name"),
        ({"input": []}, "input"),
        ({"input": "1 2", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "1 2", "max_output_tokens": 5000}, "max_output_tokens"),
        ({"input": "1 " * 3000}, "input"),
        ({"input": "1 2", "text": {"format": {"type": "xml"}}}, "text.format"),
        ({"input": "1 2", "tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": "1 2", "truncation": "middle"}, "truncation"),
        ({"input": "1 2", "tool_choice": "required"}, "tool_choice"),
        ({"input": [{"type": "function_call", "call_id": "c1", "name": "f"}]}, "input.0.arguments"),
        ({"input": "1 2", "include": [LOGPROBS_INCLUDE, "file_search_call.results"]}, "include"),
        ({"input": "1 2", "top_logprobs": 2}, "top_logprobs"),
        ({"input": "1 2", "include": [LOGPROBS_INCLUDE], "top_logprobs": 21}, "top_logprobs"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_what_a_response_cannot_do_is_a_400_naming_it(router, body, param):
    assert_error(post(router, "/v1/responses", {"model": SERVED_MODEL, **body}), 400, param=param)


def test_neutral_values_clients_send_by_default_are_accepted(client):
    response = client.responses.create(
        model=SERVED_MODEL,
        input=QUESTION,
        max_output_tokens=2,
        store=False,
        tools=[],
        tool_choice="auto",
        parallel_tool_calls=True,
        truncation="disabled",
        text={"format": {"type": "text"}},
    )
    assert response.usage.output_tokens >= 1


def test_a_stream_that_fails_midway_ends_with_an_error_and_response_failed():
    """What a cut (tests/router/test_shutdown.py) or a worker's failure sends a Responses stream after its text."""

    async def failing():
        yield Delta(token_ids=(5, 6), text="5 6")
        raise GenerationError("the router is stopping: this request was cut at once, as asked", 503)

    async def read() -> list[dict]:
        shape = ResponseShape(SERVED_MODEL, {"metadata": {}})
        return [
            json.loads(event.split("data: ", 1)[1])
            async for event in events(shape, failing(), 3, openai_api._error_body)
        ]

    sent = asyncio.run(read())
    assert [e["type"] for e in sent][-3:] == ["response.output_text.delta", "error", "response.failed"]
    assert sent[-2]["code"] == "service_unavailable" and "cut at once" in sent[-2]["message"]
    failed = sent[-1]["response"]
    assert failed["status"] == "failed" and "cut at once" in failed["error"]["message"]
    assert failed["output"][0]["content"][0]["text"] == "5 6" and failed["output"][0]["status"] == "incomplete"
