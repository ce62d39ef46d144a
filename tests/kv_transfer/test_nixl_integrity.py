"""Integrity over NIXL, real agents on loopback: each layer's WRITE is posted first, its source hashed
while it moves, and its notification (with the digest) sent once it is final; the receiver verifies
the landed regions in place. A byte flipped in a landed region is caught, the reservation stops,
the sender is refused and nothing of the session is left in flight.

The "flip" plays corruption on the wire: it changes the receiver's pool after the WRITE landed and
before the receiver looks at it, which is exactly what a bad link or a stray write would leave.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest
import torch

from engine.kv_cache import KVLayout, PagedKVCache
from kv_transfer.errors import TransferError
from kv_transfer.inbox import KVInbox
from kv_transfer.integrity import region_checksum
from kv_transfer.layout import layout_message
from kv_transfer.nixl_transport import NixlKVSender, NixlReceiver
from kv_transfer.receiver_service import KVReceiverService
from protos import decode_pb2
from tests.kv_transfer.receiver_server import loopback_ticket, serve_kv_receiver

pytestmark = pytest.mark.timeout(120)

LAYOUT = KVLayout(num_layers=4, num_blocks=24, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")
SRC_BLOCKS = [3, 4, 5, 6, 11, 0, 1]  # runs and strays, as a used pool hands them out
DST_BLOCKS = [9, 10, 11, 2, 3, 4, 20]
FINGERPRINT = "fingerprint"  # the model every Receiver and its senders claim


class FlippingInbox(KVInbox):
    """An inbox that flips one byte of a landed region of ``flip_layer`` before verifying it."""

    flip_layer: int | None = None

    def landed(self, request_id, pieces) -> None:
        for layer, block_ids, expected_checksum in pieces:
            self.checksums_seen.append((layer, expected_checksum))
            if layer == self.flip_layer:
                region = self.cache.regions[layer, block_ids[len(block_ids) // 2]]
                region[self.cache.layout.region_bytes // 3] ^= 0x10
        super().landed(request_id, pieces)


class Receiver:
    """A decode worker's KV side in miniature; the owner's callbacks only record what they were told."""

    def __init__(
        self,
        layout: KVLayout = LAYOUT,
        blocks: list[int] = DST_BLOCKS,
        name: str = "integrity-receiver",
        port: int = 0,
        instance_id: str = "instance-1",
    ) -> None:
        self.cache = PagedKVCache(layout)
        self.instance_id = instance_id
        self.blocks = blocks
        self.committed: list[str] = []
        self.aborts: list[tuple[str, str, bool]] = []
        self.inbox = FlippingInbox(self.cache, self._on_commit, self._on_abort)
        self.inbox.checksums_seen = []
        self.nixl = NixlReceiver(name, self.cache, self.inbox)
        self.layout = layout_message(layout, FINGERPRINT)
        service = KVReceiverService(self.inbox, self.layout, instance_id, self.nixl)
        self.server, self.address = serve_kv_receiver(service, port=port)

    def _on_commit(self, request_id, first_token_id, logprob) -> None:
        self.committed.append(request_id)

    def _on_abort(self, request_id, reason, sender_stopped) -> None:
        """As the reservation state machine does: the gate shuts at the first word of trouble."""
        self.aborts.append((request_id, reason, sender_stopped))
        self.inbox.close(request_id, reason)

    def ticket(self, request_id: str) -> decode_pb2.Ticket:
        ticket = loopback_ticket(request_id, "nixl", self.address, self.layout, self.blocks)
        ticket.instance_id = self.instance_id
        return ticket

    def stop(self) -> None:
        self.server.stop(0).wait()
        self.nixl.close()


@contextmanager
def nixl_pair(layout: KVLayout = LAYOUT, blocks: list[int] = DST_BLOCKS, sender_name: str = "integrity-sender", seed=5):
    """A receiver on ``blocks``, a source pool of random KV and a checksumming NIXL sender to it."""
    receiver = Receiver(layout, blocks)
    source = PagedKVCache(layout)
    source.data.copy_(torch.randn(source.data.shape, generator=torch.Generator().manual_seed(seed)))
    sender = NixlKVSender(receiver.layout, "prefill", source, sender_name, verify=True)
    try:
        yield receiver, source, sender
    finally:
        sender.close()
        receiver.stop()


@pytest.fixture
def pair():
    with nixl_pair() as made:
        yield made


def _push_all(session, source: PagedKVCache) -> None:
    for layer in range(LAYOUT.num_layers):
        session.push_layer(source, layer, SRC_BLOCKS, DST_BLOCKS)


def transfer(receiver: Receiver, sender: NixlKVSender, source: PagedKVCache, request_id: str) -> None:
    """One whole request, as a prefill worker sends it: landing opened, every layer pushed, committed, closed."""
    receiver.inbox.open(request_id, DST_BLOCKS)
    session = sender.open(request_id, receiver.ticket(request_id))
    _push_all(session, source)
    session.commit(first_token_id=1, first_logprob=None, timeout=30)
    session.close(10)


def commit_fails_within(
    receiver: Receiver, sender: NixlKVSender, source: PagedKVCache, request_id: str, seconds: float
) -> TransferError:
    """Every layer pushed, then a commit that must fail within ``seconds`` (not wait out the receiver's
    timeout); the session is then aborted and closed, as the prefill worker does. Returns the failure."""
    receiver.inbox.open(request_id, DST_BLOCKS)
    session = sender.open(request_id, receiver.ticket(request_id))
    _push_all(session, source)
    began = time.monotonic()
    with pytest.raises(TransferError) as failed:
        session.commit(first_token_id=1, first_logprob=None, timeout=30)
    assert time.monotonic() - began < seconds, "the commit waited for the receiver's timeout instead of failing"
    session.abort(str(failed.value))
    session.close(10)
    return failed.value


def test_every_layer_lands_exact_and_verified_against_the_senders_digest(pair):
    receiver, source, sender = pair
    transfer(receiver, sender, source, "ok")

    assert receiver.committed == ["ok"] and not receiver.aborts
    assert torch.equal(receiver.cache.data[:, DST_BLOCKS], source.data[:, SRC_BLOCKS])
    expected = {layer: region_checksum(source, layer, SRC_BLOCKS) for layer in range(LAYOUT.num_layers)}
    assert dict(receiver.inbox.checksums_seen) == expected, "each notification carries its layer's source digest"
    assert all(expected.values())
    assert sender.pending_writes == 0


@pytest.mark.parametrize("flip_layer", [0, LAYOUT.num_layers - 1])
def test_a_byte_flipped_after_the_write_is_caught_and_the_request_fails_cleanly(pair, flip_layer):
    receiver, source, sender = pair
    receiver.inbox.flip_layer = flip_layer
    receiver.inbox.open("bad", DST_BLOCKS)
    session = sender.open("bad", receiver.ticket("bad"))
    _push_all(session, source)

    with pytest.raises(TransferError) as refused:
        session.commit(first_token_id=1, first_logprob=None, timeout=30)
    assert refused.value.code == "ABORTED"
    assert "checksum mismatch" in str(refused.value), str(refused.value)
    session.abort(str(refused.value))  # what the prefill worker does with a refused commit
    session.close(10)

    assert receiver.committed == []
    first = receiver.aborts[0]
    assert first[0] == "bad" and f"checksum mismatch on layer {flip_layer}" in first[1]
    assert first[2] is False, "bad data is not the sender's word that it stopped writing"
    assert any(stopped for _, _, stopped in receiver.aborts[1:]), "the sender's refused commit or abort says it stopped"
    assert not receiver.inbox.pinned("bad"), "no transport thread is left inside the blocks: the owner may free them"
    assert sender.pending_writes == 0, "no write of the session is left in flight"


def test_an_error_while_verifying_fails_the_request_at_once(pair, monkeypatch):
    """Not a mismatch but a failure to verify (a CUDA error in the hash, say): the request is aborted
    with the error, rather than the error vanishing with the verifying thread's task and the commit
    waiting out the receiver's timeout."""
    receiver, source, sender = pair

    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr("kv_transfer.inbox.region_checksum", broken)
    refused = commit_fails_within(receiver, sender, source, "unverified", seconds=5)
    assert "illegal memory access" in str(refused), str(refused)
    assert receiver.committed == []
    assert receiver.aborts[0][0] == "unverified" and receiver.aborts[0][2] is False
    assert sender.pending_writes == 0


