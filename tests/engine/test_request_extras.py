"""logit_bias, min_tokens, prompt logprobs, stop reasons, allowed_token_ids, include_stop_str_in_output and
skip_special_tokens: in the sampler, and through the engine against transformers (fp32, the same weights)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest
import torch

from contract.grammar import Grammar
from contract.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidRequestError
from engine.sampler import Sampler, SamplingState
from engine.tokenizer import ByteTokenizer
from tests.checkpoints import write_checkpoint

VOCAB = 320
EOS = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-extras")
    model = write_checkpoint(directory, "LlamaForCausalLM", seed=7)
    return str(directory), model


def _engine(model_dir: str, **overrides) -> Engine:
    return Engine(EngineConfig(model=model_dir, dtype="float32", **{"num_kv_blocks": 256, **overrides}))


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(length)]


# -- the sampler ------------------------------------------------------------------------------------


def test_logit_bias_moves_greedy_and_sampled_choices_but_not_logprobs():
    logits = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    loser = int(logits[0].argmin())
    sampler = Sampler(32)
    greedy = SamplingState(SamplingParams(temperature=0, logprobs=1, logit_bias={loser: 100}), [])
    sampled = SamplingState(SamplingParams(temperature=1.0, seed=3, logit_bias={loser: 100}), [])
    result = sampler.sample(logits, [greedy, sampled])
    assert result.token_ids == [loser, loser]
    assert result.logprobs[0].logprob == pytest.approx(float(logits[0].log_softmax(-1)[loser]))  # raw, as vLLM
    winner = int(logits[0].argmax())
    banned = SamplingState(SamplingParams(temperature=0, logit_bias={winner: -100}), [])
    assert sampler.sample(logits[:1], [banned]).token_ids[0] != winner
    assert sampler.sample(logits[:1], [SamplingState(SamplingParams(temperature=0), [])]).token_ids[0] == winner


def test_min_tokens_suppresses_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, 32)
    logits[0, 5] = 10.0  # EOS would win
    logits[0, 6] = 9.0  # a stop token id next
    state = SamplingState(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(6,)), [], eos_token_ids=(5,))
    sampler = Sampler(32)
    chosen = []
    for _ in range(3):
        token = sampler.sample(logits, [state]).token_ids[0]
        state.record(token)
        chosen.append(token)
    assert chosen[:2] != [5, 5] and 5 not in chosen[:2] and 6 not in chosen[:2]
    assert chosen[2] == 5, "after min_tokens EOS is allowed again"
    ignoring = SamplingState(SamplingParams(temperature=0, min_tokens=1, ignore_eos=True), [], eos_token_ids=(5,))
    assert sampler.sample(logits, [ignoring]).token_ids == [5], "with ignore_eos, EOS is no stop to suppress"


# -- the engine ---------------------------------------------------------------------------------------


def _oracle_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    return logprobs[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)


@pytest.mark.parametrize("overrides", [{}, {"max_num_batched_tokens": 7}], ids=["one-chunk", "chunked"])
def test_prompt_logprobs_equal_transformers_even_with_a_cached_prefix(checkpoint, overrides):
    model_dir, model = checkpoint
    engine = _engine(model_dir, **overrides)
    prompt = _prompt(1, 45)
    engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0))  # caches the prompt's blocks
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
    (result,) = engine.generate([prompt], params)
    assert result.num_cached_tokens == 0, "prompt logprobs are computed, never read from the prefix cache"
    assert [lp.token_id for lp in result.prompt_logprobs] == prompt[1:]
    expected = _oracle_prompt_logprobs(model, prompt)
    assert torch.allclose(torch.tensor([lp.logprob for lp in result.prompt_logprobs]), expected, atol=1e-4)
    with torch.no_grad():
        top = model(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1).topk(3, dim=-1).indices
    assert [[t for t, _ in lp.top] for lp in result.prompt_logprobs] == top.tolist()
    (plain,) = engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0))
    assert plain.prompt_logprobs == () and plain.token_ids == result.token_ids


def test_prompt_logprobs_survive_preemption(checkpoint):
    model_dir, model = checkpoint
    engine = _engine(model_dir, num_kv_blocks=12, max_num_batched_tokens=32)
    prompts = [_prompt(seed, 60) for seed in (2, 3, 4)]
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, prompt_logprobs=0)
    preempted, original = [], engine.scheduler._preempt
    engine.scheduler._preempt = lambda request: (preempted.append(request.request_id), original(request))
    results = engine.generate(prompts, params)
    assert preempted, "the pool was sized so that preemption must happen"
    for prompt, result in zip(prompts, results):
        got = torch.tensor([lp.logprob for lp in result.prompt_logprobs])
        assert torch.allclose(got, _oracle_prompt_logprobs(model, prompt), atol=1e-4)


def test_logit_bias_and_min_tokens_through_the_engine(checkpoint):
    model_dir, _ = checkpoint
    engine = _engine(model_dir)
    prompt = _prompt(9, 20)
    (plain,) = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    (biased,) = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, logit_bias={17: 100}))
    assert biased.token_ids == (17,) * 6 != plain.token_ids
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        engine.generate([prompt], SamplingParams(max_tokens=2, logit_bias={VOCAB: 1.0}))
    # EOS pushed to the top: it ends the request at once, unless min_tokens holds it back.
    (eos,) = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, logit_bias={EOS: 100}))
    assert (eos.token_ids, eos.finish_reason, eos.stop_reason) == ((EOS,), "stop", None)
    held = SamplingParams(max_tokens=6, temperature=0, logit_bias={EOS: 100}, min_tokens=3)
    (late,) = engine.generate([prompt], held)
    assert len(late.token_ids) == 4 and EOS not in late.token_ids[:3] and late.token_ids[3] == EOS


def test_stop_reason_names_the_stop_token_or_string(checkpoint):
    model_dir, _ = checkpoint
    engine = _engine(model_dir)
    prompt = _prompt(12, 20)
    (plain,) = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    stopper = plain.token_ids[4]
    (by_id,) = engine.generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stopper,), ignore_eos=True)
    )
    assert (by_id.finish_reason, by_id.stop_reason) == ("stop", stopper)
    stop = next(c for c in plain.text[3:] if c.isalnum())
    (by_text,) = engine.generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0, stop=("\x00never", stop), ignore_eos=True)
    )
    assert (by_text.finish_reason, by_text.stop_reason) == ("stop", stop)
    (length,) = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert (length.finish_reason, length.stop_reason) == ("length", None)


# -- allowed_token_ids, include_stop_str_in_output, skip_special_tokens -----------------------------------


def test_allowed_token_ids_restrict_greedy_and_sampled_choices_but_not_logprobs():
    logits = torch.randn(2, 32, generator=torch.Generator().manual_seed(1)) * 3
    allowed = (3, 9, 17, 30)
    best = max(allowed, key=lambda t: float(logits[0, t]))
    assert best != int(logits[0].argmax()), "the likeliest token should be outside the allowed set"
    sampler = Sampler(32, seed=5)
    greedy = SamplingState(SamplingParams(temperature=0, logprobs=2, allowed_token_ids=allowed), [])
    result = sampler.sample(logits[:1], [greedy])
    assert result.token_ids == [best]
    raw = logits[0].log_softmax(-1)
    assert result.logprobs[0].logprob == pytest.approx(float(raw[best]))  # raw, as for logit_bias
    assert [t for t, _ in result.logprobs[0].top] == raw.topk(2).indices.tolist()
    # Sampled: an exact draw from the softmax over the allowed ids alone (chi-square, df 3, p = 0.001).
    draws = 20000
    states = [SamplingState(SamplingParams(temperature=1.0, allowed_token_ids=allowed), []) for _ in range(draws)]
    flat = logits[1:] / 3  # flat enough that every allowed token shows up
    counts = Counter(sampler.sample(flat.expand(draws, -1).contiguous(), states).token_ids)
    assert set(counts) == set(allowed)
    expected = flat[0, list(allowed)].softmax(-1).tolist()
    assert sum((counts[t] - p * draws) ** 2 / (p * draws) for t, p in zip(allowed, expected)) < 16.3


def test_allowed_token_ids_with_logit_bias_penalties_and_min_tokens():
    logits = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    outside = int(logits[0].argmin())
    allowed = tuple(t for t in (4, 8, 15, 16, 23) if t != outside)
    worst = min(allowed, key=lambda t: float(logits[0, t]))
    sampler = Sampler(32)

    def greedy(**params) -> int:
        return sampler.sample(logits, [SamplingState(SamplingParams(temperature=0, **params), [])]).token_ids[0]

    # A bias moves the choice inside the allowed set and cannot lift a token outside it.
    assert greedy(allowed_token_ids=allowed, logit_bias={worst: 100, outside: 100}) == worst
    best = greedy(allowed_token_ids=allowed)
    penalised = SamplingState(SamplingParams(temperature=0, allowed_token_ids=allowed, presence_penalty=2.0), [])
    for _ in range(3):
        penalised.record(best)
    assert sampler.sample(logits, [penalised]).token_ids[0] in set(allowed) - {best}
    # EOS allowed and made likeliest: min_tokens still holds it back, then it is taken.
    eos = allowed[0]
    state = SamplingState(
        SamplingParams(temperature=0, allowed_token_ids=allowed, logit_bias={eos: 100}, min_tokens=2),
        [],
        eos_token_ids=(eos,),
    )
    chosen = []
    for _ in range(3):
        chosen.append(sampler.sample(logits, [state]).token_ids[0])
        state.record(chosen[-1])
    assert eos not in chosen[:2] and set(chosen[:2]) <= set(allowed) and chosen[2] == eos


def _masked_greedy(model, prompt: list[int], allowed: tuple[int, ...], steps: int) -> list[int]:
    """The oracle: transformers' fp32 logits at each step, argmax over the allowed ids only."""
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([prompt + tokens])).logits[0, -1].float()
            tokens.append(allowed[int(logits[list(allowed)].argmax())])
    return tokens


