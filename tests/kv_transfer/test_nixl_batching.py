"""How the NIXL sender posts (kv_transfer/nixl_transport.py), real agents on loopback: a push only
queues its layer; the posting thread puts the layers pushed while it was busy into one WRITE with
one notification; the commit travels while the last WRITEs finish, and the receiver still adopts
only once every layer landed and verified."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.kv_cache import KVLayout
from kv_transfer import nixl_transport
from kv_transfer.integrity import region_checksum
from kv_transfer.nixl_agent import NixlError
from tests.kv_transfer.test_layer_ordering import LateReady
from tests.kv_transfer.test_nixl_integrity import (  # noqa: F401 (pair: a fixture)
    DST_BLOCKS,
    LAYOUT,
    SRC_BLOCKS,
    commit_fails_within,
    nixl_pair,
    pair,
    transfer,
)

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


def test_a_write_is_announced_before_the_next_post_copies(pair, monkeypatch):  # noqa: F811
    """On DRAM a WRITE is final when its post returns, and the next post holds the pool's lock for
    its whole copy: the first WRITE's notification must go out between the two posts, not wait
    behind the second copy (which kept the receiver's verification a WRITE behind)."""
    receiver, source, sender = pair
    transfer(receiver, sender, source, "warm-up")  # a new connection's first WRITE is not final at its post
    arrived: list[float] = []
    landed = receiver.nixl._landed
    receiver.nixl._landed = lambda *note: (arrived.append(time.monotonic()), landed(*note))
    posted: list[float] = []  # the announced session's posts
    copying = threading.Event()
    write_slots = sender.pool.write_slots

    def long_copy(*args):
        copying.set()
        with sender.pool._lock:  # as a DRAM copy of a large WRITE holds it
            handle = write_slots(*args)
            time.sleep(0.3)
        posted.append(time.monotonic())
        return handle

    monkeypatch.setattr(sender.pool, "write_slots", long_copy)
    receiver.inbox.open("announced", DST_BLOCKS)
    session = sender.open("announced", receiver.ticket("announced"))
    session.push_layer(source, 0, SRC_BLOCKS, DST_BLOCKS)
    assert copying.wait(10)
    for layer in range(1, LAYOUT.num_layers):  # queued behind layer 0's copy: a second WRITE
        session.push_layer(source, layer, SRC_BLOCKS, DST_BLOCKS)
    session.commit(first_token_id=1, first_logprob=None, timeout=30)
    session.close(10)

    assert receiver.committed == ["warm-up", "announced"] and len(posted) == len(arrived) == 2, (posted, arrived)
    assert arrived[0] < posted[1] - 0.15, f"WRITE 0 announced {arrived[0] - posted[1]:+.3f} s after WRITE 1's post"
    assert torch.equal(receiver.cache.data[:, DST_BLOCKS], source.data[:, SRC_BLOCKS])


def test_a_write_that_fails_after_its_post_fails_the_session_with_nixl_s_error(pair, monkeypatch):  # noqa: F811
    """A WRITE posted fine and then failed (the peer went away): the session fails at once with
    the write's error, and the sender's other sessions carry on."""
    receiver, source, sender = pair
    write_slots = sender.pool.write_slots

    class Failed:  # what a WriteHandle answers once NIXL reported the write failed
        settled = True

        def done(self):
            raise NixlError("write to the peer failed: NIXL_ERR_REMOTE_DISCONNECT")

        def wait(self, timeout):
            self.done()

    monkeypatch.setattr(sender.pool, "write_slots", lambda *args: (write_slots(*args), Failed())[1])
    failed = commit_fails_within(receiver, sender, source, "lost", seconds=2.0)
    assert "NIXL write failed" in str(failed) and "REMOTE_DISCONNECT" in str(failed), str(failed)

    monkeypatch.undo()
    transfer(receiver, sender, source, "next")
    assert receiver.committed == ["next"]
    assert torch.equal(receiver.cache.data[:, DST_BLOCKS], source.data[:, SRC_BLOCKS])


def test_a_128k_token_prompt_lands_with_its_block_lists_in_one_notification():
    """At 128k tokens in blocks of 16, a layer is 8192 regions: a WRITE of 4 such layers is 32k
    descriptors and its notification (the four block lists) ~100 KB of msgpack, past any single
    UCX fragment. Both must arrive whole; the destination runs backwards, so no run merges."""
    layout = KVLayout(num_layers=4, num_blocks=8200, block_size=1, num_kv_heads=1, head_dim=8, dtype="float32")
    src = list(range(8192))
    dst = list(range(8199, 7, -1))
    with nixl_pair(layout, dst, "long-prompt-sender", seed=7) as (receiver, source, sender):
        notes = _count_notifications(receiver)
        receiver.inbox.open("long", dst)
        session = sender.open("long", receiver.ticket("long"))
        # Every layer queued before the first post, so they share one WRITE: the sender's one posting thread waits
        # on a gate queued ahead of the drain (a LateReady on layer 0 would not do: a drain that started at once,
        # before the later pushes, takes layer 0 alone and only then waits for it).
        gate = threading.Event()
        sender.post_when_ready(gate.wait, 30)
        for layer in range(layout.num_layers):
            session.push_layer(source, layer, src, dst)
        gate.set()
        session.commit(first_token_id=1, first_logprob=None, timeout=30)
        session.close(10)

    assert receiver.committed == ["long"] and not receiver.aborts
    assert max(len(note) for note in notes) > 64 << 10, [len(note) for note in notes]
    assert torch.equal(receiver.cache.data[:, dst], source.data[:, src])
    expected = {layer: region_checksum(source, layer, src) for layer in range(layout.num_layers)}
    assert dict(receiver.inbox.checksums_seen) == expected


@pytest.mark.parametrize("stage", ["posting", "sealing"])
def test_an_unexpected_error_on_a_sender_thread_fails_the_commit_at_once(pair, monkeypatch, stage):  # noqa: F811
    """A bug inside the posting or sealing thread (not a NIXL or CUDA error) must not sit unseen in
    its Future while the commit waits out the receiver's timeout: the session fails with it."""
    receiver, source, sender = pair
    if stage == "posting":
        monkeypatch.setattr(sender.pool, "write_slots", lambda *args: {}["no such slot"])
    else:
        monkeypatch.setattr("kv_transfer.nixl_transport.region_checksum", lambda *args: 1 // 0)
    failed = commit_fails_within(receiver, sender, source, "buggy", seconds=2.0)
    assert f"{stage} layers" in str(failed), str(failed)
    assert ("KeyError" if stage == "posting" else "ZeroDivisionError") in str(failed)
    assert receiver.committed == []
    assert sender.pool.pending_writes == 0


def test_a_commit_wakes_the_receiver_that_polls_slowly_while_nothing_arrives(pair, monkeypatch):  # noqa: F811
    """A reservation open and quiet, the receiver polls at its open pace (here 5 s, ~1 ms in service). The
    commit arrives while the notifications wait to be taken and makes it poll at once: the request is
    adopted well within one such pause, not at its end."""
    monkeypatch.setattr(nixl_transport, "_OPEN_POLL_S", 5.0)
    receiver, source, sender = pair
    transfer(receiver, sender, source, "warm-up")  # the connection is made; the receiver keeps a landing open
    receiver.inbox.open("quiet", DST_BLOCKS)
    time.sleep(0.3)  # past the moving pace: the poller sleeps its open pace now
    session = sender.open("quiet", receiver.ticket("quiet"))
    began = time.monotonic()
    for layer in range(LAYOUT.num_layers):
        session.push_layer(source, layer, SRC_BLOCKS, DST_BLOCKS)
    session.commit(first_token_id=1, first_logprob=None, timeout=30)
    took = time.monotonic() - began
    session.close(10)
    assert receiver.committed[-1] == "quiet" and not receiver.aborts
    assert torch.equal(receiver.cache.data[:, DST_BLOCKS], source.data[:, SRC_BLOCKS])
    assert took < 2.0, f"adopted {took:.2f} s after the first push: the poller slept its pace out"


def test_a_write_still_moving_after_its_post_holds_no_later_hash_up(pair, monkeypatch):  # noqa: F811
    """A WRITE that UCX leaves unfinished at its post (RDMA and VRAM always, DRAM now and then) is announced
    once it completes, by a thread of its own: while it still moves, the layers pushed after it are hashed,
    rather than queued behind its wait on the one sealing thread."""
    receiver, source, sender = pair
    moving = threading.Event()  # set: the first WRITE completes

    class StillMoving:  # the first WRITE's real handle, in flight until ``moving`` is set
        def __init__(self, handle) -> None:
            self.handle = handle

        def done(self) -> bool:
            return moving.is_set() and self.handle.done()

        @property
        def settled(self) -> bool:
            return moving.is_set() and self.handle.settled

        def wait(self, timeout: float) -> None:
            assert moving.wait(timeout), "the first WRITE never completed"
            self.handle.wait(timeout)

    write_slots, posted = sender.pool.write_slots, []

    def posting(*args):
        handle = write_slots(*args)
        posted.append(handle)
        return StillMoving(handle) if len(posted) == 1 else handle

    hashed: list[int] = []

    def hashing(cache, layer, blocks):
        hashed.append(layer)
        return region_checksum(cache, layer, blocks)

    monkeypatch.setattr(sender.pool, "write_slots", posting)
    monkeypatch.setattr(nixl_transport, "region_checksum", hashing)
    receiver.inbox.open("moving", DST_BLOCKS)
    session = sender.open("moving", receiver.ticket("moving"))
    session.push_layer(source, 0, SRC_BLOCKS, DST_BLOCKS)
    deadline = time.monotonic() + 10
    while not posted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert posted, "layer 0 was never posted"
    for layer in range(1, LAYOUT.num_layers):
        session.push_layer(source, layer, SRC_BLOCKS, DST_BLOCKS)
    while len(hashed) < LAYOUT.num_layers and time.monotonic() < deadline:
        time.sleep(0.01)
    still_moving = sorted(hashed)
    moving.set()
    session.commit(first_token_id=1, first_logprob=None, timeout=30)
    session.close(10)

    assert still_moving == list(range(LAYOUT.num_layers)), "later layers waited for the first WRITE to complete"
    assert receiver.committed == ["moving"] and not receiver.aborts
    assert torch.equal(receiver.cache.data[:, DST_BLOCKS], source.data[:, SRC_BLOCKS])
