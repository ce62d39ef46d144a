"""KV over NIXL: the prefill worker WRITEs (layer, block) regions straight into the decode worker's
registered pool, one WRITE per pushed layer piece, each followed by a notification (msgpack:
request id, layer, destination blocks, checksum). The decode worker polls notifications, verifies
the landed regions in place, and adopts the KV when the sender commits over gRPC.

Integrity without a second pass on the critical path (checksums on, the default): a layer's WRITE is
posted first, and the sender's sealer thread hashes that layer's source regions while UCX moves them
(in contiguous runs, the GIL released), then has the layer's notification, with the digest, sent as
soon as the WRITE is final (checksums off: NIXL sends it with the WRITE)::

    engine / posting thread:  post W0 ── post W1 ── post W2 ──  ...            commit
    sealer thread:               hash 0 ┐  hash 1 ┐  hash 2 ┐                    ^
                                 W0 final → note 0  W1 final → note 1  ...  all sealed
    decode poll thread:                 verify 0      verify 1  ...   (while later layers land)

A notification sent after its WRITE is final orders like NIXL's own (the regions have landed); the
source regions stay referenced until ``release`` saw every seal through, hashing included.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field

import msgpack

from engine.kv_cache import PagedKVCache
from engine.layer_ready import COMPLETED, LayerReady
from kv_transfer.errors import TransferError
from kv_transfer.inbox import KVInbox
from kv_transfer.integrity import region_checksum
from kv_transfer.nixl_agent import NixlError, NixlPool, PoolDescriptor, WriteHandle
from kv_transfer.sender import KVSender, OutboundSession, OutOfBandSession, Peer
from protos import common_pb2, decode_pb2
from protos.cluster_auth import ClusterAuth

log = logging.getLogger(__name__)

_IDLE_POLL_S = 0.01
_BUSY_POLL_S = 0.0002
_SEAL_POLL_S = 0.0001  # the sealer's poll of WRITEs in flight: their notifications wait for it


def _notification(request_id: str, token: str, layer: int, dst_blocks: Sequence[int], checksum: int) -> bytes:
    note = {"request_id": request_id, "token": token, "layer": layer, "blocks": list(dst_blocks), "checksum": checksum}
    return msgpack.packb(note)


@dataclass(eq=False)
class _Seal:
    """One posted layer piece until its notification went out (or its session failed)."""

    session: NixlSession
    handle: WriteHandle
    cache: PagedKVCache
    layer: int
    src_blocks: list[int]
    dst_blocks: list[int]
    done: Future = field(default_factory=Future)
    notification: bytes = b""  # set once the source regions are hashed

    def finish(self) -> bool:
        if not self.done.done():
            self.done.set_result(None)
        return True


class _Sealer:
    """A sender's sealer thread: takes posted layers in FIFO order, hashes each one's source regions
    while its WRITE moves them, and polls the WRITEs in flight, sending each one's notification once
    it is final. A slow WRITE delays only its own notification."""

    def __init__(self, pool: NixlPool) -> None:
        self._pool = pool
        self._queue: queue.SimpleQueue[_Seal | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="nixl-seal", daemon=True)
        self._thread.start()

    def submit(self, seal: _Seal) -> Future:
        with self._lock:
            if not self._closed:
                self._queue.put(seal)
                return seal.done
        seal.session.fail("the NIXL sender is closed")
        seal.finish()
        return seal.done

    def close(self) -> None:
        """Seals what was submitted (WRITEs still in flight are aborted) and stops the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        in_flight: list[_Seal] = []  # hashed, their notification waiting for the WRITE to complete
        stopping = False
        while not stopping or in_flight:
            try:  # block while nothing is in flight; else come back to poll
                seal = self._queue.get(timeout=_SEAL_POLL_S) if in_flight or stopping else self._queue.get()
            except queue.Empty:
                seal = None
            else:
                stopping = stopping or seal is None  # None: close()
            if seal is not None and _guarded(seal, seal.session.hash_layer, failed=False):
                in_flight.append(seal)
            if in_flight:
                try:  # never queue behind a post: posts poll the writes with notifications to send too
                    self._pool.progress(wait=False)
                except NixlError:
                    pass  # closed: its writes were failed, their seals are over
            in_flight = [s for s in in_flight if not _guarded(s, s.session.poll_seal, stopping, failed=True)]


def _guarded(seal: _Seal, step, *args, failed: bool) -> bool:
    """A sealer step; an unexpected error fails the session and ends the seal (returning ``failed``),
    never the sealer thread."""
    try:
        return step(seal, *args)
    except Exception as exc:
        log.exception("sealing layer %d of %s failed", seal.layer, seal.session.request_id)
        seal.session.fail(f"sealing layer {seal.layer} failed: {exc!r}")
        seal.finish()
        return failed


