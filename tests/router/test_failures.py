"""Failures under concurrent load: clients leaving, a decode worker dying mid-stream, a prefill worker dying.

These workers are this module's own; tests kill them, in file order (disconnects first, with every
worker alive; then one decode worker; then the prefill worker).
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.checkpoints import hf_greedy
from tests.router.conftest import (
    MAX_MODEL_LEN,
    SERVED_MODEL,
    greedy_ignoring_eos,
    random_prompt,
    streams_under_way,
    token_ids,
    wait_for,
)
from tests.workers.harness import WorkerProcess, frozen, start_workers, stop_workers, wait_idle

REQUEST_TIMEOUT_S = 60
LONG_GENERATION = MAX_MODEL_LEN - 200  # several seconds of decoding: far longer than any wait below


@dataclass
class FailureCluster:
    prefills: list[WorkerProcess]  # prefill in 64-token chunks, so a long prompt takes a while
    decodes: list[WorkerProcess]

    @property
    def workers(self) -> list[WorkerProcess]:
        return [*self.prefills, *self.decodes]


def alive(workers: list[WorkerProcess]) -> list[WorkerProcess]:
    return [w for w in workers if w.process.poll() is None]


@pytest.fixture(scope="module")
def failing(checkpoint):
    model = str(checkpoint.path)
    chunked = ("prefill", model, "grpc", "--max-num-batched-tokens", "64")
    p1, p2, d1, d2 = start_workers(chunked, chunked, ("decode", model), ("decode", model))
    cluster = FailureCluster([p1, p2], [d1, d2])
    yield cluster
    stop_workers(cluster.workers)


# -- clients leaving ----------------------------------------------------------------------------------


def _leave_after_lines(url: str, body: dict, lines: int) -> int:
    """Streams a request, reads ``lines`` SSE events, then drops the connection."""
    seen = 0
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client, client.stream("POST", url, json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                assert '"error"' not in line, line
                seen += 1
                if seen == lines:
                    break
    return seen


def _leave_before_first_token(url: str, body: dict, wait_s: float) -> None:
    """Gives up while the router is still admitting / prefilling (before any byte of the response)."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=httpx.Timeout(REQUEST_TIMEOUT_S, read=wait_s))


