"""Block bookkeeping for one paged KV pool: reference counts, a free list, and a prefix cache.

Pure bookkeeping — no tensors. The model runner owns the pool; this module only decides which
block ids hold what. The hash functions at the top use only the stdlib and ``xxhash`` so that the
router can compute the same prefix-cache keys without importing the engine's heavy parts.
"""

from __future__ import annotations

import enum
import struct
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from engine.errors import NoFreeBlocksError

# Parent of a sequence's first block. Derived from a versioned label so a change of the hashing
# scheme can bump the label and never collide with hashes of the old scheme.
ROOT_PARENT_HASH = xxhash.xxh3_64_intdigest(b"splitserve/kv-block-hash/v1")

_PARENT = struct.Struct("<Q")
_TOKEN_BYTES = 4


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chained, stable 64-bit hash of one full block.

    xxh3_64 over the parent hash as 8 little-endian bytes (``ROOT_PARENT_HASH`` for a sequence's
    first block, i.e. when ``parent_hash`` is None) followed by the token ids packed as
    little-endian uint32. Identical across processes and machines — never Python's ``hash()``.
    Raises ValueError for a token id outside [0, 2**32) or a parent outside [0, 2**64).
    """
    return _hash_packed(parent_hash, _pack_tokens(token_ids))


def compute_block_hashes(token_ids: Sequence[int], block_size: int, parent_hash: int | None = None) -> list[int]:
    """Chained hashes of every FULL block of ``token_ids``; a trailing partial block has none.

    ``parent_hash`` continues a chain, e.g. hashing only the new blocks of a growing sequence.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    num_full = len(token_ids) // block_size
    packed = _pack_tokens(token_ids[: num_full * block_size])
    stride = block_size * _TOKEN_BYTES
    hashes: list[int] = []
    for start in range(0, len(packed), stride):
        parent_hash = _hash_packed(parent_hash, packed[start : start + stride])
        hashes.append(parent_hash)
    return hashes


def _pack_tokens(token_ids: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(token_ids)}I", *token_ids)
    except struct.error as exc:
        raise ValueError(f"token ids must be integers in [0, 2**32): {exc}") from None


def _hash_packed(parent_hash: int | None, packed_tokens: bytes) -> int:
    parent = ROOT_PARENT_HASH if parent_hash is None else parent_hash
    try:
        parent_bytes = _PARENT.pack(parent)
    except struct.error as exc:
        raise ValueError(f"parent hash must be an integer in [0, 2**64): {exc}") from None
    return xxhash.xxh3_64_intdigest(parent_bytes + packed_tokens)


class KVEventKind(enum.Enum):
    STORED = "stored"
    REMOVED = "removed"
    CLEARED = "cleared"


@dataclass(frozen=True)
class KVEvent:
    """One change to the prefix cache, as routers see it. A gap in ``event_id`` means resync."""

    event_id: int  # strictly increasing per allocator, starting at 1
    kind: KVEventKind
    block_hashes: tuple[int, ...]  # empty for CLEARED


