"""The decode worker's side of KV transfer: reservations whose KV is still arriving.

Contract:
- ``open`` is called on the engine thread right after the engine reserved the blocks.
- ``write`` (gRPC data), ``layer_landed`` (NIXL notifications), ``commit`` and ``abort`` come
  from transport threads; each takes the inbound's lock, so a block is never written after its
  reservation stopped being OPEN.
- ``expire`` is called on the engine thread; it reports leases that ran out. The engine thread
  frees blocks only after the inbound left OPEN (``release_time`` says when: at once for data the
  receiver copies itself, at the lease deadline for RDMA, which a sender might still be writing).
"""

from __future__ import annotations

import enum
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from engine.kv_cache import PagedKVCache
from kv_transfer.errors import TransferError
from kv_transfer.integrity import checksum, region_checksum

# Received chunks are read-only bytes; they are only read (copied into the pool), never written.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class InboundState(enum.Enum):
    OPEN = "open"
    COMMITTED = "committed"
    ABORTED = "aborted"
    EXPIRED = "expired"


@dataclass
class Inbound:
    request_id: str
    block_ids: tuple[int, ...]  # destination blocks that must be written, in prompt order
    deadline: float  # time.monotonic() by which the KV must have landed
    remote_writes: bool  # True: a peer writes our memory directly (NIXL)
    state: InboundState = InboundState.OPEN
    written: list[set[int]] = field(default_factory=list)  # per layer, blocks landed
    bytes_received: int = 0
    reason: str = ""
    client_told: bool = False  # the decode worker failed the request's stream already
    opened_at: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def release_time(self) -> float:
        """When the engine may reuse this reservation's blocks after it stopped being OPEN."""
        return self.deadline if self.remote_writes else 0.0


CommitCallback = Callable[[str, int, object], None]  # request id, first token id, first logprob (or None)


