"""A worker that stalls (SIGSTOP: its process frozen, its kernel still acknowledging TCP). A decode worker stalled
mid-stream loses its streams to another decode worker as soon as the router takes it out of routing (two missed health
checks), not when gRPC gives up on the connection: they finish exactly as an unstalled run would, and the streams on
the other worker are not disturbed. A prefill worker stalled under a prefill lets go of it the same way: the prefill
is retried on another."""

from __future__ import annotations

import time

import pytest

from protos.cluster_auth import KEEPALIVE_TIMEOUT_MS
from tests.router.conftest import (
    greedy_ignoring_eos,
    random_prompt,
    start_stream,
    streams_under_way,
    wait_for,
)
from tests.workers.harness import frozen, start_workers, stop_workers, wait_idle

MAX_TOKENS = 600  # seconds of decoding on the test checkpoint: the stall lands mid-stream
STALL_BOUND_S = 25  # from the stall to every stream done; well under gRPC's 60 s ping timeout
RESERVE_TIMEOUT_S = 10  # the router's deadline for a Reserve (router/orchestrator.py)


@pytest.fixture(scope="module")
def workers(checkpoint):
    model = str(checkpoint.path)
    prefill, *decodes = start_workers(("prefill", model), ("decode", model), ("decode", model))
    yield prefill, decodes
    stop_workers([prefill, *decodes])


@pytest.fixture(scope="module")
def spare_prefill(checkpoint):
    (worker,) = start_workers(("prefill", str(checkpoint.path)))
    yield worker
    stop_workers([worker])


def test_streams_on_a_stalled_decode_worker_migrate_promptly_and_exactly(make_router, workers, checkpoint, rng):
    prefill, decodes = workers
    router = make_router([prefill], decodes, local_prefill_threshold=32)
    prompts = [random_prompt(rng, n) for n in (20, 40, 70, 90)]  # prefilled locally and remotely
    expected = [greedy_ignoring_eos(checkpoint.model, p, MAX_TOKENS) for p in prompts]
    client = router.openai()
    streams = streams_under_way(client, prompts, MAX_TOKENS)
    active = router.worker_active()
    victim = max(decodes, key=lambda w: active[w.address])
    on_victim = active[victim.address]
    assert 1 <= on_victim < len(streams), active  # streams on both workers

    with frozen(victim):
        stalled_at = time.monotonic()
        for stream in streams:
            stream.done.wait(max(0.0, stalled_at + STALL_BOUND_S - time.monotonic()))
        waited = time.monotonic() - stalled_at
        assert all(s.done.is_set() for s in streams), f"streams on the stalled worker still open after {waited:.0f}s"

    for i, (stream, want) in enumerate(zip(streams, expected)):
        assert stream.error is None, f"stream {i} failed: {stream.error!r}"
        assert stream.finish_reason == "length"
        assert stream.ids == want, f"stream {i}: output differs from an unstalled run"
    # Only the stalled worker's streams moved.
    assert router.metrics()[("splitserve_migrations_total", ())] == on_victim
    survivor = next(w for w in decodes if w is not victim)
    for worker in (prefill, survivor):
        wait_idle(worker, timeout=10)


def _one_request_past_a_stall(router, stalled, spare, role: str, checkpoint, rng) -> float:
    """Stalls ``stalled``, sends a remotely prefilled request that the router routes to it, then adds ``spare`` to
    the ``role`` pool: asserts the request finishes exactly; returns how long after the stall it did."""
    prompt = random_prompt(rng, 100)  # prefilled remotely: reserved on the decode worker first
    expected = greedy_ignoring_eos(checkpoint.model, prompt, 40)
    with frozen(stalled):
        stalled_at = time.monotonic()
        stream = start_stream(router.openai(), prompt, 40)
        wait_for(lambda: sum(router.decisions().values()) >= 1, 10, "the request to be routed to the stalled worker")
        router.call(lambda: router.router.pool.add(spare.address, role))
        assert stream.done.wait(STALL_BOUND_S), f"the request hung on the stalled {role} worker"
        waited = time.monotonic() - stalled_at
    assert stream.error is None, f"failed after {waited:.1f}s: {stream.error!r}"
    assert stream.ids == expected
    return waited


def test_a_reserve_on_a_stalled_decode_worker_moves_to_another(make_router, workers, checkpoint, rng):
    """A request whose Reserve waits on a stalled decode worker goes to another once the router takes the stalled
    one out, rather than failing when the Reserve's deadline passes."""
    prefill, (stalled, other) = workers
    router = make_router([prefill], [stalled], local_prefill_threshold=32)
    waited = _one_request_past_a_stall(router, stalled, other, "decode", checkpoint, rng)
    assert waited < RESERVE_TIMEOUT_S, f"moved only after {waited:.1f}s"
    for worker in (prefill, stalled, other):
        wait_idle(worker, timeout=10)


def test_a_prefill_on_a_stalled_prefill_worker_moves_to_another(make_router, workers, spare_prefill, checkpoint, rng):
    """A remote prefill waiting on a stalled prefill worker is retried on another once the router takes the stalled
    one out (its Prefill and SendTicket calls let go), not when gRPC gives up on the connection."""
    stalled, (decode, _) = workers
    router = make_router([stalled], [decode], local_prefill_threshold=32, health_interval_s=0.2)  # out in ~1.2 s
    waited = _one_request_past_a_stall(router, stalled, spare_prefill, "prefill", checkpoint, rng)
    # gRPC's ping would end the call only KEEPALIVE_TIMEOUT_MS after a ping sent once the worker stalled
    assert waited < KEEPALIVE_TIMEOUT_MS / 1000, f"retried only after {waited:.1f}s"
    print(f"the stalled prefill worker's request finished {waited:.1f}s after the stall")
    for worker in (stalled, spare_prefill, decode):
        wait_idle(worker, timeout=10)
