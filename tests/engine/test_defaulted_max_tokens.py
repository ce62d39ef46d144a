"""A max_tokens the client did not set (``max_tokens_defaulted``) is lowered to what this engine's KV pool holds
after the prompt, and the request ends there with "length"; a max_tokens the client set that does not fit is
refused, by name."""

from __future__ import annotations

import random

import pytest

from contract.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidRequestError
from tests.checkpoints import write_checkpoint
from tests.router.conftest import greedy_ignoring_eos

BLOCKS, BLOCK_SIZE = 8, 16  # a pool of 128 tokens, under the model's 2,048-token context
POOL_TOKENS = BLOCKS * BLOCK_SIZE
DEFAULTED = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True, max_tokens_defaulted=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    return str(directory), write_checkpoint(directory, "LlamaForCausalLM", seed=5, max_position_embeddings=2048)


@pytest.fixture
def engine(model) -> Engine:
    return Engine(EngineConfig(model=model[0], dtype="float32", num_kv_blocks=BLOCKS, block_size=BLOCK_SIZE))


def _prompt(length: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 320) for _ in range(length)]


def test_a_defaulted_max_tokens_is_lowered_to_the_pool_and_ends_with_length(engine, model):
    prompt = _prompt(40)
    assert engine.token_capacity == POOL_TOKENS
    (result,) = engine.generate([prompt], DEFAULTED)
    assert result.finish_reason == "length"
    assert len(result.token_ids) == POOL_TOKENS - len(prompt)
    assert list(result.token_ids) == greedy_ignoring_eos(model[1], prompt, POOL_TOKENS - len(prompt))
    assert engine.allocator.num_used_blocks == 0


def test_a_defaulted_max_tokens_that_fits_is_kept(engine):
    (result,) = engine.generate([_prompt(40)], SamplingParams(max_tokens=5, temperature=0.0, max_tokens_defaulted=True))
    assert len(result.token_ids) <= 5


def test_reserve_lowers_it_too(engine):
    prompt = _prompt(100)
    engine.reserve("r", prompt, DEFAULTED)
    assert engine.requests["r"].params.max_tokens == POOL_TOKENS - len(prompt)
    assert engine.abort("r")


def test_an_explicit_max_tokens_that_does_not_fit_is_refused_by_name(engine):
    explicit = SamplingParams(max_tokens=POOL_TOKENS - 39, temperature=0.0)
    for add in (engine.add_request, engine.reserve):
        with pytest.raises(InvalidRequestError, match=r"max_tokens \(89\).*do not fit in this worker's KV pool"):
            add("x", _prompt(40), explicit)
    assert not engine.requests and engine.allocator.num_used_blocks == 0


def test_no_room_or_a_min_tokens_above_the_lowered_limit_is_refused(engine):
    with pytest.raises(InvalidRequestError, match="leaves no room"):
        engine.add_request("full", _prompt(POOL_TOKENS), DEFAULTED)
    # A max_tokens given or not, a prompt that fills the pool is what to shorten (not "at most 0 may follow").
    with pytest.raises(InvalidRequestError, match=r"^prompt \(\d+ tokens\) leaves no room"):
        engine.add_request("full", _prompt(POOL_TOKENS), SamplingParams(max_tokens=5, temperature=0.0))
    with pytest.raises(InvalidRequestError, match=r"min_tokens \(100\) exceeds the 88 tokens"):
        engine.add_request(
            "min", _prompt(40), SamplingParams(max_tokens=1000, min_tokens=100, max_tokens_defaulted=True)
        )
    assert not engine.requests


def test_resumed_output_counts_against_the_lowered_limit(engine, model):
    """A migrated request whose new worker has a smaller pool: it continues to what fits there, token for token."""
    prompt = _prompt(40)
    expected = greedy_ignoring_eos(model[1], prompt, POOL_TOKENS - len(prompt))
    resumed = expected[:30]
    engine.add_request("m", prompt, DEFAULTED, resume_token_ids=resumed)
    produced, finish = [], None
    while engine.has_unfinished():
        for output in engine.step():
            produced.extend(output.token_ids)
            finish = output.finish_reason or finish
    assert resumed + produced == expected and finish == "length"
    with pytest.raises(InvalidRequestError, match="resumed"):
        engine.add_request("over", prompt, DEFAULTED, resume_token_ids=expected + [5])