class NixlReceiver:
    """The decode worker's NIXL agent: its pool registered once, and a thread polling notifications.
    Notifications count only from agents admitted by an authenticated handshake, and only with the
    ticket's token of the reservation they name."""

    def __init__(self, name: str, cache: PagedKVCache, inbox: KVInbox) -> None:
        self.pool = NixlPool(name, cache.data)
        self.inbox = inbox
        self._admitted: set[str] = set()  # sender agent names; a set add/lookup is atomic under the GIL
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="nixl-notifications", daemon=True)
        self._thread.start()

    def metadata(self) -> bytes:
        return self.pool.metadata()

    def admit(self, agent_name: str) -> None:
        """RPC thread, from an authenticated handshake: accept this sender agent's notifications."""
        self._admitted.add(agent_name)

    def pool_descriptor_bytes(self) -> bytes:
        return msgpack.packb(self.pool.descriptor.to_dict())

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                arrived = self.pool.poll_notifications()
            except NixlError:
                return  # closed
            for sender, message in arrived:
                self._landed(sender, message)
            self._stop.wait(_BUSY_POLL_S if self.inbox.num_landings else _IDLE_POLL_S)

    def _landed(self, sender: str, message: bytes) -> None:
        if sender not in self._admitted:
            log.warning("NIXL notification from %s ignored: no authenticated handshake", sender)
            return
        try:
            note = msgpack.unpackb(message)
            self.inbox.authorize(note["request_id"], note["token"])
            self.inbox.landed(note["request_id"], note["layer"], note["blocks"], note["checksum"])
        except TransferError as exc:
            log.warning("KV from %s rejected: %s", sender, exc)
            if exc.code == "DATA_LOSS":  # the sender did not say it stopped: it may still be writing
                self.inbox.abort(note["request_id"], str(exc), sender_stopped=False)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("malformed NIXL notification from %s: %s", sender, exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.pool.close()


class NixlSession(OutOfBandSession):
    reads_after_push = True  # a posted WRITE reads our pool until NIXL reports it final

    def __init__(
        self, request_id: str, ticket: decode_pb2.Ticket, peer: Peer, sender: NixlKVSender, metadata=None
    ) -> None:
        super().__init__(request_id, ticket, peer, metadata)
        self._sender = sender
        self._remote = sender.remote_pool(peer)
        self._writes: list[WriteHandle] = []
        # One release at a time: a second caller (close after abort) returns only once the writes
        # the first one collected are final too.
        self._releasing = threading.Lock()
        # Posts waiting for their layer's ``ready`` on the sender's posting thread, in push order.
        self._deferred: list[Future] = []
        self._seals: list[Future] = []  # posted layers whose notification is not sent yet (sealer thread)

    def push_layer(
        self,
        cache: PagedKVCache,
        layer: int,
        src_blocks: Sequence[int],
        dst_blocks: Sequence[int],
        ready: LayerReady = COMPLETED,
    ) -> None:
        """Posts the WRITE now if the layer is complete (CPU), else hands it to the posting thread,
        which posts it once ``ready`` completed; later pushes of the session queue behind it."""
        with self._lock:
            if self.closed or not self.lease_left():
                return
            self._deferred = [f for f in self._deferred if not f.done()]
            if cache.data.is_cuda or self._deferred or not ready.query():
                args = (cache, layer, list(src_blocks), list(dst_blocks), ready)
                self._deferred.append(self._sender.post_when_ready(self._post_when_ready, *args))
            else:
                self._post(cache, layer, src_blocks, dst_blocks)

    def _post_when_ready(self, cache, layer, src_blocks, dst_blocks, ready: LayerReady) -> None:
        """Posting thread: the layer's K/V writes are waited for here, never on the engine thread."""
        try:
            ready.synchronize()
        except RuntimeError as exc:  # a CUDA error surfaces here
            self.fail(f"layer {layer} never became ready: {exc}")
            return
        with self._lock:
            if not self.closed and self.lease_left():
                self._post(cache, layer, src_blocks, dst_blocks)

    def close(self, timeout: float) -> None:
        with self._lock:
            self.closed = True
        self.release(timeout)

    def _post(self, cache: PagedKVCache, layer: int, src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> None:
        layout = cache.layout
        remote_blocks = self._remote.nbytes // (layout.num_layers * layout.region_bytes)
        src = [layout.region_offset(layer, b) for b in src_blocks]
        dst = [(layer * remote_blocks + b) * layout.region_bytes for b in dst_blocks]
        verify = self._sender.verify
        # Without checksums the notification rides with the WRITE; with them the sealer announces the
        # layer once it has hashed the source, which it does while UCX moves the regions.
        note = b"" if verify else _notification(self.request_id, self.ticket.token, layer, dst_blocks, 0)
        try:
            handle = self._sender.pool.write(self._remote, src, dst, layout.region_bytes, note)
        except (NixlError, ValueError) as exc:
            self.fail(f"NIXL write failed: {exc}")
            return
        self._writes.append(handle)
        self.bytes_sent += len(src) * layout.region_bytes
        if verify:
            seal = _Seal(self, handle, cache, layer, list(src_blocks), list(dst_blocks))
            self._seals.append(self._sender.sealer.submit(seal))

    def hash_layer(self, seal: _Seal) -> bool:
        """Sealer thread: hashes the layer's source regions (in place, in contiguous runs, while the
        WRITE reads them too) and hands the pool the notification to send once the WRITE is complete.
        False if the session failed meanwhile: nothing is announced."""
        if self.failed is None:
            try:
                checksum = region_checksum(seal.cache, seal.layer, seal.src_blocks)
            except RuntimeError as exc:  # a CUDA error surfaces here
                self.fail(f"could not hash layer {seal.layer}: {exc}")
        if self.failed is not None:  # nothing to announce; release() waits for the WRITE itself
            seal.finish()
            return False
        note = _notification(self.request_id, self.ticket.token, seal.layer, seal.dst_blocks, checksum)
        seal.handle.notify_when_done(note, lambda error: self._sealed(seal, error))
        return True

    def poll_seal(self, seal: _Seal, abandon: bool) -> bool:
        """Sealer thread: True once the seal is over. A WRITE still in flight past the lease deadline,
        or when the sender closes (``abandon``), is aborted (a complete one is announced instead)."""
        if not seal.done.done() and (abandon or time.time() >= self._deadline):
            seal.handle.release()  # -> _sealed(), with or without an error
        return seal.done.done()

    def _sealed(self, seal: _Seal, error: str | None) -> None:
        """Under the pool's lock: the layer's notification went out, or never will."""
        if error is not None:
            self.fail(f"NIXL write failed: {error}")
        seal.finish()

    def release(self, timeout: float) -> None:
        """Waits until every posted WRITE has read our memory (or failed) and every layer is sealed:
        hashed (which reads our memory too) and its notification sent, so that a commit or an abort
        follows every notification of the session."""
        deadline = time.monotonic() + timeout
        with self._releasing:
            with self._lock:
                deferred = list(self._deferred)
            if wait_futures(deferred, timeout=timeout).not_done:
                with self._lock:  # a post still waiting for its layer must never start after we return
                    self.fail("a pushed layer did not become ready in time")
            with self._lock:
                writes, self._writes = self._writes, []
                seals, self._seals = self._seals, []
            for handle in writes:
                try:
                    handle.wait(max(0.0, deadline - time.monotonic()))
                except NixlError as exc:
                    self.fail(f"NIXL write failed: {exc}")
            wait_futures(seals)  # every WRITE is final now: each seal ends after (at most) one hash

    def commit(self, first_token_id: int, first_logprob: common_pb2.TokenLogprob | None, timeout: float) -> None:
        self.release(timeout)
        self._commit_over_grpc(first_token_id, first_logprob, timeout)


class NixlKVSender(KVSender):
    def __init__(
        self,
        layout: common_pb2.KVLayout,
        sender_id: str,
        cache: PagedKVCache,
        agent_name: str,
        verify: bool = True,
        auth: ClusterAuth | None = None,
    ) -> None:
        super().__init__(layout, sender_id, auth)
        self.verify = verify
        self.pool = NixlPool(agent_name, cache.data)
        self._remote_pools: dict[str, PoolDescriptor] = {}  # address -> the peer's pool
        self._posting: ThreadPoolExecutor | None = None  # started at the first deferred post
        self.sealer = _Sealer(self.pool)

    def post_when_ready(self, post, *args) -> Future:
        """Runs ``post(*args)`` on this sender's one posting thread (FIFO across sessions)."""
        if self._posting is None:
            self._posting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nixl-post")
        return self._posting.submit(post, *args)

    def _nixl_metadata(self) -> bytes:
        return self.pool.metadata()

    def _nixl_agent(self) -> str:
        return self.pool.name

    def _on_new_peer(self, peer: Peer) -> None:
        if not peer.handshake.nixl_metadata:
            raise TransferError(
                f"{peer.address} does not receive KV over NIXL (transport mismatch)", "FAILED_PRECONDITION"
            )
        descriptor = PoolDescriptor.from_dict(msgpack.unpackb(peer.handshake.nixl_pool))
        ours = self.pool.descriptor.memory
        if self.verify and descriptor.memory != ours:  # the checksum is chosen by memory (integrity.py)
            raise TransferError(
                f"{peer.address} keeps its KV pool in {descriptor.memory}, this worker in {ours}: checksums "
                "would differ; put both pools on the same kind of memory or turn KV checksums off",
                "FAILED_PRECONDITION",
            )
        self.pool.add_peer(peer.handshake.nixl_metadata)
        self._remote_pools[peer.address] = descriptor

    def _forget_peer(self, peer: Peer) -> None:
        descriptor = self._remote_pools.pop(peer.address, None)
        if descriptor is not None:
            self.pool.remove_peer(descriptor.agent_name)

    def remote_pool(self, peer: Peer) -> PoolDescriptor:
        return self._remote_pools[peer.address]

    def _session(self, request_id: str, ticket: decode_pb2.Ticket, peer: Peer, metadata) -> OutboundSession:
        return NixlSession(request_id, ticket, peer, self, metadata)

    def close(self) -> None:
        if self._posting is not None:
            self._posting.shutdown(wait=True)
        self.sealer.close()
        super().close()
        self.pool.close()
