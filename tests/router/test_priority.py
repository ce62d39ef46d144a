"""--scheduling-policy priority (vLLM's `priority`: lower goes first): a slot that frees goes to the queued request
with the lowest priority, then to the earliest; under the default fcfs a request that sets one is refused by name,
over HTTP and gRPC. A queued request that leaves (its client gone, its queue timeout) hands on nothing and loses no
slot. The workers' queues are ordered the same way (the engine's order: tests/engine/test_priority.py)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from protos import common_pb2, generate_pb2, generate_pb2_grpc
from tests.router.conftest import MAX_MODEL_LEN, SERVED_MODEL, random_prompt, start_stream, wait_for
from tests.router.test_errors import assert_error, post
from tests.workers.harness import start_worker


def _queued(router) -> int:
    return router.router.frontend.admission.waiting


def _send_in_turn(client, rng, requests, prompt_tokens: int, max_tokens: int, waiting, where: str):
    """Streams a completion per (name, priority) of ``requests``, each on a thread of its own, the next sent once
    ``waiting()`` counts the one before as waiting (in the ``where`` named); when each gave its first token, by name,
    and the threads."""
    first_token_at: dict[str, float] = {}

    def send(name: str, priority: int) -> None:
        chunks = client.completions.create(
            model=SERVED_MODEL,
            prompt=[random_prompt(rng, prompt_tokens)],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"priority": priority, "ignore_eos": True},
        )
        for _ in chunks:
            first_token_at.setdefault(name, time.monotonic())

    threads = []
    for count, (name, priority) in enumerate(requests):
        threads.append(threading.Thread(target=send, args=(name, priority), daemon=True))
        threads[-1].start()
        wait_for(lambda n=count + 1: waiting() == n, 10, f"{name} to {where}")
    return first_token_at, threads


def test_a_freed_slot_goes_to_the_lowest_priority_then_the_earliest(make_router, cluster, rng):
    router = make_router(cluster.prefills, [cluster.decode], max_running=1, max_queued=8, scheduling_policy="priority")
    client = router.openai()
    holder = start_stream(client, random_prompt(rng, 8), MAX_MODEL_LEN - 64)  # holds the only slot till it leaves
    wait_for(lambda: holder.ids, 30, "the first request to run")
    order = [("late-5", 5), ("one", 1), ("three", 3), ("one-again", 1), ("neg", -2)]
    first_token_at, threads = _send_in_turn(client, rng, order, 8, 12, lambda: _queued(router), "queue")
    assert not holder.done.is_set(), "the first request ended before the queue filled"
    holder.leave.set()
    for thread in threads:
        thread.join(60)
    assert holder.error is None and len(first_token_at) == 5
    assert sorted(first_token_at, key=first_token_at.get) == ["neg", "one", "one-again", "three", "late-5"]


def test_a_request_that_leaves_the_queue_loses_no_slot(make_router, cluster, rng):
    router = make_router(
        cluster.prefills,
        [cluster.decode],
        max_running=1,
        max_queued=4,
        queue_timeout_s=0.3,
        scheduling_policy="priority",
    )
    client = router.openai()
    holder = start_stream(client, random_prompt(rng, 8), MAX_MODEL_LEN - 64)  # holds the only slot till it leaves
    wait_for(lambda: holder.ids, 30, "the first request to run")
    body = {"model": SERVED_MODEL, "prompt": "wait", "max_tokens": 2, "priority": 1}
    assert_error(post(router, "/v1/completions", body), 503)  # waited 0.3 s: its queue timeout
    assert not holder.done.is_set(), "the first request ended before the other timed out"
    assert _queued(router) == 0
    holder.leave.set()
    assert holder.done.wait(60) and holder.error is None
    for _ in range(3):  # the slot is free again, each time
        assert post(router, "/v1/completions", body).status_code == 200
    assert router.router.frontend.admission.running == 0


def test_without_the_priority_policy_a_priority_is_refused_by_name(router):
    body = {"model": SERVED_MODEL, "prompt": "first", "max_tokens": 2}
    assert post(router, "/v1/completions", {**body, "priority": 0}).status_code == 200  # the default asks nothing
    error = assert_error(post(router, "/v1/completions", {**body, "priority": 3}), 400, param="priority")
    assert "--scheduling-policy priority" in error["message"]
    chat = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "priority": -1}
    assert_error(post(router, "/v1/chat/completions", chat), 400, param="priority")
    with grpc.insecure_channel(router.grpc) as channel:
        request = generate_pb2.CompletionRequest(
            text="first", params=common_pb2.SamplingParams(max_tokens=2), priority=2
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority" in refused.value.details()


def test_priorities_out_of_grpcs_range_are_refused(make_router, cluster):
    router = make_router(cluster.prefills, [cluster.decode], scheduling_policy="priority")
    body = {"model": SERVED_MODEL, "prompt": "range", "max_tokens": 2}
    assert post(router, "/v1/completions", {**body, "priority": (1 << 31) - 1}).status_code == 200
    for value in (1 << 31, -(1 << 31) - 1, 1 << 80):
        assert_error(post(router, "/v1/completions", {**body, "priority": value}), 400, param="priority")
    with grpc.insecure_channel(router.grpc) as channel:
        request = generate_pb2.CompletionRequest(
            text="range", params=common_pb2.SamplingParams(max_tokens=2), priority=-7
        )
        chunks = list(generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=30))
    assert chunks[-1].usage.completion_tokens == 2


@pytest.mark.parametrize("path", ["local", "remote"])
def test_requests_waiting_in_a_workers_queue_are_served_by_priority(make_router, checkpoint, cluster, rng, path):
    """With the router's queue open (its default max_running), requests wait in the worker's own queue instead: a
    decode worker that prefills them itself (local), or a prefill worker (remote), each taking one request at a
    time. The request sent second, with the lower priority value, is served first there."""
    flags = ("--max-num-seqs", "1")
    if path == "remote":  # a long prompt's prefill holds the worker for some 500 steps
        flags += ("--max-num-batched-tokens", "4")
    worker = start_worker("decode" if path == "local" else "prefill", str(checkpoint.path), "grpc", *flags)
    try:
        prefills, decode = ([], worker) if path == "local" else ([worker], cluster.decode)
        router = make_router(prefills, [decode], scheduling_policy="priority", local_prefill_threshold=0)
        client = router.openai()
        if path == "local":  # decodes until its client leaves, once the others wait
            holder = start_stream(client, random_prompt(rng, 8), MAX_MODEL_LEN - 64)
        else:
            holder = start_stream(client, random_prompt(rng, MAX_MODEL_LEN - 64), 2)  # prefills while they wait
        wait_for(lambda: worker.stats().running == 1, 30, "the first request to run on the worker")
        waiting = lambda: worker.stats().waiting
        first_token_at, threads = _send_in_turn(
            client, rng, [("five", 5), ("minus-five", -5)], 40, 4, waiting, "wait on the worker"
        )
        assert worker.stats().running == 1, "the first request ended before the others queued"
        holder.leave.set()
        for thread in threads:
            thread.join(60)
        assert holder.done.wait(60) and holder.error is None
        assert sorted(first_token_at, key=first_token_at.get) == ["minus-five", "five"]
    finally:
        worker.stop()
