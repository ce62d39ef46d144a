"""Resuming a request's output on another engine (what a migration does): the client's whole text, the
tokens, stop strings across the boundary, penalties and seeded sampling are those of the run that never
moved — also when the boundary falls inside a multi-byte character the first engine was holding back."""

from __future__ import annotations

import codecs
import dataclasses
import random

import pytest

from contract.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidRequestError
from engine.tokenizer import ByteTokenizer

MAX_TOKENS = 120
VARIANTS = {
    "greedy": SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
    "penalties": SamplingParams(
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        presence_penalty=0.7,
        frequency_penalty=0.4,
        repetition_penalty=1.3,
        min_tokens=MAX_TOKENS // 2,
    ),
    "seeded": SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True),
}


@pytest.fixture(scope="module")
def engines():
    """Two engines on the same weights: the one a request starts on, and the one it moves to."""
    config = EngineConfig(model="demo", dtype="float32", num_kv_blocks=128)
    return Engine(config), Engine(config)


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1, *(rng.randrange(3, 259) for _ in range(rng.randint(20, 60)))]


def _reference(engine: Engine, prompt: list[int], params: SamplingParams):
    (result,) = engine.generate([prompt], params)
    return result


def _first_outputs(engine: Engine, request_id: str, prompt, params, count: int) -> tuple[list[int], str]:
    """Runs a request until ``count`` tokens came out, then aborts it: (tokens, text) its client had."""
    engine.add_request(request_id, prompt, params)
    tokens, text = [], ""
    while len(tokens) < count:
        for output in engine.step():
            tokens.extend(output.token_ids)
            text += output.text
    assert len(tokens) == count and engine.abort(request_id)
    engine.step()
    return tokens, text


def _resumed(engine: Engine, request_id: str, prompt, params, resumed: list[int]):
    """Continues the request on ``engine`` after ``resumed``: (new tokens, text, last output)."""
    engine.add_request(request_id, prompt, params, resumed)
    return _drain(engine, request_id)


def _drain(engine: Engine, request_id: str):
    tokens, text, last = [], "", None
    while engine.has_unfinished():
        for output in engine.step():
            if output.request_id == request_id:
                tokens.extend(output.token_ids)
                text += output.text
                last = output
    return tokens, text, last


