"""How the NIXL sender posts (kv_transfer/nixl_transport.py), real agents on loopback: a push only
queues its layer; two posting threads, an agent each, put the layers pushed while they were busy into
WRITEs with one notification each; the commit travels while the last WRITEs finish, and the receiver
still adopts only once every layer landed and verified."""

from __future__ import annotations

import threading
import time

import msgpack
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
    first = LateReady()  # holds one posting thread on layer 0 while the other layers are pushed
    session.push_layer(source, 0, SRC_BLOCKS, DST_BLOCKS, first)
    for layer in range(1, LAYOUT.num_layers):
        session.push_layer(source, layer, SRC_BLOCKS, DST_BLOCKS)
    # A push only queues: the held layer is not written (the other posting thread may take the layers after it)
    assert not receiver.cache.data[0].any(), "layer 0 was written before it was ready"
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
    assert sender.pending_writes == 0


def test_two_writes_of_one_session_copy_side_by_side_on_the_two_agents(pair, monkeypatch):  # noqa: F811
    """On DRAM a WRITE is copied inside its post, and one agent posts one WRITE at a time: a session's
    WRITEs go to both posting threads, each with its agent, so a second copy runs while the first one does."""
    receiver, source, sender = pair
    assert len(sender.pools) == nixl_transport.POSTING_AGENTS == 2
    posts: list[tuple[str, float, float]] = []  # (agent, began, ended)

    def slow_copy(pool, write_slots):
        def posting(*args):
            began = time.monotonic()
            with pool._lock:  # as a DRAM copy of a large WRITE holds it
                handle = write_slots(*args)
                time.sleep(0.3)
            posts.append((pool.name, began, time.monotonic()))
            return handle

        return posting

    for pool in sender.pools:
        monkeypatch.setattr(pool, "write_slots", slow_copy(pool, pool.write_slots))
    monkeypatch.setattr(nixl_transport, "_MAX_BATCH_LAYERS", 1)  # a WRITE per layer
    transfer(receiver, sender, source, "side-by-side")

    assert receiver.committed == ["side-by-side"] and not receiver.aborts
    assert torch.equal(receiver.cache.data[:, DST_BLOCKS], source.data[:, SRC_BLOCKS])
    assert len(posts) == LAYOUT.num_layers and {name for name, _, _ in posts} == {p.name for p in sender.pools}
    overlaps = [(a, b) for a in posts for b in posts if a[0] < b[0] and a[1] < b[2] and b[1] < a[2]]
    assert overlaps, f"no two WRITEs were copied at once: {posts}"


