"""The bulk TCP path of the gRPC transport (kv_transfer/bulk_transport.py): bytes land exactly in the
reserved blocks, a byte flipped on the wire is caught, the link admits cluster members only, a
frame with a wrong ticket token writes nothing, a frame that stalls halfway stops its reservation,
and a receiver without bulk gets gRPC messages (as one whose bulk listener refused, until the
connect is tried again).
Real gRPC server with the cluster-secret interceptor, real TCP sockets on loopback; the flipped
byte is flipped by a real forwarding proxy between the two."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import torch

from engine.kv_cache import KVLayout, PagedKVCache
from kv_transfer import bulk_transport, integrity, receiver_service
from kv_transfer.bulk_transport import (
    BulkKVSender,
    BulkLink,
    BulkReceiver,
    BulkSession,
    commit_frame,
    frame_header,
    frame_trailer,
)
from kv_transfer.errors import TransferError
from kv_transfer.grpc_transport import GrpcSession
from kv_transfer.inbox import KVInbox
from kv_transfer.integrity import checksum, region_checksum
from kv_transfer.layout import layout_message
from kv_transfer.receiver_service import KVReceiverService
from protos import common_pb2, decode_pb2, kv_transfer_pb2
from protos.cluster_auth import ClusterAuth
from tests.kv_transfer.receiver_server import loopback_ticket, serve_kv_receiver
from worker_server.security import server_interceptors

LAYOUT = KVLayout(num_layers=3, num_blocks=32, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
SRC_BLOCKS = [5, 6, 7, 1, 9, 10]  # runs 5-7, 1, 9-10
DST_BLOCKS = [2, 3, 11, 12, 13, 20]  # runs 2-3, 11-13, 20
SECRET = "bulk-test-secret"
TOKEN = "ticket-token"


class Receiver:
    """A decode side: inbox + KVReceiverService behind the cluster-secret interceptor + bulk listener."""

    def __init__(self, bulk: bool = True, staged: bool | None = None) -> None:
        self.cache = PagedKVCache(LAYOUT)
        self.committed: list[str] = []
        self.aborted: list[tuple[str, str]] = []
        self.inbox = KVInbox(self.cache, self._on_commit, self._on_abort)
        self.layout = layout_message(LAYOUT, "fingerprint")
        self.bulk = BulkReceiver(self.inbox, "127.0.0.1", 0, SECRET, staged=staged) if bulk else None
        self.service = KVReceiverService(self.inbox, self.layout, "instance-1", None, self.bulk)
        self.server, self.address = serve_kv_receiver(self.service, server_interceptors(ClusterAuth(secret=SECRET)))

    def _on_commit(self, request_id, first_token_id, logprob) -> None:
        self.committed.append(request_id)
        self.inbox.close(request_id, "committed")

    def _on_abort(self, request_id, reason, sender_stopped) -> None:
        self.aborted.append((request_id, reason))
        self.inbox.close(request_id, reason)

    def ticket(self, request_id: str, token: str = TOKEN) -> decode_pb2.Ticket:
        return loopback_ticket(request_id, "grpc", self.address, self.layout, DST_BLOCKS, token)

    def stop(self) -> None:
        self.server.stop(0).wait()
        if self.bulk is not None:
            self.bulk.close()


@pytest.fixture(params=[False, True], ids=["in-place", "staged"])
def receiver(request):
    """The receiver lands frames in place (a pool in host memory) or through its connection's host
    buffer (what a pool in GPU memory does; here the pool is in host memory and the path is the same)."""
    receiver = Receiver(staged=request.param)
    yield receiver
    receiver.stop()


def _source(seed: int = 0) -> PagedKVCache:
    cache = PagedKVCache(LAYOUT)
    cache.data.copy_(torch.randn(cache.data.shape, generator=torch.Generator().manual_seed(seed)))
    return cache


def _push_all(session, source: PagedKVCache) -> None:
    for layer in range(LAYOUT.num_layers):
        session.push_layer(source, layer, SRC_BLOCKS, DST_BLOCKS)


def _one_session(receiver: Receiver, sender: BulkKVSender, request_id: str, seed: int):
    """Reserves DST_BLOCKS for ``request_id``, pushes every layer of a source and commits; checks that it
    landed exactly, and returns the session."""
    receiver.inbox.open(request_id, DST_BLOCKS, TOKEN)
    source = _source(seed=seed)
    session = sender.open(request_id, receiver.ticket(request_id))
    _push_all(session, source)
    session.commit(7, None, 10.0)
    _assert_landed(receiver, source)
    return session


def _assert_landed(receiver: Receiver, source: PagedKVCache, dst_blocks: list[int] = DST_BLOCKS) -> None:
    """Every layer of ``source``'s SRC_BLOCKS is in the receiver's ``dst_blocks``, byte for byte."""
    for layer in range(LAYOUT.num_layers):
        assert torch.equal(receiver.cache.read_regions(layer, dst_blocks), source.read_regions(layer, SRC_BLOCKS))


@pytest.mark.parametrize("in_cache_bytes", [integrity.IN_CACHE_BYTES, 1000], ids=["whole-pieces", "cut-pieces"])
@pytest.mark.parametrize("staged", [False, True], ids=["sent-in-place", "sent-staged"])
@pytest.mark.parametrize("connections,piece_bytes", [(1, 1 << 20), (3, 2 * 512)])
def test_bulk_kv_lands_byte_identical_in_the_reserved_blocks(
    receiver, connections, piece_bytes, staged, in_cache_bytes, monkeypatch
):
    """Either end in place or staged (a GPU pool's path: each piece's regions copied to host memory and
    sent from there; landed through a host buffer): one checksum, the same bytes in the same blocks. Both
    ends move and hash a piece in chunks of IN_CACHE_BYTES: chunks of 1000 bytes cut the 512-byte regions
    and runs mid-way, as 512 KiB chunks cut a GPU prefill's layers."""
    monkeypatch.setattr(integrity, "IN_CACHE_BYTES", in_cache_bytes)
    source = _source()
    sender = BulkKVSender(
        receiver.layout,
        "prefill",
        auth=ClusterAuth(secret=SECRET),
        connections=connections,
        piece_bytes=piece_bytes,
        staged=staged,
    )
    try:
        receiver.inbox.open("r", DST_BLOCKS, TOKEN)
        session = sender.open("r", receiver.ticket("r"))
        assert isinstance(session, BulkSession)
        _push_all(session, source)
        assert all((piece.staged is not None) == staged for piece in session._pieces)
        session.commit(7, None, 10.0)
        assert receiver.committed == ["r"]
        _assert_landed(receiver, source)
        untouched = sorted(set(range(LAYOUT.num_blocks)) - set(DST_BLOCKS))
        assert not receiver.cache.read_regions(0, untouched).any()
    finally:
        sender.close()


