"""KV over NIXL: the prefill worker WRITEs (layer, block) regions straight into the decode worker's
registered pool and the decode worker adopts them when the sender commits over gRPC.

A push only queues its layer. The sender's posting thread reads the pool once the layer is ready
(on CPU the copy itself runs inside the post, so the engine thread never pays it) and posts the
layers pushed meanwhile as one WRITE, at most ``_MAX_BATCH_LAYERS``: a layer-wise push during a
prefill posts about a layer per WRITE; a whole-request push, or layers that finish faster than they
post, share WRITEs and save each WRITE's and notification's fixed cost. Every WRITE is announced by
one notification (msgpack: request id, token, and per layer its destination blocks and checksum)
that reaches the decode worker after the regions landed; it verifies each layer in place on a
thread of its own while later WRITEs land.

Checksums off: the notification rides with the WRITE. On (the default): the sealing thread hashes a
batch's source in contiguous runs (the GIL released) while the posting thread copies it, and the
notification with the digests goes out once the WRITE is final. On DRAM a WRITE is final when its
post returns, so the posting thread sends it between two posts (a notification from another thread
would wait for the pool's lock behind the next post's whole copy); a WRITE still moving (RDMA,
VRAM, or a DRAM post UCX left unfinished) is announced by the write poller once it completes: never by
the sealing thread, whose wait for it would hold every later batch's hash up behind that WRITE, and never
by a thread that waits for it, which would hold every later WRITE's announcement up, to every decode
worker: a WRITE to a stalled one stays in flight until its lease runs out::

    engine thread:   push 0 push 1 ... push 15 ── commit (sent at once, answered after the last verify)
    posting thread:    WRITE 0 │note│ WRITE 1-4 │note│ WRITE 5-8 │note│ ... WRITE 13-15 │note
    sealing thread:    hash 0  │      hash 1-4  │      hash 5-8  │      ... hash 13-15
    decode verify thread:       verify 0         verify 1-4          ...            verify 13-15
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

import msgpack
import numpy as np

from engine.kv_cache import PagedKVCache
from engine.layer_ready import COMPLETED, LayerReady
from kv_transfer.errors import TransferError
from kv_transfer.inbox import KVInbox
from kv_transfer.integrity import region_checksum
from kv_transfer.nixl_agent import NixlError, NixlPool, PoolDescriptor, WriteHandle
from kv_transfer.sender import COMMIT_THREADS, FORGET_THREADS, KVSender, OutboundSession, OutOfBandSession, Peer
from protos import common_pb2, decode_pb2
from protos.cluster_auth import ClusterAuth

log = logging.getLogger(__name__)

# The receiver's poll pace. Fast while KV moves: over UCX a sender's WRITE posted behind a notification we have
# not taken waits for our next poll. Slower while reservations are open and nothing arrives: each wake takes the
# GIL from the decode engine, and 5,000 a second slowed a CPU decode by 3-4%; 1,000 cost nothing measurable.
# A commit that arrives to wait for its layers wakes the poller at once (``KVInbox.commit_arrived``): the last
# notification of a layer-wise push, which may land after a pause longer than _MOVING_S, is not left for a pace.
_IDLE_POLL_S = 0.01  # no reservation open: nothing can land
_OPEN_POLL_S = 0.001  # reservations open, nothing arrived lately: a transfer's first notification waits <= 1 ms
_MOVING_POLL_S = 0.0002  # a notification arrived within _MOVING_S, or a commit waits for its last ones
_MOVING_S = 0.02
_MAX_BATCH_LAYERS = 4  # bounds a notification's size and how much the receiver verifies at once
_WRITE_POLL_S = 0.0001  # the poller's pace over WRITEs still in flight after their post, for _WRITE_FAST_S
_WRITE_FAST_S = 0.02
# Then: a WRITE to a stalled decode worker stays in flight until its lease ends; polled at the first pace all that
# time it took 18% of a core from the prefill worker, 8% at this one.
_STRAGGLER_POLL_S = 0.001


def _notification(request_id: str, token: str, layers: list[tuple[int, list[int], int]]) -> bytes:
    """One WRITE's notification: its layers as (layer, destination blocks, checksum; 0: unchecked)."""
    return msgpack.packb({"request_id": request_id, "token": token, "layers": layers})


