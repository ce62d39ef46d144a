"""Honour or refuse, by construction: every field of every request model is classified, each refused field
is a 400 naming it, each honoured field has a behavioural test, and out-of-range or non-UTF-8 values are a 400
(never a 500)."""

from __future__ import annotations

import random
import types
import typing

import grpc
import openai
import pytest
import torch
from pydantic import BaseModel

import tests.router.test_anthropic_api as anthropic_tests
import tests.router.test_chat_rendering as rendering_tests
import tests.router.test_defaulted_max_tokens as defaulted_tests
import tests.router.test_errors as error_tests
import tests.router.test_grpc_api as grpc_tests
import tests.router.test_openai_api as api_tests
import tests.router.test_openai_contract as contract_tests
import tests.router.test_priority as priority_tests
import tests.router.test_reasoning as reasoning_tests
import tests.router.test_request_id as request_id_tests
import tests.router.test_responses_api as responses_tests
import tests.router.test_stored_responses as stored_tests
import tests.router.test_structured_output as structured_tests
import tests.router.test_tool_messages as tool_message_tests
from contract.sampling import DEFAULT_MAX_TOKENS
from contract.sampling import FIELDS as SAMPLING_FIELDS
from protos import common_pb2, generate_pb2, generate_pb2_grpc
from router import grpc_api, openai_api
from tests.router.conftest import EOS, SERVED_MODEL, VOCAB, greedy_ignoring_eos, random_prompt, token_ids
from tests.router.test_errors import assert_error, post

TABLES = {
    openai_api.CompletionBody: (openai_api.COMPLETION_HONOURED, openai_api.COMPLETION_REFUSED),
    openai_api.ChatBody: (openai_api.CHAT_HONOURED, openai_api.CHAT_REFUSED),
    openai_api.ChatMessageBody: (openai_api.MESSAGE_HONOURED, openai_api.MESSAGE_REFUSED),
    openai_api.StreamOptions: (openai_api.STREAM_OPTIONS_HONOURED, openai_api.STREAM_OPTIONS_REFUSED),
    openai_api.TokenizeBody: (openai_api.TOKENIZE_HONOURED, {}),
    openai_api.DetokenizeBody: (openai_api.DETOKENIZE_HONOURED, {}),
    openai_api.ResponsesBody: (openai_api.RESPONSES_HONOURED, openai_api.RESPONSES_REFUSED),
    openai_api.AnthropicBody: (openai_api.ANTHROPIC_HONOURED, openai_api.ANTHROPIC_REFUSED),
    openai_api.AnthropicCountBody: (openai_api.ANTHROPIC_COUNT_HONOURED, openai_api.ANTHROPIC_COUNT_REFUSED),
}
GRPC_MESSAGES = {
    "CompletionRequest": generate_pb2.CompletionRequest,
    "ChatMessages": generate_pb2.ChatMessages,
    "ChatMessage": generate_pb2.ChatMessage,
    "TokenIds": generate_pb2.TokenIds,
    "SamplingParams": common_pb2.SamplingParams,
    "Grammar": common_pb2.Grammar,
}
GREEDY_IDS = dict(temperature=0, logprobs=0, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})


