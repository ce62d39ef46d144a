"""The prefill worker's side of KV transfer: one small interface, two transports.

Contract of an OutboundSession (one request's KV on its way to a decode worker):
- ``push_layer`` runs on the engine thread right after a layer was computed. It never waits on
  the network: gRPC copies the regions into a message and queues it; NIXL queues the layer for
  its posting thread.
- ``push_layer``'s ``ready`` (engine/layer_ready.py) completes behind the layer's K/V writes: the
  session reads those regions only once ``ready`` completed, and never waits for it on the engine
  thread or the compute stream. A ``ready`` already complete (CPU) is read at once; otherwise the
  read moves to the session's own thread (``synchronize``) or a side stream (``wait_event``), and
  then ``reads_after_push`` is True. Callers outside an engine step may leave it out (``COMPLETED``).
- ``commit`` / ``abort`` run on the request's RPC thread, after the first token is known.
- ``failed`` is set (with a reason) as soon as the receiver refused or vanished; later pushes
  are dropped, and the prefill worker aborts the request.
- ``abort`` is sent only once every write of the session is final: the receiver takes it (and the
  end of a push stream) as the sender's word that it writes no more into the reservation, and
  may free the blocks on it. So is ``commit``, except where the receiver adopts only once every
  layer is known to have landed (NIXL: a layer's notification follows its WRITE's data; a bulk
  link: a piece is acked once landed and verified); there it may travel while the last writes
  finish, and ``commit`` returns after both.
- ``reads_after_push``: False when ``push_layer`` copies the regions before it returns (gRPC);
  True when the transfer reads the pool later (NIXL). Then the prefill worker keeps a reference
  on the source blocks until ``release`` returned — on an RPC thread, never the engine thread.
- ``release`` returns once this worker's memory is no longer read by the transfer (it waits, and
  aborts writes still in flight at the timeout). ``close`` first refuses any later push, then
  releases: after it, the session never reads the pool again.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc

from engine.kv_cache import PagedKVCache
from engine.layer_ready import COMPLETED, LayerReady
from kv_transfer.errors import TransferError
from kv_transfer.layout import layout_mismatch
from protos import common_pb2, decode_pb2, kv_transfer_pb2, kv_transfer_pb2_grpc
from protos.cluster_auth import ClusterAuth

log = logging.getLogger(__name__)

# Safety margin: a sender stops writing this long before the receiver's lease deadline.
LEASE_MARGIN_S = 0.25
ABORT_RELEASE_TIMEOUT_S = 5.0  # an abort waits this long for the session's reads of the pool to end
COMMIT_THREADS = 16  # an out-of-band sender's commits waiting for one receiver at once; more queue
FORGET_THREADS = 4  # receivers being forgotten at once (each may wait for a handshake to its address)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# A handshake is one small call: this leaves room for a connect whose first two SYNs were lost (Linux
# sends them again at 1 s and 3 s), and bounds what a request waits on a receiver that drops packets.
# Later handshakes fail at once while the channel's connect attempts fail (gRPC's pick_first stays in
# TRANSIENT_FAILURE until one succeeds; cluster_auth.MIN_CONNECT_TIMEOUT_MS bounds each attempt).
HANDSHAKE_TIMEOUT_S = 5.0


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def block_pieces(
    src_blocks: Sequence[int], dst_blocks: Sequence[int], region_bytes: int, most_bytes: int
) -> Iterator[tuple[list[int], list[int]]]:
    """A layer's (source, destination) block lists cut, in order, into pieces of at most ``most_bytes`` of regions,
    at least one block each: what a transport sends as one message, frame piece or WRITE."""
    per_piece = max(1, most_bytes // region_bytes)
    for begin in range(0, len(src_blocks), per_piece):
        yield list(src_blocks[begin : begin + per_piece]), list(dst_blocks[begin : begin + per_piece])


def tell_abort(
    stub: kv_transfer_pb2_grpc.KVReceiverStub, request_id: str, ticket: decode_pb2.Ticket, reason: str, metadata=None
) -> None:
    """Tells the ticket's receiver that this sender writes nothing more for ``request_id`` (a Commit that aborts), so
    that its reservation goes now; best effort: a receiver that does not hear it frees the blocks at the lease's end."""
    abort = kv_transfer_pb2.CommitRequest(
        request_id=request_id, instance_id=ticket.instance_id, token=ticket.token, abort=True, abort_reason=reason
    )
    try:
        stub.Commit(abort, timeout=5.0, metadata=metadata)
    except grpc.RpcError as exc:
        log.info("could not tell %s about the abort of %s: %s", ticket.address, request_id, exc.details())