def test_allowed_token_ids_greedy_equals_transformers_argmax_over_the_allowed_set(checkpoint):
    """Greedy fp32 with the mask, step by step, in a batch beside unmasked requests, which stay exact."""
    model_dir, model = checkpoint
    engine = _engine(model_dir)
    prompts = [_prompt(seed, 24) for seed in (31, 32)]
    allowed = tuple(random.Random(33).sample(range(3, VOCAB), 12))  # EOS not among them: it runs to max_tokens
    masked = SamplingParams(max_tokens=10, temperature=0, allowed_token_ids=allowed)
    plain = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    results = engine.generate([prompts[0], prompts[1], prompts[1]], [masked, plain, masked])
    alone = engine.generate([prompts[1]], plain)[0]
    assert results[1].token_ids == alone.token_ids, "an unmasked request in a masked batch is unchanged"
    for prompt, result in zip(prompts, (results[0], results[2])):
        expected = _masked_greedy(model, prompt, allowed, 10)
        assert list(result.token_ids) == expected and result.finish_reason == "length"
    assert results[2].token_ids != alone.token_ids, "the mask should change this prompt's greedy output"


def test_allowed_token_ids_are_checked_against_the_vocabulary_eos_and_the_grammar(checkpoint):
    model_dir, _ = checkpoint
    engine = _engine(model_dir)
    prompt = _prompt(14, 20)
    with pytest.raises(InvalidRequestError, match="allowed_token_ids"):
        engine.generate([prompt], SamplingParams(max_tokens=2, allowed_token_ids=(5, VOCAB)))
    # Only EOS and a stop token allowed, and min_tokens forbids both at first: nothing could be sampled.
    with pytest.raises(InvalidRequestError, match="allowed_token_ids"):
        engine.generate(
            [prompt], SamplingParams(max_tokens=4, min_tokens=1, stop_token_ids=(9,), allowed_token_ids=(EOS, 9))
        )
    # With EOS allowed, it ends the request (vLLM's rule); ignored, it is just another token.
    (ended,) = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0, allowed_token_ids=(EOS,)))
    assert (ended.token_ids, ended.finish_reason) == ((EOS,), "stop")
    ignoring = SamplingParams(max_tokens=3, temperature=0, min_tokens=2, ignore_eos=True, allowed_token_ids=(EOS,))
    assert engine.generate([prompt], ignoring)[0].token_ids == (EOS,) * 3
    # A grammar and the mask both apply: lower-case letters, of which only a, b and z.
    letters = tuple(ByteTokenizer.FIRST_BYTE_ID + ord(c) for c in "abz")
    both = SamplingParams(
        max_tokens=8, temperature=0, grammar=Grammar("regex", "[a-z]{8}"), allowed_token_ids=(*letters, 50, 60)
    )
    (result,) = engine.generate([prompt], both)
    assert len(result.text) == 8 and set(result.text) <= set("abz"), result.text
    # A grammar that allows none of them fails the request; no forbidden token comes out.
    digits = SamplingParams(
        max_tokens=4, temperature=0, grammar=Grammar("regex", "[0-9]{4}"), allowed_token_ids=letters
    )
    (failed,) = engine.generate([prompt], digits)
    assert (failed.token_ids, failed.finish_reason) == ((), "abort")
    (failure,) = engine.take_failures().values()
    assert isinstance(failure, InvalidRequestError) and "allowed_token_ids" in str(failure)  # the request's own: a 400


