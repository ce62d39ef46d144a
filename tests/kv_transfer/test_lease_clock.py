"""A ticket's lease is timed on the sender's own clock (``Ticket.lease_ms``, from when the ticket reaches it), never
against the decode worker's wall clock: two hosts' wall clocks disagree, by minutes where nothing keeps them in
step. Real gRPC receiver on loopback; this process's wall clock is moved two minutes ahead of the one the ticket
was issued under.
"""

from __future__ import annotations

import time

import torch

from engine.kv_cache import KVLayout, PagedKVCache
from kv_transfer.grpc_transport import GrpcKVSender
from kv_transfer.inbox import KVInbox
from kv_transfer.layout import layout_message
from kv_transfer.receiver_service import KVReceiverService
from tests.kv_transfer.receiver_server import loopback_ticket, serve_kv_receiver

LAYOUT = KVLayout(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
SRC, DST = [1, 4], [3, 6]


class Receiver:
    def __init__(self) -> None:
        self.layout = layout_message(LAYOUT, "fingerprint")
        self.cache = PagedKVCache(LAYOUT)
        self.committed: list[str] = []
        self.inbox = KVInbox(self.cache, lambda request_id, *_: self.committed.append(request_id), lambda *_: None)
        self.server, self.address = serve_kv_receiver(KVReceiverService(self.inbox, self.layout, "instance-1"))


def test_a_sender_whose_wall_clock_runs_ahead_pushes_within_the_lease(monkeypatch):
    receiver = Receiver()
    receiver.inbox.open("r", DST)
    ticket = loopback_ticket("r", "grpc", receiver.address, receiver.layout, DST)  # 60 s of lease
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + 120)  # this host's clock, two minutes ahead
    source = PagedKVCache(LAYOUT)
    source.data.copy_(torch.randn(source.data.shape))
    sender = GrpcKVSender(receiver.layout, "prefill")
    try:
        session = sender.open("r", ticket)
        for layer in range(LAYOUT.num_layers):
            session.push_layer(source, layer, SRC, DST)
        session.commit(first_token_id=7, first_logprob=None, timeout=30)
        session.close(10)
        assert session.failed is None
        assert receiver.committed == ["r"]
        assert torch.equal(receiver.cache.data[:, DST], source.data[:, SRC])
    finally:
        sender.close()
        receiver.server.stop(0).wait()


def test_the_lease_still_runs_out_on_the_senders_clock():
    receiver = Receiver()
    receiver.inbox.open("r", DST)
    ticket = loopback_ticket("r", "grpc", receiver.address, receiver.layout, DST)
    ticket.lease_ms = 400  # LEASE_MARGIN_S (0.25 s) before it: 150 ms to push
    sender = GrpcKVSender(receiver.layout, "prefill")
    try:
        session = sender.open("r", ticket)
        assert session.lease_left()
        time.sleep(0.3)
        assert not session.lease_left() and "lease expired" in session.failed
    finally:
        sender.close()
        receiver.server.stop(0).wait()