def _holding_back(tokens: list[int]) -> list[int]:
    """Positions k where the text of tokens[:k] ends inside an unfinished UTF-8 character."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tokenizer = ByteTokenizer(512)
    held = []
    for k, token_id in enumerate(tokens, 1):
        decoder.decode(tokenizer.token_bytes(token_id))
        if decoder.getstate()[0]:
            held.append(k)
    return held


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_resumed_output_is_the_unmoved_output(engines, variant):
    source, target = engines
    params = VARIANTS[variant]
    checked = 0
    for seed in range(40):
        prompt = _prompt(seed)
        reference = _reference(target, prompt, params)
        inside_a_character = [k for k in _holding_back(list(reference.token_ids)) if k < len(reference.token_ids)]
        if not inside_a_character:
            continue
        k = inside_a_character[len(inside_a_character) // 2]
        before, text_before = _first_outputs(source, f"a-{variant}-{seed}", prompt, params, k)
        assert before == list(reference.token_ids[:k])
        after, text_after, last = _resumed(target, f"b-{variant}-{seed}", prompt, params, before)
        assert before + after == list(reference.token_ids)
        assert text_before + text_after == reference.text, "text lost or doubled at the migration point"
        assert last.finish_reason == reference.finish_reason and last.num_output_tokens == len(reference.token_ids)
        checked += 1
        if checked == 3:
            return
    pytest.fail(f"only {checked} outputs had a point inside a multi-byte character")


@pytest.mark.parametrize("include_stop", [False, True], ids=["cut", "include_stop_str_in_output"])
def test_stop_string_across_the_migration_point(engines, include_stop):
    source, target = engines
    free = VARIANTS["greedy"]
    for seed in range(40):
        prompt = _prompt(seed)
        reference = _reference(target, prompt, free)
        emitted = {k: len(_text_of(reference.token_ids[:k])) for k in range(1, len(reference.token_ids))}
        for k in _holding_back(list(reference.token_ids)):
            cut = emitted.get(k)
            if cut is None or cut < 3:
                continue
            stop = reference.text[cut - 2 : cut + 2]  # two characters the client had, two it had not
            if len(stop) < 4 or reference.text.find(stop) != cut - 2:
                continue
            params = dataclasses.replace(free, stop=(stop,), include_stop_str_in_output=include_stop)
            stopped = _reference(target, prompt, params)
            assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
            assert stopped.text == reference.text[: cut + 2 if include_stop else cut - 2]
            before, text_before = _first_outputs(source, f"s-a-{seed}-{include_stop}", prompt, params, k)
            after, text_after, last = _resumed(target, f"s-b-{seed}-{include_stop}", prompt, params, before)
            assert before + after == list(stopped.token_ids)
            assert text_before + text_after == stopped.text
            assert (last.finish_reason, last.stop_reason) == ("stop", stop)
            return
    pytest.fail("no output had a usable stop string across a point inside a character")


def test_resumed_reservation_decodes_like_the_unmoved_run(engines):
    """KV-preserving migration in miniature: a prefill engine computes the KV of prompt + resumed tokens
    (layer by layer into the reservation) and samples the next token; the decode engine continues."""
    source, decode = engines
    params = VARIANTS["penalties"]
    prompt = _prompt(3)
    reference = _reference(decode, prompt, params)
    k = 37
    before, text_before = _first_outputs(source, "r-a", prompt, params, k)

    def copy_layer(plan, layer, ready):
        ready.synchronize()
        for chunk in plan.chunks:
            blocks = prefill.requests[chunk.request_id].block_ids
            decode.kv_cache.data[layer, list(held.block_ids)] = prefill.kv_cache.data[
                layer, blocks[: len(held.block_ids)]
            ]

    prefill = Engine(EngineConfig(model="demo", dtype="float32", num_kv_blocks=128), on_layer_done=copy_layer)
    held = decode.reserve("r-b", prompt, params, before)
    assert len(held.block_ids) == -(-(len(prompt) + k) // decode.config.block_size)
    # As prefill_worker does: one token after the resumed ones, min_tokens capped alike.
    first_only = dataclasses.replace(params, max_tokens=k + 1, min_tokens=min(params.min_tokens, k + 1))
    prefill.add_request("r-b", prompt, first_only, before)
    (first,) = [t for o in _drain(prefill, "r-b")[:1] for t in o]
    decode.complete_reservation("r-b", first)
    after, text_after, last = _drain(decode, "r-b")
    assert before + after == list(reference.token_ids)
    assert text_before + text_after == reference.text
    assert last.finish_reason == "length"


def test_resumed_output_that_already_finished_is_refused(engines):
    _, target = engines
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with pytest.raises(InvalidRequestError, match="already finish"):
        target.add_request("done", _prompt(1), params, [70, 71, 72, 73])
    with pytest.raises(InvalidRequestError, match="resume_token_ids"):
        target.add_request("bad", _prompt(1), params, [10**6])
    with pytest.raises(InvalidRequestError, match="allowed_token_ids"):
        target.add_request("outside", _prompt(1), dataclasses.replace(params, allowed_token_ids=(70, 71)), [70, 72])
    assert "done" not in target.requests and not target.has_unfinished()


def _text_of(token_ids) -> str:
    """The text an incremental detokenizer has emitted after these tokens (unfinished characters held back)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tokenizer = ByteTokenizer(512)
    return "".join(decoder.decode(tokenizer.token_bytes(t)) for t in token_ids)


def test_a_resumed_requests_cached_tokens_count_its_prompt_alone(engines):
    """A request resumed where its prompt and earlier output are cached hits blocks past its prompt: those are what
    the KV transfer skips (the reservation's count), but usage's cached tokens are the prompt's, never more than the
    prompt (they reached Anthropic's usage as input_tokens = prompt - cached, negative after a migration)."""
    engine, _ = engines
    params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
    prompt = _prompt(5)[:20]
    before = _reference(engine, prompt, params).token_ids[:60]  # prompt and output now in the prefix cache
    reservation = engine.reserve("r", prompt, params, before)
    assert reservation.num_cached_tokens > len(prompt)  # the transfer skips cached output blocks too
    engine.abort("r")
    engine.step()
    _, _, last = _resumed(engine, "moved", prompt, params, before)
    assert last.num_cached_tokens == last.num_prompt_tokens == len(prompt)  # all of it cached, and no more
