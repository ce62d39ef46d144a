"""KV over NIXL: the prefill worker WRITEs (layer, block) regions straight into the decode worker's
registered pool, one WRITE per pushed layer piece, each followed by a notification (msgpack:
request id, layer, destination blocks, checksum). The decode worker polls notifications, verifies
the landed regions in place, and adopts the KV when the sender commits over gRPC.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

import grpc
import msgpack

from engine.kv_cache import PagedKVCache
from engine.layer_ready import COMPLETED, LayerReady
from kv_transfer.errors import TransferError
from kv_transfer.inbox import KVInbox
from kv_transfer.integrity import region_checksum
from kv_transfer.nixl_agent import NixlError, NixlPool, PoolDescriptor, WriteHandle
from kv_transfer.sender import KVSender, OutboundSession, Peer
from protos import common_pb2, decode_pb2, kv_transfer_pb2
from protos.cluster_auth import ClusterAuth

log = logging.getLogger(__name__)

_IDLE_POLL_S = 0.01
_BUSY_POLL_S = 0.0002
ABORT_RELEASE_TIMEOUT_S = 5.0  # writes not final by then are aborted (NixlError on their handles)


def _notification(request_id: str, token: str, layer: int, dst_blocks: Sequence[int], checksum: int) -> bytes:
    note = {"request_id": request_id, "token": token, "layer": layer, "blocks": list(dst_blocks), "checksum": checksum}
    return msgpack.packb(note)


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


class NixlSession(OutboundSession):
    reads_after_push = True  # a posted WRITE reads our pool until NIXL reports it final

    def __init__(
        self, request_id: str, ticket: decode_pb2.Ticket, peer: Peer, sender: NixlKVSender, metadata=None
    ) -> None:
        super().__init__(request_id, ticket, metadata)
        self._peer = peer
        self._sender = sender
        self._remote = sender.remote_pool(peer)
        self._writes: list[WriteHandle] = []
        # Posting a write excludes failing or closing the session: once abort() or close() ran, no
        # write is posted after they collected the ones to wait for.
        self._lock = threading.Lock()
        # One release at a time: a second caller (close after abort) returns only once the writes
        # the first one collected are final too.
        self._releasing = threading.Lock()
        # Posts waiting for their layer's ``ready`` on the sender's posting thread, in push order.
        self._deferred: list[Future] = []

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
        checksum = region_checksum(cache, layer, src_blocks) if self._sender.verify else 0
        try:
            handle = self._sender.pool.write(
                self._remote,
                src,
                dst,
                layout.region_bytes,
                _notification(self.request_id, self.ticket.token, layer, dst_blocks, checksum),
            )
        except (NixlError, ValueError) as exc:
            self.fail(f"NIXL write failed: {exc}")
            return
        self._writes.append(handle)
        self.bytes_sent += len(src) * layout.region_bytes

    def release(self, timeout: float) -> None:
        """Waits until every posted WRITE has read our memory (or failed)."""
        deadline = time.monotonic() + timeout
        with self._releasing:
            with self._lock:
                deferred = list(self._deferred)
            if wait_futures(deferred, timeout=timeout).not_done:
                with self._lock:  # a post still waiting for its layer must never start after we return
                    self.fail("a pushed layer did not become ready in time")
            with self._lock:
                writes, self._writes = self._writes, []
            for handle in writes:
                try:
                    handle.wait(max(0.0, deadline - time.monotonic()))
                except NixlError as exc:
                    self.fail(f"NIXL write failed: {exc}")

    def commit(self, first_token_id: int, first_logprob: common_pb2.TokenLogprob | None, timeout: float) -> None:
        self.release(timeout)
        if self.failed is None:
            self.lease_left()
        if self.failed is not None:
            raise TransferError(self.failed, "ABORTED")
        request = kv_transfer_pb2.CommitRequest(
            request_id=self.request_id,
            instance_id=self.ticket.instance_id,
            token=self.ticket.token,
            first_token_id=first_token_id,
        )
        if first_logprob is not None:
            request.first_logprob.CopyFrom(first_logprob)
        try:
            self._peer.stub.Commit(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            self.fail(f"decode worker refused the KV: {exc.details()}")
            raise TransferError(self.failed, "ABORTED") from exc

    def abort(self, reason: str) -> None:
        with self._lock:
            self.fail(reason)
        self.release(ABORT_RELEASE_TIMEOUT_S)  # our abort tells the receiver we write no more: make it true
        request = kv_transfer_pb2.CommitRequest(
            request_id=self.request_id,
            instance_id=self.ticket.instance_id,
            token=self.ticket.token,
            abort=True,
            abort_reason=reason,
        )
        try:
            self._peer.stub.Commit(request, timeout=5.0, metadata=self.metadata)
        except grpc.RpcError as exc:
            log.info("could not tell %s about the abort of %s: %s", self._peer.address, self.request_id, exc.details())


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
        super().close()
        self.pool.close()