def _nested_models(annotation) -> set[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {annotation}
    return {m for arg in typing.get_args(annotation) for m in _nested_models(arg)}


def test_every_field_of_every_request_model_is_classified():
    reachable = set(TABLES)
    for model in list(TABLES):
        for field in model.model_fields.values():
            reachable |= _nested_models(field.annotation)
    assert reachable == set(TABLES), f"request models without a table: {reachable - set(TABLES)}"
    for model, (honoured, refused) in TABLES.items():
        assert not honoured & set(refused), f"{model.__name__}: both honoured and refused: {honoured & set(refused)}"
        unclassified = set(model.model_fields) - honoured - set(refused)
        assert not unclassified, f"{model.__name__}: fields neither honoured nor refused: {unclassified}"
        stale = (honoured | set(refused)) - set(model.model_fields)
        assert not stale, f"{model.__name__}: classified but not a field: {stale}"
        assert model.model_config.get("extra") == "forbid", f"{model.__name__} must refuse unknown fields"
    assert openai_api.METADATA <= openai_api.CHAT_HONOURED


def test_every_field_of_every_grpc_request_message_is_classified():
    assert set(grpc_api.HONOURED) == set(GRPC_MESSAGES)
    for name, message in GRPC_MESSAGES.items():
        assert {f.name for f in message.DESCRIPTOR.fields} == grpc_api.HONOURED[name], name
    reachable = {
        f.message_type.name
        for m in GRPC_MESSAGES.values()
        for f in m.DESCRIPTOR.fields
        if f.message_type and not f.message_type.GetOptions().map_entry  # a map's entries are its own
    }
    assert reachable <= set(GRPC_MESSAGES)


# -- refused: a 400 naming the field -------------------------------------------------------------------

_EXAMPLES = {
    "response_format": {"type": "json_object"},
    "logit_bias": {"5": 100},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "required",
    "best_of": 3,
    "suffix": "end",
    "echo": True,
    "min_tokens": 4,
    "n": 2,
}
_BASES = {
    "/v1/completions": ({"model": SERVED_MODEL, "prompt": "refuse me", "max_tokens": 2}, openai_api.COMPLETION_REFUSED),
    "/v1/chat/completions": (
        {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "refuse me"}], "max_tokens": 2},
        openai_api.CHAT_REFUSED,
    ),
    "/v1/responses": (
        {"model": SERVED_MODEL, "input": "refuse me", "max_output_tokens": 2},
        openai_api.RESPONSES_REFUSED,
    ),
}
_REFUSALS = [(path, name) for path, (_, refused) in _BASES.items() for name in refused]


@pytest.mark.parametrize(("path", "field"), _REFUSALS, ids=[f"{p.split('/')[-1]}-{n}" for p, n in _REFUSALS])
def test_refused_fields_are_a_400_naming_them(router, path, field):
    base, refused = _BASES[path]
    value = _EXAMPLES.get(field, "non-default")
    assert refused[field].refuses(value)
    error = assert_error(post(router, path, {**base, field: value}), 400, "invalid_request_error", field)
    assert f"{field} is not supported" in error["message"]


def test_nested_refusals_unknown_fields_and_neutral_values(router):
    chat = "/v1/chat/completions"
    user = {"role": "user", "content": "hi"}
    # A name the model's chat template would not render (the shared checkpoint's built-in one renders none).
    error = assert_error(post(router, chat, {"messages": [{**user, "name": "bob"}]}), 400, param="messages.0.name")
    assert "does not render names" in error["message"]
    passages = {"messages": [user], "documents": [{"title": "a", "text": "b"}]}
    error = assert_error(post(router, chat, passages), 400, param="documents")
    assert "does not render documents" in error["message"]
    body = {"messages": [user], "stream": True, "stream_options": {"continuous_usage_stats": True, "other": 1}}
    assert_error(post(router, chat, body), 400, param="stream_options.other")
    assert_error(
        post(router, chat, {"messages": [user], "stream_options": {"include_usage": True}}), 400, param="stream_options"
    )
    for path, (base, _) in _BASES.items():
        error = assert_error(post(router, path, {**base, "frobnicate": 1}), 400, param="frobnicate")
        assert "Unrecognized request argument supplied: frobnicate" == error["message"]
    # Values that ask for nothing are what clients send by default: accepted.
    neutral = {
        "logit_bias": {},
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "store": False,
        "echo": False,
        "parallel_tool_calls": None,
        "spaces_between_special_tokens": True,
    }
    ok = post(router, chat, {**_BASES[chat][0], **neutral, "messages": [{**user, "tool_calls": None, "refusal": None}]})
    assert ok.status_code == 200, ok.text
    ok = post(router, "/v1/completions", {**_BASES["/v1/completions"][0], "best_of": 1, "suffix": None, "echo": False})
    assert ok.status_code == 200, ok.text


# -- range and wire type: a 400, never a 500 -------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", 1 << 31),
        ("top_k", 1 << 70),
        ("seed", 1 << 63),
        ("seed", -(1 << 63) - 1),
        ("seed", 1 << 80),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [1 << 32]),
        ("stop_token_ids", [VOCAB]),  # in uint32, not in the vocabulary
        ("max_tokens", 1 << 40),
        ("temperature", 1e400),
        ("stop", ["lone \ud800"]),
        ("logprobs", 1 << 64),
        ("allowed_token_ids", [1 << 32]),
        ("allowed_token_ids", [VOCAB]),
    ],
)
def test_values_the_wire_cannot_carry_are_a_400(router, field, value):
    body = {"model": SERVED_MODEL, "prompt": "wire check", "max_tokens": 4, field: value}
    assert_error(post(router, "/v1/completions", body), 400, param=field)


