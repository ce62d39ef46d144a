"""KV at line rate over plain TCP: the gRPC transport's bulk path.

Control stays on gRPC — handshake, abort (``KVReceiver``) — and the regions' bytes and the commit
take TCP connections the handshake negotiated: the sender asks for bulk (``HandshakeRequest.bulk``),
a receiver that has a bulk listener answers its port (``HandshakeResponse.bulk_port``), and the
sender opens ``connections`` links to it. Either side without bulk, or a listener the sender cannot
reach, and the session falls back to ``PushKV`` messages (kv_transfer/grpc_transport.py).

    prefill (sender)                                  decode (receiver)
    push_layer ─ piece ─> link queue ─ sendmsg(header, pool memoryviews) ─> recvmsg_into the destination
                         then xxh3 of what went ─ sendmsg(trailer)        blocks, pinned (inbox) ─ xxh3 in
                                                                          place ─ trailer compared ─ ack
    commit: a commit frame on the session's first link, behind its pieces there, sent while the last
            pieces land; the receiver answers it in that frame's ack once every layer landed and
            was verified, from every link, and the owner accepted the KV (KVReceiverService.commit,
            as for a Commit call); abort: Commit(abort) over gRPC

No intermediate copy on either side for pools in host memory: the sender writes straight from the
pool's memory, the receiver reads straight into the reservation's blocks while the landing is pinned
(so they are never written after the reservation stopped, nor freed while written). Adjacent blocks
go as one run; the checksum is xxh3 over the regions in block order (kv_transfer/integrity.py),
hashed in place on both sides. The checksums follow the regions, in the frame's trailer: the sender
sends a frame in chunks of at most ``IN_CACHE_BYTES`` and hashes each just after it went, while the
receiver lands it, rather than hashing a whole frame before its first byte (which held a second
link's first byte up 0.4-1.6 ms at 16 MiB on two cores); the receiver reads each piece in such
chunks and hashes each as it lands. So each side hashes bytes its own copy just brought into cache,
never a second pass over memory. The receiver compares once the trailer came; a mismatch refuses the
frame and stops the reservation (its blocks were written, pinned, and are never adopted). A pool in
GPU memory is staged: the sender queues each piece's copy into pinned host memory on a side stream
behind the layer's CUDA event (as the PushKV path does) and sends and hashes that buffer; the
receiver reads a piece into a pinned buffer of its connection, hashes it there and copies it into
the pool. The checksum is the same xxh3 of the bytes on the wire, so either end may keep its pool
in either memory.

Wire (big-endian):

    hello  receiver -> sender  b"SSKV" version:u8 nonce[32]
           sender -> receiver  HMAC-SHA256(cluster secret, HELLO_CONTEXT + nonce)    32 bytes
           receiver -> sender  0 (admitted) or 1 (refused; the connection closes)
    frame  sender -> receiver  b"KVF4" request_id_len:u16 token_len:u16 pieces:u16 checked:u8 | request id
                               | ticket token | pieces x (layer:u32 num_blocks:u32)
                               | every piece's block ids (u32 each), piece after piece
                               | every piece's regions (num_blocks x region_bytes, in block order)
                               | pieces x checksum:u64 (the trailer; 0: unchecked)
    commit sender -> receiver  a frame of 0 pieces: its header, request id and ticket token
                               | request_len:u32 context_len:u32 | a CommitRequest (its first token,
                               logprob and instance; the frame names the request and token)
                               | the sender's trace context (JSON [[key, value], ...], or no bytes)
    ack    receiver -> sender  length:u32 | "" when every piece landed (and verified), or the commit
                               was accepted, else "CODE message" (a TransferError code: the first
                               piece that did not, or why the commit was refused); one per frame,
                               in order

The link that carries a commit waits for the session's pieces on its other links; those links never
carry a commit, so they never wait for it, and no two links can wait for each other. The wait is the
Commit call's (receiver_service.COMMIT_WAIT_S at most, and it ends when the reservation stops, as it
does when another of the session's links breaks); frames behind the commit on its link wait with it.

A piece is one layer's blocks (a layer larger than the frame size is cut into several). A link sends
the pieces queued for it meanwhile as one frame, ``MAX_PIECES`` at most, when they belong to the same
request: a whole-request push, or layers pushed faster than the link drains, costs a header, a
trailer and an ack per frame rather than per layer, and lands under one pin. A frame that names a
layer or block it may not is refused whole, before any of it is written.

Trust is the control path's: the link authenticates with the cluster secret (it never crosses the
wire), and every frame presents its ticket's token (``KVInbox.authorize``). Without TLS the bytes
travel in the clear, as gRPC's without TLS do; with TLS configured the bulk path is not offered.

Threads: ``push_layer`` (engine thread) only queues a layer's pieces; each link has a sending
thread, which sends the pieces of a frame and hashes them as they go (xxh3 frees the GIL, so two
links hash on two cores), and an ack-reading thread; the receiver has an accepting thread and one
thread per connection. Socket buffers: raised to ``SOCKET_BUFFER_BYTES`` where the kernel allows
it (``net.core.[rw]mem_max``), else left to TCP autotuning, which a smaller fixed size would cap.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence

import torch
from google.protobuf.message import DecodeError

from engine.kv_cache import PagedKVCache
from engine.layer_ready import COMPLETED, LayerReady
from kv_transfer.errors import TransferError
from kv_transfer.grpc_transport import DEFAULT_CHUNK_BYTES, GrpcKVSender, stage_regions
from kv_transfer.inbox import KVInbox
from kv_transfer.integrity import in_cache_sized, region_views, running_checksum
from kv_transfer.sender import OutboundSession, OutOfBandSession, Peer, block_pieces
from protos import common_pb2, decode_pb2, kv_transfer_pb2
from protos.cluster_auth import ClusterAuth, end_silent_peers

log = logging.getLogger(__name__)

VERSION = 4
HELLO = b"SSKV"
HELLO_CONTEXT = b"splitserve-kv-bulk-v1"
NONCE_BYTES = 32
FRAME_MAGIC = b"KVF4"
FRAME_HEADER = struct.Struct("!4sHHHB")  # magic, request id and token lengths, pieces, checked
PIECE_HEADER = struct.Struct("!II")  # layer, blocks
CHECKSUM = struct.Struct("!Q")  # a piece's, in the frame's trailer
MAX_PIECES = 64  # per frame: bounds its header, and what one ack answers for
COMMIT_HEADER = struct.Struct("!II")  # a commit frame's CommitRequest bytes, its trace context's bytes
MAX_COMMIT_BYTES = 64 * 1024  # both together: a first token's logprobs and a trace context fit many times
ACK_HEADER = struct.Struct("!I")
DEFAULT_CONNECTIONS = 2
DEFAULT_PIECE_BYTES = 8 * 1024 * 1024  # a layer larger than this is cut into pieces (spread over links)
SOCKET_BUFFER_BYTES = 32 * 1024 * 1024  # ~ the bandwidth-delay product of 100 Gb/s x 2.5 ms
CONNECT_TIMEOUT_S = 5.0
RECONNECT_S = 5.0  # after a failed connect, a peer's KV goes in gRPC messages this long before the next try
HELLO_TIMEOUT_S = 5.0
# Once a frame started, each of its reads and writes must progress within this: a stalled link
# (no byte for this long) is broken, which unpins the landing and fails the sessions on it.
STALL_TIMEOUT_S = 30.0
# A peer silent for cluster_auth.PEER_SILENCE_S (10 s) ends the link sooner, with its frames, whichever end
# notices (cluster_auth.end_silent_peers): a host that vanishes mid-frame is not waited for this long.
MAX_CONNECTIONS = 256  # admitted links
# Connections still in their hello (HELLO_TIMEOUT_S at most, all of it), in all and from one address: a
# neighbour that opens connections and says nothing holds these few slots, never an admitted link's, and never a
# member's (an address that proved the secret before is held to its own address's slots only).
MAX_HELLOS = 64
MAX_HELLOS_PER_HOST = 8
REFUSAL_LOG_S = 10.0  # refusals are logged at most this often per host
_DRAIN_BYTES = 1 << 20


def hello_proof(secret: str | None, nonce: bytes) -> bytes:
    return hmac.new((secret or "").encode(), HELLO_CONTEXT + nonce, hashlib.sha256).digest()


def frame_header(
    request_id: str, token: str, pieces: Sequence[tuple[int, Sequence[int]]], checked: bool = True
) -> bytes:
    """A frame's header: its ``pieces`` as (layer, destination blocks); ``checked``: its trailer holds their
    checksums (else zeros, and the receiver hashes nothing)."""
    request, ticket = request_id.encode(), token.encode()
    blocks = [block for _, dst_blocks in pieces for block in dst_blocks]
    return b"".join(
        [
            FRAME_HEADER.pack(FRAME_MAGIC, len(request), len(ticket), len(pieces), checked),
            request,
            ticket,
            *(PIECE_HEADER.pack(layer, len(dst_blocks)) for layer, dst_blocks in pieces),
            struct.pack(f"!{len(blocks)}I", *blocks),
        ]
    )


def frame_trailer(checksums: Sequence[int]) -> bytes:
    """A frame's trailer, behind its regions: each piece's checksum (0: unchecked), in order."""
    return struct.pack(f"!{len(checksums)}Q", *checksums)


def commit_frame(request_id: str, token: str, request: kv_transfer_pb2.CommitRequest, metadata) -> bytes:
    """A commit frame: ``request`` (first token, logprob, instance) for ``request_id``, with the trace
    context the session's gRPC calls carry (``metadata``: (key, value) pairs, or None)."""
    body, context = request.SerializeToString(), json.dumps(list(metadata or ())).encode()
    return frame_header(request_id, token, []) + COMMIT_HEADER.pack(len(body), len(context)) + body + context


