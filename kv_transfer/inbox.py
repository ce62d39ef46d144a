"""The decode worker's landing zones: where a reservation's KV arrives, and nothing about its life.

A landing is one request's destination blocks, what has landed per layer, and a gate. Whether the
reservation is open, committed or stopped is the decode worker's reservation state machine's
fact, not ours: it opens a landing, closes its gate the moment the reservation leaves OPEN, and
forgets it once the blocks are adopted or freed. Transports only report what happened.

Contract:
- ``open`` / ``close`` / ``pinned`` / ``forget`` are the owner's: the reservation state machine, under
  its lock (on the decode engine thread, or on a transport thread deciding a good commit at once).
- ``write`` (gRPC data), ``receive_in_place`` (bulk TCP data), ``landed`` (NIXL notifications),
  ``check``, ``layers_complete``, ``wait_for_layers``, ``commit`` and ``abort`` run on transport threads. The
  first three touch the pool only while *pinned*: the pin is taken under the landing's lock and
  only while the gate is open, and the owner frees a landing's blocks only once it is closed and
  unpinned. So no block is written (or read for a
  checksum) after its reservation stopped, nor ever while it could be freed.
- ``authorize`` (transport threads, before anything else about a request): the sender presents the
  ticket's token, which the owner handed the landing at ``open``; a wrong one is PERMISSION_DENIED
  and changes nothing.
- ``commit`` and ``abort`` hand the event to the owner (``on_commit`` / ``on_abort``); they never
  change a landing themselves. ``commit`` returns only once the owner accepted the KV (it is then
  the engine's, which decodes it from its next step), or raises TransferError with the owner's reason.
"""

from __future__ import annotations

import hmac
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from engine.kv_cache import PagedKVCache
from kv_transfer.errors import TransferError
from kv_transfer.integrity import checksum, region_checksum

# Received chunks are read-only bytes; they are only read (copied into the pool), never written.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

# What lands: (layer, destination blocks)
Piece = tuple[int, Sequence[int]]
# request id, first token id, first logprob (or None); blocks until accepted, raises TransferError if refused
CommitHandler = Callable[[str, int, object], None]
# request id, reason, sender_stopped: the sender says it will write no more (every gRPC message from
# it says so; a NIXL notification with bad data does not)
AbortHandler = Callable[[str, str, bool], None]


@dataclass
class Landing:
    request_id: str
    block_ids: tuple[int, ...]  # destination blocks that must be written, in prompt order
    written: list[set[int]]  # per layer, blocks landed
    token: str = field(default="", repr=False)  # the ticket's token: senders must present it
    bytes_received: int = 0
    accepting: bool = True  # the gate: False from the moment the reservation left OPEN
    closed_reason: str = ""
    pins: int = 0  # transport threads touching this landing's blocks right now
    lock: threading.Lock = field(default_factory=threading.Lock)
    reserved: frozenset[int] = field(init=False, repr=False)  # block_ids, for checking each chunk's blocks

    def __post_init__(self) -> None:
        self.reserved = frozenset(self.block_ids)

    @property
    def complete(self) -> bool:
        return all(len(blocks) == len(self.block_ids) for blocks in self.written)

    def missing_layers(self) -> list[int]:
        return [layer for layer, blocks in enumerate(self.written) if len(blocks) < len(self.block_ids)]