def test_token_prompts_outside_the_vocabulary_are_a_400_echoed_or_not(router):
    """Found by the fuzzer: with echo, a token prompt was decoded before it was checked, and -11 was a 500."""
    for prompt in ([-11, 5], [[5, VOCAB]], [[3, 4], [-1]]):
        for echo in (False, True):
            body = {"model": SERVED_MODEL, "prompt": prompt, "echo": echo, "max_tokens": 1}
            assert_error(post(router, "/v1/completions", body), 400, param="prompt")


def test_lone_surrogates_are_a_400_naming_where(router):
    chat, user = "/v1/chat/completions", {"role": "user", "content": "hi"}
    cases = [
        ("/v1/completions", {"prompt": "bad \udc00"}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", "bad \ud800"]}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "model": "m\ud800"}, "model"),
        ("/v1/completions", {"prompt": "hi", "stop": "\udfff"}, "stop"),
        ("/v1/completions", {"prompt": "hi", "user": "\ud800"}, "user"),
        (chat, {"messages": [{"role": "user", "content": "bad \ud800"}]}, "messages.0.content"),
        (chat, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}, "messages.0.content"),
        (chat, {"messages": [user], "stop": ["\ud800"]}, "stop"),
    ]
    for path, body, param in cases:
        assert_error(post(router, path, body), 400, param=param)
    assert_error(post(router, chat, {"messages": [user], "\ud800": 1}), 400)  # a field name no one can print
    api_tests.test_models_lists_the_served_model(router)


# -- honoured: each has a behavioural test ------------------------------------------------------------------


def _greedy_completion(client, prompt, max_tokens, **fields):
    extra = {"ignore_eos": True, "return_tokens_as_token_ids": True, **fields.pop("extra_body", {})}
    out = client.completions.create(
        model=SERVED_MODEL, prompt=[prompt], max_tokens=max_tokens, logprobs=0, extra_body=extra, **fields
    )
    return token_ids(out.choices[0].logprobs.tokens), out.choices[0].finish_reason


def test_filters_that_keep_one_token_are_greedy_and_temperature_samples(router, checkpoint, rng):
    client = router.openai()
    prompt = random_prompt(rng, 24)
    greedy = greedy_ignoring_eos(checkpoint.model, prompt, 16)
    assert _greedy_completion(client, prompt, 16, temperature=0)[0] == greedy
    sampled = _greedy_completion(client, prompt, 16, temperature=1.5, seed=3)[0]
    assert sampled != greedy, "temperature 1.5 should sample, not take the argmax"
    for one_token in ({"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        extra = {k: v for k, v in one_token.items() if k != "top_p"}
        fields = {"top_p": one_token["top_p"]} if "top_p" in one_token else {}
        ids = _greedy_completion(client, prompt, 16, temperature=1.5, seed=3, extra_body=extra, **fields)[0]
        assert ids == greedy, f"{one_token} keeps only the most likely token"


def _penalised_greedy(model, prompt: list[int], steps: int, presence=0.0, frequency=0.0, repetition=1.0) -> list[int]:
    """The oracle: transformers' logits, OpenAI/vLLM penalties, argmax."""
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([prompt + tokens])).logits[0, -1].float()
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[prompt + tokens] = True
            logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
            counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=logits.numel()).float()
            logits = logits - frequency * counts - presence * (counts > 0).float()
            tokens.append(int(logits.argmax()))
    return tokens


def test_penalties_match_a_penalised_greedy_oracle(router, checkpoint, rng):
    client = router.openai()
    prompt = random_prompt(rng, 20)
    plain = greedy_ignoring_eos(checkpoint.model, prompt, 20)
    for field, value, oracle in [
        ("presence_penalty", 1.5, dict(presence=1.5)),
        ("frequency_penalty", 1.0, dict(frequency=1.0)),
        ("repetition_penalty", 1.8, dict(repetition=1.8)),
    ]:
        fields = {field: value} if field != "repetition_penalty" else {"extra_body": {field: value}}
        ids = _greedy_completion(client, prompt, 20, temperature=0, **fields)[0]
        expected = _penalised_greedy(checkpoint.model, prompt, 20, **oracle)
        assert ids == expected, field
        assert expected != plain, f"the prompt should be one where {field} changes the output"