def test_a_grammar_whose_next_token_is_banned_fails_the_request_rather_than_sample_token_0(checkpoint):
    """After "a" the regex allows only "b", a bad word: no token is left to sample, where the argmax of nothing was
    token 0."""
    model_dir, _ = checkpoint
    engine = _engine(model_dir)
    params = SamplingParams(max_tokens=6, temperature=0, grammar=Grammar("regex", "ab"), bad_words=("b",))
    (failed,) = engine.generate([_prompt(15, 20)], params)
    assert failed.finish_reason == "abort" and 0 not in failed.token_ids, failed
    (failure,) = engine.take_failures().values()
    assert isinstance(failure, InvalidRequestError) and "bad_words" in str(failure)  # the request's own: a 400
    (fine,) = engine.generate([_prompt(15, 20)], replace(params, bad_words=()))
    assert (fine.text, fine.finish_reason) == ("ab", "stop")
    # min_tokens past where the grammar is complete cannot hold: refused, where it was ignored. Up to it, it holds.
    (short,) = engine.generate([_prompt(15, 20)], replace(params, bad_words=(), min_tokens=3))
    assert short.finish_reason == "abort", short
    (failure,) = engine.take_failures().values()
    assert isinstance(failure, InvalidRequestError) and "min_tokens (3)" in str(failure)
    (exact,) = engine.generate([_prompt(15, 20)], replace(params, bad_words=(), min_tokens=2))
    assert (exact.text, exact.finish_reason) == ("ab", "stop")