def test_a_layer_larger_than_a_write_goes_in_pieces_and_lands_exact(pair, monkeypatch):  # noqa: F811
    """A layer whose blocks pass ``_WRITE_BYTES`` is cut into WRITEs of its blocks, each hashed and verified
    on its own, and the receiver adopts once every block of every layer landed."""
    receiver, source, sender = pair
    notes = _count_notifications(receiver)
    monkeypatch.setattr(nixl_transport, "_WRITE_BYTES", 2 * LAYOUT.region_bytes)  # two blocks a WRITE
    transfer(receiver, sender, source, "pieces")

    assert receiver.committed == ["pieces"] and not receiver.aborts
    assert torch.equal(receiver.cache.data[:, DST_BLOCKS], source.data[:, SRC_BLOCKS])
    pieces = [piece for note in notes for piece in msgpack.unpackb(note)["layers"]]
    per_layer = -(-len(DST_BLOCKS) // 2)
    assert len(pieces) == LAYOUT.num_layers * per_layer, pieces
    assert all(len(blocks) <= 2 and checksum for _, blocks, checksum in pieces), pieces


def test_a_write_that_fails_after_its_post_fails_the_session_with_nixl_s_error(pair, monkeypatch):  # noqa: F811
    """A WRITE posted fine and then failed (the peer went away): the session fails at once with
    the write's error, and the sender's other sessions carry on."""
    receiver, source, sender = pair

    class Failed:  # what a WriteHandle answers once NIXL reported the write failed
        settled = True

        def done(self):
            raise NixlError("write to the peer failed: NIXL_ERR_REMOTE_DISCONNECT")

        def wait(self, timeout):
            self.done()

    for pool in sender.pools:
        monkeypatch.setattr(pool, "write_slots", lambda *args, post=pool.write_slots: (post(*args), Failed())[1])
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
        # Every layer queued before the first post, so they share one WRITE: each posting thread waits on a gate
        # queued ahead of the drains (a LateReady on layer 0 would not do: a drain that started at once, before
        # the later pushes, takes layer 0 alone and only then waits for it).
        gate = threading.Event()
        for _ in sender.posters:
            sender.post_when_ready(lambda pool: gate.wait(30))
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


@pytest.mark.parametrize("stage", ["posting", "hashing"])
def test_an_unexpected_error_on_a_sender_thread_fails_the_commit_at_once(pair, monkeypatch, stage):  # noqa: F811
    """A bug while a posting thread posts or hashes (not a NIXL or CUDA error) must not sit unseen in
    its Future while the commit waits out the receiver's timeout: the session fails with it."""
    receiver, source, sender = pair
    if stage == "posting":
        for pool in sender.pools:
            monkeypatch.setattr(pool, "write_slots", lambda *args: {}["no such slot"])
    else:
        monkeypatch.setattr("kv_transfer.nixl_transport.region_checksum", lambda *args: 1 // 0)
    failed = commit_fails_within(receiver, sender, source, "buggy", seconds=2.0)
    assert f"{stage} layers" in str(failed), str(failed)
    assert ("KeyError" if stage == "posting" else "ZeroDivisionError") in str(failed)
    assert receiver.committed == []
    assert sender.pending_writes == 0


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


def test_a_write_still_moving_after_its_post_holds_no_later_post_up(pair, monkeypatch):  # noqa: F811
    """A WRITE that UCX leaves unfinished at its post (RDMA and VRAM always, DRAM now and then) holds nothing
    up: while it still moves, the layers pushed after it are hashed and posted, and the commit is answered
    once it completed."""
    receiver, source, sender = pair
    moving = threading.Event()  # set: the first WRITE completes

    class StillMoving:  # the first WRITE's real handle, in flight until ``moving`` is set
        def __init__(self, handle) -> None:
            self.handle = handle

        def done(self) -> bool:
            return moving.is_set() and self.handle.done()

        def wait(self, timeout: float) -> None:
            assert moving.wait(timeout), "the first WRITE never completed"
            self.handle.wait(timeout)

    posted: list[int] = []  # how many regions each WRITE carried, in posting order
    lock = threading.Lock()

    def posting_on(write_slots):
        def posting(peer, src, dst, nbytes, note):
            handle = write_slots(peer, src, dst, nbytes, note)
            with lock:
                posted.append(len(src))
                return StillMoving(handle) if len(posted) == 1 else handle

        return posting

    for pool in sender.pools:
        monkeypatch.setattr(pool, "write_slots", posting_on(pool.write_slots))
    monkeypatch.setattr(nixl_transport, "_MAX_BATCH_LAYERS", 1)  # a WRITE per layer
    receiver.inbox.open("moving", DST_BLOCKS)
    session = sender.open("moving", receiver.ticket("moving"))
    for layer in range(LAYOUT.num_layers):
        session.push_layer(source, layer, SRC_BLOCKS, DST_BLOCKS)
    deadline = time.monotonic() + 10
    while len(posted) < LAYOUT.num_layers and time.monotonic() < deadline:
        time.sleep(0.01)
    posted_while_moving = len(posted)
    moving.set()
    session.commit(first_token_id=1, first_logprob=None, timeout=30)
    session.close(10)

    assert posted_while_moving == LAYOUT.num_layers, "later layers waited for the first WRITE to complete"
    assert receiver.committed == ["moving"] and not receiver.aborts
    assert torch.equal(receiver.cache.data[:, DST_BLOCKS], source.data[:, SRC_BLOCKS])
