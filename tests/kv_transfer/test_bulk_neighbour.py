"""A hostile neighbour on the network: a host that opens connections to a decode worker's bulk KV listener and
never says a word, as fast as it can. It holds at most MAX_HELLOS_PER_HOST of the listener's slots, each for at
most HELLO_TIMEOUT_S, so a cluster member's links are still admitted and its KV lands exactly over them (before,
the neighbour filled all MAX_CONNECTIONS slots and every sender fell back to gRPC messages).

Test host: a network namespace joined to this one by a veth pair; the neighbour runs there, the receiver (gRPC
server and bulk listener) on this side of the pair, the sender in this process. Needs root (namespaces, veth).
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch

from engine.kv_cache import KVLayout, PagedKVCache
from kv_transfer.bulk_transport import MAX_HELLOS_PER_HOST, BulkKVSender, BulkReceiver, BulkSession
from kv_transfer.inbox import KVInbox
from kv_transfer.layout import layout_message
from kv_transfer.receiver_service import KVReceiverService
from protos.cluster_auth import ClusterAuth
from tests.kv_transfer.receiver_server import loopback_ticket, serve_kv_receiver
from tests.netns import NetnsHost, subnets
from worker_server.security import server_interceptors

LAYOUT = KVLayout(num_layers=3, num_blocks=32, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
BLOCKS = [3, 4, 9, 17]
SECRET = "neighbour-test-secret"
TOKEN = "ticket-token"
HELD = 2000  # open at once: at ~200 a second, each stays open past the listener's HELLO_TIMEOUT_S

# The neighbour: opens connections without end, keeps the last HELD open, never sends a byte.
FLOOD = """
import socket, sys, time
target, held = (sys.argv[1], int(sys.argv[2])), []
while True:
    try:
        held.append(socket.create_connection(target, timeout=1))
    except OSError:
        time.sleep(0.01)
    if len(held) > int(sys.argv[3]):
        held.pop(0).close()
    time.sleep(0.005)
"""


def test_a_neighbour_flooding_the_bulk_listener_does_not_keep_cluster_members_off_it():
    host = NetnsHost(subnets(1)[0])
    committed: list[str] = []

    def on_commit(request_id, first_token_id, logprob) -> None:
        committed.append(request_id)
        inbox.close(request_id, "committed")

    inbox = KVInbox(PagedKVCache(LAYOUT), on_commit, lambda request_id, *args: inbox.close(request_id, "aborted"))
    layout = layout_message(LAYOUT, "fingerprint")
    bulk = BulkReceiver(inbox, host.gateway, 0, SECRET)
    service = KVReceiverService(inbox, layout, "instance-1", None, bulk)
    server, address = serve_kv_receiver(service, server_interceptors(ClusterAuth(secret=SECRET)), host=host.gateway)
    neighbour = subprocess.Popen(
        [*host.prefix, sys.executable, "-c", FLOOD, host.gateway, str(bulk.port), str(HELD)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    sender = BulkKVSender(layout, "prefill", auth=ClusterAuth(secret=SECRET))
    try:
        deadline = time.monotonic() + 20
        while len(bulk._connections) < MAX_HELLOS_PER_HOST:  # the neighbour holds all it may
            assert neighbour.poll() is None, neighbour.stderr.read()
            assert time.monotonic() < deadline, "the neighbour never filled its share of the listener"
            time.sleep(0.05)
        time.sleep(2.0)  # and keeps flooding: within two seconds, more connections than MAX_CONNECTIONS
        for index in range(3):
            source = PagedKVCache(LAYOUT)
            source.data.copy_(torch.randn(source.data.shape, generator=torch.Generator().manual_seed(index)))
            request_id = f"r{index}"
            inbox.open(request_id, BLOCKS, TOKEN)
            session = sender.open(request_id, loopback_ticket(request_id, "grpc", address, layout, BLOCKS, TOKEN))
            assert isinstance(session, BulkSession), f"a cluster member was kept off the bulk path: {session}"
            for layer in range(LAYOUT.num_layers):
                session.push_layer(source, layer, BLOCKS, BLOCKS)
            session.commit(7, None, 10.0)
            for layer in range(LAYOUT.num_layers):
                assert torch.equal(inbox.cache.read_regions(layer, BLOCKS), source.read_regions(layer, BLOCKS))
        assert committed == ["r0", "r1", "r2"]
        assert neighbour.poll() is None, "the neighbour stopped flooding"
        assert bulk._hellos[host.address] <= MAX_HELLOS_PER_HOST
    finally:
        neighbour.kill()
        neighbour.wait(10)
        sender.close()
        server.stop(0).wait()
        bulk.close()
        host.close()