def test_a_peers_first_token_outside_allowed_token_ids_is_refused(checkpoint):
    """The decode side of a disaggregated request checks the prefill worker's first token against the mask."""
    model_dir, _ = checkpoint
    engine = _engine(model_dir)
    engine.reserve("peer", _prompt(17, 20), SamplingParams(max_tokens=4, allowed_token_ids=(40, 41)))
    with pytest.raises(InvalidRequestError, match="allowed_token_ids"):
        engine.complete_reservation("peer", first_token_id=42)
    engine.complete_reservation("peer", first_token_id=41)
    assert engine.abort("peer")


def test_include_stop_str_in_output_ends_the_text_with_what_stopped_it(checkpoint):
    """A stop string of several tokens: the text up to and including it, nothing after; streamed the same."""
    model_dir, _ = checkpoint
    engine = _engine(model_dir)
    prompt = _prompt(15, 20)
    ascii_letters = tuple(ByteTokenizer.FIRST_BYTE_ID + ord(c) for c in "abcdefgh")  # one token per character
    free = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, allowed_token_ids=ascii_letters)
    (plain,) = engine.generate([prompt], free)
    stop = plain.text[12:15]
    where = plain.text.find(stop)
    (cut,) = engine.generate([prompt], replace(free, stop=("\x00never", stop)))
    (kept,) = engine.generate([prompt], replace(free, stop=("\x00never", stop), include_stop_str_in_output=True))
    assert cut.text == plain.text[:where]
    assert kept.text == plain.text[: where + len(stop)] and kept.token_ids == cut.token_ids
    assert (kept.finish_reason, kept.stop_reason) == ("stop", stop)
    streamed = _streamed_texts(engine, prompt, replace(free, stop=(stop,), include_stop_str_in_output=True))
    assert "".join(streamed) == kept.text and len(streamed) > 2
    # A stop token's text too (as vLLM's): a plain byte here.
    stopper = plain.token_ids[5]
    by_id = replace(free, stop_token_ids=(stopper,), include_stop_str_in_output=True)
    (token_kept,) = engine.generate([prompt], by_id)
    (token_cut,) = engine.generate([prompt], replace(by_id, include_stop_str_in_output=False))
    assert token_kept.text == token_cut.text + ByteTokenizer(VOCAB).decode([stopper])
    assert token_kept.stop_reason == token_cut.stop_reason == stopper


