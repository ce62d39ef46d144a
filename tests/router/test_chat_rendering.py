"""How a request becomes its prompt, through the real router and workers: the chat-template fields
(``add_generation_prompt``, ``continue_final_message``, ``chat_template_kwargs``, ``documents``, a message's
``name``) give the prompt transformers renders, and ``truncate_prompt_tokens`` / ``add_special_tokens`` give the
tokens they name.

The chat-template checkpoint is a random Qwen2 with a trained BPE tokenizer and a Qwen3-style template that reads
``enable_thinking`` and gpt-oss's ``reasoning_effort`` (and renders documents and names); the oracle is transformers
rendering the same conversation with the same arguments."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.tokenizer import ChatTemplate
from tests.router.conftest import (
    MAX_MODEL_LEN,
    SERVED_MODEL,
    RouterThread,
    TemplatedModel,
    greedy_ignoring_eos,
    random_prompt,
    templated_model,
    token_ids,
)
from tests.router.test_errors import assert_error, post

MODEL = "bpe-qwen-thinking"
THINKING_TEMPLATE = """{%- if documents %}
{{- '<|im_start|>system\\nDocuments:' }}
{%- for doc in documents %}{{- '\\n' + doc.title + ': ' + doc.text }}{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- if reasoning_effort is defined %}
{{- '<|im_start|>system\\nReasoning: ' + reasoning_effort + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{{- '<|im_start|>' + message.role + (' ' + message.name if message.name is defined else '') + '\\n' }}
{{- message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""

QUESTION = [{"role": "user", "content": "Name a colour."}]
STARTED = [*QUESTION, {"role": "assistant", "content": "A colour: bl"}]
DOCUMENTS = [{"title": "Sky", "text": "The sky is blue."}, {"title": "Grass", "text": "Grass is green."}]
GREEDY = {"ignore_eos": True, "return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[TemplatedModel]:
    with templated_model(tmp_path_factory.mktemp("rendering") / MODEL, THINKING_TEMPLATE, seed=11) as served:
        yield served


def _tokenize(router: RouterThread, messages: list[dict], **fields) -> list[int]:
    response = post(router, "/tokenize", {"model": MODEL, "messages": messages, **fields})
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_chat_template_fields_give_the_prompt_transformers_renders(setup):
    router = setup.router
    cases = [  # (the request's fields, the conversation, transformers' arguments)
        ({}, QUESTION, dict(add_generation_prompt=True)),
        ({}, [{**QUESTION[0], "name": "ada"}], dict(add_generation_prompt=True)),  # a template that renders names
        ({"documents": DOCUMENTS}, QUESTION, dict(add_generation_prompt=True, documents=DOCUMENTS)),
        ({"add_generation_prompt": False}, QUESTION, dict(add_generation_prompt=False)),
        ({"continue_final_message": True}, STARTED, dict(continue_final_message=True)),
        ({"continue_final_message": True, "add_generation_prompt": False}, STARTED, dict(continue_final_message=True)),
        (
            {"continue_final_message": True},
            [*QUESTION, {"role": "assistant", "content": "Trailing space "}],
            dict(continue_final_message=True),
        ),
        (
            {"chat_template_kwargs": {"enable_thinking": False}},
            QUESTION,
            dict(add_generation_prompt=True, enable_thinking=False),
        ),
        (
            {"chat_template_kwargs": {"enable_thinking": True}},
            QUESTION,
            dict(add_generation_prompt=True, enable_thinking=True),
        ),
    ]
    seen = set()
    for fields, messages, hf_kwargs in cases:
        ours = _tokenize(router, messages, **fields)
        assert ours == setup.oracle_ids(messages, **hf_kwargs), fields
        seen.add(tuple(ours))
    # Two pairs render alike: continuing with and without an explicit add_generation_prompt false, and
    # enable_thinking true with the template's default.
    assert len(seen) == len(cases) - 2
    opened = setup.oracle.decode(_tokenize(router, STARTED, continue_final_message=True))
    assert opened.endswith("<|im_start|>assistant\nA colour: bl"), opened
    assert "<think>" in setup.oracle.decode(
        _tokenize(router, QUESTION, chat_template_kwargs={"enable_thinking": False})
    )

    # The model sees those prompts: its greedy tokens are transformers' on transformers' prompt.
    client = router.openai()
    for fields, hf_kwargs in [
        ({"continue_final_message": True}, dict(continue_final_message=True)),
        ({"chat_template_kwargs": {"enable_thinking": False}}, dict(add_generation_prompt=True, enable_thinking=False)),
    ]:
        messages = STARTED if "continue_final_message" in fields else QUESTION
        out = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, extra_body={**GREEDY, **fields}
        )
        prompt = setup.oracle_ids(messages, **hf_kwargs)
        assert out.usage.prompt_tokens == len(prompt)
        generated = token_ids([t.token for t in out.choices[0].logprobs.content])
        assert generated == greedy_ignoring_eos(setup.model, prompt, 6), fields


def test_a_developer_message_is_the_system_prompt_of_a_template_without_a_developer_role(setup):
    """OpenAI's developer messages replace system messages: a template that names no developer role renders one as
    its system prompt, on chat (and /tokenize) as on the Responses API, where chat passed the role through as a turn
    the model never saw in training. A template that names the role renders it as its own (engine/tokenizer.py)."""
    said = [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "hi"}]
    as_system = [{**said[0], "role": "system"}, said[1]]
    expected = setup.oracle_ids(as_system, add_generation_prompt=True)
    assert _tokenize(setup.router, said) == expected
    chat = post(setup.router, "/v1/chat/completions", {"model": MODEL, "messages": said, "max_tokens": 1})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == len(expected), chat.text
    response = post(setup.router, "/v1/responses", {"model": MODEL, "input": said, "max_output_tokens": 1})
    assert response.status_code == 200 and response.json()["usage"]["input_tokens"] == len(expected), response.text
    assert setup.router.router.frontend.tokenizer.developer_role == "system"
    assert ChatTemplate("{% if m == 'developer' %}d{% endif %}").names_developer


def test_a_reasoning_effort_reaches_a_template_that_reads_one(setup):
    """chat's reasoning_effort and a response's reasoning.effort are the template's reasoning_effort (gpt-oss's
    templates say how hard to reason in the system turn): the prompt transformers renders with it, and the model's
    greedy tokens on that prompt."""
    client = setup.router.openai()
    prompt = setup.oracle_ids(QUESTION, add_generation_prompt=True, reasoning_effort="low")
    assert prompt != setup.oracle_ids(QUESTION, add_generation_prompt=True)
    out = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        reasoning_effort="low",
        extra_body=GREEDY,
    )
    assert out.usage.prompt_tokens == len(prompt)
    assert token_ids([t.token for t in out.choices[0].logprobs.content]) == greedy_ignoring_eos(setup.model, prompt, 6)
    response = client.responses.create(
        model=MODEL, input=QUESTION, max_output_tokens=2, temperature=0, reasoning={"effort": "high"}, store=False
    )
    high = setup.oracle_ids(QUESTION, add_generation_prompt=True, reasoning_effort="high")
    assert (response.usage.input_tokens, response.reasoning.effort) == (len(high), "high")
    # truncation "auto" renders the turns it keeps as the whole was rendered: with the effort.
    long = [{"role": "user", "content": "colour " * 900}, {"role": "assistant", "content": "Blue."}, *QUESTION]
    assert len(setup.oracle_ids(long, add_generation_prompt=True)) > MAX_MODEL_LEN - 1100
    truncated = client.responses.create(
        model=MODEL,
        input=long,
        max_output_tokens=1100,
        temperature=0,
        reasoning={"effort": "high"},
        truncation="auto",
        store=False,
    )
    assert truncated.usage.input_tokens == len(high), "the last user turn, rendered with the effort"
    for body, param in (
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),  # not one of OpenAI's levels
        ({"reasoning_effort": "low", "chat_template_kwargs": {"reasoning_effort": "high"}}, "reasoning_effort"),
    ):
        request = {"model": MODEL, "messages": QUESTION, "max_tokens": 2, **body}
        assert_error(post(setup.router, "/v1/chat/completions", request), 400, param=param)


@pytest.mark.parametrize(
    ("fields", "messages", "param", "says"),
    [
        (
            {"continue_final_message": True, "add_generation_prompt": True},
            STARTED,
            "continue_final_message",
            "cannot both be true",
        ),
        ({"continue_final_message": True}, QUESTION, "continue_final_message", "an assistant's text"),
        ({"chat_template_kwargs": {"enable_thinkin": False}}, QUESTION, "chat_template_kwargs", "enable_thinking"),
        ({"chat_template_kwargs": {"messages": []}}, QUESTION, "chat_template_kwargs", "set by the server"),
        (
            {"chat_template_kwargs": {"add_generation_prompt": False}},
            QUESTION,
            "chat_template_kwargs",
            "send add_generation_prompt",
        ),
        ({"chat_template_kwargs": ["enable_thinking"]}, QUESTION, "chat_template_kwargs", ""),
    ],
)
def test_chat_template_fields_that_cannot_be_honoured_are_a_400_naming_them(setup, fields, messages, param, says):
    for path, body in [
        ("/v1/chat/completions", {"messages": messages, "max_tokens": 2}),
        ("/tokenize", {"messages": messages}),
    ]:
        error = assert_error(post(setup.router, path, {**body, **fields}), 400, "invalid_request_error", param)
        assert says in error["message"], error


# -- on the shared router (a byte tokenizer that adds BOS; prompts of 32+ tokens are prefilled remotely) ----


def test_truncate_prompt_tokens_keeps_the_prompts_tail(router, checkpoint, rng):
    client = router.openai()
    prompt = random_prompt(rng, 60)
    tail = prompt[-40:]
    out = client.completions.create(
        model=SERVED_MODEL,
        prompt=[prompt],
        max_tokens=8,
        temperature=0,
        logprobs=0,
        echo=True,
        extra_body={**GREEDY, "truncate_prompt_tokens": 40},
    )
    assert out.usage.prompt_tokens == 40
    assert token_ids(out.choices[0].logprobs.tokens) == tail + greedy_ignoring_eos(checkpoint.model, tail, 8)
    text = "".join(chr(65 + rng.randrange(26)) for _ in range(50))  # a text prompt: its tokens' tail is echoed
    cut = client.completions.create(
        model=SERVED_MODEL, prompt=text, max_tokens=1, echo=True, logprobs=0, extra_body={"truncate_prompt_tokens": 12}
    )
    assert (cut.usage.prompt_tokens, cut.choices[0].text[:12]) == (12, text[-12:])
    assert cut.choices[0].logprobs.text_offset == list(range(13))  # one character a token, counted from the tail
    whole = client.completions.create(
        model=SERVED_MODEL, prompt=[prompt], max_tokens=1, extra_body={"truncate_prompt_tokens": -1}
    )
    assert whole.usage.prompt_tokens == len(prompt)
    chat = client.chat.completions.create(
        model=SERVED_MODEL,
        messages=[{"role": "user", "content": text}],
        max_tokens=1,
        extra_body={"truncate_prompt_tokens": 7},
    )
    assert chat.usage.prompt_tokens == 7
    for bad in (0, -2, MAX_MODEL_LEN + 1):
        body = {"model": SERVED_MODEL, "prompt": "x", "max_tokens": 1, "truncate_prompt_tokens": bad}
        error = assert_error(
            post(router, "/v1/completions", body), 400, "invalid_request_error", "truncate_prompt_tokens"
        )
        assert f"[1, {MAX_MODEL_LEN}]" in error["message"]


def test_add_special_tokens_adds_or_leaves_out_the_tokenizers_bos(router, checkpoint):
    client = router.openai()
    tokenizer = router.router.frontend.tokenizer
    text = "Special tokens, or not."
    for add, expected in [(None, tokenizer.encode(text)), (False, tokenizer.encode(text, add_special_tokens=False))]:
        fields = {} if add is None else {"add_special_tokens": add}
        out = client.completions.create(
            model=SERVED_MODEL, prompt=text, max_tokens=6, temperature=0, logprobs=0, extra_body={**GREEDY, **fields}
        )
        assert out.usage.prompt_tokens == len(expected)
        assert token_ids(out.choices[0].logprobs.tokens) == greedy_ignoring_eos(checkpoint.model, expected, 6)
    assert tokenizer.encode(text)[0] == tokenizer.bos_token_id != tokenizer.encode(text, add_special_tokens=False)[0]
    messages = [{"role": "user", "content": text}]
    plain = client.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=1)
    with_bos = client.chat.completions.create(
        model=SERVED_MODEL, messages=messages, max_tokens=1, extra_body={"add_special_tokens": True}
    )
    assert with_bos.usage.prompt_tokens == plain.usage.prompt_tokens + 1
