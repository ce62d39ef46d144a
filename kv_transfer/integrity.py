"""Integrity of KV in flight: one checksum, computed on bytes sent or on regions hashed in place."""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from engine.kv_cache import PagedKVCache


def checksum(data) -> int:
    """xxh3-64 of a bytes-like object: cheap enough to run on every chunk (~10+ GB/s)."""
    return xxhash.xxh3_64_intdigest(data)


def region_checksum(cache: PagedKVCache, layer: int, block_ids: Sequence[int]) -> int:
    """Checksum of one layer's regions in ``block_ids`` order, hashed in place (no gathered copy);
    equal to ``checksum`` of the same regions sent back to back."""
    digest = xxhash.xxh3_64()
    rows = cache.regions[layer]
    for block in block_ids:
        digest.update(memoryview(rows[block].numpy()))
    return digest.intdigest()