def test_stop_token_ids_and_ignore_eos(router, checkpoint, rng):
    client = router.openai()
    prompt = random_prompt(rng, 24)
    greedy = greedy_ignoring_eos(checkpoint.model, prompt, 16)
    stopper = greedy[5]
    ids, finish = _greedy_completion(client, prompt, 16, temperature=0, extra_body={"stop_token_ids": [stopper]})
    assert (ids, finish) == (greedy[: greedy.index(stopper) + 1], "stop")

    search = random.Random(5)
    for _ in range(120):  # a prompt whose greedy continuation emits EOS early (about one in six do)
        prompt = [search.randrange(3, VOCAB) for _ in range(12)]
        greedy = greedy_ignoring_eos(checkpoint.model, prompt, 16)
        if EOS in greedy[:-1]:
            break
    else:
        pytest.fail("no prompt found whose greedy continuation emits EOS")
    stops = client.completions.create(
        model=SERVED_MODEL,
        prompt=[prompt],
        max_tokens=16,
        temperature=0,
        logprobs=0,
        extra_body={"return_tokens_as_token_ids": True},
    ).choices[0]
    assert (token_ids(stops.logprobs.tokens), stops.finish_reason) == (greedy[: greedy.index(EOS) + 1], "stop")
    assert _greedy_completion(client, prompt, 16, temperature=0) == (greedy, "length")


def test_max_tokens_and_max_completion_tokens(router, rng):
    client = router.openai()
    out = client.completions.create(
        model=SERVED_MODEL,
        prompt=[random_prompt(rng, 10)],
        max_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert (out.usage.completion_tokens, out.choices[0].finish_reason) == (7, "length")
    messages = [{"role": "user", "content": f"lengths {rng.random()}"}]
    for fields, expected in [
        ({"max_tokens": 4}, 4),
        ({"max_completion_tokens": 5}, 5),
        ({"max_tokens": 3, "max_completion_tokens": 3}, 3),  # the same limit twice
    ]:
        chat = client.chat.completions.create(
            model=SERVED_MODEL, messages=messages, temperature=0, extra_body={"ignore_eos": True}, **fields
        )
        assert chat.usage.completion_tokens == expected, fields
    with pytest.raises(openai.BadRequestError) as refused:  # two limits: which one the client meant is unknown
        client.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=9, max_completion_tokens=3)
    assert refused.value.body["param"] == "max_tokens" and "disagree" in refused.value.body["message"]


def test_metadata_fields_change_nothing(router, rng):
    client = router.openai()
    prompt = random_prompt(rng, 30)
    plain = _greedy_completion(client, prompt, 8, temperature=0)
    assert _greedy_completion(client, prompt, 8, temperature=0, user="user-17") == plain
    messages = [{"role": "user", "content": f"metadata {rng.random()}"}]
    args = dict(model=SERVED_MODEL, messages=messages, max_tokens=6, temperature=0)
    base = client.chat.completions.create(**args).choices[0].message.content
    tagged = client.chat.completions.create(
        **args, user="u", extra_body={"safety_identifier": "s-1", "prompt_cache_key": "k-1"}
    )
    assert tagged.choices[0].message.content == base


