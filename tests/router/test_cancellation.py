"""Clients that go away where the other tests do not look: the work stops, every KV block returns, the router's counts
come back to zero, and the requests beside them keep their exact output.

- A client that leaves while its decode worker's engine is in a step (a long prompt prefilled there): the worker's
  Generate call ended before the worker could hook the call's end, and its request decoded on to max_tokens for
  nobody.
- A queued client that leaves in the turn its slot comes: ``wait_for`` handed the request the slot and swallowed its
  cancellation, so it ran to its end for nobody, holding the slot (and its HTTP handler waited for it).
- A guard of what held already: a chat of n=2 not streamed and a gRPC call past its deadline, mid-decode, stop on
  every worker within STOPPED_WITHIN_S.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

import grpc
import httpx
import pytest

from protos import common_pb2, generate_pb2, generate_pb2_grpc
from router.frontend import Admission
from router.metrics import RouterMetrics
from tests.router.conftest import (
    MAX_MODEL_LEN,
    SERVED_MODEL,
    complete_ids,
    greedy_ignoring_eos,
    metric_sum,
    random_prompt,
    wait_for,
)
from tests.workers.harness import wait_idle

LONG_PROMPT = MAX_MODEL_LEN - 48  # prefilled in one engine step of the decode worker: the step that holds it
LONG_OUTPUT = MAX_MODEL_LEN - 64  # seconds of decoding: only a cancellation ends it this soon
STOPPED_WITHIN_S = 2.0


def _post_and_leave(router, path: str, body: dict, stay: Callable[[], object]) -> None:
    """POSTs ``body`` and closes the socket once ``stay()`` returns, whatever came back meanwhile."""
    data = httpx.Request("POST", "/", json=body).read()
    with socket.create_connection(("127.0.0.1", router.router.http_port)) as client:
        head = f"POST {path} HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\ncontent-length: "
        client.sendall(f"{head}{len(data)}\r\n\r\n".encode() + data)
        stay()


def _call_until_deadline(router, request: generate_pb2.CompletionRequest, deadline_s: float) -> None:
    with grpc.insecure_channel(router.grpc) as channel:
        call = generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=deadline_s)
        with pytest.raises(grpc.RpcError) as ended:
            for _ in call:
                pass
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def _http_client_leaves(router, prompt: list[int]) -> None:
    """A completion not streamed, whose client closes its socket before the router's next look (every 0.5 s)."""
    body = {"model": SERVED_MODEL, "prompt": [prompt], "max_tokens": LONG_OUTPUT, "temperature": 0, "ignore_eos": True}
    _post_and_leave(router, "/v1/completions", body, lambda: time.sleep(0.3))


def _grpc_client_cancels(router, prompt: list[int]) -> None:
    """A streamed completion over gRPC, cancelled as soon as the router has opened its decode call."""
    request = generate_pb2.CompletionRequest(
        token_ids=generate_pb2.TokenIds(ids=prompt),
        params=common_pb2.SamplingParams(max_tokens=LONG_OUTPUT, temperature=0, ignore_eos=True),
    )
    with grpc.insecure_channel(router.grpc) as channel:
        call = generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=60)
        time.sleep(0.05)
        call.cancel()


