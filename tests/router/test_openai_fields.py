"""OpenAI's field semantics beyond the happy path: logprobs that describe the bytes and text really returned, null as
"not given", wrong JSON types refused, requests that can never be admitted, and errors that name their field.

The router's tokenizer is byte-level (tests/router/conftest.py's checkpoint ships none): token ``3 + b`` is byte ``b``,
so a byte >= 0x80 is a token holding part of a UTF-8 character, whose text alone reads U+FFFD."""

from __future__ import annotations

import codecs

import httpx
import pytest

from tests.router.conftest import MAX_MODEL_LEN, SERVED_MODEL, random_prompt
from tests.router.test_errors import assert_error, post

FIRST_BYTE_ID = 3
NO_SPECIAL = {"0": -100, "1": -100, "2": -100}  # <pad>, <s>, </s>: the text skips them, their bytes would not
DRAGON = "🐉".encode()  # four tokens, none a character alone
USER = [{"role": "user", "content": "hi"}]


def _byte_token(byte: int) -> str:
    return str(FIRST_BYTE_ID + byte)


def _char_starts(text: str) -> list[int]:
    """For each UTF-8 byte of ``text``, the index of the character it belongs to."""
    return [index for index, char in enumerate(text) for _ in char.encode()]


def _byte_starts(data: bytes) -> list[int]:
    """For each byte of ``data``, how many characters UTF-8 decoding (errors replaced) has completed before it."""
    decoder, done, starts = codecs.getincrementaldecoder("utf-8")(errors="replace"), 0, []
    for byte in data:
        starts.append(done)
        done += len(decoder.decode(bytes([byte])))
    return starts


# -- chat logprobs' bytes are the token's own ------------------------------------------------------------


def test_chat_logprob_bytes_are_each_tokens_raw_bytes(router):
    """Tokens that are parts of characters report their own bytes (not U+FFFD's), so joined they rebuild the text."""
    bias = {**NO_SPECIAL, **{_byte_token(b): 100 for b in DRAGON}}  # every token one of 🐉's four bytes
    request = dict(
        model=SERVED_MODEL, messages=USER, max_tokens=16, seed=7, logprobs=True, top_logprobs=3, logit_bias=bias
    )
    client = router.openai()
    out = client.chat.completions.create(**request)
    content = out.choices[0].logprobs.content
    assert len(content) == 16
    assert all(len(entry.bytes) == 1 and entry.bytes[0] in DRAGON for entry in content), content
    for top in (top for entry in content for top in entry.top_logprobs):  # the raw distribution's: any byte
        assert len(top.bytes) == 1 and (top.bytes[0] >= 0x80 if top.token == "\ufffd" else top.token.encode())
    joined = b"".join(bytes(entry.bytes) for entry in content)
    assert joined.decode("utf-8", errors="replace") == out.choices[0].message.content

    chunks = client.chat.completions.create(**request, stream=True)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.bytes for e in streamed] == [e.bytes for e in content], "the same seed streams the same tokens"


# -- colliding top_logprobs keys keep the most likely ----------------------------------------------------