def test_tools_for_a_template_that_cannot_render_them_are_a_400(router):
    """The shared checkpoint's built-in template has no tools: asking it to call one is refused, by name."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    error = assert_error(post(router, "/v1/chat/completions", body), 400, "invalid_request_error", "tools")
    assert "does not render tools" in error["message"]


def test_text_content_parts_read_as_their_concatenation(router):
    client = router.openai()
    args = dict(model=SERVED_MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(messages=[{"role": "user", "content": "hello world"}], **args)
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]
    split = client.chat.completions.create(messages=[{"role": "user", "content": parts}], **args)
    assert split.choices[0].message.content == whole.choices[0].message.content
    assert split.usage.prompt_tokens == whole.usage.prompt_tokens


def test_grpc_sampling_params_mean_what_http_means(router, rng):
    """Every proto SamplingParams field set to a non-default value: the tokens equal HTTP's for the same values."""
    prompt = random_prompt(rng, 30)
    values = dict(
        max_tokens=12,
        temperature=1.3,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=11,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=1.25,
        stop=["never-appears"],
        stop_token_ids=[VOCAB - 1],
        ignore_eos=True,
        logprobs=2,
        logit_bias={7: 3.5},
        min_tokens=2,
        prompt_logprobs=2,
        grammar=common_pb2.Grammar(kind="regex", text="[a-z ]{1,60}"),
        max_tokens_defaulted=True,  # 12 fits: nothing to lower
        skip_special_tokens=False,
        include_stop_str_in_output=True,
        allowed_token_ids=[3 + ord(c) for c in "splitserve "],  # within the grammar's letters: both apply
        bad_words=["pl", "v"],
    )
    params = common_pb2.SamplingParams(**values)
    thinking = {"thinking", "thinking_token_budget"}  # a reasoning model's: tests/router/test_reasoning.py sets them
    assert {f.name for f, _ in params.ListFields()} == set(SAMPLING_FIELDS) - thinking, "set every field"
    with grpc.insecure_channel(router.grpc) as channel:
        chunks = list(
            generate_pb2_grpc.GenerateStub(channel).Generate(
                generate_pb2.CompletionRequest(token_ids=generate_pb2.TokenIds(ids=prompt), params=params), timeout=60
            )
        )
    grpc_ids = [t for c in chunks for t in c.token_ids]
    assert all(len(lp.top) == 2 for c in chunks for lp in c.logprobs)
    grpc_prompt_logprobs = [lp.logprob for lp in chunks[0].prompt_logprobs]
    assert [lp.token_id for lp in chunks[0].prompt_logprobs] == prompt[1:]
    assert all(1 <= lp.rank <= VOCAB for lp in chunks[0].prompt_logprobs)
    grpc_text = "".join(c.text for c in chunks)
    assert "pl" not in grpc_text and "v" not in grpc_text, grpc_text
    http_fields = {k: values[k] for k in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")}
    extra = {k: values[k] for k in ("top_k", "min_p", "repetition_penalty", "stop_token_ids", "min_tokens")}
    extra |= {k: values[k] for k in ("skip_special_tokens", "include_stop_str_in_output", "allowed_token_ids")}
    extra["bad_words"] = values["bad_words"]
    out = router.openai().completions.create(
        model=SERVED_MODEL,
        prompt=[prompt],
        max_tokens=12,
        logprobs=2,
        echo=True,  # with logprobs: prompt_logprobs=2
        stop=values["stop"],
        extra_body={
            **extra,
            "logit_bias": {"7": 3.5},
            "guided_regex": values["grammar"].text,
            "ignore_eos": True,
            "return_tokens_as_token_ids": True,
        },
        **http_fields,
    )
    echoed = out.choices[0].logprobs
    assert token_ids(echoed.tokens) == prompt + grpc_ids
    assert set(grpc_ids) <= set(values["allowed_token_ids"])
    assert echoed.token_logprobs[1 : len(prompt)] == pytest.approx(grpc_prompt_logprobs, abs=1e-5)
    unset = common_pb2.SamplingParams(temperature=0, ignore_eos=True)  # max_tokens 0: the API's default
    with grpc.insecure_channel(router.grpc) as channel:
        request = generate_pb2.CompletionRequest(token_ids=generate_pb2.TokenIds(ids=prompt), params=unset)
        chunks = list(generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=60))
    assert chunks[-1].usage.completion_tokens == DEFAULT_MAX_TOKENS