@pytest.mark.parametrize("leave", [_http_client_leaves, _grpc_client_cancels], ids=["http", "grpc"])
def test_a_client_that_leaves_while_the_decode_engine_steps_stops_its_request(
    make_router, cluster, checkpoint, rng, leave
):
    """Aggregated: the decode worker prefills a long prompt in one step; meanwhile a client sends a short prompt and
    leaves. Its Generate call reaches the worker and is cancelled while the worker waits for the step to add the
    request: once the step ends, the request must go too, not decode LONG_OUTPUT tokens."""
    router = make_router([], [cluster.decode])
    decode = cluster.decode
    long_prompt = random_prompt(rng, LONG_PROMPT)
    holder: list[list[int]] = []
    held = threading.Thread(target=lambda: holder.append(complete_ids(router, long_prompt, 2)), daemon=True)
    sent = time.monotonic()
    held.start()
    # Routed (a count that stays), not in flight (a state a fast machine's step may end before the first look).
    wait_for(lambda: sum(router.decisions().values()) == 1, 10, "the long prompt to be routed to the decode worker")
    leave(router, random_prompt(rng, 8))
    held.join(30)
    step_ended = time.monotonic()
    assert holder == [greedy_ignoring_eos(checkpoint.model, long_prompt, 2)], "the request beside it changed"
    # The worker's stats come from its last step's end: a while past it, a request still decoding shows.
    time.sleep(0.5)
    wait_idle(decode, STOPPED_WITHIN_S)
    print(f"long prompt answered in {step_ended - sent:.2f} s; decode idle {time.monotonic() - step_ended:.2f} s later")
    wait_for(lambda: router.running() == 0, 2, "the router to release the slot")
    assert router.worker_active() == {decode.address: 0}
    prompt = random_prompt(rng, 40)
    assert complete_ids(router, prompt, 8) == greedy_ignoring_eos(checkpoint.model, prompt, 8)


def test_a_queued_client_that_leaves_as_its_slot_comes_is_not_admitted():
    async def scenario():
        admission = Admission(max_running=1, max_queued=1, queue_timeout_s=30, metrics=RouterMetrics())
        release, admitted = asyncio.Event(), []

        async def hold():
            async with admission.slot():
                await release.wait()
            queued.cancel()  # its client left: in the very turn the slot it waits for comes free

        async def wait_in_queue():
            async with admission.slot():
                admitted.append(True)
                await asyncio.sleep(3600)  # a generation for nobody

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        queued = asyncio.create_task(wait_in_queue())
        await asyncio.sleep(0)
        assert (admission.running, admission.waiting) == (1, 1)
        release.set()
        await holder
        await asyncio.wait({queued}, timeout=1)
        try:
            assert queued.cancelled() and not admitted, "a request whose client left was admitted"
            assert (admission.running, admission.waiting) == (0, 0)
            async with asyncio.timeout(1), admission.slot():  # the slot is free for the next request
                pass
        finally:
            queued.cancel()

    asyncio.run(scenario())


def test_whole_completions_and_grpc_calls_stop_within_seconds_of_their_clients(router, cluster, rng):
    """A guard (this held already): remotely prefilled, mid-decode, a chat of n=2 not streamed whose client closes its
    socket, and a gRPC call whose deadline passes, each stop on every worker within STOPPED_WITHIN_S, and the router's
    gauges come back to zero."""
    chat = {"model": SERVED_MODEL, "messages": [{"role": "user", "content": f"go on {rng.random()} " * 4}], "n": 2}
    chat |= {"max_tokens": MAX_MODEL_LEN - 256, "temperature": 0, "ignore_eos": True}  # room for the chat template

    def leave_chat():
        both = lambda: cluster.decode.stats().running == 2
        _post_and_leave(router, "/v1/chat/completions", chat, lambda: wait_for(both, 30, "both choices to decode"))

    request = generate_pb2.CompletionRequest(
        token_ids=generate_pb2.TokenIds(ids=random_prompt(rng, 64)),
        params=common_pb2.SamplingParams(max_tokens=LONG_OUTPUT, temperature=0, ignore_eos=True),
    )
    leave_grpc = lambda: _call_until_deadline(router, request, 0.5)
    for leave in (leave_chat, leave_grpc):
        routed = router.decisions().get("remote_prefill", 0)
        leave()
        left = time.monotonic()
        for worker in cluster.workers:
            wait_idle(worker, STOPPED_WITHIN_S - (time.monotonic() - left))
        assert router.decisions().get("remote_prefill", 0) > routed
    wait_for(lambda: router.running() == 0, 1, "the router to release every slot")
    samples = router.metrics()
    assert metric_sum(samples, "splitserve_running_requests") == metric_sum(samples, "splitserve_queue_depth") == 0
    assert set(router.worker_active().values()) == {0}