class KVInbox:
    def __init__(
        self,
        cache: PagedKVCache,
        on_commit: CommitHandler,
        on_abort: AbortHandler,
        verify_checksums: bool = True,
        sanitize_in_place: bool = False,
    ) -> None:
        """``sanitize_in_place``: the engine's attention reads masked slots (``reads_masked_slots``),
        so KV landed in place gets its non-finite values replaced by 0, as ``write`` does for gRPC chunks."""
        self.cache = cache
        self.sanitize_in_place = sanitize_in_place
        self.on_commit = on_commit
        self.on_abort = on_abort
        self.verify_checksums = verify_checksums
        self._landings: dict[str, Landing] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition()  # notified when a landing is complete or shuts its gate
        self._commits_waiting = 0  # commits inside wait_for_layers (under _changed)
        # Set when a commit starts waiting for layers still to land: a transport that paces its polling
        # (NIXL's notifications) polls at once rather than at the end of its current wait.
        self.commit_arrived = threading.Event()

    # -- owner (decode engine thread) -------------------------------------------------------------

    def open(self, request_id: str, block_ids: Sequence[int], token: str = "") -> Landing:
        written = [set() for _ in range(self.cache.layout.num_layers)]
        landing = Landing(request_id, tuple(block_ids), written, token=token)
        with self._lock:
            self._landings[request_id] = landing
        return landing

    def close(self, request_id: str, reason: str) -> bool:
        """Shut the gate: transports are refused from now on. True if every layer had landed."""
        landing = self.get(request_id)
        if landing is None:
            return False
        with landing.lock:
            landing.accepting = False
            landing.closed_reason = reason
            complete = landing.complete
        self._signal()
        return complete

    def pinned(self, request_id: str) -> bool:
        """A transport thread is still inside this landing's blocks (its gate may be shut already)."""
        landing = self.get(request_id)
        if landing is None:
            return False
        with landing.lock:
            return landing.pins > 0

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._landings.pop(request_id, None)

    @property
    def num_landings(self) -> int:
        with self._lock:
            return len(self._landings)

    @property
    def commits_waiting(self) -> int:
        """Commits blocked in ``wait_for_layers``: their senders' last notifications are due now."""
        return self._commits_waiting

    # -- transport threads ------------------------------------------------------------------------

    def get(self, request_id: str) -> Landing | None:
        with self._lock:
            return self._landings.get(request_id)

    def authorize(self, request_id: str, token: str) -> None:
        """Raises TransferError unless ``token`` is the one of ``request_id``'s ticket (NOT_FOUND:
        no such reservation; PERMISSION_DENIED: another request's ticket or a wrong token)."""
        landing = self._landing(request_id)
        if not hmac.compare_digest(token.encode(), landing.token.encode()):
            raise TransferError(f"wrong ticket token for reservation {request_id!r}", "PERMISSION_DENIED")

    def write(self, request_id: str, layer: int, block_ids: Sequence[int], data: bytes, expected_checksum: int) -> None:
        """gRPC data: copy one chunk (regions of ``block_ids`` back to back) straight into the pool."""
        landing = self._landing(request_id)
        self._check_chunk(landing, layer, block_ids)
        region_bytes = self.cache.layout.region_bytes
        if len(data) != len(block_ids) * region_bytes:
            raise TransferError(
                f"chunk has {len(data)} bytes, expected {len(block_ids)} x {region_bytes}", "INVALID_ARGUMENT"
            )
        if self.verify_checksums and expected_checksum and checksum(data) != expected_checksum:
            raise TransferError(f"checksum mismatch on layer {layer} of {request_id}", "DATA_LOSS")
        regions = torch.frombuffer(data, dtype=torch.uint8).view(len(block_ids), region_bytes)
        with self.pin(landing):
            self.cache.write_regions(layer, block_ids, regions)
            self._mark_written(landing, [(layer, block_ids)])

    def landed(self, request_id: str, layers: Sequence[tuple[int, Sequence[int], int]]) -> None:
        """A NIXL notification: the sender's WRITE of ``layers`` (layer, blocks, checksum; 0: unchecked) has
        landed in place (nothing left to fill: verify in place and mark)."""
        pieces = [(layer, block_ids) for layer, block_ids, _ in layers]
        self.receive_in_place(
            request_id, pieces, lambda layer, block_ids: None, lambda: [checksum for _, _, checksum in layers]
        )

    def receive_in_place(
        self,
        request_id: str,
        pieces: Sequence[Piece],
        fill: Callable[[int, Sequence[int]], int | None],
        checksums: Callable[[], Sequence[int]],
    ) -> None:
        """Bulk TCP data (kv_transfer/bulk_transport.py): piece after piece (layer, blocks), ``fill(layer,
        blocks)`` reads its regions from the network into the pool and returns their checksum, hashed while still
        in cache (anything when ``verify_checksums`` is off), or None to have them hashed in place here, only
        where a checksum is expected (NIXL's, landed before); ``checksums()`` then gives the sender's, in order
        (0: unchecked). The landing stays pinned throughout, so a refused or stopped reservation is never
        written; a mismatch is DATA_LOSS, and nothing of the frame is marked landed. One pin, and one mark, for
        all of a frame's pieces."""
        landing = self.check(request_id, pieces)
        with self.pin(landing):
            digests = [fill(layer, block_ids) for layer, block_ids in pieces]
            for (layer, block_ids), digest, expected in zip(pieces, digests, checksums(), strict=True):
                if self.verify_checksums and expected:
                    if digest is None:
                        digest = region_checksum(self.cache, layer, block_ids)
                    if digest != expected:
                        raise TransferError(f"checksum mismatch on layer {layer} of {request_id}", "DATA_LOSS")
                if self.sanitize_in_place:
                    self.cache.sanitize(layer, block_ids)
            self._mark_written(landing, pieces)

    def check(self, request_id: str, pieces: Sequence[Piece]) -> Landing:
        """Raises TransferError unless every piece names a layer of the pool and blocks of the reservation:
        a frame of pieces is refused whole, before any of it is written. The landing."""
        landing = self._landing(request_id)
        for layer, block_ids in pieces:
            self._check_chunk(landing, layer, block_ids)
        return landing

    def layers_complete(self, request_id: str) -> bool:
        landing = self._landing(request_id)
        with landing.lock:
            self.require_accepting(landing)
            return landing.complete

    def wait_for_layers(self, request_id: str, timeout: float) -> bool:
        """Blocks until every layer landed (True), the gate shut (raises TransferError) or ``timeout``
        passed (False): how a commit waits for the notifications of trailing NIXL writes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._commits_waiting += 1
            try:
                if not self.layers_complete(request_id):
                    self.commit_arrived.set()
                while not self.layers_complete(request_id):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._changed.wait(left)
            finally:
                self._commits_waiting -= 1
        return True

    def commit(self, request_id: str, first_token_id: int, first_logprob) -> int:
        """Every layer landed: the owner accepts the KV. Returns the bytes received."""
        landing = self._landing(request_id)
        with landing.lock:
            self.require_accepting(landing)
            if not landing.complete:
                missing = landing.missing_layers()
                raise TransferError(f"commit before layers {missing[:8]} landed", "FAILED_PRECONDITION")
        self.on_commit(request_id, first_token_id, first_logprob)
        return landing.bytes_received

    def abort(self, request_id: str, reason: str, sender_stopped: bool = True) -> None:
        self.on_abort(request_id, reason, sender_stopped)

    # -- helpers ----------------------------------------------------------------------------------

    def _landing(self, request_id: str) -> Landing:
        landing = self.get(request_id)
        if landing is None:
            raise TransferError(f"no reservation {request_id!r} on this worker", "NOT_FOUND")
        return landing

    @contextmanager
    def pin(self, landing: Landing) -> Iterator[None]:
        """Transport threads: hold while touching a landing's blocks; refused once its gate is shut."""
        with landing.lock:
            self.require_accepting(landing)
            landing.pins += 1
        try:
            yield
        finally:
            with landing.lock:
                landing.pins -= 1

    @staticmethod
    def require_accepting(landing: Landing) -> None:
        """TransferError ABORTED once the reservation left OPEN (its gate shut: lease expired, aborted, committed)."""
        if not landing.accepting:
            reason = landing.closed_reason or "stopped"
            raise TransferError(f"reservation {landing.request_id} takes no more KV: {reason}", "ABORTED")

    def _check_chunk(self, landing: Landing, layer: int, block_ids: Sequence[int]) -> None:
        if not 0 <= layer < self.cache.layout.num_layers:
            raise TransferError(f"layer {layer} outside [0, {self.cache.layout.num_layers})", "INVALID_ARGUMENT")
        if not block_ids or not landing.reserved.issuperset(block_ids):
            stray = sorted(set(block_ids) - landing.reserved)
            raise TransferError(f"blocks {stray[:8]} are not reserved for {landing.request_id}", "INVALID_ARGUMENT")

    def _mark_written(self, landing: Landing, pieces: Sequence[Piece]) -> None:
        with landing.lock:
            for layer, block_ids in pieces:
                landing.written[layer].update(block_ids)
                landing.bytes_received += len(block_ids) * self.cache.layout.region_bytes
            complete = landing.complete
        if complete:  # a waiting commit wakes once, not once per piece
            self._signal()

    def _signal(self) -> None:
        with self._changed:
            self._changed.notify_all()