# field -> the test that shows its effect. Every honoured field needs one: a new field without one fails here.
_SAMPLING_BEHAVIOUR = {
    "temperature": test_filters_that_keep_one_token_are_greedy_and_temperature_samples,
    "top_p": test_filters_that_keep_one_token_are_greedy_and_temperature_samples,
    "top_k": test_filters_that_keep_one_token_are_greedy_and_temperature_samples,
    "min_p": test_filters_that_keep_one_token_are_greedy_and_temperature_samples,
    "seed": api_tests.test_n_choices_have_distinct_indices_and_reproduce_with_a_seed,
    "stop": api_tests.test_stop_strings_end_the_output_without_the_stop,
    "stop_token_ids": test_stop_token_ids_and_ignore_eos,
    "ignore_eos": test_stop_token_ids_and_ignore_eos,
    "presence_penalty": test_penalties_match_a_penalised_greedy_oracle,
    "frequency_penalty": test_penalties_match_a_penalised_greedy_oracle,
    "repetition_penalty": test_penalties_match_a_penalised_greedy_oracle,
    "max_tokens": test_max_tokens_and_max_completion_tokens,
    "logprobs": api_tests.test_logprobs_shapes,
    "logit_bias": contract_tests.test_logit_bias_and_min_tokens_on_both_paths,
    "min_tokens": contract_tests.test_logit_bias_and_min_tokens_on_both_paths,
    "allowed_token_ids": contract_tests.test_allowed_token_ids_on_both_paths,
    "skip_special_tokens": contract_tests.test_special_tokens_and_stop_strings_kept_on_request_on_both_paths,
    "include_stop_str_in_output": contract_tests.test_special_tokens_and_stop_strings_kept_on_request_on_both_paths,
    "response_format": structured_tests.test_json_schema_output_validates_against_the_schema,
    "guided_json": structured_tests.test_vllm_guided_fields_constrain_completions_and_streams,
    "guided_regex": structured_tests.test_vllm_guided_fields_constrain_completions_and_streams,
    "guided_choice": structured_tests.test_vllm_guided_fields_constrain_completions_and_streams,
    "guided_grammar": structured_tests.test_vllm_guided_fields_constrain_completions_and_streams,
    "structured_outputs": structured_tests.test_vllm_guided_fields_constrain_completions_and_streams,
}
BEHAVIOUR = {
    "http": {
        **_SAMPLING_BEHAVIOUR,
        "model": error_tests.test_unknown_model,
        "request_id": request_id_tests.test_vllms_request_id_field_names_the_request_as_the_header_does,
        "prompt": api_tests.test_greedy_fp32_equals_transformers,
        "messages": api_tests.test_stream_and_non_stream_agree,
        "role": api_tests.test_stream_and_non_stream_agree,
        "content": test_text_content_parts_read_as_their_concatenation,
        "n": api_tests.test_n_choices_have_distinct_indices_and_reproduce_with_a_seed,
        "stream": api_tests.test_stream_and_non_stream_agree,
        "stream_options": api_tests.test_usage_counts_and_cached_tokens,
        "include_usage": api_tests.test_usage_counts_and_cached_tokens,
        "return_tokens_as_token_ids": api_tests.test_greedy_fp32_equals_transformers,
        "max_completion_tokens": test_max_tokens_and_max_completion_tokens,
        "top_logprobs": api_tests.test_logprobs_shapes,
        "user": test_metadata_fields_change_nothing,
        "safety_identifier": test_metadata_fields_change_nothing,
        "prompt_cache_key": test_metadata_fields_change_nothing,
        "echo": contract_tests.test_echo_scores_the_prompt_like_transformers,
        "best_of": contract_tests.test_best_of_returns_the_most_likely_candidates,
        "continuous_usage_stats": contract_tests.test_lists_of_prompts_stream_with_indices_and_count_usage_once,
        "add_generation_prompt": rendering_tests.test_chat_template_fields_give_the_prompt_transformers_renders,
        "continue_final_message": rendering_tests.test_chat_template_fields_give_the_prompt_transformers_renders,
        "chat_template_kwargs": rendering_tests.test_chat_template_fields_give_the_prompt_transformers_renders,
        "add_special_tokens": rendering_tests.test_add_special_tokens_adds_or_leaves_out_the_tokenizers_bos,
        "truncate_prompt_tokens": rendering_tests.test_truncate_prompt_tokens_keeps_the_prompts_tail,
        "prompt_logprobs": contract_tests.test_prompt_logprobs_are_transformers_scores_and_ranks,
        "bad_words": contract_tests.test_bad_words_on_both_paths,
        "priority": priority_tests.test_a_freed_slot_goes_to_the_lowest_priority_then_the_earliest,
        "include": responses_tests.test_included_logprobs_are_the_chat_completions_whole_and_streamed,
        "tokens": contract_tests.test_model_tokenize_detokenize_and_version_endpoints,
        "input": responses_tests.test_a_response_is_the_chat_completion_of_its_instructions_and_input,
        "instructions": responses_tests.test_a_response_is_the_chat_completion_of_its_instructions_and_input,
        "max_output_tokens": responses_tests.test_a_response_is_the_chat_completion_of_its_instructions_and_input,
        "text": structured_tests.test_a_responses_text_format_constrains_the_output_to_its_schema,
        "metadata": responses_tests.test_metadata_comes_back_and_is_bounded,
        "store": stored_tests.test_deleted_and_unstored_responses_are_gone_with_a_404_naming_them,
        "previous_response_id": stored_tests.test_a_chain_of_responses_is_the_chat_of_every_turn_before_it,
        "background": stored_tests.test_a_background_response_is_polled_to_the_answer_it_would_have_given,
        "truncation": stored_tests.test_truncation_auto_drops_the_earliest_turns_that_do_not_fit,
        "reasoning_content": reasoning_tests.test_a_reasoning_item_sent_back_is_the_assistant_turns_reasoning_content,
        "thinking_token_budget": reasoning_tests.test_a_thinking_token_budget_closes_the_thinking_there,
        "thinking": reasoning_tests.test_anthropic_thinking_asks_the_template_and_bounds_the_thinking,
        "reasoning_effort": rendering_tests.test_a_reasoning_effort_reaches_a_template_that_reads_one,
        "reasoning": rendering_tests.test_a_reasoning_effort_reaches_a_template_that_reads_one,
        "tools": structured_tests.test_tools_reach_the_template_and_auto_or_none_leave_text,
        "tool_choice": structured_tests.test_named_tool_choice_returns_a_call_whose_arguments_validate,
        "parallel_tool_calls": structured_tests.test_tools_reach_the_template_and_auto_or_none_leave_text,
        "tool_calls": tool_message_tests.test_a_second_turn_with_tool_results_is_the_prompt_transformers_renders,
        "tool_call_id": tool_message_tests.test_tool_turns_that_do_not_add_up_are_a_400_naming_them,
        "name": rendering_tests.test_chat_template_fields_give_the_prompt_transformers_renders,
        "documents": rendering_tests.test_chat_template_fields_give_the_prompt_transformers_renders,
        "system": anthropic_tests.test_a_message_is_the_chat_completion_of_its_system_and_messages,
        "stop_sequences": anthropic_tests.test_stop_sequences_and_an_assistant_turn,
        "cache_control": anthropic_tests.test_a_message_is_the_chat_completion_of_its_system_and_messages,
        "output_config": anthropic_tests.test_output_config_format_constrains_the_text_to_a_json_schema,
    },
    "grpc": {
        **{name: test_grpc_sampling_params_mean_what_http_means for name in SAMPLING_FIELDS},
        "max_tokens_defaulted": defaulted_tests.test_completions_and_grpc_default_limits_are_lowered_too,
        "model": grpc_tests.test_grpc_errors_are_status_codes,
        "text": grpc_tests.test_grpc_streams_the_same_tokens_as_http,
        "token_ids": grpc_tests.test_grpc_streams_the_same_tokens_as_http,
        "ids": grpc_tests.test_grpc_streams_the_same_tokens_as_http,
        "chat": grpc_tests.test_grpc_streams_the_same_tokens_as_http,
        "messages": grpc_tests.test_grpc_streams_the_same_tokens_as_http,
        "role": grpc_tests.test_grpc_streams_the_same_tokens_as_http,
        "content": grpc_tests.test_grpc_streams_the_same_tokens_as_http,
        "params": test_grpc_sampling_params_mean_what_http_means,
        "request_id": grpc_tests.test_grpc_streams_the_same_tokens_as_http,
        "priority": priority_tests.test_priorities_out_of_grpcs_range_are_refused,
        "kind": structured_tests.test_grpc_grammar_continues_after_accepted_prompt_tokens,
        "accepted_prompt_tokens": structured_tests.test_grpc_grammar_continues_after_accepted_prompt_tokens,
        "thinking": reasoning_tests.test_a_thinking_token_budget_closes_the_thinking_there,
        "thinking_token_budget": reasoning_tests.test_a_thinking_token_budget_closes_the_thinking_there,
    },
}


def test_every_honoured_field_has_a_behavioural_test():
    http = set().union(*(honoured for honoured, _ in TABLES.values()))
    assert set(BEHAVIOUR["http"]) == http, f"missing: {http - set(BEHAVIOUR['http'])}"
    grpc_fields = set().union(*grpc_api.HONOURED.values())
    assert set(BEHAVIOUR["grpc"]) == grpc_fields, f"missing: {grpc_fields - set(BEHAVIOUR['grpc'])}"
    for test in [*BEHAVIOUR["http"].values(), *BEHAVIOUR["grpc"].values()]:
        assert isinstance(test, types.FunctionType) and test.__name__.startswith("test_")
