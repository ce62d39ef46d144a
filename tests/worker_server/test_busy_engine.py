"""A call that ends while a worker's engine is busy: gRPC runs a call's end (its callbacks) on the one server thread
that takes every call's events, so that thread must not wait there for the engine's step (or for anything else).
Real in-process workers, real gRPC.

The engine thread is held inside a call (as it is inside a long step) while a client leaves its Generate (decode
worker) or its Prefill (prefill worker): another call is still answered at once, and the request is stopped, its
blocks freed, once the engine is free.
"""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig
from prefill_worker.worker import PrefillWorker
from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from protos.cluster_auth import ClusterAuth
from tests.checkpoints import write_checkpoint
from tests.decode_worker.test_commit import HeldEngine
from tests.workers.harness import wait_until

SECRET = "busy-engine-secret"
PROMPT = list(range(3, 40))


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> EngineConfig:
    path = tmp_path_factory.mktemp("busy-tiny")
    write_checkpoint(path, "LlamaForCausalLM", seed=12)
    return EngineConfig(model=str(path), kv_cache_memory_bytes=4 * 1024 * 1024)


@pytest.fixture(params=["decode", "prefill"])
def worker(request, config):
    worker_class = DecodeWorker if request.param == "decode" else PrefillWorker
    worker = worker_class(config, auth=ClusterAuth(secret=SECRET))
    worker.start()
    worker.free_at_start = worker.loop.call(lambda engine: engine.allocator.num_free_blocks)
    yield worker
    worker.stop()


def _start_call(worker, channel):
    """A call that stays open: a long Generate that has begun decoding, or a Prefill still waiting for its ticket."""
    if isinstance(worker, DecodeWorker):
        params = common_pb2.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        request = decode_pb2.GenerateRequest(request_id="leaves", prompt_token_ids=PROMPT, params=params)
        stream = decode_pb2_grpc.DecodeWorkerStub(channel).Generate(request, timeout=60)
        assert next(stream).token_ids
        return stream
    request = prefill_pb2.PrefillRequest(
        request_id="leaves",
        prompt_token_ids=PROMPT,
        params=common_pb2.SamplingParams(max_tokens=1),
        ticket_follows=True,
    )
    call = prefill_pb2_grpc.PrefillWorkerStub(channel).Prefill.future(request, timeout=60)
    wait_until(lambda: worker.transfer_state()[0] == 1, 10, what="the prefill to wait for its ticket")
    return call


def test_a_client_leaving_while_the_engine_is_busy_holds_up_no_other_call(worker):
    with ClusterAuth(secret=SECRET).channel(worker.address) as channel:
        call = _start_call(worker, channel)
        held = HeldEngine(worker)
        try:
            call.cancel()  # the client leaves while the engine is inside a step
            time.sleep(0.3)  # the worker sees the call end
            start = time.monotonic()
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            except grpc.RpcError as exc:
                pytest.fail(f"another call got no answer while the engine was busy: {exc.code().name}")
            answered_in = time.monotonic() - start
            assert not held.done.done(), "the engine was let go before the check: the test proves nothing"
        finally:
            held.release()
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert answered_in < 2.0, f"another call waited {answered_in:.1f} s for the engine's step"
    wait_until(
        lambda: "leaves" not in worker.engine.requests and worker.transfer_state()[0] == 0,
        10,
        what="the request stopped",
    )
    wait_until(
        lambda: worker.loop.call(lambda engine: engine.allocator.num_free_blocks) == worker.free_at_start,
        10,
        what="every block free",
    )


def test_a_prefill_whose_client_left_while_it_waited_for_the_engine_computes_nothing(config):
    """A long prompt's step holds the engine for seconds; a Prefill whose client left meanwhile was added once the
    step ended, and its cancel (registered too late, so never run) never came: the worker computed it for nobody.
    Now its start sees the call gone, nothing is added, and the outcome counts as cancelled, not as a failure."""
    worker = PrefillWorker(config, auth=ClusterAuth(secret=SECRET))
    worker.start()
    try:
        before = worker.counters.snapshot()
        with ClusterAuth(secret=SECRET).channel(worker.address) as channel:
            held = HeldEngine(worker)
            try:
                request = prefill_pb2.PrefillRequest(
                    request_id="gone",
                    prompt_token_ids=PROMPT,
                    params=common_pb2.SamplingParams(max_tokens=1),
                    ticket_follows=True,
                )
                call = prefill_pb2_grpc.PrefillWorkerStub(channel).Prefill.future(request, timeout=0.5)
                assert call.exception(10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
            finally:
                held.release()
        wait_until(lambda: worker.counters.snapshot()["kv_transfers_cancelled"] == 1, 10, what="the start refused")
        after = worker.counters.snapshot()
        assert after["prompt_tokens"] == before["prompt_tokens"], "the prompt was computed for nobody"
        assert after["kv_transfers_failed"] == before["kv_transfers_failed"]
        assert "gone" not in worker.engine.requests and worker.transfer_state()[0] == 0
    finally:
        worker.stop()