def test_client_disconnects_return_every_block(make_router, failing, rng):
    router = make_router(failing.prefills, failing.decodes, local_prefill_threshold=32)
    url = f"{router.http}/v1/completions"
    chat_url = f"{router.http}/v1/chat/completions"
    before = {w.address: w.stats().prompt_tokens for w in failing.workers}

    def long_body(prompt_len: int, **extra) -> dict:
        prompt = random_prompt(rng, prompt_len)
        max_tokens = min(LONG_GENERATION, MAX_MODEL_LEN - prompt_len)
        return {
            "model": SERVED_MODEL,
            "prompt": [prompt],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            **extra,
        }

    jobs = [
        lambda b=long_body(100, stream=True): _leave_after_lines(url, b, 5),  # remote prefill, mid-decode
        lambda b=long_body(120, stream=True): _leave_after_lines(url, b, 1),  # right after the first token
        lambda b=long_body(10, stream=True): _leave_after_lines(url, b, 5),  # local prefill
        lambda b=long_body(60, stream=True, n=2): _leave_after_lines(url, b, 6),  # two choices at once
        lambda b=long_body(1500, stream=True): _leave_before_first_token(url, b, 0.1),  # mid-prefill
        lambda b=long_body(1500): _leave_before_first_token(url, b, 0.3),  # non-streaming, mid-prefill
        lambda b=long_body(80): _leave_before_first_token(url, b, 1.5),  # non-streaming, mid-decode
        lambda: _leave_after_lines(
            chat_url,
            {
                "model": SERVED_MODEL,
                "messages": [{"role": "user", "content": "go on " * 20}],
                "max_tokens": LONG_GENERATION,
                "ignore_eos": True,
                "stream": True,
            },
            4,
        ),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result(timeout=REQUEST_TIMEOUT_S)

    # Every generation asked for minutes' worth of tokens: only cancellation can idle the workers this soon.
    wait_for(lambda: router.running() == 0, 5, "the router to release every admission slot")
    for worker in failing.workers:
        wait_idle(worker, timeout=5)
    assert sum(w.stats().prompt_tokens - before[w.address] for w in failing.decodes) > 0
    assert sum(w.stats().prompt_tokens - before[w.address] for w in failing.prefills) > 0, (
        "no request reached a prefill worker"
    )
    assert router.worker_active() == {w.address: 0 for w in failing.workers}

    # And the router still serves.
    out = router.openai().completions.create(
        model=SERVED_MODEL,
        prompt=[random_prompt(rng, 50)],
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage.completion_tokens == 4


# -- a worker stalls --------------------------------------------------------------------------------------


def test_a_stalled_worker_leaves_routing_only_after_checks_in_a_row(make_router, failing):
    """One health check that times out (a busy machine can stall a worker past its 1 s deadline) keeps the
    worker routed to; a worker that stays stalled for several checks is taken out, and comes back."""
    router = make_router(failing.prefills, failing.decodes[:1])
    worker = failing.decodes[0]

    def routed() -> bool:
        return worker.address in router.call(lambda: [w.address for w in router.router.pool.of_role("decode")])

    seen: list[bool] = []

    def missed_checks() -> int:
        """Health checks missed in a row, as the router counts them; whether it routes to the worker goes in seen."""
        seen.append(routed())
        return router.call(lambda: router.router.pool.workers[worker.address].failures)

    assert routed()
    with frozen(worker):  # until one check has timed out (1 s), not for a fixed time: the next one is answered
        wait_for(lambda: missed_checks() >= 1, 10, "a health check to time out")
    wait_for(lambda: missed_checks() == 0, 10, "a health check to pass again")
    assert all(seen), "one missed health check took the worker out of routing"

    with frozen(worker):
        wait_for(lambda: not routed(), 10, "the stalled worker to leave routing")
    wait_for(routed, 10, "the worker to be routed to again once it answers")


# -- a decode worker dies mid-stream --------------------------------------------------------------------


def test_decode_worker_killed_mid_stream_migrates(make_router, failing, checkpoint, rng, caplog):
    assert len(alive(failing.decodes)) == 2
    router = make_router(alive(failing.prefills), failing.decodes, local_prefill_threshold=32)
    # The client's X-Request-Id (one for all four streams, as a client may reuse one) names them in the router's log.
    client = openai.OpenAI(
        base_url=f"{router.http}/v1",
        api_key="none",
        max_retries=0,
        timeout=60,
        default_headers={"X-Request-Id": "streams-4"},
    )
    caplog.set_level(logging.WARNING, logger="router.orchestrator")
    max_tokens = 500  # ~1 s of stream here: the kill lands mid-stream on a machine a few times faster too
    prompts = [random_prompt(rng, n) for n in (20, 40, 70, 90)]  # local and remote prefills
    expected = [greedy_ignoring_eos(checkpoint.model, p, max_tokens) for p in prompts]
    streams = streams_under_way(client, prompts, max_tokens)
    active = router.worker_active()
    victim = max(failing.decodes, key=lambda w: active[w.address])
    assert active[victim.address] >= 1
    victim.kill()

    for stream in streams:
        assert stream.done.wait(REQUEST_TIMEOUT_S), "a stream hung after its decode worker died"
    for i, (stream, want) in enumerate(zip(streams, expected)):
        assert stream.error is None, f"stream {i} failed: {stream.error!r}"
        assert stream.finish_reason == "length"
        assert stream.ids == want, f"stream {i}: migrated output differs from transformers"
    migrations = router.metrics()[("splitserve_migrations_total", ())]
    assert migrations >= 1, "no stream was migrated"
    migrated = [r.getMessage() for r in caplog.records if "migrating" in r.getMessage()]
    assert len(migrated) == migrations, migrated
    for line in migrated:
        assert re.fullmatch(
            r"request streams-4 \([0-9a-f]{32}\): decode worker \S+ lost after \d+ tokens; migrating", line
        )

    survivor = next(w for w in failing.decodes if w is not victim)
    for worker in alive([*failing.prefills, survivor]):
        wait_idle(worker, timeout=10)
    out = client.completions.create(
        model=SERVED_MODEL,
        prompt=[random_prompt(rng, 50)],
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage.completion_tokens == 4


# -- the prefill worker dies under load ------------------------------------------------------------------


def test_prefill_workers_killed_under_load(make_router, failing, checkpoint, rng):
    """The first prefill worker dies: its prefills are retried on the second. Then the second dies:
    the decode workers prefill for themselves."""
    first, second = failing.prefills
    decodes = alive(failing.decodes)
    router = make_router(failing.prefills, decodes, local_prefill_threshold=32, prefill_timeout_s=20)
    client = router.openai()

    def complete(prompt):
        try:
            out = client.completions.create(
                model=SERVED_MODEL,
                prompt=[prompt],
                max_tokens=6,
                temperature=0,
                logprobs=0,
                extra_body={"return_tokens_as_token_ids": True},
            )
            return token_ids(out.choices[0].logprobs.tokens)
        except openai.APIStatusError as exc:
            return exc

    def wave(victim: WorkerProcess, in_flight: int) -> list:
        prompts = [random_prompt(rng, 900 + 13 * i) for i in range(6)]
        expected = [hf_greedy(checkpoint.model, p, 6) for p in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(complete, p) for p in prompts]
            wait_for(
                lambda: router.worker_active()[victim.address] >= in_flight,
                30,
                f"prefills in flight on {victim.address}",
            )
            victim.kill()
            results = [f.result(timeout=REQUEST_TIMEOUT_S + 10) for f in futures]
        for i, (result, want) in enumerate(zip(results, expected)):
            if isinstance(result, openai.APIStatusError):  # a clean error is allowed; a wrong answer is not
                assert result.status_code >= 500 and set(result.body) >= {"message", "type", "code"}, result
            else:
                assert result == want, f"request {i}: output after {victim.address} died differs from transformers"
        return [r for r in results if not isinstance(r, openai.APIStatusError)]

    assert len(wave(first, 1)) == 6, "with a second prefill worker up, every request should complete"
    assert router.metrics()[("splitserve_prefill_retries_total", ())] >= 1, "no prefill was retried on the other worker"
    assert "fallback" not in router.decisions()

    assert len(wave(second, 2)) >= 3, "the decode workers should have taken over"
    assert router.decisions().get("fallback", 0) >= 1, router.decisions()

    # With both prefill workers gone for good, long prompts are prefilled on the decode workers.
    wait_for(
        lambda: router.call(lambda: not router.router.pool.of_role("prefill")),
        10,
        "the dead prefill workers to be marked unhealthy",
    )
    unavailable = httpx.get(f"{router.http}/ready", timeout=10).json()["unavailable_workers"]
    assert [why.split(": ", 1)[0] for why in unavailable] == [f"prefill worker {w.address}" for w in failing.prefills]
    assert all(why.split(": ", 1)[1] for why in unavailable), unavailable  # each names what failed
    fallbacks = router.decisions()["fallback"]
    out = client.completions.create(model=SERVED_MODEL, prompt=[random_prompt(rng, 300)], max_tokens=6, temperature=0)
    assert out.usage.completion_tokens >= 1
    assert router.decisions()["fallback"] == fallbacks + 1
    for worker in decodes:
        wait_idle(worker, timeout=10)