def test_checksum_over_runs_equals_the_per_block_definition_and_catches_a_flipped_byte():
    """Each side merges its own adjacent blocks into runs; both still hash the same thing: xxh3 of the
    regions in block order, back to back."""
    source = _source(seed=2)
    sent = source.read_regions(1, SRC_BLOCKS).numpy().tobytes()
    assert region_checksum(source, 1, SRC_BLOCKS) == checksum(sent)
    before = region_checksum(source, 1, SRC_BLOCKS)
    flat = source.regions[1, 9]
    for index in (0, 1, LAYOUT.region_bytes // 2, LAYOUT.region_bytes - 1):
        flat[index] ^= 0x10
        assert region_checksum(source, 1, SRC_BLOCKS) != before
        flat[index] ^= 0x10
    assert region_checksum(source, 1, SRC_BLOCKS) == before


class FlippingProxy:
    """Forwards one TCP connection both ways, flipping one bit of the sender's byte number ``flip_at``."""

    def __init__(self, target_port: int, flip_at: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.flip_at = flip_at
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._pipe, args=(upstream, client, None), daemon=True).start()
        self._pipe(client, upstream, self.flip_at)

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket, flip_at: int | None) -> None:
        seen = 0
        try:
            while data := source.recv(1 << 16):
                if flip_at is not None and seen <= flip_at < seen + len(data):
                    data = bytearray(data)
                    data[flip_at - seen] ^= 0x04
                seen += len(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("in_cache_bytes", [integrity.IN_CACHE_BYTES, 700], ids=["whole-pieces", "cut-pieces"])
def test_a_byte_flipped_on_the_wire_is_refused_and_stops_the_reservation(receiver, in_cache_bytes, monkeypatch):
    monkeypatch.setattr(integrity, "IN_CACHE_BYTES", in_cache_bytes)  # 700: the flip lands in a piece's 2nd chunk
    source = _source(seed=4)
    hello = 32  # the sender's side of the hello: its proof
    # A byte inside the first layer's regions, however many layers the first frame carries.
    header = len(frame_header("r", TOKEN, [(layer, DST_BLOCKS) for layer in range(LAYOUT.num_layers)]))
    assert header + 1000 < len(frame_header("r", TOKEN, [(0, DST_BLOCKS)])) + len(DST_BLOCKS) * LAYOUT.region_bytes
    proxy = FlippingProxy(receiver.bulk.port, hello + header + 1000)
    link = BulkLink("127.0.0.1", proxy.port, SECRET, verify=True)
    sender = BulkKVSender(receiver.layout, "prefill", auth=ClusterAuth(secret=SECRET), connections=1)
    try:
        receiver.inbox.open("r", DST_BLOCKS, TOKEN)
        peer = sender.peer(receiver.ticket("r"))  # the control path; the data goes through the proxy
        staged = {} if receiver.bulk._staged else None  # both ends staged, or both in place
        session = BulkSession("r", receiver.ticket("r"), peer, [link], 1 << 20, copy_streams=staged)
        _push_all(session, source)
        with pytest.raises(TransferError, match="checksum mismatch"):
            session.commit(7, None, 10.0)
        assert receiver.committed == []
        assert receiver.aborted and "checksum mismatch" in receiver.aborted[0][1]
        assert not receiver.inbox.pinned("r")
    finally:
        link.close()
        proxy.close()
        sender.close()


def test_the_bulk_link_admits_cluster_members_only(receiver):
    with pytest.raises(ConnectionError, match="refused our cluster credentials"):
        BulkLink("127.0.0.1", receiver.bulk.port, "not-the-secret", verify=True)
    BulkLink("127.0.0.1", receiver.bulk.port, SECRET, verify=True).close()


def test_a_frame_with_a_wrong_token_writes_nothing(receiver):
    source = _source(seed=5)
    sender = BulkKVSender(receiver.layout, "prefill", auth=ClusterAuth(secret=SECRET))
    try:
        receiver.inbox.open("r", DST_BLOCKS, TOKEN)
        session = sender.open("r", receiver.ticket("r", token="guessed"))
        _push_all(session, source)
        with pytest.raises(TransferError, match="PERMISSION_DENIED"):
            session.commit(7, None, 10.0)
        assert not receiver.cache.data.any()
        assert receiver.committed == []
        # The link survives a refused frame: the right token still lands on it.
        good = sender.open("r", receiver.ticket("r"))
        _push_all(good, source)
        good.commit(7, None, 10.0)
        assert receiver.committed == ["r"]
    finally:
        sender.close()


def _member_connection(port: int) -> socket.socket:
    """A connection to the bulk listener past its hello (the cluster secret proven), for frames written by hand."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = _read(sock, len(bulk_transport.HELLO) + 1 + bulk_transport.NONCE_BYTES)
    sock.sendall(bulk_transport.hello_proof(SECRET, greeting[len(bulk_transport.HELLO) + 1 :]))
    assert _read(sock, 1) == b"\x00"
    return sock


def _read(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, "the receiver closed the connection"
        data += chunk
    return data


def _ack(sock: socket.socket) -> str:
    (length,) = struct.unpack("!I", _read(sock, 4))
    return _read(sock, length).decode()


def _regions(cache: PagedKVCache, layer: int, blocks: list[int]) -> bytes:
    return cache.read_regions(layer, blocks).numpy().tobytes()


def _frame(request_id: str, token: str, pieces: list[tuple[int, list[int], bytes]], checksums=None) -> bytes:
    """A frame written by hand: ``pieces`` as (layer, destination blocks, their bytes), the trailer holding each
    piece's true checksum unless ``checksums`` says otherwise."""
    if checksums is None:
        checksums = [checksum(data) for _, _, data in pieces]
    header = frame_header(request_id, token, [(layer, blocks) for layer, blocks, _ in pieces])
    return header + b"".join(data for _, _, data in pieces) + frame_trailer(checksums)


def test_a_frame_of_several_pieces_lands_each_and_a_refused_piece_leaves_the_link_working(receiver):
    """One frame carries pieces of two layers (one layer cut in two): each lands in its blocks. A frame whose
    middle piece names a block outside the reservation is refused whole with the reason: no piece of it is
    written (all are read off the wire), and the next frame on the connection lands."""
    source = _source(seed=11)
    receiver.inbox.open("r", DST_BLOCKS, TOKEN)
    sock = _member_connection(receiver.bulk.port)
    try:
        cut = [(0, SRC_BLOCKS[:2], DST_BLOCKS[:2]), (0, SRC_BLOCKS[2:], DST_BLOCKS[2:]), (1, SRC_BLOCKS, DST_BLOCKS)]
        sock.sendall(_frame("r", TOKEN, [(layer, dst, _regions(source, layer, src)) for layer, src, dst in cut]))
        assert _ack(sock) == ""
        for layer in (0, 1):
            assert torch.equal(receiver.cache.read_regions(layer, DST_BLOCKS), source.read_regions(layer, SRC_BLOCKS))

        stray = max(set(range(LAYOUT.num_blocks)) - set(DST_BLOCKS))
        head, tail = _regions(source, 2, SRC_BLOCKS[:3]), _regions(source, 2, SRC_BLOCKS[3:])
        pieces = [(2, DST_BLOCKS[:3], head), (2, [stray], bytes(LAYOUT.region_bytes)), (2, DST_BLOCKS[3:], tail)]
        sock.sendall(_frame("r", TOKEN, pieces))
        assert _ack(sock).startswith(f"INVALID_ARGUMENT blocks [{stray}] are not reserved")
        assert not receiver.cache.read_regions(2, DST_BLOCKS).any()
        assert not receiver.cache.read_regions(2, [stray]).any()
        assert not receiver.inbox.layers_complete("r")

        sock.sendall(_frame("r", TOKEN, [(2, DST_BLOCKS[:3], head), (2, DST_BLOCKS[3:], tail)]))
        assert _ack(sock) == ""
        assert receiver.inbox.layers_complete("r")
        assert torch.equal(receiver.cache.read_regions(2, DST_BLOCKS), source.read_regions(2, SRC_BLOCKS))
    finally:
        sock.close()


def test_the_trailer_checksums_decide_what_lands(receiver):
    """The checksums follow the regions, in the frame's trailer: a frame whose trailer disagrees with its second
    piece is refused (DATA_LOSS, the reservation stops) and none of its pieces counts as landed; a frame sent
    unchecked (its header says so, its trailer is zeros) lands as it came."""
    source = _source(seed=14)
    receiver.inbox.open("r", DST_BLOCKS, TOKEN)
    receiver.inbox.open("s", DST_BLOCKS, TOKEN)
    sock = _member_connection(receiver.bulk.port)
    try:
        pieces = [(layer, DST_BLOCKS, _regions(source, layer, SRC_BLOCKS)) for layer in (0, 1)]
        truth = [checksum(data) for _, _, data in pieces]
        sock.sendall(_frame("r", TOKEN, pieces, checksums=[truth[0], truth[1] ^ 1]))
        assert _ack(sock) == "DATA_LOSS checksum mismatch on layer 1 of r"
        assert receiver.aborted and receiver.aborted[0][0] == "r"
        assert not receiver.inbox.pinned("r")

        header = frame_header("s", TOKEN, [(layer, blocks) for layer, blocks, _ in pieces], checked=False)
        sock.sendall(header + b"".join(data for _, _, data in pieces) + frame_trailer([0, 0]))
        assert _ack(sock) == ""
        for layer in (0, 1):
            assert torch.equal(receiver.cache.read_regions(layer, DST_BLOCKS), source.read_regions(layer, SRC_BLOCKS))
        assert receiver.inbox.get("s").written[1] == set(DST_BLOCKS)
    finally:
        sock.close()


def test_the_commit_rides_the_first_link_with_its_first_token_and_trace_context(receiver, monkeypatch):
    """Five sessions at once over three links: each commit goes on the session's first link, not in a Commit
    call, with the first token, its logprob and the session's trace context, and is accepted only once the
    pieces on the other links landed; every session lands exactly (no link waits for another for good)."""
    seen: dict[str, tuple] = {}
    link_commit = receiver.service.link_commit

    def record(request, metadata):
        seen[request.request_id] = (request.first_token_id, request.first_logprob, metadata)
        link_commit(request, metadata)

    monkeypatch.setattr(receiver.service, "link_commit", record)
    sender = BulkKVSender(receiver.layout, "prefill", auth=ClusterAuth(secret=SECRET), connections=3, piece_bytes=512)
    sources = {f"r{i}": _source(seed=20 + i) for i in range(5)}
    blocks = {request_id: list(range(6 * i, 6 * i + 6)) for i, request_id in enumerate(sources)}

    def one(request_id: str) -> None:
        receiver.inbox.open(request_id, blocks[request_id], TOKEN)
        ticket = loopback_ticket(request_id, "grpc", receiver.address, receiver.layout, blocks[request_id], TOKEN)
        session = sender.open(request_id, ticket, metadata=(("traceparent", f"00-{request_id}"),))
        for layer in range(LAYOUT.num_layers):
            session.push_layer(sources[request_id], layer, SRC_BLOCKS, blocks[request_id])
        logprob = common_pb2.TokenLogprob(token_id=9, logprob=-0.25)
        session.commit(9, logprob, 10.0)

    try:
        threads = [threading.Thread(target=one, args=(request_id,)) for request_id in sources]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(receiver.committed) == sorted(sources)
        for request_id, source in sources.items():
            first_token, logprob, metadata = seen[request_id]
            assert (first_token, logprob.token_id, logprob.logprob) == (9, 9, -0.25)
            assert metadata == (("traceparent", f"00-{request_id}"),)
            _assert_landed(receiver, source, blocks[request_id])
    finally:
        sender.close()


def test_a_refused_commit_names_its_reason_and_the_links_carry_the_next_session(receiver, monkeypatch):
    """A session whose last layer never comes: its commit on the link is refused with the receiver's code and
    reason, the reservation stops, and the same links (none broken) carry the next session to its commit."""
    monkeypatch.setattr(receiver_service, "COMMIT_WAIT_S", 0.3)
    sender = BulkKVSender(receiver.layout, "prefill", auth=ClusterAuth(secret=SECRET), connections=2)
    try:
        receiver.inbox.open("r", DST_BLOCKS, TOKEN)
        session = sender.open("r", receiver.ticket("r"))
        for layer in range(LAYOUT.num_layers - 1):
            session.push_layer(_source(seed=30), layer, SRC_BLOCKS, DST_BLOCKS)
        with pytest.raises(TransferError, match=r"refused the KV: FAILED_PRECONDITION commit before layers \[2\]"):
            session.commit(7, None, 10.0)
        assert receiver.committed == [] and [request_id for request_id, _ in receiver.aborted] == ["r"]
        links = session._links
        assert links and not any(link.broken for link in links)

        assert _one_session(receiver, sender, "s", seed=31)._links == links
        assert receiver.committed == ["s"]
    finally:
        sender.close()


def test_commit_frames_written_by_hand_are_checked_before_anything_is_decided(receiver):
    """On one member connection: a commit with a wrong token, for another instance, or with a body that is not
    a CommitRequest is answered with the reason and decides nothing; the right one, once the data landed, is
    accepted. A commit frame larger than MAX_COMMIT_BYTES ends its connection."""
    source = _source(seed=13)
    receiver.inbox.open("r", DST_BLOCKS, TOKEN)
    good = kv_transfer_pb2.CommitRequest(instance_id="instance-1", first_token_id=7)
    sock = _member_connection(receiver.bulk.port)
    try:
        pieces = [(layer, DST_BLOCKS, _regions(source, layer, SRC_BLOCKS)) for layer in range(LAYOUT.num_layers)]
        sock.sendall(_frame("r", TOKEN, pieces))
        assert _ack(sock) == ""

        sock.sendall(commit_frame("r", "not-the-token", good, None))
        assert _ack(sock) == "PERMISSION_DENIED wrong ticket token for reservation 'r'"
        other = kv_transfer_pb2.CommitRequest(instance_id="instance-2", first_token_id=7)
        sock.sendall(commit_frame("r", TOKEN, other, None))
        assert _ack(sock).startswith("FAILED_PRECONDITION ticket is for instance instance-2")
        body, context = good.SerializeToString(), b"[[1]]"
        sock.sendall(frame_header("r", TOKEN, []) + struct.pack("!II", len(body), len(context)) + body + context)
        assert _ack(sock).startswith("INVALID_ARGUMENT malformed commit for 'r'")
        body = b"\xff\xff\xff"
        sock.sendall(frame_header("r", TOKEN, []) + struct.pack("!II", len(body), 0) + body)
        assert _ack(sock).startswith("INVALID_ARGUMENT malformed commit for 'r'")
        assert receiver.committed == [] and receiver.aborted == []

        body = good.SerializeToString()  # no trace context: no bytes for it
        sock.sendall(frame_header("r", TOKEN, []) + struct.pack("!II", len(body), 0) + body)
        assert _ack(sock) == ""
        assert receiver.committed == ["r"]
    finally:
        sock.close()
    sock = _member_connection(receiver.bulk.port)
    try:
        too_long = bulk_transport.MAX_COMMIT_BYTES + 1
        sock.sendall(frame_header("r", TOKEN, []) + struct.pack("!II", too_long, 0))
        assert sock.recv(1) == b"", "the receiver ends a connection that announces an oversized commit"
    finally:
        sock.close()


class _Gate:
    """A layer whose K/V is not written yet (a ``LayerReady``): a link that reads it waits until ``open``."""

    def __init__(self) -> None:
        self.waited_on = threading.Event()
        self._open = threading.Event()

    def query(self) -> bool:
        return self._open.is_set()

    def synchronize(self) -> None:
        self.waited_on.set()
        assert self._open.wait(10), "the gate was never opened"

    def wait(self, stream=None) -> None:
        self.synchronize()

    def open(self) -> None:
        self._open.set()


def test_pieces_queued_while_the_link_is_busy_go_out_as_one_frame(receiver, monkeypatch):
    """The link's sending thread is held reading layer 0 (not written yet) while layers 1 and 2 are pushed:
    they follow as one frame of two pieces, not two frames, and everything lands exactly."""
    frames: list[int] = []
    header = bulk_transport.frame_header
    monkeypatch.setattr(
        bulk_transport,
        "frame_header",
        lambda r, t, pieces, *rest: frames.append(len(pieces)) or header(r, t, pieces, *rest),
    )
    source = _source(seed=12)
    sender = BulkKVSender(receiver.layout, "prefill", auth=ClusterAuth(secret=SECRET), connections=1)
    try:
        receiver.inbox.open("r", DST_BLOCKS, TOKEN)
        session = sender.open("r", receiver.ticket("r"))
        gate = _Gate()
        session.push_layer(source, 0, SRC_BLOCKS, DST_BLOCKS, gate)
        assert gate.waited_on.wait(10)
        for layer in (1, 2):
            session.push_layer(source, layer, SRC_BLOCKS, DST_BLOCKS)
        gate.open()
        session.commit(7, None, 10.0)
        assert [pieces for pieces in frames if pieces] == [1, 2]
        assert frames.count(0) == 1  # the commit's frame
        assert receiver.committed == ["r"]
        _assert_landed(receiver, source)
    finally:
        sender.close()


def test_a_sender_that_stalls_mid_frame_stops_the_reservation_after_the_stall_timeout(receiver, monkeypatch):
    """A cluster member's link that goes quiet halfway through a frame (alive: TCP keeps answering) holds the
    landing pinned only until STALL_TIMEOUT_S passes without a byte: then the reservation stops, unpinned, and
    an idle link between frames is not ended by the same timeout."""
    monkeypatch.setattr(bulk_transport, "STALL_TIMEOUT_S", 1.0)
    idle = BulkLink("127.0.0.1", receiver.bulk.port, SECRET, verify=True)
    link = BulkLink("127.0.0.1", receiver.bulk.port, SECRET, verify=True)
    try:
        receiver.inbox.open("r", DST_BLOCKS, TOKEN)
        header = frame_header("r", TOKEN, [(0, DST_BLOCKS)])
        link.sock.sendall(header + bytes(LAYOUT.region_bytes * len(DST_BLOCKS) // 2))
        began = time.monotonic()
        while not receiver.aborted and time.monotonic() - began < 10:
            time.sleep(0.05)
        waited = time.monotonic() - began
        assert receiver.aborted and "mid-frame" in receiver.aborted[0][1], receiver.aborted
        assert 0.9 <= waited < 3.0, f"the stalled frame was given up after {waited:.1f} s, not ~1 s"
        assert not receiver.inbox.pinned("r")
        # The quiet link, idle since its hello for longer than the timeout, still carries a frame.
        receiver.inbox.open("s", DST_BLOCKS, TOKEN)
        sender = BulkKVSender(receiver.layout, "prefill", auth=ClusterAuth(secret=SECRET), connections=1)
        try:
            peer = sender.peer(receiver.ticket("s"))
            staged = {} if receiver.bulk._staged else None
            session = BulkSession("s", receiver.ticket("s"), peer, [idle], 1 << 20, copy_streams=staged)
            source = _source(seed=8)
            _push_all(session, source)
            session.commit(7, None, 10.0)
        finally:
            sender.close()
        assert receiver.committed == ["s"]
        assert torch.equal(receiver.cache.read_regions(1, DST_BLOCKS), source.read_regions(1, SRC_BLOCKS))
    finally:
        link.close()
        idle.close()


def test_a_frame_that_trickles_holds_no_blocks_once_its_reservation_stopped(receiver):
    """A byte now and then, each within the stall timeout, kept a frame's landing pinned, and so its reservation's
    blocks held past its lease, for as long as the sender liked: once the reservation stops (its lease ran out here),
    the frame's next byte unpins it, and the link answers the frame refused."""
    receiver.inbox.open("r", DST_BLOCKS, TOKEN)
    sock = _member_connection(receiver.bulk.port)  # by hand: a BulkLink's own thread would read the ack
    try:
        payload = LAYOUT.region_bytes * len(DST_BLOCKS)
        # A start that one read takes whole: a larger one, still being read when the reservation stops, would unpin
        # it by itself (each read checks the gate), as it did under load
        started = min(1024, payload // 2)
        sock.sendall(frame_header("r", TOKEN, [(0, DST_BLOCKS)]) + bytes(started))
        assert wait_for(lambda: receiver.inbox.pinned("r"), 5), "the frame never started landing"
        time.sleep(0.2)  # the start read
        receiver.inbox.close("r", "lease expired before the KV landed")  # what the decode worker's tick does
        time.sleep(0.2)
        assert receiver.inbox.pinned("r"), "nothing came since: the read still waits"
        sock.sendall(b"\0")  # the trickle's next byte
        assert wait_for(lambda: not receiver.inbox.pinned("r"), 5), "the stopped reservation is still pinned"
        sock.sendall(bytes(payload - started - 1) + frame_trailer([0]))  # the rest is drained
        assert "takes no more KV: lease expired" in _ack(sock)
    finally:
        sock.close()


def test_silent_connections_from_many_addresses_keep_no_member_off_the_link(receiver):
    """Neighbours on enough addresses can hold every one of the listener's MAX_HELLOS slots (each address its
    MAX_HELLOS_PER_HOST): an address that proved the cluster secret before still gets its links, a new one does not."""
    source = _source(seed=11)
    first = BulkKVSender(receiver.layout, "prefill", auth=ClusterAuth(secret=SECRET))
    try:
        _one_session(receiver, first, "before", seed=11)  # 127.0.0.1 is a member from now on
    finally:
        first.close()
    per_host = bulk_transport.MAX_HELLOS_PER_HOST
    hosts = [f"127.0.0.{10 + i}" for i in range(-(-bulk_transport.MAX_HELLOS // per_host))]
    silent = [
        socket.create_connection(("127.0.0.1", receiver.bulk.port), timeout=5, source_address=(host, 0))
        for host in hosts
        for _ in range(per_host)
    ]
    try:
        assert wait_for(lambda: sum(receiver.bulk._hellos.values()) >= bulk_transport.MAX_HELLOS, 3)
        stranger = socket.create_connection(
            ("127.0.0.1", receiver.bulk.port), timeout=5, source_address=("127.0.0.99", 0)
        )
        with stranger:
            assert stranger.recv(64) == b"", "a new address got a hello slot past MAX_HELLOS"
        member = BulkKVSender(receiver.layout, "prefill", auth=ClusterAuth(secret=SECRET))
        try:
            receiver.inbox.open("after", DST_BLOCKS, TOKEN)
            session = member.open("after", receiver.ticket("after"))
            assert isinstance(session, BulkSession), f"a member was kept off the bulk link: {session}"
            _push_all(session, source)
            session.commit(7, None, 10.0)
        finally:
            member.close()
        _assert_landed(receiver, source)
    finally:
        for sock in silent:
            sock.close()


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_without_a_bulk_listener_kv_goes_in_grpc_messages():
    receiver = Receiver(bulk=False)
    source = _source(seed=6)
    sender = BulkKVSender(receiver.layout, "prefill", auth=ClusterAuth(secret=SECRET))
    try:
        receiver.inbox.open("r", DST_BLOCKS, TOKEN)
        session = sender.open("r", receiver.ticket("r"))
        assert isinstance(session, GrpcSession)
        _push_all(session, source)
        session.commit(7, None, 10.0)
        assert torch.equal(receiver.cache.read_regions(2, DST_BLOCKS), source.read_regions(2, SRC_BLOCKS))
    finally:
        sender.close()
        receiver.stop()


def test_a_listener_on_another_wire_version_is_not_used_and_kv_goes_in_grpc_messages():
    """The handshake offers a bulk port whose listener greets with another wire version (a release before
    the commit rode the link): the sender does not use it, and the session goes in PushKV messages, exactly."""
    receiver = Receiver()
    other = socket.create_server(("127.0.0.1", 0))
    greeted: list[socket.socket] = []

    def greet() -> None:
        while True:
            try:
                connection, _ = other.accept()
            except OSError:
                return
            greeted.append(connection)
            connection.sendall(bulk_transport.HELLO + bytes([bulk_transport.VERSION - 1]) + bytes(32))
            try:  # it admits whoever answers: only the version keeps the sender off this link
                if len(connection.recv(32, socket.MSG_WAITALL)) == 32:
                    connection.sendall(b"\x00")
            except OSError:
                pass

    threading.Thread(target=greet, daemon=True).start()
    receiver.bulk.port = other.getsockname()[1]  # what the handshake offers
    sender = BulkKVSender(receiver.layout, "prefill", auth=ClusterAuth(secret=SECRET))
    try:
        assert isinstance(_one_session(receiver, sender, "r", seed=14), GrpcSession) and greeted
        assert receiver.committed == ["r"]
    finally:
        sender.close()
        other.close()
        for connection in greeted:
            connection.close()
        receiver.stop()


def test_a_bulk_listener_that_refused_is_connected_again_after_a_while(monkeypatch):
    """The handshake offers a bulk port that refuses the connect: KV goes in gRPC messages, exactly, and the
    connect is tried again RECONNECT_S later (not never): once the listener is back, KV takes the bulk links."""
    monkeypatch.setattr(bulk_transport, "RECONNECT_S", 0.5)
    receiver = Receiver()
    port = receiver.bulk.port
    receiver.bulk.close()  # refuses connections from now on
    sender = BulkKVSender(receiver.layout, "prefill", auth=ClusterAuth(secret=SECRET))
    try:
        kinds = []
        for index, pause in enumerate((0.0, 0.0, 0.7)):
            time.sleep(pause)
            if index == 2:  # the listener is back on its port
                receiver.bulk = BulkReceiver(receiver.inbox, "127.0.0.1", port, SECRET)
                receiver.bulk.take_commits(receiver.service)  # as the service does with its own
            source = _source(seed=10 + index)
            request_id = f"r{index}"
            receiver.inbox.open(request_id, DST_BLOCKS, TOKEN)
            session = sender.open(request_id, receiver.ticket(request_id))
            kinds.append(type(session))
            _push_all(session, source)
            session.commit(7, None, 10.0)
            _assert_landed(receiver, source)
        assert kinds == [GrpcSession, GrpcSession, BulkSession]
        assert receiver.committed == ["r0", "r1", "r2"]
    finally:
        sender.close()
        receiver.stop()
