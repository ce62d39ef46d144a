"""logit_bias, min_tokens, prompt logprobs and stop reasons: in the sampler, and through the engine against
transformers (fp32, the same weights)."""

from __future__ import annotations

import random

import pytest
import torch

from contract.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidRequestError
from engine.sampler import Sampler, SamplingState
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
