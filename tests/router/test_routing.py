"""KV-aware routing and conditional disaggregation, observed on the workers' own counters."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.block_manager import compute_block_hashes
from router.prefill_clock import PREFILL_SPEED_WEIGHT, PrefillClock, timed_prefill
from router.routing import overflows_to_decode
from tests.router.conftest import (
    MAX_MODEL_LEN,
    SERVED_MODEL,
    complete_ids,
    greedy_ignoring_eos,
    random_prompt,
    token_ids,
    wait_for,
)
from tests.workers.harness import start_workers, stop_workers, wait_idle

BLOCK = 16


def _complete(router, prompt: list[int], max_tokens: int = 2) -> None:
    out = router.openai().completions.create(
        model=SERVED_MODEL, prompt=[prompt], max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == max_tokens


def test_shared_prefix_goes_to_the_prefill_worker_holding_it(make_router, cluster, rng):
    router = make_router(cluster.prefills, [cluster.decode], local_prefill_threshold=BLOCK)
    prefix = random_prompt(rng, 16 * BLOCK)
    prefix_hashes = compute_block_hashes(prefix, BLOCK)
    before = {w.address: w.stats() for w in cluster.prefills}

    _complete(router, prefix + random_prompt(rng, 40))
    grown = [w for w in cluster.prefills if w.stats().prompt_tokens > before[w.address].prompt_tokens]
    assert len(grown) == 1, "the first request is prefilled by exactly one prefill worker"
    holder = grown[0]
    other = next(w for w in cluster.prefills if w is not holder)
    router.wait_synced(holder.address, prefix_hashes)

    holder_before, other_before = holder.stats(), other.stats()
    for _ in range(4):
        _complete(router, prefix + random_prompt(rng, 40))  # 40 uncached tokens on D: still remote
    holder_after, other_after = holder.stats(), other.stats()
    assert other_after.prompt_tokens == other_before.prompt_tokens, (
        "a request sharing the prefix went to the worker without it"
    )
    assert holder_after.prompt_tokens - holder_before.prompt_tokens == 4 * (len(prefix) + 40)
    assert holder_after.prefix_hit_tokens - holder_before.prefix_hit_tokens >= 4 * len(prefix), (
        "the holder did not reuse its prefix"
    )
    assert router.decisions() == {"remote_prefill": 5.0}

    # Load matters too: an unrelated prompt may go anywhere, but the prefix keeps its home.
    _complete(router, random_prompt(rng, 200))
    _complete(router, prefix + random_prompt(rng, 40))
    assert other.stats().prompt_tokens - other_after.prompt_tokens in (0, 200)
    for worker in cluster.workers:
        wait_idle(worker)


def test_conditional_disaggregation(make_router, cluster, rng):
    router = make_router(cluster.prefills, [cluster.decode], local_prefill_threshold=64)

    def prompt_tokens():
        return cluster.decode.stats().prompt_tokens, sum(w.stats().prompt_tokens for w in cluster.prefills)

    decode0, prefill0 = prompt_tokens()
    _complete(router, random_prompt(rng, 40))  # short: the decode worker prefills it
    decode1, prefill1 = prompt_tokens()
    assert (decode1 - decode0, prefill1 - prefill0) == (40, 0)
    assert router.decisions() == {"local_prefill": 1.0}

    long = random_prompt(rng, 200)
    _complete(router, long)  # long: a prefill worker computes it, the decode worker reserves for it
    decode2, prefill2 = prompt_tokens()
    assert (decode2 - decode1, prefill2 - prefill1) == (200, 200)
    assert router.decisions() == {"local_prefill": 1.0, "remote_prefill": 1.0}

    # Repeated, the long prompt is cached on the decode worker: 8 uncached tokens < 64, so local.
    router.wait_synced(cluster.decode.address, compute_block_hashes(long, BLOCK))
    _complete(router, long)
    decode3, prefill3 = prompt_tokens()
    assert (decode3 - decode2, prefill3 - prefill2) == (200, 0)
    decisions = router.decisions()
    assert decisions == {"local_prefill": 2.0, "remote_prefill": 1.0}

    metrics = router.metrics()
    assert metrics[("splitserve_routing_decisions_total", (("decision", "local_prefill"),))] == 2.0
    cached = sum(v for (name, _), v in metrics.items() if name == "splitserve_cached_prompt_tokens_total")
    assert cached >= 192  # labelled by model since the metrics carry the served model's name


def test_no_prefill_worker_falls_back_to_the_decode_worker(make_router, cluster, rng):
    router = make_router([], [cluster.decode], local_prefill_threshold=16)
    prefill_before = sum(w.stats().prompt_tokens for w in cluster.prefills)
    _complete(router, random_prompt(rng, 200))
    assert router.decisions() == {"fallback": 1.0}
    assert sum(w.stats().prompt_tokens for w in cluster.prefills) == prefill_before


def test_overflow_rule_weighs_the_wait_on_the_prefill_worker_against_the_decode_workers_queue():
    # a 1 s wait on P at 1 ms/token: D's queue is weighed at the same speed
    assert overflows_to_decode(1.0, 0, 0.001, max_wait_s=0.5)
    assert not overflows_to_decode(1.0, 0, 0.001, max_wait_s=1.5), "within the wait allowed"
    assert not overflows_to_decode(1.0, 1000, 0.001, max_wait_s=0.5), "D has as much queued: P still"
    assert overflows_to_decode(1.0, 999, 0.001, max_wait_s=0.5)
    assert not overflows_to_decode(None, 0, None, max_wait_s=0.5), "no speed measured yet"
    assert not overflows_to_decode(10.0**9, 0, 0.001, max_wait_s=0.0), "0 turns it off"
    # the speed it weighs: an average of prompts' compute time per token, newest weighted PREFILL_SPEED_WEIGHT
    assert timed_prefill(None, 500, 0.5) == 0.001
    assert timed_prefill(0.001, 500, 1.5) == pytest.approx(0.001 + PREFILL_SPEED_WEIGHT * (0.003 - 0.001))
    assert timed_prefill(0.001, 0, 9.0) == 0.001, "a fully cached prompt times nothing"


def test_the_prefill_clock_times_compute_not_answers_and_reads_answers_in_the_order_sent():
    clock = PrefillClock()
    first = clock.send(1000, now=0.0)
    assert clock.wait_s(0.0) is None, "no speed before an answer"
    # P computed it in 1 s; its answer came 3 s later (the decode worker was busy): the speed is 1 ms/token
    clock.computed(first, 1.0)
    assert clock.s_per_token == pytest.approx(0.001)
    assert clock.wait_s(4.0) == 0.0, "nothing left to compute"

    # three prompts sent together, each of 500 tokens: 1.5 s of work, less what has passed
    a, b, c = (clock.send(500, now=10.0) for _ in range(3))
    assert clock.wait_s(10.0) == pytest.approx(1.5)
    assert clock.wait_s(11.0) == pytest.approx(0.5)
    assert clock.wait_s(12.0) == 0.0, "computed by now as far as the clock can tell, answered or not"
    # b's answer: computed 2 s after it was sent (slower than the clock thought), and so was a, sent before it;
    # c is timed from there. Neither queued prompt times the speed: each waited behind another.
    clock.computed(b, 2.0)
    assert clock.s_per_token == pytest.approx(0.001)
    assert clock.wait_s(12.0) == pytest.approx(0.5)
    clock.computed(a, 0.5)  # a's answer after b's: already counted
    assert clock.wait_s(12.0) == pytest.approx(0.5)
    clock.forget(c)  # its prefill failed: nothing of it is left to wait for
    assert clock.wait_s(12.0) == 0.0

    # a prompt sent while nothing is unreported times the speed again
    lone = clock.send(1000, now=20.0)
    assert clock.computed(lone, 3.0) == pytest.approx(1.0 - 3.0), "forecast 1 s (1000 tokens), took 3 s"
    assert clock.s_per_token == pytest.approx(0.001 + PREFILL_SPEED_WEIGHT * (0.003 - 0.001))


def test_the_prefill_clock_says_how_far_each_forecast_was_off():
    clock = PrefillClock()
    first = clock.send(1000, now=0.0)
    assert first.forecast_s is None and clock.computed(first, 1.0) is None, "no speed, no forecast"
    # 1 ms/token: each prompt's forecast is its wait plus its own tokens
    a = clock.send(500, now=10.0)
    b = clock.send(300, now=10.2)
    assert a.forecast_s == pytest.approx(0.5)
    assert b.forecast_s == pytest.approx(0.3 + 0.3), "a has 0.3 s left when b is sent"
    assert clock.computed(a, 0.7) == pytest.approx(-0.2), "a took 0.2 s longer than forecast"
    assert clock.computed(b, 0.4) == pytest.approx(0.2), "b was done 0.2 s sooner"
    c, d = clock.send(200, now=20.0), clock.send(200, now=20.0)
    assert d.forecast_s == pytest.approx(400 * clock.s_per_token), "a's answer timed the speed again: 1.08 ms/token"
    assert clock.computed(d, 0.5) == pytest.approx(d.forecast_s - 0.5)
    assert clock.computed(c, 0.3) is None, "reported already by d's answer: counted once"


def test_max_prefill_wait_sends_the_overflow_to_the_decode_worker(make_router, cluster, checkpoint, rng):
    prefill = cluster.prefills[0]
    router = make_router([prefill], [cluster.decode], local_prefill_threshold=16, max_prefill_wait_ms=1.0)
    pool = router.router.pool

    def handle(worker):
        return router.call(lambda: (pool.workers[worker.address].queued_prefill_tokens, pool.workers[worker.address]))

    _complete(router, random_prompt(rng, 300))  # alone on an idle prefill worker: its speed is measured
    assert router.decisions() == {"remote_prefill": 1.0}
    assert handle(prefill)[1].prefill_s_per_token > 0

    prompts = [random_prompt(rng, 1500) for _ in range(4)]
    clients = [router.openai() for _ in prompts]  # made beforehand: the prompts arrive together
    barrier = threading.Barrier(len(prompts))

    def complete(client, prompt):
        barrier.wait()
        out = client.completions.create(
            model=SERVED_MODEL,
            prompt=[prompt],
            max_tokens=4,
            temperature=0,
            logprobs=0,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        )
        return token_ids(out.choices[0].logprobs.tokens)

    with ThreadPoolExecutor(len(prompts)) as pool_of_clients:
        outputs = list(pool_of_clients.map(complete, clients, prompts))
    decisions = router.decisions()
    # The first prompt finds the prefill worker idle; one arriving while it holds 1500 tokens (far over 1 ms of
    # wait) goes to the decode worker, whose own queue is then as long: so both workers take some.
    assert decisions.get("fallback", 0) >= 1, decisions
    assert decisions["remote_prefill"] >= 2, decisions
    for prompt, output in zip(prompts, outputs):
        assert output == greedy_ignoring_eos(checkpoint.model, prompt, 4)
    assert handle(prefill)[0] == 0 and handle(cluster.decode)[0] == 0, "every backlog token was taken off again"
    metrics = router.metrics()
    key = (("role", "prefill"), ("worker", prefill.stats().worker_id))
    speed = metrics[("splitserve_router_prefill_seconds_per_token", key)]
    assert speed == pytest.approx(handle(prefill)[1].prefill_s_per_token)
    backlogs = {k: v for k, v in metrics.items() if k[0] == "splitserve_router_prefill_backlog_tokens"}
    assert len(backlogs) == 2 and set(backlogs.values()) == {0.0}, backlogs
    # every prompt sent to P after the first (which measured its speed) was forecast, and its error observed once
    # unless a later prompt's answer came first and reported it computed; the newest one sent is always its own
    errors = metrics[("splitserve_router_prefill_forecast_error_seconds_count", (("worker", key[1][1]),))]
    assert 1 <= errors <= decisions["remote_prefill"] - 1, (errors, decisions)
    # every prompt answered: nothing left on the prefill worker's clock
    assert metrics[("splitserve_router_prefill_wait_seconds", key)] == 0.0
    assert handle(prefill)[1].prefill_wait_s() == 0.0
    for worker in cluster.workers:
        wait_idle(worker)


def test_a_request_goes_to_a_decode_worker_whose_kv_pool_holds_it(make_router, checkpoint, cluster, rng):
    """Decode workers with KV pools of different sizes: a request that only the larger one holds is served there,
    token for token transformers' greedy output, where the smaller one's engine would refuse it (a 400)."""
    (small,) = start_workers(("decode", str(checkpoint.path), "grpc", "--kv-cache-mb", "1"))
    try:
        capacity, large = small.stats().token_capacity, cluster.decode.stats().token_capacity
        assert 0 < capacity < large == MAX_MODEL_LEN, (capacity, large)
        said = f"KV pool holds {capacity} tokens, fewer than the model's context ({MAX_MODEL_LEN})"
        assert any(said in line for line in small.log_lines), "the small worker did not say so at its start"
        assert not any("fewer than the model's context" in line for line in cluster.decode.log_lines)
        router = make_router([], [small, cluster.decode])
        decodes = lambda: router.router.pool.of_role("decode")  # noqa: E731
        wait_for(
            lambda: router.call(lambda: sorted(w.stats.token_capacity for w in decodes())) == [capacity, large],
            10,
            "the router to learn both pools",
        )
        before = cluster.decode.stats().requests_finished
        for _ in range(6):  # prompts no worker has cached: each of the two would be drawn at random, load for load
            prompt, max_tokens = random_prompt(rng, capacity - 8), 16  # 8 tokens over the small pool at the end
            assert complete_ids(router, prompt, max_tokens) == greedy_ignoring_eos(checkpoint.model, prompt, max_tokens)
        assert cluster.decode.stats().requests_finished - before == 6
        assert small.stats().requests_finished == 0
    finally:
        stop_workers([small])


def test_a_prompt_no_prefill_worker_holds_is_prefilled_where_it_decodes(make_router, checkpoint, cluster, rng):
    """A prefill worker whose KV pool is smaller than a prompt is not sent it (its engine refused it, and the client
    got that 400): the decode worker prefills it, exact. A prompt it holds goes to it."""
    (small,) = start_workers(("prefill", str(checkpoint.path), "grpc", "--kv-cache-mb", "1"))
    try:
        capacity = small.stats().token_capacity
        assert 0 < capacity < MAX_MODEL_LEN
        router = make_router([small], [cluster.decode], local_prefill_threshold=16)
        prefills = lambda: router.router.pool.of_role("prefill")  # noqa: E731
        wait_for(
            lambda: router.call(lambda: [w.stats.token_capacity for w in prefills()]) == [capacity],
            10,
            "the router to learn the prefill worker's pool",
        )
        for length, decision in ((capacity + 8, "fallback"), (capacity // 2, "remote_prefill")):
            prompt = random_prompt(rng, length)
            assert complete_ids(router, prompt, 4) == greedy_ignoring_eos(checkpoint.model, prompt, 4)
            assert router.decisions().get(decision) == 1.0, router.decisions()
        assert small.stats().prompt_tokens == capacity // 2
    finally:
        stop_workers([small])