def _slots(batch: list[_Push], side: str, blocks_per_layer: int) -> np.ndarray:
    """The batch's regions on one side as slots of a pool cut into regions: layer * blocks + block."""
    return np.concatenate(
        [np.asarray(getattr(p, side), dtype=np.int32) + np.int32(p.layer * blocks_per_layer) for p in batch]
    )


@dataclass(eq=False)
class _Push:
    """A pushed layer piece waiting for the posting thread."""

    cache: PagedKVCache
    layer: int
    src_blocks: list[int]
    dst_blocks: list[int]
    ready: LayerReady


def _final(handle: WriteHandle) -> bool:
    """Whether the WRITE completed; a failed one counts as still moving: whoever waits for it next
    (``release``, ``_announce``) gets its error and fails the session."""
    try:
        return handle.done()
    except NixlError:
        return False


@dataclass(eq=False)
class _Posted:
    """A posted WRITE waiting for its notification: the batch, its digests (a Future), its handle."""

    batch: list[_Push]
    hashed: Future
    handle: WriteHandle


class _WritePoller:
    """A sender's thread that polls WRITEs still in flight after their post (RDMA, VRAM; a DRAM
    WRITE usually completes inside its post), so that NIXL sends each one's notification as soon as
    it completes rather than at commit; with checksums, it announces each such WRITE once it is final
    and its source hashed (``announce``). It never waits for one WRITE: a decode worker that stopped
    progressing (stalled) holds up its own sessions' announcements only, never another's. Polls fast for
    a moment after each post, slower after that; sleeps while nothing is in flight."""

    def __init__(self, pool: NixlPool) -> None:
        self._pool = pool
        self._unannounced: list[tuple[NixlSession, _Posted, Future]] = []  # under self._lock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nixl-writes", daemon=True)
        self._thread.start()

    def watch(self) -> None:
        self._wake.set()

    def announce(self, session: NixlSession, posted: _Posted) -> Future:
        """Announces ``posted`` once that waits for nothing (``NixlSession.announce_if_settled``); the
        Future completes then."""
        announced = Future()
        with self._lock:
            self._unannounced.append((session, posted, announced))
        self._wake.set()
        return announced

    def close(self) -> None:
        """Stops polling; a session whose WRITE is still to be announced fails."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        with self._lock:
            left, self._unannounced = self._unannounced, []
        for session, _, announced in left:
            session.fail("the KV sender closed before a WRITE completed")
            announced.set_result(None)

    def _run(self) -> None:
        pace, fast_until = None, 0.0  # None: nothing in flight, sleep until a post wakes us
        while True:
            woken = self._wake.wait(pace)
            if self._stopping:
                return
            self._wake.clear()  # before looking: a write posted from here on sets it again
            now = time.monotonic()
            if woken:
                fast_until = now + _WRITE_FAST_S
            try:
                # Skipped while a post holds the agent, unless an announcement waits: as long as posts follow each
                # other, it would wait for all of them.
                self._pool.progress(wait=bool(self._unannounced))
                in_flight = self._pool.pending_writes
            except NixlError:
                in_flight = 0  # closed: every WRITE failed, which the announcements below say
            waiting = self._announce_settled()
            if not (in_flight or waiting):
                pace = None
            else:
                pace = _WRITE_POLL_S if now < fast_until else _STRAGGLER_POLL_S

    def _announce_settled(self) -> int:
        """Announces every WRITE that waits for nothing any more; how many still wait."""
        with self._lock:
            unannounced = list(self._unannounced)
        settled = [item for item in unannounced if item[0].announce_if_settled(item[1])]
        for _, _, announced in settled:
            announced.set_result(None)
        with self._lock:
            self._unannounced = [item for item in self._unannounced if item not in settled]
            return len(self._unannounced)


class NixlReceiver:
    """The decode worker's NIXL agent: its pool registered once, a thread polling notifications and
    one verifying what they announce. Notifications count only from agents admitted by an
    authenticated handshake, and only with the ticket's token of the reservation they name.

    Polling never waits for a verification: over UCX a sender's WRITE posted behind an earlier
    notification completes only once this agent progressed (see kv_transfer/nixl_agent.py), so a
    poll thread busy hashing a landed batch would hold the sender's next copy up."""

    def __init__(self, name: str, cache: PagedKVCache, inbox: KVInbox) -> None:
        self.pool = NixlPool(name, cache.data)
        self.inbox = inbox
        self._admitted: set[str] = set()  # sender agent names; a set add/lookup is atomic under the GIL
        self._verifying = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nixl-verify")
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
        moving_until = 0.0
        while not self._stop.is_set():
            try:
                arrived = self.pool.poll_notifications()
            except NixlError:
                return  # closed
            for sender, message in arrived:
                self._verifying.submit(self._landed, sender, message)
            now = time.monotonic()
            if arrived or self.inbox.commits_waiting:
                moving_until = now + _MOVING_S
            pause = _MOVING_POLL_S if now < moving_until else _OPEN_POLL_S if self.inbox.num_landings else _IDLE_POLL_S
            if self.inbox.commit_arrived.wait(pause):  # a commit waits for its layers: poll now
                self.inbox.commit_arrived.clear()

    def _landed(self, sender: str, message: bytes) -> None:
        """Verifying thread: one notification's layers checked in place and marked landed."""
        if sender not in self._admitted:
            log.warning("NIXL notification from %s ignored: no authenticated handshake", sender)
            return
        try:
            note = msgpack.unpackb(message)
            self.inbox.authorize(note["request_id"], note["token"])
            self.inbox.landed(note["request_id"], note["layers"])
        except TransferError as exc:
            log.warning("KV from %s rejected: %s", sender, exc)
            if exc.code == "DATA_LOSS":  # the sender did not say it stopped: it may still be writing
                self.inbox.abort(note["request_id"], str(exc), sender_stopped=False)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("malformed NIXL notification from %s: %s", sender, exc)
        except Exception as exc:  # e.g. a CUDA error while verifying: fail the request now, not at its commit timeout
            log.exception("verifying KV of %s from %s failed", note["request_id"], sender)
            self.inbox.abort(note["request_id"], f"verifying its KV failed: {exc!r}", sender_stopped=False)

    def close(self) -> None:
        self._stop.set()
        self.inbox.commit_arrived.set()  # wakes the poller
        self._thread.join(2.0)
        self._verifying.shutdown(wait=True)
        self.pool.close()


