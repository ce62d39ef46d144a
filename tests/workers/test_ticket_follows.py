"""A prefill started before the decode worker reserved (``ticket_follows``): the prefill worker
computes at once, holds what it computed, and pushes it all when SendTicket brings the ticket.

The output must equal transformers' (or the decode worker's own prefill) whenever the ticket comes:
after the prompt was computed, in the middle of a chunked prompt, or before the Prefill call. A ticket
that never comes, or a client that leaves, returns every block."""

from __future__ import annotations

import time

import grpc
import pytest

from protos import decode_pb2, prefill_pb2
from tests.checkpoints import hf_greedy
from tests.workers.conftest import random_prompt
from tests.workers.harness import aggregated, claim, new_id, reserve, rpc_error, wait_idle, wait_until, wire_params

MAX_TOKENS = 8


def prefill_follows(prefill, request_id: str, prompt: list[int], params, timeout: float = 60):
    request = prefill_pb2.PrefillRequest(
        request_id=request_id, prompt_token_ids=prompt, params=params, ticket_follows=True
    )
    return prefill.stub.Prefill.future(request, timeout=timeout)


def send_ticket(prefill, request_id: str, ticket: decode_pb2.Ticket) -> None:
    prefill.stub.SendTicket(prefill_pb2.TicketDelivery(request_id=request_id, ticket=ticket), timeout=10)


def decode_all(decode, request_id: str, first: prefill_pb2.PrefillResponse) -> list[int]:
    tokens = [t for response in claim(decode, request_id) for t in response.token_ids]
    assert tokens and tokens[0] == first.first_token_id
    return tokens


def test_ticket_after_the_prompt_was_computed(cluster, checkpoints, rng):
    prefill, decode = cluster.prefill, cluster.decode
    prompt = random_prompt(rng, 150)  # 10 blocks, one partial
    params = wire_params(MAX_TOKENS)
    request_id = new_id("late")
    pending = prefill_follows(prefill, request_id, prompt, params)

    # The engine is done with the prompt (its first token is sampled), but its blocks stay held for the push.
    held = wait_until(
        lambda: (s := prefill.stats()).running == 0 and s.waiting == 0 and s.kv_blocks_used > 0 and s,
        30,
        what="the prompt computed and its blocks held",
    )
    assert held.kv_blocks_used >= 10
    assert not pending.done(), "the prefill answered before its ticket came"

    ticket = reserve(decode, request_id, prompt, params)
    send_ticket(prefill, request_id, ticket)
    first = pending.result(60)
    assert decode_all(decode, request_id, first) == hf_greedy(checkpoints.tiny_model, prompt, MAX_TOKENS)
    assert first.kv_bytes_sent > 0
    wait_idle(prefill)
    wait_idle(decode)


def test_ticket_before_the_prefill_and_with_a_cached_prefix(cluster, checkpoints, rng):
    prefill, decode = cluster.prefill, cluster.decode
    shared = random_prompt(rng, 64)  # 4 full blocks D will have cached
    params = wire_params(MAX_TOKENS)
    warm = shared + random_prompt(rng, 20)
    assert aggregated(decode, new_id("warm"), warm, params) == hf_greedy(checkpoints.tiny_model, warm, MAX_TOKENS)

    prompt = shared + random_prompt(rng, 41)
    request_id = new_id("early")
    ticket = reserve(decode, request_id, prompt, params)
    assert ticket.num_cached_tokens == 64
    send_ticket(prefill, request_id, ticket)  # before the Prefill call itself
    first = prefill_follows(prefill, request_id, prompt, params).result(60)
    assert decode_all(decode, request_id, first) == hf_greedy(checkpoints.tiny_model, prompt, MAX_TOKENS)
    wait_idle(prefill)
    wait_idle(decode)


def test_ticket_in_the_middle_of_a_chunked_prompt(cluster, checkpoints, rng):
    """The slow pair prefills in 128-token chunks (~1 s for 1,500 tokens): the ticket comes after some
    chunks are computed, so their layers go at once and the rest layer by layer."""
    import transformers

    prefill, decode = cluster.slow_prefill, cluster.slow_decode
    prompt = random_prompt(rng, 900)
    params = wire_params(MAX_TOKENS)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(checkpoints.slow, torch_dtype="float32").eval()
    expected = hf_greedy(oracle, prompt, MAX_TOKENS)

    request_id = new_id("mid")
    pending = prefill_follows(prefill, request_id, prompt, params)
    wait_until(lambda: prefill.stats().running > 0, 30, interval=0.01, what="the prefill to start")
    time.sleep(0.2)  # a few chunks in
    assert not pending.done()
    ticket = reserve(decode, request_id, prompt, params, lease_ms=10_000)
    send_ticket(prefill, request_id, ticket)
    first = pending.result(60)
    assert decode_all(decode, request_id, first) == expected
    wait_idle(prefill)
    wait_idle(decode)


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_a_ticket_that_never_comes_returns_every_block(cluster, rng, how):
    prefill = cluster.prefill
    prompt = random_prompt(rng, 100)
    pending = prefill_follows(prefill, new_id(how), prompt, wire_params(4), timeout=5 if how == "deadline" else 60)
    wait_until(lambda: prefill.stats().kv_blocks_used > 0 and prefill.stats().running == 0, 30, what="blocks held")
    if how == "cancel":
        pending.cancel()
    else:
        assert rpc_error(pending.result).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(prefill)


def test_ticket_calls_that_are_wrong(cluster, checkpoints, rng):
    prefill, decode = cluster.prefill, cluster.decode
    prompt = random_prompt(rng, 40)
    params = wire_params(4)
    request_id = new_id("both")
    ticket = reserve(decode, request_id, prompt, params)
    both = prefill_pb2.PrefillRequest(
        request_id=request_id, prompt_token_ids=prompt, params=params, ticket=ticket, ticket_follows=True
    )
    error = rpc_error(prefill.stub.Prefill, both, timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "ticket_follows" in error.details()

    empty = rpc_error(prefill.stub.SendTicket, prefill_pb2.TicketDelivery(request_id=request_id), timeout=10)
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT and "ticket" in empty.details()

    send_ticket(prefill, request_id, ticket)
    twice = rpc_error(send_ticket, prefill, request_id, ticket)
    assert twice.code() == grpc.StatusCode.ALREADY_EXISTS

    # A ticket that does not fit the prompt fails the prefill by name, and frees what it computed.
    short = decode_pb2.Ticket()
    short.CopyFrom(ticket)
    del short.block_ids[-1]
    other = new_id("short")
    send_ticket(prefill, other, short)
    miscounted = rpc_error(prefill_follows(prefill, other, prompt, params).result)
    assert miscounted.code() == grpc.StatusCode.INVALID_ARGUMENT and "blocks" in miscounted.details()
    # The first request's ticket waits in its slot for its own (late) prefill, which then succeeds.
    first = prefill_follows(prefill, request_id, prompt, params).result(60)
    assert decode_all(decode, request_id, first) == hf_greedy(checkpoints.tiny_model, prompt, 4)
    wait_idle(prefill)
    wait_idle(decode)