def test_a_failed_session_announces_nothing_more(pair):
    """After an abort, release waits for every WRITE, and no notification follows the abort."""
    receiver, source, sender = pair
    receiver.inbox.open("gone", DST_BLOCKS)
    session = sender.open("gone", receiver.ticket("gone"))
    session.push_layer(source, 0, SRC_BLOCKS, DST_BLOCKS)
    session.abort("the client went away")
    seen = len(receiver.inbox.checksums_seen)
    time.sleep(0.2)
    assert len(receiver.inbox.checksums_seen) == seen
    assert sender.pending_writes == 0


def test_the_receiver_polls_fast_only_while_kv_moves(pair):
    """With a reservation open and nothing arriving, the receiver polls about every millisecond (each wake takes the GIL
    from the decode engine); from a notification on, and while a commit waits for its layers, every 0.2 ms (a sender's
    WRITE behind a notification not yet taken waits for our next poll)."""
    receiver, source, sender = pair
    polls: list[float] = []
    poll = receiver.nixl.pool.poll_notifications

    def counted():
        polls.append(time.monotonic())
        return poll()

    receiver.nixl.pool.poll_notifications = counted
    receiver.inbox.open("paced", DST_BLOCKS)
    time.sleep(0.1)  # the poller notices the open reservation
    quiet_from = time.monotonic()
    time.sleep(0.5)
    quiet = sum(quiet_from <= t for t in polls) / (time.monotonic() - quiet_from)

    session = sender.open("paced", receiver.ticket("paced"))
    _push_all(session, source)
    session.commit(first_token_id=1, first_logprob=None, timeout=30)
    moving_from, window = time.monotonic(), 0.015  # still within _MOVING_S of the last notification
    time.sleep(window)  # counted over the window alone: a sleep that overshoots on a busy machine counts nothing more
    moving = sum(moving_from <= t <= moving_from + window for t in polls) / window
    session.close(10)

    assert receiver.committed == ["paced"]
    assert 100 < quiet < 1200, f"{quiet:.0f} polls/s with a reservation open and nothing arriving"
    assert moving > 2 * quiet, f"{moving:.0f} polls/s while KV moves vs {quiet:.0f} while quiet"
