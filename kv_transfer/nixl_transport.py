"""KV over NIXL: the prefill worker WRITEs (layer, block) regions straight into the decode worker's
registered pool and the decode worker adopts them when the sender commits over gRPC.

A push only queues its layer. The sender's posting threads read the pool once the layer is ready and
post the layers pushed meanwhile as one WRITE (at most ``_MAX_BATCH_LAYERS`` layers, at most
``_WRITE_BYTES``; a larger layer goes in pieces of its blocks): a layer-wise push during a prefill posts
about a layer per WRITE; a whole-request push, or layers that finish faster than they post, share WRITEs
and save each WRITE's and notification's fixed cost. Every WRITE carries one notification (msgpack:
request id, token, and per piece its layer, destination blocks and checksum), which NIXL delivers once the
regions landed; the decode worker verifies each piece in place on a thread of its own while later WRITEs
land.

Two posting threads (``POSTING_AGENTS``), each with a NIXL agent of its own: on DRAM UCX's CMA transport
copies a WRITE inside its post, on the posting thread, and one agent posts one WRITE at a time, so only
two agents copy side by side. With checksums on (the default) a posting thread hashes a batch's source
just before posting it, and the digests ride with the WRITE; while one thread hashes, the other copies::

    engine thread:     push 0 push 1 ... push 15 ── commit (sent at once, answered after the last verify)
    posting thread 1:  hash 0 │ WRITE 0 ·note│ hash 2 │ WRITE 2 ·note│ ...
    posting thread 2:         hash 1 │ WRITE 1 ·note│ hash 3 │ WRITE 3 ·note│ ...
    decode verify thread:            verify 0        verify 1   verify 2 ...

A WRITE still moving after its post (RDMA, VRAM, or a DRAM post UCX left unfinished) holds nothing up:
the posting thread goes on, and the write poller drives it until NIXL sends its notification.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
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
from kv_transfer.sender import (
    COMMIT_THREADS,
    FORGET_THREADS,
    KVSender,
    OutboundSession,
    OutOfBandSession,
    Peer,
    block_pieces,
)
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
# A WRITE's most bytes. Smaller WRITEs let the two posting threads share a transfer; each costs a post, a notification
# and a verify task. With a hash and a notification per WRITE
# over two agents (a throwaway script, 64 MiB on a 2-vCPU Zen 5): 2 MiB WRITEs 52%, 4 MiB 51-57%, 16 MiB 44% of
# memcpy; 512 KiB 16%, each WRITE waiting for the receiver's next poll of the notification before it.
_WRITE_BYTES = 4 << 20
POSTING_AGENTS = 2
_WRITE_POLL_S = 0.0001  # the poller's pace over WRITEs still in flight after their post, for _WRITE_FAST_S
_WRITE_FAST_S = 0.02
# Then: a WRITE to a stalled decode worker stays in flight until its lease ends; polled at the first pace all that
# time it took 18% of a core from the prefill worker, 8% at this one.
_STRAGGLER_POLL_S = 0.001


def _notification(request_id: str, token: str, pieces: list[tuple[int, list[int], int]]) -> bytes:
    """One WRITE's notification: its pieces as (layer, destination blocks, checksum; 0: unchecked)."""
    return msgpack.packb({"request_id": request_id, "token": token, "layers": pieces})


def _slots(batch: list[_Push], side: str, blocks_per_layer: int) -> np.ndarray:
    """The batch's regions on one side as slots of a pool cut into regions: layer * blocks + block."""
    return np.concatenate(
        [np.asarray(getattr(p, side), dtype=np.int32) + np.int32(p.layer * blocks_per_layer) for p in batch]
    )


@dataclass(eq=False)
class _Push:
    """A pushed layer, or a piece of its blocks, waiting for a posting thread."""

    cache: PagedKVCache
    layer: int
    src_blocks: list[int]
    dst_blocks: list[int]
    ready: LayerReady

    @property
    def nbytes(self) -> int:
        return len(self.src_blocks) * self.cache.layout.region_bytes


def _take_batch(queued: list[_Push]) -> list[_Push]:
    """Takes the next WRITE's pieces off the front of ``queued``: at most ``_MAX_BATCH_LAYERS`` of them and
    ``_WRITE_BYTES`` in all, at least one."""
    taken, nbytes = 0, 0
    while taken < min(len(queued), _MAX_BATCH_LAYERS):
        nbytes += queued[taken].nbytes
        if taken and nbytes > _WRITE_BYTES:
            break
        taken += 1
    batch = queued[:taken]
    del queued[:taken]
    return batch


def _final(handle: WriteHandle) -> bool:
    """Whether the WRITE completed; a failed one counts as still moving: ``release`` waits for it next, gets its
    error and fails the session."""
    try:
        return handle.done()
    except NixlError:
        return False


