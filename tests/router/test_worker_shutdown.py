"""A `splitserve worker` run by hand (a systemd unit, a Kubernetes Deployment of workers) stopped by SIGTERM drains:
its Stats say draining, so routers send it no new work, and what is in flight finishes there (no migration, nothing
recomputed) before it exits, within its --shutdown-grace; a second signal stops it at once. It used to stop in 1 s,
its streams migrated elsewhere or failed. A worker that comes back at the same address is routed to again."""

from __future__ import annotations

import contextlib
import signal
import time

import openai
import pytest

from tests.router.conftest import SERVED_MODEL, metric_sum
from tests.router.test_shutdown import MAX_TOKENS, StreamingClient
from tests.workers.harness import start_worker, stop_workers, wait_idle, wait_until

GRACE_S = 120  # longer than the stream: the drain must not lean on it


def _decode(checkpoint, grace: float = GRACE_S):
    return start_worker("decode", str(checkpoint.path), "grpc", "--shutdown-grace", str(grace))


def _prompt(rng) -> str:
    return " ".join(str(rng.randrange(1000)) for _ in range(12))


@contextlib.contextmanager
def _stopped_with_a_stream(checkpoint, cluster, make_router, rng):
    """(decode worker, router, stream): a router's only decode worker, SIGTERMed with a long stream in flight."""
    decode = _decode(checkpoint)
    try:
        router = make_router(cluster.prefills, [decode])
        stream = StreamingClient(router.http, _prompt(rng))
        stream.start()
        assert stream.first_chunk.wait(30) and stream.error is None, stream.error
        decode.process.terminate()
        yield decode, router, stream
    finally:
        stop_workers([decode])


def test_a_worker_stopped_by_sigterm_finishes_its_streams_and_takes_no_new_work(checkpoint, cluster, make_router, rng):
    with _stopped_with_a_stream(checkpoint, cluster, make_router, rng) as (decode, router, stream):
        handle = router.router.pool.workers[decode.address]
        wait_until(lambda: router.call(lambda: handle.draining), 10, what="the router to see it draining")
        client = router.openai()
        with pytest.raises(openai.APIStatusError) as refused:  # the only decode worker takes no new work
            client.completions.create(model=SERVED_MODEL, prompt=_prompt(rng), max_tokens=2)
        assert refused.value.status_code == 503 and "draining" in str(refused.value), refused.value
        assert decode.process.poll() is None, "the worker stopped with a stream in flight"
        stream.join(GRACE_S)
        assert stream.error is None and stream.finish_reason == "length", stream.error
        assert stream.usage.completion_tokens == MAX_TOKENS
        assert metric_sum(router.metrics(), "splitserve_migrations_total") == 0  # it finished where it was
        assert decode.process.wait(15) == 0
        assert any("draining" in line for line in decode.log_lines), decode.log_lines


def test_a_second_signal_stops_a_draining_worker_at_once(checkpoint, cluster, make_router, rng):
    with _stopped_with_a_stream(checkpoint, cluster, make_router, rng) as (decode, _, stream):
        wait_until(lambda: any("draining" in line for line in decode.log_lines), 10, what="the worker to say it drains")
        began = time.monotonic()
        decode.process.send_signal(signal.SIGTERM)
        decode.process.wait(15)
        assert time.monotonic() - began < 10
        stream.join(30)
        assert stream.error is not None, "the stream claimed to finish on a stopped worker"


def test_a_worker_back_at_its_address_after_a_drain_is_routed_to_again(checkpoint, cluster, make_router):
    decode = _decode(checkpoint, grace=5)
    router = make_router(cluster.prefills, [decode], health_interval_s=0.2)
    address = decode.address
    decode.process.terminate()
    assert decode.process.wait(15) == 0
    port = address.rsplit(":", 1)[1]
    again = start_worker("decode", str(checkpoint.path), "grpc", "--port", port)
    try:
        wait_until(lambda: router.call(lambda: router.router.pool.workers[address].available), 15, what="routed again")
        out = router.openai().completions.create(model=SERVED_MODEL, prompt="1 2 3", max_tokens=2, temperature=0)
        assert out.usage.completion_tokens == 2
        wait_idle(again)
    finally:
        stop_workers([again])