# A sender's channel to a receiver keeps its connection to itself: a channel made anew after the receiver was lost
# (``KVSender.forget``) connects at once, rather than share the old one's reconnect backoff through gRPC's global
# subchannel pool.
_SENDER_CHANNEL = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]


class OutboundSession(ABC):
    reads_after_push = False

    def __init__(self, request_id: str, ticket: decode_pb2.Ticket, metadata=None) -> None:
        self.request_id = request_id
        self.ticket = ticket
        self.metadata = metadata  # gRPC metadata every call of the session carries (the trace context)
        self.failed: str | None = None
        # The failure is the link's: the receiver stopped answering mid-session (its connection lost), not a refusal.
        self.lost = False
        self.closed = False  # set by close(): later pushes are dropped
        self.bytes_sent = 0
        # The lease on this worker's own clock, from now (the ticket has just reached it): hosts' clocks differ.
        self._deadline = time.monotonic() + ticket.lease_ms / 1000.0 - LEASE_MARGIN_S

    def fail(self, reason: str, lost: bool = False) -> None:
        if self.failed is None:
            self.failed, self.lost = reason, lost

    def fail_call(self, exc: grpc.RpcError) -> None:
        """A call to the receiver failed: it refused the KV, or (UNAVAILABLE) the connection to it was lost. A
        refusal reads "CODE message" whichever path brought it (a call's status, a bulk link's ack)."""
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            self.fail(f"lost the connection to the decode worker at {self.ticket.address}: {exc.details()}", lost=True)
        else:
            self.refused(f"{exc.code().name} {exc.details()}")

    def refused(self, reason: str) -> None:
        """The receiver refused the KV: ``reason`` is "CODE message"."""
        self.fail(f"decode worker refused the KV: {reason}")

    def failure(self) -> TransferError:
        """The error a failed session raises: a lost link names the receiver (UNAVAILABLE, ``unreachable``), so the
        worker's answer blames the link, as a handshake that could not reach it does; anything else is ABORTED."""
        if self.lost:
            return TransferError(self.failed, "UNAVAILABLE", unreachable=self.ticket.address)
        return TransferError(self.failed, "ABORTED")

    def lease_left(self) -> bool:
        if time.monotonic() >= self._deadline:
            self.fail("lease expired before the KV was sent")
        return self.failed is None

    @abstractmethod
    def push_layer(
        self,
        cache: PagedKVCache,
        layer: int,
        src_blocks: Sequence[int],
        dst_blocks: Sequence[int],
        ready: LayerReady = COMPLETED,
    ) -> None: ...

    @abstractmethod
    def commit(self, first_token_id: int, first_logprob: common_pb2.TokenLogprob | None, timeout: float) -> None:
        """Blocks until the receiver has accepted the KV (it decodes from it); raises TransferError otherwise."""

    @abstractmethod
    def abort(self, reason: str) -> None: ...

    def release(self, timeout: float) -> None:
        """Default: data was copied at push time, nothing of ours is read later."""

    def close(self, timeout: float) -> None:
        self.closed = True
        self.release(timeout)


@dataclass
class Peer:
    """A decode worker this sender has shaken hands with."""

    address: str
    stub: kv_transfer_pb2_grpc.KVReceiverStub
    instance_id: str
    handshake: kv_transfer_pb2.HandshakeResponse