def test_top_logprobs_that_read_the_same_keep_the_most_likely(router, rng):
    """Of the 20 most likely next tokens, several are parts of characters (each reads U+FFFD) or alias a byte: each
    key holds its most likely token's logprob. The same request naming tokens by id shows the whole ranking."""
    body = {"prompt": [random_prompt(rng, 12)], "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 20}
    by_text = post(router, "/v1/completions", body).json()["choices"][0]["logprobs"]["top_logprobs"]
    by_id = post(router, "/v1/completions", {**body, "return_tokens_as_token_ids": True}).json()
    collided = False
    for text_top, id_top in zip(by_text[1:], by_id["choices"][0]["logprobs"]["top_logprobs"][1:], strict=True):
        expected: dict[str, float] = {}
        for token, logprob in id_top.items():  # most likely first
            expected.setdefault(_text_of(int(token.removeprefix("token_id:"))), logprob)
        assert text_top == pytest.approx(expected)
        collided |= len(expected) < len(id_top)
    assert collided, "some tokens read the same"


def _text_of(token_id: int) -> str:
    if token_id < FIRST_BYTE_ID:
        return ("<pad>", "<s>", "</s>")[token_id]
    return bytes([(token_id - FIRST_BYTE_ID) % 256]).decode("utf-8", errors="replace")


# -- text_offset -----------------------------------------------------------------------------------------


def test_text_offset_points_into_the_returned_text(router):
    prompt = "héllo 🐉 ok"
    ascii_a = {**NO_SPECIAL, _byte_token(ord("a")): 100}  # one character per generated token
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 1, "logit_bias": ascii_a}

    echoed = post(router, "/v1/completions", {**body, "echo": True}).json()["choices"][0]
    assert echoed["text"] == prompt + "aaaa"
    offsets = echoed["logprobs"]["text_offset"]
    assert len(offsets) == len(echoed["logprobs"]["tokens"]) == 1 + len(prompt.encode()) + 4
    # <s> first (no text), then each byte where its character starts, then the generated tokens after the prompt.
    assert offsets == [0, *_char_starts(prompt), *range(len(prompt), len(prompt) + 4)]

    plain = post(router, "/v1/completions", body).json()["choices"][0]
    assert plain["logprobs"]["text_offset"] == list(range(len(prompt), len(prompt) + 4)), "from the prompt's end"

    streamed = router.openai().completions.create(model=SERVED_MODEL, stream=True, **body)
    assert [o for chunk in streamed for o in chunk.choices[0].logprobs.text_offset] == plain["logprobs"]["text_offset"]

    ids = post(router, "/v1/completions", {**body, "prompt": [1, *(FIRST_BYTE_ID + b for b in DRAGON)], "echo": True})
    choice = ids.json()["choices"][0]
    assert choice["text"] == "<s>🐉aaaa", "a token prompt echoes decoded, special tokens shown"
    assert choice["logprobs"]["text_offset"] == [0, 3, 3, 3, 3, 4, 5, 6, 7]


def test_text_offset_of_multibyte_generated_text(router):
    """Generated tokens inside a character start where the character does; none passes the text's end."""
    bias = {**NO_SPECIAL, **{_byte_token(b): 100 for b in DRAGON}}
    body = {"prompt": "ab", "max_tokens": 12, "seed": 3, "logprobs": 0, "logit_bias": bias}
    choice = post(router, "/v1/completions", {**body, "return_tokens_as_token_ids": True}).json()["choices"][0]
    tokens = bytes(int(t.removeprefix("token_id:")) - FIRST_BYTE_ID for t in choice["logprobs"]["tokens"])
    text = tokens.decode("utf-8", errors="replace")
    assert choice["text"] == text
    starts = [2 + start for start in _byte_starts(tokens)]
    assert choice["logprobs"]["text_offset"] == starts


# -- requests too large ever to be admitted --------------------------------------------------------------