class NixlSession(OutOfBandSession):
    reads_after_push = True  # the posting thread reads our pool after push_layer returned

    def __init__(
        self, request_id: str, ticket: decode_pb2.Ticket, peer: Peer, sender: NixlKVSender, metadata=None
    ) -> None:
        super().__init__(request_id, ticket, peer, metadata)
        self._sender = sender
        self._receiver = sender.receiver(peer)
        self._remote = self._receiver.pool
        self._queued: list[_Push] = []  # pushed, not yet taken by the posting thread (self._lock)
        self._draining = False  # a drain of _queued is scheduled or running (self._lock)
        self._drains: list[Future] = []
        self._writes: list[WriteHandle] = []
        self._posting = threading.Lock()  # held across one post: a failing release waits behind it
        self._seals: list[Future] = []  # hashes on the sealing thread, announcements by the write poller
        self._announcing = threading.Lock()  # held across one notification, as _posting is across a post
        # One release at a time: a second caller (close after abort) returns only once the writes
        # the first one collected are final too.
        self._releasing = threading.Lock()

    def push_layer(
        self,
        cache: PagedKVCache,
        layer: int,
        src_blocks: Sequence[int],
        dst_blocks: Sequence[int],
        ready: LayerReady = COMPLETED,
    ) -> None:
        """Queues the layer for the posting thread, which reads it once ``ready`` completed."""
        with self._lock:
            if self.closed or not self.lease_left():
                return
            self._queued.append(_Push(cache, layer, list(src_blocks), list(dst_blocks), ready))
            if not self._draining:
                self._draining = True
                self._drains = [f for f in self._drains if not f.done()]
                self._drains.append(self._sender.post_when_ready(self._drain))

    def _drain(self) -> None:
        """Posting thread: posts what was pushed, in push order, up to ``_MAX_BATCH_LAYERS`` layers
        per WRITE, until nothing is queued; with checksums, announces each WRITE as soon as both
        it is final and its source is hashed."""
        unannounced: list[_Posted] = []
        while True:
            with self._lock:
                batch = self._queued[:_MAX_BATCH_LAYERS]
                del self._queued[:_MAX_BATCH_LAYERS]
            if not batch:
                self._announce_posted(unannounced, wait_for_hashes=True)
                with self._lock:
                    if not self._queued:  # a push meanwhile found _draining set: it is ours to post
                        self._draining = False
                        return
                continue
            hashed = self._hash_beside_post(batch)
            try:
                handle = self._post(batch)
                if hashed is not None and handle is not None:
                    unannounced.append(_Posted(batch, hashed, handle))
                    self._announce_posted(unannounced, wait_for_hashes=False)
            except Exception as exc:
                self._fail_on_bug("posting", batch, exc)

    def _hash_beside_post(self, batch: list[_Push]) -> Future | None:
        """With checksums: the batch's digests, computed on the sealing thread during its post."""
        if not self._sender.verify:
            return None
        hashed = self._sender.sealing.submit(self._hash, batch)
        with self._lock:
            self._seals.append(hashed)
        return hashed

    def _post(self, batch: list[_Push]) -> WriteHandle | None:
        """Posts the batch as one WRITE; None if it was not posted (the session failed or closed)."""
        try:
            for push in batch:
                push.ready.synchronize()
        except RuntimeError as exc:  # a CUDA error surfaces here
            self.fail(f"layers {[p.layer for p in batch]} never became ready: {exc}")
            return None
        layout = batch[0].cache.layout
        region = layout.region_bytes
        src = _slots(batch, "src_blocks", layout.num_blocks)
        dst = _slots(batch, "dst_blocks", self._remote.nbytes // (layout.num_layers * region))
        verify, pool = self._sender.verify, self._sender.pool
        with self._posting:
            if self.closed or not self.lease_left():
                return None
            # Checksums off: the notification rides with the WRITE (NIXL sends it once the regions
            # landed). On: it follows the WRITE, once the source is hashed (_announce).
            unchecked = [(p.layer, p.dst_blocks, 0) for p in batch]
            note = b"" if verify else _notification(self.request_id, self.ticket.token, unchecked)
            try:
                handle = pool.write_slots(self._remote, src, dst, region, note)
            except NixlError as exc:
                self._nixl_failed("NIXL write failed", exc)
                return None
            except ValueError as exc:
                self.fail(f"NIXL write failed: {exc}")
                return None
            with self._lock:
                self._writes.append(handle)
                self.bytes_sent += len(src) * region
        if not verify and not _final(handle):
            self._sender.poller.watch()  # its notification goes out when a poll sees it complete
        return handle

    def _announce_posted(self, unannounced: list[_Posted], wait_for_hashes: bool) -> None:
        """Posting thread, between posts: announces the posted WRITEs in order while they are final
        and hashed (waiting for the hashes if ``wait_for_hashes``: nothing is left to post); hands a
        WRITE still moving to the write poller, which announces it once it completes."""
        while unannounced:
            posted = unannounced[0]
            if not _final(posted.handle):
                seal = self._sender.poller.announce(self, posted)
                with self._lock:
                    self._seals.append(seal)
            elif posted.hashed.done() or wait_for_hashes:
                self._announce(posted)
            else:
                return  # its hash is still running: announce it after the next post
            unannounced.pop(0)

    def _hash(self, batch: list[_Push]) -> list[tuple[int, list[int], int]]:
        """Sealing thread: each layer's (layer, destination blocks, checksum of its source regions)."""
        for push in batch:
            push.ready.synchronize()
        return [(p.layer, p.dst_blocks, region_checksum(p.cache, p.layer, p.src_blocks)) for p in batch]

    def announce_if_settled(self, posted: _Posted) -> bool:
        """Write poller: announces a WRITE that was still moving at its post if that waits for nothing now
        (it is final, its source hashed). True once nothing is left to do for it: announced, or the session
        failed (a WRITE still moving at the lease deadline is aborted, which fails it)."""
        if self.failed is None and not posted.handle.settled and time.monotonic() >= self._deadline:
            posted.handle.release()
            self.fail(f"a WRITE to {self._remote.agent_name} was still moving at the lease deadline")
        if self.failed is not None:
            return True  # nothing more is announced; release() waits for the WRITE itself
        if not (posted.handle.settled and posted.hashed.done()):
            return False
        self._announce(posted)
        return True

    def _announce(self, posted: _Posted) -> None:
        """Sends the WRITE's notification with its digests once the WRITE is final (posting thread
        for a WRITE final at its post, which waits for the hashes; else the write poller, once it
        completed and was hashed)."""
        layers = None
        try:
            layers = posted.hashed.result(max(0.0, self._deadline - time.monotonic()))
            posted.handle.wait(max(0.0, self._deadline - time.monotonic()))
        except RuntimeError as exc:  # a CUDA error surfaces here
            self.fail(f"could not hash layers {[p.layer for p in posted.batch]}: {exc}")
        except NixlError as exc:
            self._nixl_failed("NIXL write failed", exc)
        except Exception as exc:
            self._fail_on_bug("sealing", posted.batch, exc)
        with self._announcing:
            if self.failed is not None:
                return
            try:
                note = _notification(self.request_id, self.ticket.token, layers)
                self._sender.pool.notify(self._remote.agent_name, note)
            except NixlError as exc:
                self._nixl_failed("NIXL notification failed", exc)

    def _nixl_failed(self, what: str, exc: NixlError) -> None:
        """NIXL failed a WRITE or notification: so does the session. A peer NIXL says disconnected (its process
        gone, or its link) is forgotten too (``KVSender.forget``): its agent, metadata and prepared lists would
        otherwise stay loaded until another instance shook hands at its address, which may never happen."""
        self.fail(f"{what}: {exc}", lost=exc.peer_lost)
        if exc.peer_lost:
            self._sender.forget_soon(self._peer)

    def _fail_on_bug(self, stage: str, batch: list[_Push], exc: Exception) -> None:
        """An error neither NIXL nor CUDA raised on a sender thread: fail the session now, rather than
        leave it in a Future until the commit times out."""
        log.exception("%s KV of %s failed", stage, self.request_id)
        self.fail(f"{stage} layers {[p.layer for p in batch]} failed: {exc!r}")

    def close(self, timeout: float) -> None:
        with self._lock:
            self.closed = True
        self.release(timeout)

    def release(self, timeout: float) -> None:
        """Waits until every pushed layer was posted (or dropped) and every WRITE has read our
        memory (or failed), so that a commit or an abort follows every notification of the session."""
        deadline = time.monotonic() + timeout
        with self._releasing:
            with self._lock:
                drains = list(self._drains)
            if wait_futures(drains, timeout=timeout).not_done:
                with self._posting:  # a post under way ends first; none starts after this
                    self.fail("a pushed layer did not become ready in time")
            with self._lock:
                seals = list(self._seals)
            if wait_futures(seals, timeout=max(0.0, deadline - time.monotonic())).not_done:
                with self._announcing:  # a notification under way goes first; none after this
                    self.fail("a pushed layer was not sealed in time")
            with self._lock:
                writes, self._writes = self._writes, []
            for handle in writes:
                try:
                    handle.wait(max(0.0, deadline - time.monotonic()))
                except NixlError as exc:
                    self._nixl_failed("NIXL write failed", exc)

    def commit(self, first_token_id: int, first_logprob: common_pb2.TokenLogprob | None, timeout: float) -> None:
        """The commit travels while the last WRITEs finish (``_commit_beside``): each layer's
        notification follows its WRITE's data, and the receiver adopts once every one arrived."""
        self._commit_beside(self._receiver.committing, self.release, first_token_id, first_logprob, timeout)


def _pool_of(peer: Peer) -> PoolDescriptor:
    """The pool a NIXL receiver's handshake described."""
    return PoolDescriptor.from_dict(msgpack.unpackb(peer.handshake.nixl_pool))


@dataclass(frozen=True)
class _Receiver:
    """What a sender keeps per receiver instance: its pool, read from the handshake once, and the threads its
    commits wait on, its own: a receiver that stalls holds up only its own commits, never another's."""

    pool: PoolDescriptor
    committing: ThreadPoolExecutor  # threads start as commits need them, at most COMMIT_THREADS


def _receiver_of(peer: Peer) -> _Receiver:
    committing = ThreadPoolExecutor(max_workers=COMMIT_THREADS, thread_name_prefix=f"nixl-commit-{peer.address}")
    return _Receiver(_pool_of(peer), committing)


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
        self._posting = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nixl-post")
        self.sealing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nixl-seal")
        # per receiver instance handshaken (its instance id): dropped when it is forgotten or replaced
        self._receivers: dict[str, _Receiver] = {}
        self._forgetting = ThreadPoolExecutor(max_workers=FORGET_THREADS, thread_name_prefix="nixl-forget")
        self.poller = _WritePoller(self.pool)

    def post_when_ready(self, post, *args) -> Future:
        """Runs ``post(*args)`` on this sender's one posting thread (FIFO across sessions)."""
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
        receiver = _receiver_of(peer)
        ours = self.pool.descriptor.memory
        if self.verify and receiver.pool.memory != ours:  # the checksum is chosen by memory (integrity.py)
            raise TransferError(
                f"{peer.address} keeps its KV pool in {receiver.pool.memory}, this worker in {ours}: checksums "
                "would differ; put both pools on the same kind of memory or turn KV checksums off",
                "FAILED_PRECONDITION",
            )
        self.pool.add_peer(peer.handshake.nixl_metadata)
        with self._lock:
            self._receivers[peer.instance_id] = receiver

    def _forget_peer(self, peer: Peer) -> None:
        """Drops ``peer``'s own agent (agent names are unique per instance): never another instance's that
        shook hands at its address since. Its sessions still open keep their ``_Receiver``: their commits end
        as the receiver answers or their timeouts run out, and its idle threads go with the last of them."""
        with self._lock:
            self._receivers.pop(peer.instance_id, None)
        self.pool.remove_peer(_pool_of(peer).agent_name)

    def forget_soon(self, peer: Peer) -> None:
        """``forget(peer)`` on a thread that may wait for a handshake to its address (not a sender's thread)."""
        try:
            self._forgetting.submit(self.forget, peer)
        except RuntimeError:  # closing: the pool goes with every peer
            pass

    def receiver(self, peer: Peer) -> _Receiver:
        """The pool and commit threads of ``peer``'s instance; UNAVAILABLE if that instance was forgotten or
        replaced meanwhile: a session never writes one instance's ticket into another's pool."""
        with self._lock:
            receiver = self._receivers.get(peer.instance_id) if self._peers.get(peer.address) is peer else None
        if receiver is None:
            raise TransferError(
                f"the decode worker at {peer.address} (instance {peer.instance_id}) is gone",
                "UNAVAILABLE",
                unreachable=peer.address,
            )
        return receiver

    def _session(self, request_id: str, ticket: decode_pb2.Ticket, peer: Peer, metadata) -> OutboundSession:
        return NixlSession(request_id, ticket, peer, self, metadata)

    def close(self) -> None:
        self._posting.shutdown(wait=True)
        self.sealing.shutdown(wait=True)
        self._forgetting.shutdown(wait=True)
        with self._lock:
            receivers, self._receivers = list(self._receivers.values()), {}
        for receiver in receivers:
            receiver.committing.shutdown(wait=True)
        self.poller.close()
        super().close()
        self.pool.close()
