"""A decode worker whose KV pool has no blocks free for a reservation: a disaggregated request waits for blocks in the
decode engine's own queue (prefilled there once they free) instead of failing with 503 while other requests hold
them. A prompt that can never fit is still refused up front."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.router.conftest import SERVED_MODEL, complete_ids, greedy_ignoring_eos, random_prompt
from tests.workers.harness import start_workers, stop_workers, wait_idle

POOL_MB = "1"  # 16 blocks of 16 tokens for this checkpoint: two 100-token prompts' reservations, not three
PROMPT_TOKENS = 100
MAX_TOKENS = 40
CONCURRENT = 6


@pytest.fixture(scope="module")
def small_pool(checkpoint):
    model = str(checkpoint.path)
    workers = start_workers(("prefill", model), ("decode", model, "grpc", "--kv-cache-mb", POOL_MB))
    yield workers
    stop_workers(workers)


def test_requests_beyond_a_full_decode_pool_wait_for_blocks_and_match_transformers(
    make_router, small_pool, checkpoint, rng
):
    prefill, decode = small_pool
    router = make_router([prefill], [decode], local_prefill_threshold=0)  # every prompt goes to the prefill worker
    prompts = [random_prompt(rng, PROMPT_TOKENS) for _ in range(CONCURRENT)]
    with ThreadPoolExecutor(CONCURRENT) as pool:
        outs = list(pool.map(lambda prompt: complete_ids(router, prompt, MAX_TOKENS), prompts))
    for prompt, ids in zip(prompts, outs, strict=True):
        assert ids == greedy_ignoring_eos(checkpoint.model, prompt, MAX_TOKENS)
    decisions = router.decisions()
    assert decisions.get("remote_prefill", 0) >= 1  # some were disaggregated ...
    assert decisions.get("fallback", 0) >= 1  # ... and some found the pool full and queued on the decode worker
    for worker in small_pool:
        wait_idle(worker, timeout=10)


def test_a_prompt_that_can_never_fit_the_decode_pool_is_refused_at_once(make_router, small_pool, rng):
    prefill, decode = small_pool
    client = make_router([prefill], [decode], local_prefill_threshold=0).openai()
    with pytest.raises(openai.BadRequestError, match="leaves no room for output in this worker's KV pool") as refused:
        client.completions.create(model=SERVED_MODEL, prompt=[random_prompt(rng, 400)], max_tokens=8, temperature=0)
    assert refused.value.body["param"] == "prompt"  # the prompt is what to shorten, as the worker said