class KVInbox:
    def __init__(self, cache: PagedKVCache, on_commit: CommitCallback, verify_checksums: bool = True) -> None:
        self.cache = cache
        self.on_commit = on_commit
        self.verify_checksums = verify_checksums
        self._inbound: dict[str, Inbound] = {}
        self._lock = threading.Lock()
        self.leases_expired = 0
        self.bytes_received = 0

    # -- engine thread ----------------------------------------------------------------------------

    def open(self, request_id: str, block_ids: Sequence[int], lease_seconds: float, remote_writes: bool) -> Inbound:
        inbound = Inbound(request_id, tuple(block_ids), time.monotonic() + lease_seconds, remote_writes)
        inbound.written = [set() for _ in range(self.cache.layout.num_layers)]
        with self._lock:
            self._inbound[request_id] = inbound
        return inbound

    def expire(self, now: float) -> list[Inbound]:
        """Marks OPEN inbounds past their deadline EXPIRED and returns them."""
        expired = []
        for inbound in self._snapshot():
            with inbound.lock:
                if inbound.state is InboundState.OPEN and now >= inbound.deadline:
                    inbound.state = InboundState.EXPIRED
                    inbound.reason = "lease expired before the KV landed"
                    expired.append(inbound)
        self.leases_expired += len(expired)
        return expired

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._inbound.pop(request_id, None)

    def get(self, request_id: str) -> Inbound | None:
        with self._lock:
            return self._inbound.get(request_id)

    def stopped(self) -> list[Inbound]:
        """Inbounds that were aborted or expired and still hold their blocks."""
        return [i for i in self._snapshot() if i.state in (InboundState.ABORTED, InboundState.EXPIRED)]

    @property
    def in_flight(self) -> int:
        return sum(1 for i in self._snapshot() if i.state is InboundState.OPEN)

    # -- transport threads ------------------------------------------------------------------------

    def write(self, request_id: str, layer: int, block_ids: Sequence[int], data: bytes, expected_checksum: int) -> None:
        """gRPC data: copy one chunk (regions of ``block_ids`` back to back) straight into the pool."""
        inbound = self._open_inbound(request_id)
        self._check_chunk(inbound, layer, block_ids)
        region_bytes = self.cache.layout.region_bytes
        if len(data) != len(block_ids) * region_bytes:
            raise TransferError(
                f"chunk has {len(data)} bytes, expected {len(block_ids)} x {region_bytes}", "INVALID_ARGUMENT"
            )
        if self.verify_checksums and expected_checksum and checksum(data) != expected_checksum:
            raise TransferError(f"checksum mismatch on layer {layer} of {request_id}", "DATA_LOSS")
        regions = torch.frombuffer(data, dtype=torch.uint8).view(len(block_ids), region_bytes)
        with inbound.lock:
            self._require_open(inbound)
            self.cache.write_regions(layer, block_ids, regions)
            self._mark_written(inbound, layer, block_ids)

    def landed(self, request_id: str, layer: int, block_ids: Sequence[int], expected_checksum: int) -> None:
        """A NIXL notification: the sender's WRITE of ``block_ids`` on ``layer`` has landed in place."""
        inbound = self._open_inbound(request_id)
        self._check_chunk(inbound, layer, block_ids)
        with inbound.lock:
            self._require_open(inbound)
            if (
                self.verify_checksums
                and expected_checksum
                and region_checksum(self.cache, layer, block_ids) != expected_checksum
            ):
                raise TransferError(f"checksum mismatch on layer {layer} of {request_id}", "DATA_LOSS")
            self._mark_written(inbound, layer, block_ids)

    def layers_complete(self, request_id: str) -> bool:
        inbound = self._open_inbound(request_id)
        with inbound.lock:
            return self._complete(inbound)

    def commit(self, request_id: str, first_token_id: int, first_logprob) -> Inbound:
        """Every layer landed: verify, mark COMMITTED and hand the request to the engine."""
        inbound = self._open_inbound(request_id)
        with inbound.lock:
            self._require_open(inbound)
            if not self._complete(inbound):
                missing = [
                    layer for layer, blocks in enumerate(inbound.written) if len(blocks) < len(inbound.block_ids)
                ]
                raise TransferError(f"commit before layers {missing[:8]} landed", "FAILED_PRECONDITION")
            inbound.state = InboundState.COMMITTED
        self.on_commit(request_id, first_token_id, first_logprob)
        return inbound

    def abort(self, request_id: str, reason: str) -> Inbound | None:
        inbound = self.get(request_id)
        if inbound is None:
            return None
        with inbound.lock:
            if inbound.state is InboundState.OPEN:
                inbound.state = InboundState.ABORTED
                inbound.reason = reason
        return inbound

    # -- helpers ----------------------------------------------------------------------------------

    def _snapshot(self) -> list[Inbound]:
        with self._lock:
            return list(self._inbound.values())

    def _open_inbound(self, request_id: str) -> Inbound:
        inbound = self.get(request_id)
        if inbound is None:
            raise TransferError(f"no reservation {request_id!r} on this worker", "NOT_FOUND")
        self._require_open(inbound)
        return inbound

    @staticmethod
    def _require_open(inbound: Inbound) -> None:
        if inbound.state is not InboundState.OPEN:
            reason = inbound.reason or inbound.state.value
            raise TransferError(f"reservation {inbound.request_id} is {inbound.state.value}: {reason}", "ABORTED")

    @staticmethod
    def _complete(inbound: Inbound) -> bool:
        return all(len(blocks) == len(inbound.block_ids) for blocks in inbound.written)

    def _check_chunk(self, inbound: Inbound, layer: int, block_ids: Sequence[int]) -> None:
        if not 0 <= layer < self.cache.layout.num_layers:
            raise TransferError(f"layer {layer} outside [0, {self.cache.layout.num_layers})", "INVALID_ARGUMENT")
        stray = set(block_ids) - set(inbound.block_ids)
        if stray or not block_ids:
            raise TransferError(
                f"blocks {sorted(stray)[:8]} are not reserved for {inbound.request_id}", "INVALID_ARGUMENT"
            )

    def _mark_written(self, inbound: Inbound, layer: int, block_ids: Sequence[int]) -> None:
        inbound.written[layer].update(block_ids)
        nbytes = len(block_ids) * self.cache.layout.region_bytes
        inbound.bytes_received += nbytes
        self.bytes_received += nbytes
