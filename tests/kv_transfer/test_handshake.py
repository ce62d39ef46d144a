"""Handshakes (kv_transfer/sender.py KVSender.peer): a receiver that does not answer holds up only the sessions
to its own address, and its failure names it (the prefill worker's answer then names it to the router). Once a
handshake could not reach a receiver, the sessions queued behind it fail with it.

A real gRPC receiver on loopback, and a "silent" one: a listening socket that takes TCP connections and never
speaks HTTP/2, as a hung or half-partitioned host does.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

from engine.kv_cache import KVLayout, PagedKVCache
from kv_transfer import sender as sender_module
from kv_transfer.errors import TransferError
from kv_transfer.grpc_transport import GrpcKVSender
from kv_transfer.inbox import KVInbox
from kv_transfer.layout import layout_message
from kv_transfer.receiver_service import KVReceiverService
from tests.kv_transfer.receiver_server import loopback_ticket, serve_kv_receiver

LAYOUT = KVLayout(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")


def test_a_silent_receiver_holds_up_only_its_own_handshake():
    layout = layout_message(LAYOUT, "fingerprint")
    inbox = KVInbox(PagedKVCache(LAYOUT), lambda *args: None, lambda *args: None)
    server, address = serve_kv_receiver(KVReceiverService(inbox, layout, "instance-1"))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the connections; nobody reads them
    silent_address = f"127.0.0.1:{silent.getsockname()[1]}"
    sender = GrpcKVSender(layout, "prefill")
    pool = ThreadPoolExecutor(1)
    try:
        stuck = pool.submit(sender.peer, loopback_ticket("a", "grpc", silent_address, layout, [0]))
        time.sleep(0.5)
        assert not stuck.done(), "the silent receiver's handshake ended early"
        began = time.monotonic()
        peer = sender.peer(loopback_ticket("b", "grpc", address, layout, [0]))
        assert time.monotonic() - began < 3, "a handshake to another receiver waited for the silent one"
        assert peer.instance_id == "instance-1" and not stuck.done()
        assert sender.peer(loopback_ticket("c", "grpc", address, layout, [1])) is peer  # remembered, no new call
    finally:
        sender.close()  # ends the silent handshake's call
        error = stuck.exception(timeout=15)
        pool.shutdown()
        silent.close()
        server.stop(0).wait()
    assert isinstance(error, TransferError), error
    assert (error.code, error.unreachable) == ("UNAVAILABLE", silent_address)
    assert silent_address in str(error)


def test_sessions_queued_behind_a_handshake_that_failed_fail_with_it(monkeypatch):
    """Three sessions to a receiver that does not answer: the first handshake waits out its timeout, the two queued
    behind it fail with it (naming the receiver) rather than each waiting out a timeout of its own in turn; once the
    receiver answers on that address, a session reaches it over the same channel (its reconnect backoff is short)."""
    monkeypatch.setattr(sender_module, "HANDSHAKE_TIMEOUT_S", 1.0)
    layout = layout_message(LAYOUT, "fingerprint")
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    address = f"127.0.0.1:{port}"
    sender = GrpcKVSender(layout, "prefill")
    pool = ThreadPoolExecutor(3)
    server = None
    try:
        began = time.monotonic()
        queued = [pool.submit(sender.peer, loopback_ticket(f"q{i}", "grpc", address, layout, [0])) for i in range(3)]
        errors = [future.exception(timeout=10) for future in queued]
        waited = time.monotonic() - began
        assert all(isinstance(error, TransferError) for error in errors), errors
        assert {(error.code, error.unreachable) for error in errors} == {("UNAVAILABLE", address)}
        assert all(address in str(error) for error in errors)
        assert 0.9 < waited < 1.8, f"three queued sessions took {waited:.2f} s (one timeout is 1 s)"

        silent.close()  # the receiver comes back on the same address
        inbox = KVInbox(PagedKVCache(LAYOUT), lambda *args: None, lambda *args: None)
        server, _ = serve_kv_receiver(KVReceiverService(inbox, layout, "instance-1"), port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert sender.peer(loopback_ticket("back", "grpc", address, layout, [0])).instance_id == "instance-1"
                break
            except TransferError as error:
                assert error.unreachable == address, error
                assert time.monotonic() < deadline, "the receiver, back on its address, was never reached"
                time.sleep(0.2)
        print(f"reached {time.monotonic() - began - waited:.1f} s after the receiver came back")
    finally:
        sender.close()
        pool.shutdown()
        silent.close()
        if server is not None:
            server.stop(0).wait()