class OutOfBandSession(OutboundSession):
    """A session whose KV bytes travel outside gRPC (NIXL WRITEs, bulk TCP links) while its abort is a
    ``KVReceiver.Commit`` call, sent once ``release`` says nothing of the session reads the pool any
    more. Its commit travels beside the last data: a Commit call (``_commit_beside``, NIXL) or a
    commit frame on a bulk link. Subclasses implement ``push_layer``, ``release`` and ``commit``."""

    def __init__(self, request_id: str, ticket: decode_pb2.Ticket, peer: Peer, metadata=None) -> None:
        super().__init__(request_id, ticket, metadata)
        self._peer = peer
        # Posting excludes failing or closing the session: once abort() or close() ran, nothing is
        # posted after they collected what to wait for.
        self._lock = threading.Lock()

    def _commit_beside(
        self,
        committing: Executor,
        settle: Callable[[float], None],
        first_token_id: int,
        first_logprob: common_pb2.TokenLogprob | None,
        timeout: float,
    ) -> None:
        """The commit travels on one of ``committing``'s threads while ``settle(timeout)`` waits for the
        session's data to land and ``release``s the pool. The receiver accepts only once every layer landed
        and was verified (``KVInbox.wait_for_layers``), so a commit never adopts KV still in flight, and its
        round trip hides behind the transfer's tail instead of following it. A blocking call on a thread: a
        gRPC future would start a thread of its own on an idle channel. A session that fails meanwhile does
        not wait for it: the worker's abort, which follows, ends the receiver's wait."""
        call = committing.submit(self._commit_over_grpc, first_token_id, first_logprob, timeout)
        settle(timeout)
        if self.failed is not None:
            raise self.failure()
        call.result()

    def _commit_over_grpc(
        self, first_token_id: int, first_logprob: common_pb2.TokenLogprob | None, timeout: float
    ) -> None:
        """The lease checked, then the commit (raises TransferError if refused)."""
        if self.failed is None:
            self.lease_left()
        if self.failed is not None:
            raise self.failure()
        request = self._commit_request(first_token_id=first_token_id, first_logprob=first_logprob)
        try:
            self._peer.stub.Commit(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            self.fail_call(exc)
            raise self.failure() from exc

    def abort(self, reason: str) -> None:
        with self._lock:
            self.fail(reason)
        self.release(ABORT_RELEASE_TIMEOUT_S)  # our abort tells the receiver we write no more: make it true
        tell_abort(self._peer.stub, self.request_id, self.ticket, reason, self.metadata)

    def _commit_request(self, **fields) -> kv_transfer_pb2.CommitRequest:
        return kv_transfer_pb2.CommitRequest(
            request_id=self.request_id, instance_id=self.ticket.instance_id, token=self.ticket.token, **fields
        )


class KVSender(ABC):
    """Opens sessions to decode workers; remembers each peer's handshake per receiver instance.
    Every call to a receiver carries this worker's cluster credentials (``auth``; default: the
    environment's), and every session presents its ticket's token."""

    def __init__(self, layout: common_pb2.KVLayout, sender_id: str, auth: ClusterAuth | None = None) -> None:
        self.layout = layout
        self.sender_id = sender_id
        self.auth = auth if auth is not None else ClusterAuth.from_env()
        self._channels: dict[str, grpc.Channel] = {}
        self._peers: dict[str, Peer] = {}
        self._per_address: dict[str, threading.Lock] = {}  # one handshake (or bulk connect) at a time per address
        # per address: when its last handshake that could not reach it failed, and how (monotonic seconds)
        self._unreached: dict[str, tuple[float, TransferError]] = {}
        self._lock = threading.Lock()  # the dicts above

    def open(self, request_id: str, ticket: decode_pb2.Ticket, metadata=None) -> OutboundSession:
        return self._session(request_id, ticket, self.peer(ticket, request_id), metadata)

    def _abort_refused(self, request_id: str, ticket: decode_pb2.Ticket, reason: str) -> None:
        """The receiver refused this sender: no KV will come for ``ticket``, which its reservation learns now (our
        abort, which says we write nothing) rather than when its lease runs out (a NIXL receiver waits for the
        sender's word, or the lease, before it frees blocks a peer may write)."""
        with self._lock:
            channel = self._channels.get(ticket.address)
        if channel is not None:
            tell_abort(kv_transfer_pb2_grpc.KVReceiverStub(channel), request_id, ticket, reason)

    def peer(self, ticket: decode_pb2.Ticket, request_id: str = "") -> Peer:
        """``_peer``; where the receiver refuses this sender, ``request_id``'s reservation hears at once that no KV
        will come (``_abort_refused``)."""
        try:
            return self._peer(ticket)
        except TransferError as exc:
            if exc.refused and request_id:
                self._abort_refused(request_id, ticket, str(exc))
            raise

    def _peer(self, ticket: decode_pb2.Ticket) -> Peer:
        """The handshaken peer for a ticket; a new receiver instance (a restart) means a new handshake.
        A ticket without an address is refused (INVALID_ARGUMENT): no receiver issues one, so it is
        bad input, not an unreachable peer (UNAVAILABLE naming the peer, which a router routes around).
        The handshake's call holds up only sessions to the same address: a receiver that does not answer
        does not stall the sessions to every other. Sessions that queued behind a handshake that could
        not reach the receiver fail with it, rather than each waiting out a timeout of its own in turn."""
        address = ticket.address
        if not address:
            raise TransferError("the ticket names no receiver (ticket.address is empty)", "INVALID_ARGUMENT")
        with self._lock:
            if (known := self._known(ticket)) is not None:
                return known
            one_at_a_time = self._address_lock(address)
        queued = time.monotonic()
        with one_at_a_time:
            with self._lock:
                if (known := self._known(ticket)) is not None:
                    return known  # another session shook hands meanwhile
                failed_at, error = self._unreached.get(address, (0.0, None))
                if failed_at > queued:  # another session's handshake failed meanwhile
                    raise TransferError(str(error), error.code, unreachable=address, refused=error.refused)
                stale = self._peers.pop(address, None)  # the receiver's previous instance
                channel = self._channels.get(address)
                if channel is None:
                    channel = self._channels[address] = self.auth.channel(address, options=_SENDER_CHANNEL)
            # The call and the hooks (a bulk link's connect, NIXL's metadata) run under this address's lock only.
            if stale is not None:
                self._forget_peer(stale)
            stub = kv_transfer_pb2_grpc.KVReceiverStub(channel)
            try:
                response = self._handshake(address, stub)
            except TransferError as exc:
                if exc.unreachable:
                    with self._lock:
                        self._unreached[address] = (time.monotonic(), exc)
                raise
            peer = Peer(address, stub, response.instance_id, response)
            self._on_new_peer(peer)
            if peer.instance_id != ticket.instance_id:
                raise TransferError(
                    f"ticket is for receiver instance {ticket.instance_id}, {address} is now {peer.instance_id}",
                    "FAILED_PRECONDITION",
                )
            with self._lock:
                self._peers[address] = peer
            return peer

    def is_current(self, peer: Peer) -> bool:
        """Whether ``peer`` is still the instance this sender knows at its address (not forgotten, not replaced)."""
        with self._lock:
            return self._peers.get(peer.address) is peer

    def forget(self, peer: Peer) -> None:
        """``peer``'s instance is gone (its process, or its link: NIXL said it disconnected): what this sender keeps
        about it goes now, not when another instance shakes hands at its address, which one may never do (a
        restarted worker often listens elsewhere). A later ticket for its address shakes hands anew, on a channel
        of its own: the old one's reconnect backoff would refuse a worker back at that address for a while (its
        calls still under way keep it until they end). Waits for a handshake to that address under way; a peer
        forgotten already, or replaced, is left alone."""
        with self._lock:
            one_at_a_time = self._address_lock(peer.address)
        with one_at_a_time:
            with self._lock:
                if self._peers.get(peer.address) is not peer:
                    return
                del self._peers[peer.address]
                self._channels.pop(peer.address, None)
            self._forget_peer(peer)

    def _address_lock(self, address: str) -> threading.Lock:
        """Under ``_lock``: the lock that one handshake (or bulk connect) to ``address`` holds at a time."""
        return self._per_address.setdefault(address, threading.Lock())

    def _known(self, ticket: decode_pb2.Ticket) -> Peer | None:
        """Under ``_lock``: the peer already handshaken for the ticket's receiver instance."""
        peer = self._peers.get(ticket.address)
        return peer if peer is not None and peer.instance_id == ticket.instance_id else None

    def _handshake(self, address: str, stub: kv_transfer_pb2_grpc.KVReceiverStub) -> kv_transfer_pb2.HandshakeResponse:
        """The receiver's answer, checked: it accepted this sender and keeps the same KV layout."""
        request = kv_transfer_pb2.HandshakeRequest(
            layout=self.layout,
            sender_id=self.sender_id,
            nixl_agents=self._nixl_agents(),
            bulk=self._wants_bulk(),
        )
        try:
            response = stub.Handshake(request, timeout=HANDSHAKE_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise TransferError(
                f"handshake with {address} failed: {exc.details()}", "UNAVAILABLE", unreachable=address
            ) from exc
        # Refused: this pair cannot move KV (a routing layer pairs them no more for a while, as if unreachable).
        if not response.accepted:
            raise TransferError(response.message, "FAILED_PRECONDITION", unreachable=address, refused=True)
        mismatch = layout_mismatch(response.layout, self.layout)
        if mismatch:
            raise TransferError(mismatch, "FAILED_PRECONDITION", unreachable=address, refused=True)
        return response

    def _nixl_agents(self) -> list[str]:
        return []

    def _wants_bulk(self) -> bool:
        """Hook: the sender can take KV bytes over the receiver's bulk TCP listener (bulk_transport.py)."""
        return False

    def _on_new_peer(self, peer: Peer) -> None:
        """Hook for transports with per-peer state (NIXL loads the peer's agent metadata)."""

    def _forget_peer(self, peer: Peer) -> None:
        """Hook: a peer restarted; drop what was cached about its old instance."""

    @abstractmethod
    def _session(self, request_id: str, ticket: decode_pb2.Ticket, peer: Peer, metadata) -> OutboundSession: ...

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
