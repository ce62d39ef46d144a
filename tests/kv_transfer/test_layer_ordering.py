"""The ordering contract (engine/layer_ready.py): a transport reads a pushed layer's regions only
once the layer's ``ready`` completed, and never blocks the pushing (engine) thread waiting for it.

A stand-in ``ready`` that completes later plays a CUDA event whose layer is still computing: the
pool is changed after ``push_layer`` returned and before ``ready`` completes, and the receiver must
get the changed bytes. Real gRPC server, bulk TCP links and NIXL agents on loopback; the CUDA-event version
is in tests/gpu/.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.kv_cache import KVLayout, PagedKVCache
from kv_transfer.bulk_transport import BulkKVSender, BulkReceiver, BulkSession
from kv_transfer.grpc_transport import GrpcKVSender
from kv_transfer.inbox import KVInbox
from kv_transfer.layout import layout_message
from kv_transfer.receiver_service import KVReceiverService
from protos import decode_pb2
from tests.kv_transfer.receiver_server import loopback_ticket, serve_kv_receiver

LAYOUT = KVLayout(num_layers=3, num_blocks=16, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
SRC_BLOCKS = [5, 1, 9]
DST_BLOCKS = [2, 3, 11]


class LateReady:
    """A ``LayerReady`` that completes when the test says so; counts waits on each thread."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.waited_on: set[str] = set()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self.waited_on.add(threading.current_thread().name)
        assert self._done.wait(30), "the layer never became ready"

    def complete(self) -> None:
        self._done.set()


class Receiver:
    def __init__(self, transport: str, device: str = "cpu") -> None:
        self.cache = PagedKVCache(LAYOUT, device)
        self.committed: list[str] = []
        self.inbox = KVInbox(self.cache, self._on_commit, self._on_abort)
        self.nixl = self.bulk = None
        if transport == "nixl":
            from kv_transfer.nixl_transport import NixlReceiver

            self.nixl = NixlReceiver("order-receiver", self.cache, self.inbox)
        if transport == "bulk":  # landed through a host buffer, as a GPU pool's are
            self.bulk = BulkReceiver(self.inbox, "127.0.0.1", 0, staged=True)
        self.layout = layout_message(LAYOUT, "fingerprint")
        service = KVReceiverService(self.inbox, self.layout, "instance-1", self.nixl, self.bulk)
        self.server, self.address = serve_kv_receiver(service)

    def _on_commit(self, request_id, first_token_id, logprob) -> None:
        self.committed.append(request_id)
        # As the decode worker's reservations do: a committed landing is done, so a link closing later
        # (the sender's close) has nothing left to abort.
        self.inbox.close(request_id, "committed")
        self.inbox.forget(request_id)

    def _on_abort(self, request_id, reason, sender_stopped) -> None:
        raise AssertionError(f"{request_id} aborted: {reason}")

    def ticket(self, request_id: str, transport: str) -> decode_pb2.Ticket:
        wire = "grpc" if transport == "bulk" else transport  # bulk is the gRPC transport's, negotiated
        return loopback_ticket(request_id, wire, self.address, self.layout, DST_BLOCKS)

    def stop(self) -> None:
        self.server.stop(0).wait()
        if self.nixl is not None:
            self.nixl.close()
        if self.bulk is not None:
            self.bulk.close()


@pytest.fixture(params=["grpc", "bulk", "nixl"])
def transport(request):
    return request.param


def _sender(transport: str, cache: PagedKVCache, layout):
    if transport == "grpc":
        return GrpcKVSender(layout, "prefill", staged=True)  # a CUDA pool's session stages on a side stream
    if transport == "bulk":
        return BulkKVSender(layout, "prefill", staged=True)  # frames staged as a CUDA pool's are
    from kv_transfer.nixl_transport import NixlKVSender

    return NixlKVSender(layout, "prefill", cache, "order-sender")


def test_a_layer_is_read_only_after_its_ready_completed(transport):
    receiver = Receiver(transport)
    source = PagedKVCache(LAYOUT)
    sender = _sender(transport, source, receiver.layout)
    try:
        receiver.inbox.open("r", DST_BLOCKS)
        session = sender.open("r", receiver.ticket("r", transport))
        assert session.reads_after_push, "a session that reads after push must say so (block holds)"
        assert isinstance(session, BulkSession) == (transport == "bulk")
        readies = [LateReady() for _ in range(LAYOUT.num_layers)]
        for layer, ready in enumerate(readies):
            began = time.monotonic()
            session.push_layer(source, layer, SRC_BLOCKS, DST_BLOCKS, ready)
            assert time.monotonic() - began < 5, "push_layer waited for the layer"
        # The "compute" writes the layers' K/V only now, after every push returned.
        expected = torch.randn(LAYOUT.num_layers, len(SRC_BLOCKS), *source.data.shape[2:])
        source.data[:, SRC_BLOCKS] = expected
        time.sleep(0.3)
        landing = receiver.inbox.get("r")
        assert not any(landing.written), "the receiver got a layer before its ready completed"
        for ready in readies:
            ready.complete()
        session.commit(first_token_id=7, first_logprob=None, timeout=30)
        session.close(10)
        assert receiver.committed == ["r"]
        assert torch.equal(receiver.cache.data[:, DST_BLOCKS], expected)
        assert all(threading.main_thread().name not in r.waited_on for r in readies), "waited on the pushing thread"
    finally:
        sender.close()
        receiver.stop()


def test_a_session_closed_before_ready_never_reads_the_layer():
    """gRPC, staged: close() returns although a pushed layer is not ready; the layer is never read."""
    receiver = Receiver("grpc")
    receiver.inbox.on_abort = lambda *args: None  # the abort is expected here
    source = PagedKVCache(LAYOUT)
    sender = _sender("grpc", source, receiver.layout)
    try:
        receiver.inbox.open("r", DST_BLOCKS)
        session = sender.open("r", receiver.ticket("r", "grpc"))
        ready = LateReady()
        session.push_layer(source, 0, SRC_BLOCKS, DST_BLOCKS, ready)
        session.abort("the client went away")
        began = time.monotonic()
        session.close(1)
        assert time.monotonic() - began < 1
        ready.complete()  # from now on a read would be allowed — but the session is closed
        time.sleep(0.3)
        assert not receiver.inbox.get("r").written[0]
    finally:
        sender.close()
        receiver.stop()