class BlockAllocator:
    """Reference-counted blocks of one paged KV pool, with a prefix cache keyed by chained hashes.

    Contract:
    - Allocation is separate from publication: ``allocate()`` hands out blocks nobody can find;
      a block joins the prefix cache only when its owner calls ``publish()`` (KV computed here)
      or ``adopt()`` (KV received and verified), i.e. when its contents are complete.
    - Whoever obtained a reference (``allocate`` or ``acquire``) gives it back with ``free``.
      A freed published block keeps its contents and stays findable until ``allocate`` evicts it.
    - Events (STORED / REMOVED / CLEARED) accumulate until ``take_events()``; the owner drains
      them every step. A disabled prefix cache publishes nothing and emits no events.
    - Not thread-safe: one owner thread calls everything.
    - Every method validates its arguments before changing anything, so an exception leaves the
      allocator as it was.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[int | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # block hash -> block id, published blocks only
        # Blocks with ref_count == 0; insertion order is eviction order:
        #   front: allocate() pops here                                      back
        #   [ unpublished free blocks | published free blocks, LRU ......... MRU ]
        #     ^ free() of an unpublished block           free() of a published block ^
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._events: list[KVEvent] = []
        self._last_event_id = 0

    # -- queries ------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_count == 0, including free blocks that are still cached."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Published blocks, whatever their ref count."""
        return len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[self._checked(block_id)]

    def block_hash(self, block_id: int) -> int | None:
        """The hash a block is published under, or None if it is not in the prefix cache."""
        return self._block_hashes[self._checked(block_id)]

    def match_prefix(self, block_hashes: Sequence[int]) -> list[int]:
        """Ids of the blocks cached under the longest run of leading ``block_hashes``.

        Changes nothing: ``acquire()`` the hits before any ``allocate()``, which could evict them.
        """
        hits: list[int] = []
        for block_hash in block_hashes:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    # -- references ---------------------------------------------------------------------------

    def acquire(self, block_ids: Sequence[int]) -> None:
        """+1 ref on each block (prefix-cache hits, or sharing a held block).

        A free block must be published — a free unpublished block's contents are undefined — and
        leaves the free list in O(1). Raises ValueError otherwise.
        """
        for block_id in block_ids:
            if self._ref_counts[self._checked(block_id)] == 0 and self._block_hashes[block_id] is None:
                raise ValueError(f"block {block_id} is free and not cached; nothing to acquire")
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """``num_blocks`` fresh blocks with ref 1, unpublished.

        Takes free blocks from the front of the free list: never-cached ones first, then cached
        ones least-recently-freed first. Evicting a cached block unpublishes it (one REMOVED event
        per call). Raises NoFreeBlocksError, changing nothing, if there are not enough free blocks.
        """
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if not self.can_allocate(num_blocks):
            raise NoFreeBlocksError(f"asked for {num_blocks} KV blocks, {len(self._free)} free")
        block_ids = [self._free.popitem(last=False)[0] for _ in range(num_blocks)]
        evicted = [h for h in map(self._unpublish, block_ids) if h is not None]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        if evicted:
            self._emit(KVEventKind.REMOVED, evicted)
        return block_ids

    def free(self, block_ids: Sequence[int]) -> None:
        """-1 ref on each block, in reverse order so that a sequence's tail is evicted first.

        A block reaching ref 0 returns to the free list: published blocks at the back (evicted
        last, LRU), unpublished blocks at the front (reused first). Raises ValueError, changing
        nothing, if that would take any block below ref 0.
        """
        for block_id, times in Counter(block_ids).items():
            if self._ref_counts[self._checked(block_id)] < times:
                ref_count = self._ref_counts[block_id]
                raise ValueError(f"block {block_id} freed {times}x with ref_count {ref_count}")
        for block_id in reversed(block_ids):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None
                if self._block_hashes[block_id] is None:
                    self._free.move_to_end(block_id, last=False)

    # -- publication --------------------------------------------------------------------------

    def publish(self, block_id: int, block_hash: int) -> bool:
        """Enter a held (ref > 0), full, computed block into the prefix cache (one STORED event).

        Returns True iff this call published it. False, changing nothing, when another block
        already holds ``block_hash`` (this one stays unpublished), when this block is already
        published under ``block_hash``, or when prefix caching is disabled. Raises ValueError for
        a free block or one already published under a different hash.
        """
        self._check_publishable(block_id, block_hash)
        published = self._publish_one(block_id, block_hash)
        if published:
            self._emit(KVEventKind.STORED, [block_hash])
        return published

    def adopt(self, block_ids: Sequence[int], block_hashes: Sequence[int]) -> None:
        """Publish blocks whose KV was written from outside (received over the network) once
        verified — the decode worker's entry point. Same rules as ``publish()``; one STORED event
        listing the blocks actually published (none if no block was)."""
        if len(block_ids) != len(block_hashes):
            raise ValueError(f"{len(block_ids)} block ids but {len(block_hashes)} hashes")
        if len(set(block_ids)) != len(block_ids):
            raise ValueError(f"duplicate block ids in {list(block_ids)}")
        for block_id, block_hash in zip(block_ids, block_hashes):
            self._check_publishable(block_id, block_hash)
        stored = [h for b, h in zip(block_ids, block_hashes) if self._publish_one(b, h)]
        if stored:
            self._emit(KVEventKind.STORED, stored)

    def reset_prefix_cache(self) -> None:
        """Unpublish every block (held blocks keep their contents for their holders; free ones
        become plain free blocks). One CLEARED event."""
        if not self.enable_prefix_cache:
            return
        for block_id in self._cached.values():
            self._block_hashes[block_id] = None
        self._cached.clear()
        self._emit(KVEventKind.CLEARED, [])

    @property
    def last_event_id(self) -> int:
        return self._last_event_id

    def cached_hashes(self) -> list[int]:
        """Every published block hash (a snapshot for a new KV-event subscriber)."""
        return list(self._cached)

    def take_events(self) -> list[KVEvent]:
        """Events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    # -- internals ----------------------------------------------------------------------------

    def _checked(self, block_id: int) -> int:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} outside [0, {self.num_blocks})")
        return block_id

    def _check_publishable(self, block_id: int, block_hash: int) -> None:
        if self._ref_counts[self._checked(block_id)] == 0:
            raise ValueError(f"block {block_id} is free; only held blocks can be published")
        if not 0 <= block_hash < 2**64:
            raise ValueError(f"block hash {block_hash} is not a 64-bit unsigned integer")
        current = self._block_hashes[block_id]
        if current is not None and current != block_hash:
            raise ValueError(f"block {block_id} is already published under another hash")

    def _publish_one(self, block_id: int, block_hash: int) -> bool:
        if not self.enable_prefix_cache or block_hash in self._cached:
            return False
        self._cached[block_hash] = block_id
        self._block_hashes[block_id] = block_hash
        return True

    def _unpublish(self, block_id: int) -> int | None:
        block_hash = self._block_hashes[block_id]
        if block_hash is not None:
            self._block_hashes[block_id] = None
            del self._cached[block_hash]
        return block_hash

    def _emit(self, kind: KVEventKind, block_hashes: Sequence[int]) -> None:
        self._last_event_id += 1
        self._events.append(KVEvent(self._last_event_id, kind, tuple(block_hashes)))
