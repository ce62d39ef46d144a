"""KV events: a snapshot first, then STORED events with consecutive ids as blocks are cached."""

from __future__ import annotations

import grpc

from engine.block_manager import compute_block_hashes
from protos import common_pb2
from tests.workers.conftest import random_prompt
from tests.workers.harness import disaggregated, new_id, wait_idle, wire_params


def _collect_until_stored(stream, last_event_id: int, wanted: set[int]) -> list[common_pb2.KVEvent]:
    """Reads batches until every wanted hash was STORED; checks the ids run on without a gap."""
    events: list[common_pb2.KVEvent] = []
    stored: set[int] = set()
    while not wanted <= stored:
        batch = next(stream)  # the call's deadline bounds the wait
        assert not batch.snapshot, "only the first batch of a subscription is a snapshot"
        for event in batch.events:
            assert event.event_id == last_event_id + 1, f"event id {event.event_id} after {last_event_id}"
            last_event_id = event.event_id
            events.append(event)
            if event.kind == common_pb2.KVEvent.STORED:
                stored.update(event.block_hashes)
        assert batch.last_event_id == last_event_id
    return events


def test_subscription_sees_snapshot_then_stored_events(cluster, rng):
    prompt = random_prompt(rng, 70)  # 4 full blocks and a partial one
    hashes = set(compute_block_hashes(prompt, 16))
    assert len(hashes) == 4
    request = common_pb2.SubscribeKVEventsRequest()
    streams = {w.role: w.stub.SubscribeKVEvents(request, timeout=20) for w in (cluster.prefill, cluster.decode)}
    try:
        snapshots = {role: next(stream) for role, stream in streams.items()}
        for role, snapshot in snapshots.items():
            assert snapshot.snapshot, f"{role}: the first batch is not a snapshot"
            assert not hashes & set(snapshot.cached_hashes), f"{role}: a fresh prompt is cached already"

        tokens, _ = disaggregated(cluster.prefill, cluster.decode, new_id("events"), prompt, wire_params(4))
        assert len(tokens) == 4

        for role, stream in streams.items():
            events = _collect_until_stored(stream, snapshots[role].last_event_id, hashes)
            assert events[0].kind == common_pb2.KVEvent.STORED, f"{role}: {events[0]}"
    finally:
        for stream in streams.values():
            stream.cancel()

    # A new subscriber's snapshot includes the blocks, as of the latest event id.
    for worker in (cluster.prefill, cluster.decode):
        stream = worker.stub.SubscribeKVEvents(request, timeout=20)
        try:
            snapshot = next(stream)
        finally:
            stream.cancel()
        assert snapshot.snapshot and hashes <= set(snapshot.cached_hashes)
        assert snapshot.last_event_id >= snapshots[worker.role].last_event_id + 1
        wait_idle(worker)


def test_cancelled_subscription_leaves_worker_serving(cluster, rng):
    stream = cluster.decode.stub.SubscribeKVEvents(common_pb2.SubscribeKVEventsRequest(), timeout=20)
    assert next(stream).snapshot
    stream.cancel()
    try:
        next(stream)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.CANCELLED
    prompt = random_prompt(rng, 20)
    tokens, last = disaggregated(cluster.prefill, cluster.decode, new_id("after"), prompt, wire_params(3))
    assert len(tokens) == 3 and last.finish_reason == "length"