def test_more_choices_than_can_ever_be_in_flight_is_a_400(router, make_router, cluster):
    config = router.router.frontend.config
    limit = config.max_running + config.max_queued
    cases = [
        ({"prompt": ["a"] * (limit + 1)}, "prompt"),
        ({"prompt": ["a"] * (limit // 16 + 1), "n": 16}, "n"),
        ({"prompt": ["a"] * (limit // 16 + 1), "best_of": 16}, "best_of"),
    ]
    for body, param in cases:
        error = assert_error(post(router, "/v1/completions", {**body, "max_tokens": 1}), 400, param=param)
        assert str(limit) in error["message"], error
    small = make_router([], [cluster.decode], max_running=1, max_queued=1)
    assert_error(post(small, "/v1/chat/completions", {"messages": USER, "n": 3}), 400, param="n")
    assert post(small, "/v1/chat/completions", {"messages": USER, "n": 2, "max_tokens": 1}).status_code == 200


# -- null is "not given" ---------------------------------------------------------------------------------


def test_null_optional_fields_read_as_not_given(router):
    client = router.openai()
    unset = dict(temperature=None, top_p=None, n=None, stream=None, presence_penalty=None, frequency_penalty=None)
    chat = client.chat.completions.create(model=SERVED_MODEL, messages=USER, max_tokens=2, logprobs=None, **unset)
    assert len(chat.choices) == 1 and chat.choices[0].logprobs is None
    completion = client.completions.create(model=SERVED_MODEL, prompt="x", max_tokens=2, echo=None, **unset)
    assert len(completion.choices) == 1 and completion.usage.completion_tokens >= 1
    # A required field's null is still a missing field; an unknown field's null is still unknown.
    assert_error(post(router, "/v1/completions", {"prompt": None}), 400, param="prompt")
    assert_error(post(router, "/v1/completions", {"prompt": "x", "frobnicate": None}), 400, param="frobnicate")


# -- wrong JSON types are refused, not converted ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "max_tokens", True),
        ("/v1/completions", "max_tokens", "3"),
        ("/v1/completions", "temperature", True),
        ("/v1/completions", "echo", "yes"),
        ("/v1/completions", "echo", 1),
        ("/v1/completions", "best_of", True),
        ("/v1/completions", "seed", True),
        ("/v1/completions", "logprobs", True),
        ("/v1/chat/completions", "logprobs", "true"),
        ("/v1/chat/completions", "stream", 0),
        ("/v1/chat/completions", "top_logprobs", True),
    ],
)
def test_wrongly_typed_values_are_a_400_naming_the_field(router, path, field, value):
    base = {"prompt": "x"} if path == "/v1/completions" else {"messages": USER, "logprobs": True}
    assert_error(post(router, path, {**base, "max_tokens": 2, field: value}), 400, param=field)


def test_integers_are_numbers(router):
    body = {"prompt": "x", "max_tokens": 2, "temperature": 0, "top_p": 1, "logit_bias": {"5": 1}}
    assert post(router, "/v1/completions", body).status_code == 200


# -- errors name their field -----------------------------------------------------------------------------


def test_context_and_model_errors_name_the_field(router, rng):
    long_prompt = random_prompt(rng, MAX_MODEL_LEN - 10)
    too_long = {"prompt": [[*long_prompt, *long_prompt]], "max_tokens": 1}
    assert_error(post(router, "/v1/completions", too_long), 400, "context_length_exceeded", "prompt")
    tipped = {"prompt": [long_prompt], "max_tokens": 11}
    assert_error(post(router, "/v1/completions", tipped), 400, "context_length_exceeded", "max_tokens")
    long_chat = [{"role": "user", "content": "x" * (MAX_MODEL_LEN * 2)}]
    chat_error = post(router, "/v1/chat/completions", {"messages": long_chat})
    assert_error(chat_error, 400, "context_length_exceeded", "messages")
    chat = [{"role": "user", "content": "x" * (MAX_MODEL_LEN - 40)}]
    for field in ("max_tokens", "max_completion_tokens"):
        body = {"messages": chat, field: 100}
        assert_error(post(router, "/v1/chat/completions", body), 400, "context_length_exceeded", field)
    for path, base in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": USER})):
        assert_error(post(router, path, {**base, "model": "gpt-17"}), 404, "model_not_found", "model")
    assert httpx.get(f"{router.http}/health", timeout=10).status_code == 200


# -- minor: tool fields without tools -------------------------------------------------------------------------------


def test_tool_fields_without_tools_are_a_400(router):
    for field, value in (("tool_choice", "auto"), ("tool_choice", "required"), ("parallel_tool_calls", False)):
        assert_error(post(router, "/v1/chat/completions", {"messages": USER, field: value}), 400, param=field)
    ok = post(router, "/v1/chat/completions", {"messages": USER, "max_tokens": 1, "tool_choice": "none"})
    assert ok.status_code == 200, ok.text