def tune_socket(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    end_silent_peers(sock)
    for option, limit in ((socket.SO_SNDBUF, "wmem_max"), (socket.SO_RCVBUF, "rmem_max")):
        if _sysctl(f"/proc/sys/net/core/{limit}") >= SOCKET_BUFFER_BYTES:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)


def _sysctl(path: str) -> int:
    try:
        with open(path) as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _recv_exactly(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fills ``view``; with a ``deadline`` (monotonic), all of it by then (TimeoutError otherwise)."""
    got = 0
    while got < len(view):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(view) - got} of {len(view)} bytes still missing at the deadline")
            sock.settimeout(left)
        count = sock.recv_into(view[got:])
        if count == 0:
            raise ConnectionError("the peer closed the bulk connection")
        got += count


def _recv_bytes(sock: socket.socket, count: int, deadline: float | None = None) -> bytes:
    buffer = bytearray(count)
    _recv_exactly(sock, memoryview(buffer), deadline)
    return bytes(buffer)


def _recv_views(sock: socket.socket, views: list[memoryview], arrived: Callable[[int], None]) -> None:
    """Fills every view, in order: ``recvmsg_into`` scatters what has arrived over as many of them as it
    covers, one call rather than one per view (a frame's pieces land in a few calls). ``arrived`` is told each
    call's bytes, and raises to stop (a frame that trickles in must not hold its reservation's blocks past its
    lease)."""
    views = list(views)
    while views:
        count = sock.recvmsg_into(views[:512])[0]  # IOV_MAX is 1024 on Linux
        if count == 0:
            raise ConnectionError("the peer closed the bulk connection")
        _advance(views, count)
        arrived(count)


def _send_all(sock: socket.socket, buffers: list) -> None:
    """``sendmsg`` the buffers, resuming after a partial send; no buffer is joined or copied."""
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        _advance(views, sock.sendmsg(views[:512]))  # IOV_MAX is 1024 on Linux


def _advance(views: list[memoryview], count: int) -> None:
    """Drops the first ``count`` bytes of ``views`` (a scatter/gather list) after a call moved them."""
    while count and views:
        if count >= len(views[0]):
            count -= len(views.pop(0))
        else:
            views[0] = views[0][count:]
            count = 0


# -- receiver ---------------------------------------------------------------------------------------


class BulkReceiver:
    """The decode worker's bulk listener: authenticated connections whose frames land in the inbox's
    open reservations (``KVInbox.receive_in_place``). ``port`` 0 picks a free one; ``.port`` says which."""

    def __init__(
        self, inbox: KVInbox, host: str, port: int = 0, secret: str | None = None, staged: bool | None = None
    ) -> None:
        """``staged``: land frames through a host buffer (default: when the pool is in GPU memory)."""
        self.inbox = inbox
        self._secret = secret
        self._staged = inbox.cache.data.is_cuda if staged is None else staged
        self._listener = socket.create_server((host, port), family=_family(host), backlog=64)
        tune_socket(self._listener)  # accepted sockets inherit the buffer sizes
        self.port = self._listener.getsockname()[1]
        self._connections: set[socket.socket] = set()  # every open one, in its hello or admitted
        self._hellos: collections.Counter[str] = collections.Counter()  # connections in their hello, per host
        self._members: set[str] = set()  # hosts that proved the cluster secret: the cluster's, a bounded few
        self._refusals_logged: dict[str, float] = {}  # per host: when a refusal was last logged (accepting thread)
        self._lock = threading.Lock()
        self._closed = False
        self._commits = None  # KVReceiverService: decides the commits frames carry (``take_commits``)
        threading.Thread(target=self._accept, name="kv-bulk-accept", daemon=True).start()

    def take_commits(self, service) -> None:
        """The service whose ``link_commit(request, trace metadata)`` decides commit frames (returns once
        accepted, raises TransferError when refused); without one, a commit frame is answered
        UNIMPLEMENTED and the sender's session fails."""
        self._commits = service

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return  # closed
            host = peer[0]
            with self._lock:
                refused = self._refusal(host)
                if refused is None:
                    self._connections.add(sock)
                    self._hellos[host] += 1
            if refused is not None:
                sock.close()
                if time.monotonic() - self._refusals_logged.get(host, -REFUSAL_LOG_S) >= REFUSAL_LOG_S:
                    self._refusals_logged[host] = time.monotonic()
                    log.warning("bulk KV connections from %s refused: %s", host, refused)
                continue
            threading.Thread(target=self._serve, args=(sock, host), name="kv-bulk-conn", daemon=True).start()

    def _refusal(self, host: str) -> str | None:
        """Under ``_lock``: why a new connection from ``host`` is refused, if it is."""
        hellos = sum(self._hellos.values())
        if self._closed:
            return "the listener is closing"
        if self._hellos[host] >= MAX_HELLOS_PER_HOST:
            return f"{MAX_HELLOS_PER_HOST} of its connections are in their hello already"
        if hellos >= MAX_HELLOS and host not in self._members:
            return f"{MAX_HELLOS} connections are in their hello already"
        if len(self._connections) - hellos >= MAX_CONNECTIONS:
            return f"{MAX_CONNECTIONS} links are open already"
        return None

    def _serve(self, sock: socket.socket, host: str) -> None:
        sent_here: set[str] = set()  # reservations this link carried frames for
        staging = _Staging() if self._staged else None
        in_hello = True
        try:
            admitted = self._admit(sock)
            with self._lock:
                self._end_hello(host)
                in_hello = False
                if admitted:
                    self._members.add(host)
            if admitted:
                sock.settimeout(STALL_TIMEOUT_S)  # each read within a frame; between frames, _frame waits on
                while self._frame(sock, sent_here, staging):
                    pass
        except (OSError, ConnectionError, TransferError) as exc:
            log.info("bulk KV connection closed: %s", exc)
        finally:
            with self._lock:
                if in_hello:
                    self._end_hello(host)
                self._connections.discard(sock)
            sock.close()
            # As a broken push stream does: a sender whose link is gone (it died, or the link broke)
            # will not finish; its reservations not committed yet stop now, not at lease expiry.
            for request_id in sent_here:
                if self.inbox.get(request_id) is not None:
                    self.inbox.abort(request_id, "the bulk KV link closed before a commit")

    def _end_hello(self, host: str) -> None:
        """Under ``_lock``: a connection from ``host`` is through its hello (admitted or not)."""
        self._hellos[host] -= 1
        if not self._hellos[host]:
            del self._hellos[host]

    def _admit(self, sock: socket.socket) -> bool:
        """The hello: a proof of the cluster secret within HELLO_TIMEOUT_S in all (a byte now and then does
        not keep a connection in its hello longer)."""
        tune_socket(sock)
        deadline = time.monotonic() + HELLO_TIMEOUT_S
        sock.settimeout(HELLO_TIMEOUT_S)
        nonce = secrets.token_bytes(NONCE_BYTES)
        sock.sendall(HELLO + bytes([VERSION]) + nonce)
        proof = _recv_bytes(sock, hashlib.sha256().digest_size, deadline)
        admitted = self._secret is None or hmac.compare_digest(proof, hello_proof(self._secret, nonce))
        sock.sendall(b"\x00" if admitted else b"\x01")
        if not admitted:
            log.warning("bulk KV connection from %s refused: wrong cluster credentials", _peer_name(sock))
        return admitted

    def _frame(self, sock: socket.socket, sent_here: set[str], staging: _Staging | None) -> bool:
        """One frame: False when the sender closed the connection between frames."""
        header = bytearray(FRAME_HEADER.size)
        first = _recv_into_idle(sock, memoryview(header))  # an idle link waits for its next frame as long as it likes
        if first == 0:
            return False
        _recv_exactly(sock, memoryview(header)[first:])
        magic, id_len, token_len, count, checked = FRAME_HEADER.unpack(header)
        if magic != FRAME_MAGIC or count > MAX_PIECES:
            raise ConnectionError(f"malformed bulk KV frame (magic {magic!r}, {count} pieces)")
        names = _recv_bytes(sock, id_len + token_len + PIECE_HEADER.size * count)
        request_id = names[:id_len].decode(errors="replace")
        token = names[id_len : id_len + token_len].decode(errors="replace")
        if count == 0:
            answer = self._commit(sock, request_id, token)
        else:
            pieces = self._pieces(sock, names[id_len + token_len :])
            answer = self._land(sock, request_id, token, pieces, bool(checked), sent_here, staging)
        sock.sendall(ACK_HEADER.pack(len(answer)) + answer)
        return True

    def _pieces(self, sock: socket.socket, shapes_bytes: bytes) -> list[tuple[int, tuple[int, ...]]]:
        """A frame's pieces as (layer, destination blocks), their block ids read off the wire."""
        shapes = list(PIECE_HEADER.iter_unpack(shapes_bytes))
        if any(not 0 < num_blocks <= self.inbox.cache.layout.num_blocks for _, num_blocks in shapes):
            raise ConnectionError(f"malformed bulk KV frame (pieces of {[n for _, n in shapes]} blocks)")
        total = sum(num_blocks for _, num_blocks in shapes)
        blocks = struct.unpack(f"!{total}I", _recv_bytes(sock, 4 * total))
        pieces, begin = [], 0
        for layer, num_blocks in shapes:
            pieces.append((layer, blocks[begin : begin + num_blocks]))
            begin += num_blocks
        return pieces

    def _commit(self, sock: socket.socket, request_id: str, token: str) -> bytes:
        """A commit frame's body, then its answer (the ack's text): waits, on this link's thread, for the
        session's pieces on the sender's other links (they never wait for this one)."""
        body_len, context_len = COMMIT_HEADER.unpack(_recv_bytes(sock, COMMIT_HEADER.size))
        if body_len + context_len > MAX_COMMIT_BYTES:
            raise ConnectionError(f"malformed bulk KV commit ({body_len + context_len} bytes)")
        body = _recv_bytes(sock, body_len + context_len)
        try:
            request = kv_transfer_pb2.CommitRequest.FromString(body[:body_len])
            context = json.loads(body[body_len:]) if context_len else []  # no bytes: no trace context
            metadata = tuple((str(key), str(value)) for key, value in context)
        except (DecodeError, ValueError, TypeError) as exc:
            return f"INVALID_ARGUMENT malformed commit for {request_id!r}: {exc}".encode()
        if self._commits is None:
            return b"UNIMPLEMENTED this receiver takes commits over gRPC only"
        request.request_id, request.token = request_id, token  # the frame names them, as for its pieces
        try:
            self._commits.link_commit(request, metadata)
            return b""
        except TransferError as exc:
            return _refusal(exc)

    def _land(self, sock, request_id: str, token: str, pieces, checked: bool, sent_here, staging) -> bytes:
        """Receives the frame's pieces into the reservation, each hashed as it lands (while in cache) and checked
        against the trailer's checksums, or drains what is left of the frame once refused (a frame naming a block
        or layer it may not is refused whole, before any byte is written); the ack's text."""
        region = self.inbox.cache.layout.region_bytes
        payload = sum(len(blocks) for _, blocks in pieces) * region + CHECKSUM.size * len(pieces)
        received = 0
        hashing = checked and self.inbox.verify_checksums

        def fill(layer: int, blocks) -> int:  # a piece's regions, each chunk hashed as soon as it landed, in cache
            landing = self.inbox.get(request_id)

            def arrived(count: int) -> None:
                nonlocal received
                received += count
                self.inbox.require_accepting(landing)  # stopped meanwhile: unpinned, the rest drained

            if staging is None:
                views = region_views(self.inbox.cache, layer, blocks)
            else:  # through a host buffer, then copied into the pool
                views = [staging.view(len(blocks) * region)]
            digest = running_checksum()
            for chunk in in_cache_sized(views):
                parts = [part for _, part in chunk]
                _recv_views(sock, parts, arrived)
                if hashing:
                    for part in parts:
                        digest.update(part)
            if staging is not None:
                self.inbox.cache.write_regions(layer, blocks, staging.regions(len(blocks), region))
            return digest.intdigest() if hashing else 0

        def checksums() -> tuple[int, ...]:
            nonlocal received
            trailer = _recv_bytes(sock, CHECKSUM.size * len(pieces))
            received += len(trailer)
            return struct.unpack(f"!{len(pieces)}Q", trailer)

        try:
            self.inbox.authorize(request_id, token)
            if request_id not in sent_here and len(sent_here) >= 64:  # forget reservations already gone
                sent_here.difference_update([r for r in sent_here if self.inbox.get(r) is None])
            sent_here.add(request_id)
            self.inbox.receive_in_place(request_id, pieces, fill, checksums)
            return b""
        except (OSError, ConnectionError):
            # Mid-frame: nobody can finish these layers now. Other frames on this link are their senders' business.
            self.inbox.abort(request_id, "the bulk KV connection broke mid-frame")
            raise
        except TransferError as exc:
            if received < payload:
                _drain(sock, payload - received)
            if exc.code == "DATA_LOSS":  # we are the only writer of these blocks: stop the reservation
                self.inbox.abort(request_id, str(exc))
            return _refusal(exc)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        self._listener.close()
        for sock in connections:
            _shutdown(sock)


class _Staging:
    """One connection's landing buffer for a pool in GPU memory: pinned where CUDA is (the copy into
    the pool reads it directly), grown to the largest piece seen and reused."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def view(self, nbytes: int) -> memoryview:
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        return memoryview(self._buffer.numpy())[:nbytes]

    def regions(self, count: int, region_bytes: int) -> torch.Tensor:
        """What ``view`` received, as ``count`` regions of ``region_bytes`` (the pool's write reads it)."""
        return self._buffer[: count * region_bytes].view(count, region_bytes)


def _refusal(exc: TransferError) -> bytes:
    """An ack's text for a refused piece or commit: "CODE message"."""
    return f"{exc.code} {exc}".encode()


def _drain(sock: socket.socket, count: int) -> None:
    scratch = memoryview(bytearray(min(count, _DRAIN_BYTES)))
    while count:
        view = scratch[: min(count, len(scratch))]
        _recv_exactly(sock, view)
        count -= len(view)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _peer_name(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# -- sender -----------------------------------------------------------------------------------------


class _Answered:
    """What an ack answers (a piece, or a commit): ``acked`` is set with ``error`` None (landed, or
    accepted) or the receiver's/link's reason."""

    def __init__(self, session: BulkSession) -> None:
        self.session = session
        self.error: str | None = None
        self.lost = False  # finished by its link's end, not by the receiver's answer
        self.acked = threading.Event()

    def finish(self, error: str | None, lost: bool = False) -> None:
        if not self.acked.is_set():
            self.error, self.lost = error, lost
            self.acked.set()


class _Piece(_Answered):
    """One layer's blocks on their way (a layer larger than the frame size is cut into several). The
    pool is read between ``begin_reading`` and the end of the send; ``stop_reading`` returns once it no
    longer is, and keeps a piece not yet started from ever starting."""

    def __init__(self, session: BulkSession, cache: PagedKVCache, layer: int, src, dst, ready, staged=None) -> None:
        super().__init__(session)
        self.staged = staged  # grpc_transport._StagedRegions: the pool is read by its copy, the piece sends that
        self.cache = cache
        self.layer = layer
        self.src_blocks = src
        self.dst_blocks = dst
        self.ready = ready
        self.nbytes = len(src) * cache.layout.region_bytes
        self._lock = threading.Lock()
        self._state = "queued"  # queued -> reading -> read, or queued -> cancelled
        self._read = threading.Event()

    def begin_reading(self) -> bool:
        with self._lock:
            if self._state != "queued":
                return False
            self._state = "reading"
            return True

    def end_reading(self) -> None:
        with self._lock:
            self._state = "read"
        self._read.set()

    def stop_reading(self, timeout: float) -> bool:
        """True once the pool is not read by this piece (now or ever again)."""
        with self._lock:
            if self._state == "queued":
                self._state = "cancelled"
                self._read.set()
                self.finish("released before it was sent")
        if self.staged is not None:
            self.staged.stop_reading()  # its copy out of the pool is the only read of it; a send reads the copy
            return True
        return self._read.wait(timeout)

    def regions(self) -> list | None:
        """Sending thread, once reading: the bytes to send and hash (views of the pool, or the staged copy);
        None if the staged copy was released before its regions were read."""
        if self.staged is not None:
            data = self.staged.host_view()
            return None if data is None else [data]
        self.ready.synchronize()  # the layer's K/V are written
        return region_views(self.cache, self.layer, self.src_blocks)


class _Commit(_Answered):
    """A session's commit frame on its way. It reads no pool memory: nothing to end or stop reading."""

    nbytes = 0

    def __init__(self, session: BulkSession, frame: bytes) -> None:
        super().__init__(session)
        self.frame = frame

    def end_reading(self) -> None:
        pass

    def stop_reading(self, timeout: float) -> bool:
        return True


class BulkLink:
    """One authenticated TCP connection to a receiver's bulk listener, with its sending thread (FIFO)
    and its ack-reading thread. Broken for good on any error: every piece on it then fails."""

    def __init__(self, host: str, port: int, secret: str | None, verify: bool) -> None:
        self.verify = verify
        self.name = f"bulk KV link to {host}:{port}"
        self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        try:
            tune_socket(self.sock)
            self.sock.settimeout(HELLO_TIMEOUT_S)
            greeting = _recv_bytes(self.sock, len(HELLO) + 1 + NONCE_BYTES)
            if greeting[: len(HELLO)] != HELLO or greeting[len(HELLO)] != VERSION:
                raise ConnectionError(f"{host}:{port} does not speak bulk KV version {VERSION}")
            self.sock.sendall(hello_proof(secret, greeting[len(HELLO) + 1 :]))
            if _recv_bytes(self.sock, 1) != b"\x00":
                raise ConnectionError(f"{host}:{port} refused our cluster credentials on the bulk KV link")
            self.sock.settimeout(STALL_TIMEOUT_S)
        except BaseException:
            self.sock.close()
            raise
        self.broken: str | None = None
        self.queued_bytes = 0  # queued or sent, not yet acked: where the next piece goes
        self._queued: collections.deque[_Piece | _Commit] = collections.deque()  # for the sending thread
        self._sent: collections.deque[list] = collections.deque()  # frames sent (pieces, or a commit), not acked
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        threading.Thread(target=self._send_loop, name="kv-bulk-send", daemon=True).start()
        threading.Thread(target=self._ack_loop, name="kv-bulk-acks", daemon=True).start()

    def send(self, piece: _Piece | _Commit) -> None:
        with self._lock:
            if self.broken is not None:
                piece.finish(self.broken, lost=True)
                piece.stop_reading(0)
                return
            self.queued_bytes += piece.nbytes
            self._queued.append(piece)
            self._wake.notify()

    def _send_loop(self) -> None:
        while (pieces := self._next_frame()) is not None:
            try:
                self._send_frame(pieces)
            except Exception as exc:  # OSError, or a bug: either way the link ends, and its pieces fail now
                if not isinstance(exc, (OSError, ValueError)):
                    log.exception("%s: sending a frame failed", self.name)
                self.break_link(f"{self.name} failed while sending: {exc}")
                for piece in pieces:
                    piece.finish(self.broken, lost=True)
            finally:
                for piece in pieces:
                    piece.end_reading()

    def _next_frame(self) -> list | None:
        """The next frame: a commit alone, or pieces, each begun reading: the oldest queued piece and those
        of the same session queued right behind it, ``MAX_PIECES`` at most; None once the link is broken."""
        with self._lock:
            while True:
                while not self._queued and self.broken is None:
                    self._wake.wait()
                if self.broken is not None:
                    return None
                if isinstance(self._queued[0], _Commit):
                    return [self._queued.popleft()]
                session, pieces = self._queued[0].session, []
                while (
                    self._queued
                    and self._queued[0].session is session
                    and isinstance(self._queued[0], _Piece)
                    and len(pieces) < MAX_PIECES
                ):
                    piece = self._queued.popleft()
                    if piece.begin_reading():
                        pieces.append(piece)
                    else:  # released before it was sent: never sent, never acked
                        self.queued_bytes -= piece.nbytes
                if pieces:
                    return pieces

    def _send_frame(self, items: list) -> None:
        """A commit's frame, or the pieces' (those still to send)."""
        if isinstance(items[0], _Commit):
            if self._expect_ack(items, dropped=0):
                _send_all(self.sock, [items[0].frame])
            return
        sent, groups, dropped = self._readable(items)
        if self._expect_ack(sent, dropped):
            self._send_pieces(sent, groups)

    def _expect_ack(self, sent: list, dropped: int) -> bool:
        """Before a frame's bytes go, so that the ack reader finds what its ack answers: False if there is
        nothing to send (every piece released meanwhile); raises OSError on a broken link."""
        with self._lock:
            if self.broken is not None:
                raise OSError(self.broken)
            self.queued_bytes -= dropped
            if sent:
                self._sent.append(sent)
            return bool(sent)

    def _send_pieces(self, sent: list[_Piece], groups: list[list]) -> None:
        """The pieces' bytes in sends of at most IN_CACHE_BYTES, each hashed as soon as it went (the copy left
        it in cache; the receiver lands it meanwhile), then the trailer of checksums."""
        session = sent[0].session
        pieces = [(p.layer, p.dst_blocks) for p in sent]
        owners = [index for index, regions in enumerate(groups) for _ in regions]  # each view's piece
        digests = [running_checksum() for _ in sent]
        buffers = [frame_header(session.request_id, session.ticket.token, pieces, self.verify)]
        for chunk in in_cache_sized([view for regions in groups for view in regions]):
            _send_all(self.sock, buffers + [part for _, part in chunk])
            buffers = []
            if self.verify:
                for index, part in chunk:
                    digests[owners[index]].update(part)
        _send_all(self.sock, [frame_trailer([d.intdigest() if self.verify else 0 for d in digests])])

    def _readable(self, pieces: list) -> tuple[list, list, int]:
        """The pieces still to send, each one's buffers, and the bytes of those released before they were read."""
        sent, groups, dropped = [], [], 0
        for piece in pieces:
            regions = piece.regions()
            if regions is None:
                piece.finish("released before it was sent")
                dropped += piece.nbytes
                continue
            sent.append(piece)
            groups.append(regions)
        return sent, groups, dropped

    def _ack_loop(self) -> None:
        try:
            while True:
                (length,) = ACK_HEADER.unpack(_recv_bytes_blocking(self.sock, ACK_HEADER.size))
                text = _recv_bytes_blocking(self.sock, length).decode(errors="replace") if length else ""
                with self._lock:
                    pieces = self._sent.popleft() if self._sent else None
                    self.queued_bytes -= sum(p.nbytes for p in pieces or [])
                if pieces is None:
                    raise ConnectionError("an ack for no frame")
                for piece in pieces:
                    piece.finish(text or None)
        except (OSError, ConnectionError, struct.error) as exc:
            self.break_link(f"{self.name} lost: {exc}")

    def break_link(self, reason: str) -> None:
        with self._lock:
            if self.broken is None:
                self.broken = reason
            pieces = [*self._queued, *(piece for frame in self._sent for piece in frame)]
            self._queued.clear()
            self._sent.clear()
            self.queued_bytes = 0
            self._wake.notify_all()
        _shutdown(self.sock)
        for piece in pieces:
            piece.finish(self.broken, lost=True)

    def close(self) -> None:
        self.break_link(f"{self.name} closed")
        self.sock.close()


def _recv_into_idle(sock: socket.socket, view: memoryview) -> int:
    """``recv_into`` on a socket with a stall timeout that may stay idle as long as the link lives (between
    frames, between acks): bytes read, 0 once the peer closed."""
    while True:
        try:
            return sock.recv_into(view)
        except TimeoutError:
            continue


def _recv_bytes_blocking(sock: socket.socket, count: int) -> bytes:
    """Acks may be far apart (a long frame, or none in flight): the ack reader waits as long as the
    link lives; a stalled send breaks the link, which ends this wait too."""
    buffer = bytearray(count)
    view, got = memoryview(buffer), 0
    while got < count:
        received = _recv_into_idle(sock, view[got:])
        if received == 0:
            raise ConnectionError("the bulk connection ended (the receiver closed it, or it timed out)")
        got += received
    return bytes(buffer)


class BulkSession(OutOfBandSession):
    """A request's KV over bulk links (contract: kv_transfer/sender.py). The pool is read after
    ``push_layer`` returned (by the links' sending threads), so ``reads_after_push``."""

    reads_after_push = True

    def __init__(
        self,
        request_id: str,
        ticket: decode_pb2.Ticket,
        peer: Peer,
        links: list[BulkLink],
        piece_bytes: int,
        metadata=None,
        copy_streams: dict | None = None,
    ) -> None:
        """``copy_streams``: stage every piece through host memory (a CUDA pool; see the module's note),
        with the side streams its copies run on."""
        super().__init__(request_id, ticket, peer, metadata)
        self._links = links
        self._piece_bytes = piece_bytes
        self._pieces: list[_Piece] = []
        self._copy_streams = copy_streams

    def push_layer(
        self,
        cache: PagedKVCache,
        layer: int,
        src_blocks: Sequence[int],
        dst_blocks: Sequence[int],
        ready: LayerReady = COMPLETED,
    ) -> None:
        with self._lock:
            if self.closed or not self.lease_left():
                return
            for src, dst in block_pieces(src_blocks, dst_blocks, cache.layout.region_bytes, self._piece_bytes):
                staged = None
                if self._copy_streams is not None:
                    staged = stage_regions(cache, layer, src, dst, ready, self._copy_streams)
                piece = _Piece(self, cache, layer, src, dst, ready, staged)
                min(self._links, key=lambda link: link.queued_bytes).send(piece)
                self._pieces.append(piece)
                self.bytes_sent += piece.nbytes

    def close(self, timeout: float) -> None:
        with self._lock:
            self.closed = True
        self.release(timeout)

    def release(self, timeout: float) -> None:
        """Returns once no piece of this session reads the pool: each finished sending or never will.
        A send stalled past ``timeout`` breaks its link, which ends the send."""
        deadline = time.monotonic() + timeout
        with self._lock:
            pieces = list(self._pieces)
        for piece in pieces:
            if not piece.stop_reading(max(0.0, deadline - time.monotonic())):
                for link in self._links:
                    link.break_link("a KV send did not finish in time")
                piece.stop_reading(STALL_TIMEOUT_S)
                self.fail("a KV send did not finish in time")

    def commit(self, first_token_id: int, first_logprob: common_pb2.TokenLogprob | None, timeout: float) -> None:
        """The commit goes on the session's first link behind its pieces there, while the last pieces land:
        the receiver marks a piece landed once its regions are in and verified, and answers the commit once
        every layer is and the owner accepted the KV. A session that fails meanwhile does not wait for the
        answer: the worker's abort, which follows, ends the receiver's wait."""
        deadline = time.monotonic() + timeout
        note = None
        with self._lock:
            if self.lease_left():  # else the session failed, and says why below
                request = self._commit_request(first_token_id=first_token_id, first_logprob=first_logprob)
                note = _Commit(self, commit_frame(self.request_id, self.ticket.token, request, self.metadata))
        if note is not None:
            self._links[0].send(note)
        self._settle(timeout)
        if self.failed is None:
            self._answered(note, deadline, "decode worker did not answer the commit in time")
        if self.failed is not None:
            raise self.failure()

    def _settle(self, timeout: float) -> None:
        """Every piece acknowledged (landed and verified), or the session failed on the first that was
        not; then ``release``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            pieces = list(self._pieces)
        for piece in pieces:
            if not self._answered(piece, deadline, "decode worker did not acknowledge the KV in time"):
                break
        self.release(max(0.0, deadline - time.monotonic()))

    def _answered(self, item: _Answered, deadline: float, late: str) -> bool:
        """Waits for the answer to a piece or the commit: True if it landed or was accepted; otherwise the
        session fails with the link's reason, the receiver's refusal, or ``late``."""
        if not item.acked.wait(max(0.0, deadline - time.monotonic())):
            self.fail(late)
        elif item.lost:
            self.fail(item.error, lost=True)
        elif item.error is not None:
            self.refused(item.error)
        else:
            return True
        return False


class BulkKVSender(GrpcKVSender):
    """The gRPC transport with the bulk path: sessions go over ``connections`` TCP links per peer when
    the peer's handshake offers a bulk port, else as ``PushKV`` messages (the parent's). For pools in
    ``staged``: the pool is in GPU memory; pieces (and PushKV messages) go through pinned host memory."""

    def __init__(
        self,
        layout: common_pb2.KVLayout,
        sender_id: str,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        verify: bool = True,
        auth: ClusterAuth | None = None,
        connections: int = DEFAULT_CONNECTIONS,
        piece_bytes: int = DEFAULT_PIECE_BYTES,
        staged: bool = False,
    ) -> None:
        super().__init__(layout, sender_id, chunk_bytes, verify, staged=staged, auth=auth)
        if connections < 1 or piece_bytes < 1:
            raise ValueError(f"bulk KV needs at least one connection and piece byte, got {connections}, {piece_bytes}")
        self.connections = connections
        self.piece_bytes = piece_bytes
        self._links: dict[str, list[BulkLink]] = {}  # peer address -> its links (under self._lock)
        self._reconnect_at: dict[str, float] = {}  # peer address -> when a failed connect is tried again

    def _wants_bulk(self) -> bool:
        return self.auth.tls is None  # the bulk path has no TLS: with TLS, KV stays inside gRPC

    def _on_new_peer(self, peer: Peer) -> None:
        if peer.handshake.bulk_port:
            links = self._connect(peer)
            with self._lock:
                self._links[peer.address] = links

    def _connect(self, peer: Peer) -> list[BulkLink]:
        """The peer's links, or none (KV then goes in gRPC messages) until RECONNECT_S from now."""
        host = peer.address.rsplit(":", 1)[0].strip("[]")
        links: list[BulkLink] = []
        try:
            for _ in range(self.connections):
                links.append(BulkLink(host, peer.handshake.bulk_port, self.auth.secret, self.verify))
            return links
        except (OSError, ConnectionError) as exc:
            for link in links:
                link.close()
            log.warning(
                "bulk KV to %s unavailable (%s): KV goes in gRPC messages, connecting again in %g s",
                peer.address,
                exc,
                RECONNECT_S,
            )
            with self._lock:
                self._reconnect_at[peer.address] = time.monotonic() + RECONNECT_S
            return []

    def _forget_peer(self, peer: Peer) -> None:
        with self._lock:
            links = self._links.pop(peer.address, [])
            self._reconnect_at.pop(peer.address, None)
        for link in links:
            link.close()

    def links(self, peer: Peer) -> list[BulkLink]:
        """The peer's links: connected again when one broke (a restart of the link, not of the peer), or
        RECONNECT_S after a connect failed. The connect holds up only sessions to that peer."""
        with self._lock:
            if not self._reconnect_due(peer):
                return self._links.get(peer.address, [])
            one_at_a_time = self._address_lock(peer.address)
        with one_at_a_time:
            with self._lock:
                if not self._reconnect_due(peer):  # another session connected meanwhile
                    return self._links.get(peer.address, [])
                old = self._links.pop(peer.address, [])
                self._reconnect_at.pop(peer.address, None)
            for link in old:
                link.close()
            links = self._connect(peer)
            with self._lock:
                self._links[peer.address] = links
            return links

    def _reconnect_due(self, peer: Peer) -> bool:
        """Under ``_lock``: a link of the peer broke, or its failed connect is due again."""
        links = self._links.get(peer.address, [])
        if links:
            return any(link.broken for link in links)
        return peer.handshake.bulk_port != 0 and time.monotonic() >= self._reconnect_at.get(peer.address, 0.0)

    def _session(self, request_id: str, ticket: decode_pb2.Ticket, peer: Peer, metadata) -> OutboundSession:
        links = self.links(peer)
        if not links:
            return super()._session(request_id, ticket, peer, metadata)
        copy_streams = self._copy_streams if self.staged else None
        return BulkSession(request_id, ticket, peer, links, self.piece_bytes, metadata, copy_streams)

    def close(self) -> None:
        with self._lock:
            every, self._links = [link for links in self._links.values() for link in links], {}
        for link in every:
            link.close()
        super().close()
