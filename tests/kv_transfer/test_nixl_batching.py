"""How the NIXL sender posts (kv_transfer/nixl_transport.py), real agents on loopback: a push only
queues its layer; the posting thread puts the layers pushed while it was busy into one WRITE with
one notification; the commit travels while the last WRITEs finish, and the receiver still adopts
only once every layer landed and verified."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kv_transfer.integrity import region_checksum
from tests.kv_transfer.test_layer_ordering import LateReady
from tests.kv_transfer.test_nixl_integrity import DST_BLOCKS, LAYOUT, SRC_BLOCKS, pair  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(120)


def _count_notifications(receiver) -> list[bytes]:
    seen: list[bytes] = []
    landed = receiver.nixl._landed

    def counting(sender, message):
        seen.append(message)
        landed(sender, message)

    receiver.nixl._landed = counting
    return seen


def test_layers_pushed_while_a_write_posts_share_a_write_and_land_exact(pair):  # noqa: F811
    receiver, source, sender = pair
    notes = _count_notifications(receiver)
    receiver.inbox.open("batched", DST_BLOCKS)
    session = sender.open("batched", receiver.ticket("batched"))
    first = LateReady()  # holds the posting thread on layer 0 while the other layers are pushed
    session.push_layer(source, 0, SRC_BLOCKS, DST_BLOCKS, first)
    for layer in range(1, LAYOUT.num_layers):
        session.push_layer(source, layer, SRC_BLOCKS, DST_BLOCKS)
    assert not receiver.cache.data.any(), "a push only queues: nothing was written on the pushing thread"
    first.complete()
    session.commit(first_token_id=1, first_logprob=None, timeout=30)
    session.close(10)

    assert receiver.committed == ["batched"] and not receiver.aborts
    assert torch.equal(receiver.cache.data[:, DST_BLOCKS], source.data[:, SRC_BLOCKS])
    assert len(notes) < LAYOUT.num_layers, f"{LAYOUT.num_layers} layers in {len(notes)} notifications"
    expected = {layer: region_checksum(source, layer, SRC_BLOCKS) for layer in range(LAYOUT.num_layers)}
    assert dict(receiver.inbox.checksums_seen) == expected, "every layer of a shared WRITE is verified"


def test_an_early_commit_waits_for_the_last_layer_to_land(pair):  # noqa: F811
    receiver, source, sender = pair
    receiver.inbox.open("early", DST_BLOCKS)
    session = sender.open("early", receiver.ticket("early"))
    last = LAYOUT.num_layers - 1
    late = LateReady()
    for layer in range(last):
        session.push_layer(source, layer, SRC_BLOCKS, DST_BLOCKS)
    session.push_layer(source, last, SRC_BLOCKS, DST_BLOCKS, late)
    outcome: list[object] = []
    committing = threading.Thread(target=lambda: outcome.append(session.commit(1, None, 30)))
    committing.start()
    time.sleep(0.3)

    assert committing.is_alive() and receiver.committed == [], "no adoption before the last layer landed"
    assert not receiver.cache.data[last].any(), "the last layer was not read before it was ready"
    late.complete()
    committing.join(30)
    assert outcome == [None] and receiver.committed == ["early"]
    assert torch.equal(receiver.cache.data[:, DST_BLOCKS], source.data[:, SRC_BLOCKS])
    session.close(10)
    assert sender.pool.pending_writes == 0