def test_skip_special_tokens_false_keeps_eos_and_other_special_tokens_text(checkpoint):
    model_dir, _ = checkpoint
    engine = _engine(model_dir)
    prompt = _prompt(16, 20)
    eos_first = SamplingParams(max_tokens=4, temperature=0, logit_bias={EOS: 100})
    shown = replace(eos_first, skip_special_tokens=False)
    # EOS ends the request; its text is output only with include_stop_str_in_output (vLLM's rule).
    assert engine.generate([prompt], eos_first)[0].text == ""
    assert engine.generate([prompt], shown)[0].text == ""
    assert engine.generate([prompt], replace(shown, include_stop_str_in_output=True))[0].text == "</s>"
    assert engine.generate([prompt], replace(eos_first, include_stop_str_in_output=True))[0].text == ""
    # Special tokens that do not stop the request: skipped by default, kept on request, beside plain text (the
    # frequency penalty makes the three allowed tokens take turns).
    x = ByteTokenizer.FIRST_BYTE_ID + ord("x")
    mixed = SamplingParams(
        max_tokens=6, temperature=0, ignore_eos=True, allowed_token_ids=(1, EOS, x), frequency_penalty=2.0
    )
    (skipped,) = engine.generate([prompt], mixed)
    (kept,) = engine.generate([prompt], replace(mixed, skip_special_tokens=False))
    assert kept.token_ids == skipped.token_ids and {1, x} <= set(kept.token_ids)
    assert kept.text == "".join({1: "<s>", EOS: "</s>", x: "x"}[t] for t in kept.token_ids)
    assert skipped.text == "x" * kept.token_ids.count(x)


def test_streamed_text_holds_back_only_what_could_begin_a_stop_string(checkpoint):
    """Each token's text goes out with it unless the text now ends with the start of a stop string: a stop string
    the text never begins holds nothing back (not its length less one), and the whole text is the same."""
    model_dir, _ = checkpoint
    engine = _engine(model_dir)
    prompt = _prompt(19, 20)
    ascii_letters = tuple(ByteTokenizer.FIRST_BYTE_ID + ord(c) for c in "abcdefgh")  # one token per character
    free = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, allowed_token_ids=ascii_letters)
    plain = _streamed_texts(engine, prompt, free)
    assert all(len(piece) == 1 for piece in plain)
    assert _streamed_texts(engine, prompt, replace(free, stop=("\x00never", "zzz"))) == plain

    text = "".join(plain)
    stop = text[12:15]
    cut = text[: text.find(stop)]
    streamed = _streamed_texts(engine, prompt, replace(free, stop=(stop,)))
    assert "".join(streamed) == cut
    sent = ""
    for count, piece in enumerate(streamed[: len(cut)], start=1):
        sent += piece
        so_far = text[:count]
        if not (so_far.endswith(stop[0]) or so_far.endswith(stop[:2])):
            assert sent == so_far, f"after {count} tokens {sent!r} went out of {so_far!r}"


