"""A sender's commit against a busy decode engine: real in-process workers, real gRPC, real transports.

The engine thread is held inside a call (as it is inside a decode step) while a prefill worker
pushes and commits. A good commit must be accepted without it, so the prefill's first token reaches
its client at once; the KV is adopted once the engine is free, and the request decodes exactly what
transformers does. An abort queued for the engine before the verdict still frees every block once.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig
from prefill_worker.worker import PrefillWorker
from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from protos.cluster_auth import ClusterAuth
from tests.checkpoints import hf_greedy, write_checkpoint
from tests.workers.harness import wait_until

SECRET = "commit-test-secret"
MAX_TOKENS = 8
HELD_S = 60.0  # the longest the engine thread is held; every test lets it go well before
PREFILL_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("commit-tiny")
    return path, write_checkpoint(path, "LlamaForCausalLM", seed=11)


@pytest.fixture(scope="module", params=["grpc", "nixl"])
def workers(request, checkpoint):
    path, _ = checkpoint
    auth = ClusterAuth(secret=SECRET)
    config = EngineConfig(model=str(path), kv_cache_memory_bytes=4 * 1024 * 1024)
    decode = DecodeWorker(config, transport=request.param, auth=auth)
    prefill = PrefillWorker(config, transport=request.param, auth=auth)
    decode.start()
    prefill.start()
    decode.free_at_start = decode.loop.call(lambda engine: engine.allocator.num_free_blocks)
    with auth.channel(decode.address) as d_channel, auth.channel(prefill.address) as p_channel:
        yield decode, decode_pb2_grpc.DecodeWorkerStub(d_channel), prefill_pb2_grpc.PrefillWorkerStub(p_channel)
    prefill.stop()
    decode.stop()


class HeldEngine:
    """Holds the decode engine thread inside a call until released (or HELD_S)."""

    def __init__(self, decode: DecodeWorker) -> None:
        self.released = threading.Event()
        self.entered = threading.Event()
        self.done = decode.loop.submit(self._hold)
        assert self.entered.wait(10), "the engine thread never took the call"

    def _hold(self, engine) -> None:
        self.entered.set()
        self.released.wait(HELD_S)

    def release(self) -> None:
        self.released.set()
        self.done.result(10)


def params() -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


def reserve(stub, request_id: str, prompt: list[int]) -> decode_pb2.Ticket:
    return stub.Reserve(
        decode_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt, params=params()), timeout=10
    )


def prefill_with(stub, ticket, prompt: list[int]) -> prefill_pb2.PrefillResponse:
    request = prefill_pb2.PrefillRequest(
        request_id=ticket.request_id, prompt_token_ids=prompt, params=params(), ticket=ticket
    )
    return stub.Prefill(request, timeout=PREFILL_TIMEOUT_S)


def test_a_good_commit_is_accepted_while_the_engine_is_busy(workers, checkpoint):
    decode, d, p = workers
    prompt = [5 + (i * 7) % 300 for i in range(45)]  # three blocks, the last partial
    ticket = reserve(d, "busy-engine", prompt)
    held = HeldEngine(decode)
    try:
        started = time.monotonic()
        first = prefill_with(p, ticket, prompt)  # pushes every layer, then commits
        accepted_in = time.monotonic() - started
        assert not held.released.is_set(), "the commit was answered only because the engine thread was let go"
        assert decode.reservations.get("busy-engine").state.value == "committed"
    finally:
        held.release()
    assert accepted_in < PREFILL_TIMEOUT_S
    tokens = generate(d, ticket)
    assert tokens == hf_greedy(checkpoint[1], prompt, MAX_TOKENS)
    assert tokens[0] == first.first_token_id
    assert every_block_free(decode)


def test_an_abort_queued_before_the_verdict_frees_every_block_once(workers, checkpoint):
    decode, d, p = workers
    prompt = [9 + (i * 13) % 300 for i in range(40)]
    ticket = reserve(d, "aborted-meanwhile", prompt)
    held = HeldEngine(decode)
    with ThreadPoolExecutor(1) as pool:
        try:
            abort = pool.submit(
                d.Abort, common_pb2.AbortRequest(request_id="aborted-meanwhile", token=ticket.token), timeout=30
            )
            wait_until(lambda: decode.loop._calls.qsize() == 1, 10, what="the abort queued for the engine thread")
            prefill_with(p, ticket, prompt)  # accepted at once: the abort has not run yet
        finally:
            held.release()
        assert abort.result(30).found
    wait_until(
        lambda: decode.reservations.get("aborted-meanwhile") is None or _ended(decode, "aborted-meanwhile"),
        10,
        what="the aborted reservation's end",
    )
    assert "aborted-meanwhile" not in decode.engine.requests and every_block_free(decode)
    # The worker serves on: the same prompt, reserved and sent again, decodes what transformers does.
    again = reserve(d, "after-the-abort", prompt)
    prefill_with(p, again, prompt)
    assert generate(d, again) == hf_greedy(checkpoint[1], prompt, MAX_TOKENS)
    assert every_block_free(decode)


def generate(stub, ticket) -> list[int]:
    request = decode_pb2.GenerateRequest(request_id=ticket.request_id, reserved=True, token=ticket.token)
    return [t for output in stub.Generate(request, timeout=30) for t in output.token_ids]


def every_block_free(decode: DecodeWorker) -> bool:
    """No request or reservation holds a block (cached blocks nobody holds count as free)."""
    wait_until(lambda: not decode.engine.requests, 10, what="no request left on the engine")
    return decode.loop.call(lambda engine: engine.allocator.num_free_blocks) == decode.free_at_start


def _ended(decode: DecodeWorker, request_id: str) -> bool:
    record = decode.reservations.get(request_id)
    return record is not None and record.ended_at is not None
