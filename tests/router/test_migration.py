"""A request outlives the workers it started on: a worker leaving the router's pool under a call, and a
decode worker killed mid-stream, end in the reference output — tokens and text — never an error.

These workers are this module's own; the last test kills one of them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from contract.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from tests.checkpoints import hf_greedy
from tests.router.conftest import (
    SERVED_MODEL,
    greedy_ignoring_eos,
    random_prompt,
    start_stream,
    token_ids,
    wait_for,
)
from tests.workers.harness import frozen, start_workers, stop_workers, wait_idle

REQUEST_TIMEOUT_S = 90
FIRST_BYTE_ID = 3
# Every three-byte UTF-8 lead byte, favoured: each token starts a character the next one breaks, so at
# every point of the output the detokenizer holds an unfinished character back (U+FFFD once the next comes).
LEAD_BYTES = {str(FIRST_BYTE_ID + b): 40.0 for b in range(0xE0, 0xF0)}


@dataclass
class Workers:
    prefills: list
    decodes: list

    @property
    def all(self) -> list:
        return [*self.prefills, *self.decodes]


@pytest.fixture(scope="module")
def workers(checkpoint):
    model = str(checkpoint.path)
    chunked = ("prefill", model, "grpc", "--max-num-batched-tokens", "64")  # a long prompt prefills for a while
    p1, p2, d1, d2 = start_workers(chunked, chunked, ("decode", model), ("decode", model))
    yield Workers([p1, p2], [d1, d2])
    stop_workers([p1, p2, d1, d2])


def test_worker_removed_from_the_pool_under_a_call_is_a_lost_worker(make_router, workers, checkpoint, rng):
    """The pool closes a worker's channel (health says it is gone) while a Prefill or a decode stream is in
    flight on it: the call ends in CancelledError, which must become a retry / migration, not a 500."""
    router = make_router(workers.prefills, workers.decodes, local_prefill_threshold=32, health_interval_s=0.2)
    client = router.openai(timeout=REQUEST_TIMEOUT_S)

    # Mid-prefill: a 1,300-token prompt (~0.2 s of chunks on a 2-core EPYC, a few looks), both prefill workers frozen
    # until one has it and has left the pool, so that it cannot end first on a faster machine.
    prompt = random_prompt(rng, 1300)
    expected = hf_greedy(checkpoint.model, prompt, 6)
    with ThreadPoolExecutor(1) as pool:
        with frozen(workers.prefills[0]), frozen(workers.prefills[1]):
            future = pool.submit(
                client.completions.create,
                model=SERVED_MODEL,
                prompt=[prompt],
                max_tokens=6,
                temperature=0,
                logprobs=0,
                extra_body={"return_tokens_as_token_ids": True},
            )
            busy = wait_for(
                lambda: next((p for p in workers.prefills if router.worker_active().get(p.address)), None),
                30,
                "a prefill in flight",
            )
            router.run(router.router.pool.remove(busy.address), 10)
        out = future.result(REQUEST_TIMEOUT_S)
    assert token_ids(out.choices[0].logprobs.tokens) == expected

    # Mid-decode: the stream's decode worker leaves the pool.
    prompt = random_prompt(rng, 50)
    expected = greedy_ignoring_eos(checkpoint.model, prompt, 300)
    stream = start_stream(client, prompt, 300)
    wait_for(lambda: len(stream.ids) >= 10 or stream.done.is_set(), 30, "the stream to start")
    serving = next(d for d in workers.decodes if router.worker_active().get(d.address))
    router.run(router.router.pool.remove(serving.address), 10)
    assert stream.done.wait(REQUEST_TIMEOUT_S), "the stream hung after its decode worker left the pool"
    assert stream.error is None, repr(stream.error)
    assert stream.ids == expected and stream.finish_reason == "length"
    assert router.metrics()[("splitserve_migrations_total", ())] >= 1
    for worker in workers.all:
        wait_idle(worker, timeout=10)


def test_a_lost_decode_worker_with_none_to_move_to_fails_and_counts_no_migration(make_router, workers, rng):
    """The only decode worker leaves under a stream: the client gets an error, and no migration is counted (a move
    with no worker to move to is none)."""
    router = make_router(workers.prefills, workers.decodes[:1], local_prefill_threshold=32, health_interval_s=0.2)
    stream = start_stream(router.openai(timeout=REQUEST_TIMEOUT_S), random_prompt(rng, 50), 300)
    wait_for(lambda: len(stream.ids) >= 10 or stream.done.is_set(), 30, "the stream to start")
    router.run(router.router.pool.remove(workers.decodes[0].address), 10)
    assert stream.done.wait(REQUEST_TIMEOUT_S), "the stream hung after its only decode worker left the pool"
    assert stream.error is not None and len(stream.ids) < 300
    assert router.metrics().get(("splitserve_migrations_total", ()), 0) == 0
    wait_idle(workers.decodes[0], timeout=10)


def test_decode_worker_killed_inside_a_character_keeps_text_and_kv(make_router, workers, checkpoint, rng):
    """Killed mid-decode, while its detokenizer holds an unfinished character back: the client's text is
    the no-fault text exactly (nothing lost at the migration point), penalties continue over the output,
    and the prompt's KV comes from the prefill worker's prefix cache (only the generated tokens are computed)."""
    router = make_router(workers.prefills, workers.decodes, local_prefill_threshold=32)
    client = router.openai(timeout=REQUEST_TIMEOUT_S)
    prompt = random_prompt(rng, 1000)
    max_tokens = 400
    sampling = dict(presence_penalty=0.5, frequency_penalty=0.2, logit_bias=LEAD_BYTES)
    reference = _engine_reference(checkpoint, prompt, max_tokens, sampling)
    assert reference.text.count("\ufffd") >= max_tokens - 1

    stream = start_stream(client, prompt, max_tokens, **sampling)
    wait_for(lambda: len(stream.ids) >= 20 or stream.done.is_set(), 60, "the stream to start")
    active = router.worker_active()
    victim = max(workers.decodes, key=lambda w: active[w.address])
    prefill_hits = {p.address: p.stats().prefix_hit_tokens for p in workers.prefills}
    remote_before = router.decisions().get("remote_prefill", 0)
    victim.kill()

    assert stream.done.wait(REQUEST_TIMEOUT_S), "the stream hung after its decode worker died"
    assert stream.error is None, repr(stream.error)
    assert router.metrics()[("splitserve_migrations_total", ())] >= 1
    assert stream.ids == list(reference.token_ids)
    assert stream.text == reference.text, "text lost at the migration point"
    assert stream.finish_reason == "length"
    # The migration went through a prefill worker, which had the prompt cached.
    assert router.decisions().get("remote_prefill", 0) == remote_before + 1
    reused = sum(p.stats().prefix_hit_tokens - prefill_hits[p.address] for p in workers.prefills)
    assert reused >= len(prompt) // 16 * 16 - 16, reused
    for worker in [*workers.prefills, *(d for d in workers.decodes if d is not victim)]:
        wait_idle(worker, timeout=10)


def _engine_reference(checkpoint, prompt: list[int], max_tokens: int, sampling: dict):
    """The no-fault output, from the engine both workers run (transformers has no OpenAI penalties)."""
    engine = Engine(EngineConfig(model=str(checkpoint.path), dtype="float32", num_kv_blocks=256))
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        presence_penalty=sampling["presence_penalty"],
        frequency_penalty=sampling["frequency_penalty"],
        logit_bias={int(k): v for k, v in sampling["logit_bias"].items()},
    )
    (result,) = engine.generate([prompt], params)
    return result