def _streamed_texts(engine: Engine, prompt: list[int], params: SamplingParams) -> list[str]:
    engine.add_request("streamed", prompt, params)
    texts = []
    while engine.has_unfinished():
        texts.extend(o.text for o in engine.step() if o.request_id == "streamed")
    return texts


# -- bad_words ------------------------------------------------------------------------------------------


def test_bad_word_sequences_are_spelled_at_the_start_and_after_a_space(tmp_path):
    from engine.sampler import bad_word_token_ids
    from engine.tokenizer import HFTokenizer
    from tests.engine.test_tokenizer import write_model_dir

    bpe = HFTokenizer.from_dir(write_model_dir(tmp_path / "bpe"))

    def encode(text: str) -> list[int]:
        return bpe.encode(text, add_special_tokens=False)

    (alone, spaced) = bad_word_token_ids(encode, ["model"])
    assert (alone, spaced) == (tuple(encode("model")), tuple(encode(" model")))
    assert alone[0] != spaced[0] and len(alone) == len(spaced)
    assert bad_word_token_ids(encode, ["  model"]) == (alone, spaced)  # leading spaces do not count, as vLLM's
    assert len(encode(" hello")) < len(encode("hello"))  # " hello" is one token: banning it would ban more than asked
    assert bad_word_token_ids(encode, ["hello"]) == (tuple(encode("hello")),)
    byte = ByteTokenizer(VOCAB)  # " ab" is a token longer than "ab": only the word's own spelling
    assert bad_word_token_ids(lambda t: byte.encode(t, add_special_tokens=False), ["ab"]) == ((100, 101),)


def test_bad_words_ban_a_words_last_token_only_after_the_rest_of_it():
    logits = torch.zeros(1, VOCAB)
    logits[0, 100] = 5.0  # "a" is the likeliest, then "b", then "c"
    logits[0, 101] = 4.0
    logits[0, 102] = 3.0
    sampler = Sampler(VOCAB)
    state = SamplingState(SamplingParams(temperature=0, bad_words=("b", "ab")), [], bad_words=((101,), (100, 101)))
    picked = []
    for _ in range(3):
        (token,) = sampler.sample(logits, [state]).token_ids
        state.record(token)
        picked.append(token)
    assert picked == [100, 100, 100]  # "b" is banned alone; "a" stays the argmax
    alone = SamplingState(SamplingParams(temperature=0, bad_words=("ab",)), [], bad_words=((100, 101),))
    assert alone.banned_token_ids == ()
    alone.record(100)
    assert alone.banned_token_ids == (101,)  # after "a", "b" would finish the word
    alone.record(102)
    assert alone.banned_token_ids == ()


def test_bad_words_on_the_engine_against_transformers(checkpoint):
    model_dir, model = checkpoint
    engine = _engine(model_dir)
    prompt = _prompt(11, 24)
    letters = [3 + ord(c) for c in "abcdefgh"]
    (plain,) = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, allowed_token_ids=letters))
    first, *_ = plain.token_ids
    words = (chr(first - 3), chr(plain.token_ids[2] - 3) + chr(plain.token_ids[3] - 3))
    banned = [tuple(3 + ord(c) for c in word) for word in words]
    params = SamplingParams(max_tokens=10, temperature=0, allowed_token_ids=letters, bad_words=words)
    (result,) = engine.generate([prompt], params)
    expected: list[int] = []
    with torch.no_grad():
        for _ in range(10):
            logits = model(torch.tensor([prompt + expected])).logits[0, -1].float()
            held = {
                w[-1]
                for w in banned
                if len(w) - 1 <= len(expected) and tuple(expected[len(expected) - len(w) + 1 :]) == w[:-1]
            }
            expected.append(max((t for t in letters if t not in held), key=lambda t: float(logits[t])))
    assert list(result.token_ids) == expected != list(plain.token_ids)
    text = engine.tokenizer.decode(result.token_ids)
    assert words[0] not in text and words[1] not in text
    with pytest.raises(InvalidRequestError):  # every allowed token a banned word: refused, not sampled
        engine.generate(
            [prompt], SamplingParams(max_tokens=2, temperature=0, allowed_token_ids=[100], bad_words=("a",))
        )