class _Poster:
    """A NIXL agent and the one thread that posts on it."""

    def __init__(self, name: str, cache: PagedKVCache) -> None:
        self.pool = NixlPool(name, cache.data)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nixl-post-{name}")


class _WritePoller:
    """A sender's thread that polls WRITEs still in flight after their post (RDMA, VRAM; a DRAM WRITE usually
    completes inside its post), so that NIXL sends each one's notification as soon as it completes rather than
    when someone next waits for it. Polls fast for a moment after each such post, slower after that (a WRITE to
    a stalled decode worker stays in flight until its session's ``release`` gives up on it and aborts it); sleeps
    while nothing is in flight. Never waits for an agent a post holds: the posting thread progresses it then."""

    def __init__(self, pools: list[NixlPool]) -> None:
        self._pools = pools
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nixl-writes", daemon=True)
        self._thread.start()

    def watch(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

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
            in_flight = 0
            for pool in self._pools:
                try:  # a post holds the agent: it is in flight itself, look again at the next pace
                    in_flight += pool.pending_writes if pool.progress(wait=False) else 1
                except NixlError:
                    pass  # closed: every WRITE failed, which their sessions learn as they wait for them
            if not in_flight:
                pace = None
            else:
                pace = _WRITE_POLL_S if now < fast_until else _STRAGGLER_POLL_S


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
    reads_after_push = True  # the posting threads read our pool after push_layer returned

    def __init__(
        self, request_id: str, ticket: decode_pb2.Ticket, peer: Peer, sender: NixlKVSender, metadata=None
    ) -> None:
        super().__init__(request_id, ticket, peer, metadata)
        self._sender = sender
        self._receiver = sender.receiver(peer)
        self._remote = self._receiver.pool
        self._queued: list[_Push] = []  # pushed, not yet taken by a posting thread (self._lock)
        self._draining = 0  # drains of _queued scheduled or running, at most one per posting thread (self._lock)
        self._drains: list[Future] = []
        self._writes: list[WriteHandle] = []
        self._posts_under_way = 0  # (self._lock) a failing release waits for them: none starts after it
        self._posted = threading.Condition(self._lock)
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
        """Queues the layer for the posting threads, which read it once ``ready`` completed."""
        with self._lock:
            if self.closed or not self.lease_left():
                return
            region = cache.layout.region_bytes
            for src, dst in block_pieces(src_blocks, dst_blocks, region, _WRITE_BYTES):  # a large layer: in pieces
                self._queued.append(_Push(cache, layer, src, dst, ready))
            if self._draining < len(self._sender.posters):
                self._draining += 1
                self._drains = [f for f in self._drains if not f.done()]
                self._drains.append(self._sender.post_when_ready(self._drain))

    def _drain(self, pool: NixlPool) -> None:
        """A posting thread: posts what was pushed, in push order, a batch per WRITE, until nothing is queued
        (another posting thread may drain the same session beside it)."""
        while True:
            with self._lock:
                batch = _take_batch(self._queued)
                if not batch:
                    self._draining -= 1
                    return
            try:
                self._post(pool, batch)
            except Exception as exc:
                self._fail_on_bug("posting", batch, exc)

    def _post(self, pool: NixlPool, batch: list[_Push]) -> None:
        """Hashes the batch's source (with checksums) and posts it as one WRITE with its notification."""
        try:
            for push in batch:
                push.ready.synchronize()
        except RuntimeError as exc:  # a CUDA error surfaces here
            self.fail(f"layers {[p.layer for p in batch]} never became ready: {exc}")
            return
        pieces = self._hash(batch)
        if pieces is None:
            return
        layout = batch[0].cache.layout
        region = layout.region_bytes
        src = _slots(batch, "src_blocks", layout.num_blocks)
        dst = _slots(batch, "dst_blocks", self._remote.nbytes // (layout.num_layers * region))
        note = _notification(self.request_id, self.ticket.token, pieces)
        with self._lock:
            if self.closed or not self.lease_left():
                return
            self._posts_under_way += 1
        handle = None
        try:
            handle = pool.write_slots(self._remote, src, dst, region, note)
        except NixlError as exc:
            self._nixl_failed("NIXL write failed", exc)
            return
        except ValueError as exc:
            self.fail(f"NIXL write failed: {exc}")
            return
        finally:
            with self._lock:  # the WRITE is known to release before the post counts as over
                if handle is not None:
                    self._writes.append(handle)
                    self.bytes_sent += len(src) * region
                self._posts_under_way -= 1
                self._posted.notify_all()
        if not _final(handle):
            self._sender.poller.watch()  # its notification goes out when a poll sees it complete

    def _hash(self, batch: list[_Push]) -> list[tuple[int, list[int], int]] | None:
        """Each piece's (layer, destination blocks, checksum of its source regions; 0 with checksums off); None
        if hashing failed, which fails the session."""
        if not self._sender.verify:
            return [(p.layer, p.dst_blocks, 0) for p in batch]
        try:
            return [(p.layer, p.dst_blocks, region_checksum(p.cache, p.layer, p.src_blocks)) for p in batch]
        except RuntimeError as exc:  # a CUDA error surfaces here
            self.fail(f"could not hash layers {[p.layer for p in batch]}: {exc}")
        except Exception as exc:
            self._fail_on_bug("hashing", batch, exc)
        return None

    def _nixl_failed(self, what: str, exc: NixlError) -> None:
        """NIXL failed a WRITE: so does the session. A peer NIXL says disconnected (its process gone, or its link)
        is forgotten too (``KVSender.forget``): its agent, metadata and prepared lists would otherwise stay loaded
        until another instance shook hands at its address, which may never happen."""
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
                with self._lock:
                    self.fail("a pushed layer did not become ready in time")  # no post starts after this
                    self._posted.wait_for(lambda: not self._posts_under_way)  # one under way ends first
            with self._lock:
                writes, self._writes = self._writes, []
            for handle in writes:
                try:
                    handle.wait(max(0.0, deadline - time.monotonic()))
                except NixlError as exc:
                    self._nixl_failed("NIXL write failed", exc)

    def commit(self, first_token_id: int, first_logprob: common_pb2.TokenLogprob | None, timeout: float) -> None:
        """The commit travels while the last WRITEs finish (``_commit_beside``): each WRITE's
        notification follows its data, and the receiver adopts once every one arrived."""
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
        names = [agent_name] + [f"{agent_name}.{i}" for i in range(1, POSTING_AGENTS)]
        self.posters = [_Poster(name, cache) for name in names]
        self._next_poster = itertools.cycle(self.posters)  # under self._lock
        # per receiver instance handshaken (its instance id): dropped when it is forgotten or replaced
        self._receivers: dict[str, _Receiver] = {}
        self._forgetting = ThreadPoolExecutor(max_workers=FORGET_THREADS, thread_name_prefix="nixl-forget")
        self.poller = _WritePoller(self.pools)

    @property
    def pools(self) -> list[NixlPool]:
        return [poster.pool for poster in self.posters]

    @property
    def pending_writes(self) -> int:
        """WRITEs posted and not yet final, over every agent."""
        return sum(pool.pending_writes for pool in self.pools)

    def post_when_ready(self, post: Callable[[NixlPool], None]) -> Future:
        """Runs ``post(pool)`` on the next posting thread in turn, with its agent (FIFO on each thread)."""
        with self._lock:
            poster = next(self._next_poster)
        return poster.thread.submit(post, poster.pool)

    def _nixl_agents(self) -> list[str]:
        return [pool.name for pool in self.pools]

    def _on_new_peer(self, peer: Peer) -> None:
        if not peer.handshake.nixl_metadata:
            raise TransferError(
                f"{peer.address} does not receive KV over NIXL (transport mismatch: start the prefill and decode "
                "workers with the same --transport)",
                "FAILED_PRECONDITION",
                unreachable=peer.address,
                refused=True,
            )
        try:
            receiver = _receiver_of(peer)
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as exc:  # a peer's bytes
            raise TransferError(
                f"{peer.address} described its NIXL pool in a form this worker cannot read ({type(exc).__name__}: "
                f"{exc}): are both workers the same splitserve version?",
                "FAILED_PRECONDITION",
                unreachable=peer.address,
                refused=True,
            ) from exc
        ours = self.posters[0].pool.descriptor.memory
        if self.verify and receiver.pool.memory != ours:  # the checksum is chosen by memory (integrity.py)
            raise TransferError(
                f"{peer.address} keeps its KV pool in {receiver.pool.memory}, this worker in {ours}: checksums "
                "would differ; put both pools on the same kind of memory or turn KV checksums off",
                "FAILED_PRECONDITION",
            )
        for pool in self.pools:
            pool.add_peer(peer.handshake.nixl_metadata)
        with self._lock:
            self._receivers[peer.instance_id] = receiver

    def _forget_peer(self, peer: Peer) -> None:
        """Drops ``peer``'s own agent (agent names are unique per instance): never another instance's that
        shook hands at its address since. Its sessions still open keep their ``_Receiver``: their commits end
        as the receiver answers or their timeouts run out, and its idle threads go with the last of them."""
        with self._lock:
            self._receivers.pop(peer.instance_id, None)
        for pool in self.pools:
            pool.remove_peer(_pool_of(peer).agent_name)

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
        for poster in self.posters:
            poster.thread.shutdown(wait=True)
        self._forgetting.shutdown(wait=True)
        with self._lock:
            receivers, self._receivers = list(self._receivers.values()), {}
        for receiver in receivers:
            receiver.committing.shutdown(wait=True)
        self.poller.close()
        super().close()
        for pool in self.pools:
            pool.close()
