"""Integrity of KV in flight: one checksum, computed on bytes sent or on regions hashed in place.

Two functions, one per kind of memory, both order-sensitive:

- bytes on the host (gRPC chunks, CPU pools hashed in place): xxh3-64;
- regions in GPU memory (NIXL VRAM pools): ``device_checksum``, a torch reduction that runs where
  the regions are, so verifying never pulls VRAM through the host.

``region_checksum`` picks by the pool's device, so the two ends of a NIXL transfer agree only when
both pools are on the same kind of memory; the NIXL sender refuses a peer that is not (with
checksums on).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence

import torch
import xxhash

from engine.kv_cache import PagedKVCache

# Two lanes modulo the Mersenne prime 2^31 - 1: each product of a word residue and a coefficient
# stays below 2^62, and a sum of up to 2^32 residues fits in int64, so no step overflows.
_PRIME = (1 << 31) - 1
_LANE_MULTIPLIERS = (1_103_515_245, 740_103_789)
_coefficients: dict[tuple[torch.device, int], torch.Tensor] = {}
IN_CACHE_BYTES = 512 << 10  # what a copy leaves in one core's cache for the hash that follows it (in_cache_sized)
_pool_views: weakref.WeakKeyDictionary[PagedKVCache, memoryview] = weakref.WeakKeyDictionary()


def checksum(data) -> int:
    """xxh3-64 of a bytes-like object: cheap enough to run on every chunk (~10+ GB/s)."""
    return xxhash.xxh3_64_intdigest(data)


def region_checksum(cache: PagedKVCache, layer: int, block_ids: Sequence[int]) -> int:
    """Checksum of one layer's regions in ``block_ids`` order, computed where the pool lives.

    CPU: hashed in place (no gathered copy), equal to ``checksum`` of the same regions sent back
    to back. CUDA: ``device_checksum`` of the gathered regions, on the device."""
    if cache.data.is_cuda:
        return device_checksum(cache.read_regions(layer, list(block_ids)))
    return views_checksum(region_views(cache, layer, block_ids))


def running_checksum() -> xxhash.xxh3_64:
    """``checksum`` fed piece by piece (``update``, then ``intdigest``): xxh3 streamed over pieces equals xxh3 of
    their concatenation, so each side hashes its own runs, in its own cuts, and both still agree."""
    return xxhash.xxh3_64()


def views_checksum(views: Sequence[memoryview]) -> int:
    """``checksum`` of the views' bytes back to back, hashed where they lie, one call each (the GIL released
    inside)."""
    digest = running_checksum()
    for view in views:
        digest.update(view)
    return digest.intdigest()


def in_cache_sized(views: Sequence[memoryview]) -> Iterator[list[tuple[int, memoryview]]]:
    """The views' bytes, in order, as consecutive chunks of at most IN_CACHE_BYTES, each a list of (index of the
    view it is from, part of that view); a view is split where a chunk ends. A host transport copies a chunk and
    hashes it at once, while the copy left it in the core's cache: xxh3 right after a 512 KiB copy reads ~40 GB/s
    here, against ~10 GB/s over a 16 MiB one (Emerald Rapids, docs/PERFORMANCE.md)."""
    limit, chunk, size = IN_CACHE_BYTES, [], 0
    for index, view in enumerate(views):
        while len(view):
            part = view[: limit - size]
            chunk.append((index, part))
            size += len(part)
            view = view[len(part) :]
            if size == limit:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def pool_bytes(cache: PagedKVCache) -> memoryview:
    """The whole CPU pool as one writable byte memoryview (no copy): what the host transports slice. Made once
    per pool (the pool's tensor never changes), not once per layer moved."""
    view = _pool_views.get(cache)
    if view is None:
        view = _pool_views[cache] = memoryview(cache.data.view(-1).view(torch.uint8).numpy())
    return view


def region_views(cache: PagedKVCache, layer: int, block_ids: Sequence[int]) -> list[memoryview]:
    """The CPU pool's bytes of ``block_ids``' regions on ``layer``, as views (no copy), one per run of
    ``region_runs``: what a host transport sends from, receives into and hashes."""
    pool = pool_bytes(cache)
    return [pool[start : start + length] for start, length in region_runs(cache, layer, block_ids)]


def region_runs(cache: PagedKVCache, layer: int, block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """(byte offset, length) of ``block_ids``' regions on ``layer``, in order, adjacent blocks merged::

    block_ids 4 5 6 9 10   ->   [offset(4), 3 regions) [offset(9), 2 regions)
    """
    layout = cache.layout
    region, runs = layout.region_bytes, []
    if block_ids and list(block_ids) == list(range(block_ids[0], block_ids[0] + len(block_ids))):
        return [(layout.region_offset(layer, block_ids[0]), len(block_ids) * region)]  # one run (checked in C)
    previous = None
    for block in block_ids:
        if previous is not None and block == previous + 1:
            runs[-1][1] += region
        else:
            runs.append([layout.region_offset(layer, block), region])
        previous = block
    return [(start, length) for start, length in runs]


def device_checksum(regions: torch.Tensor) -> int:
    """A 62-bit, order-sensitive hash of ``regions`` (``[n, region_bytes]`` uint8, region_bytes a
    multiple of 4), computed with torch ops on the tensor's own device; one scalar comes back.

    Each 32-bit word w_i contributes (w_i mod p) * c_i mod p to each of two lanes, with per-position
    coefficients c_i = ((i + 1) * a mod p)^2 mod p, never 0. Any change to a single word (a flipped
    byte included) changes both lanes, since p is prime and neither factor is 0 mod p."""
    words = regions.reshape(-1).view(torch.int32).to(torch.int64).remainder_(_PRIME)
    lanes = [
        words.mul(_position_coefficients(words.device, words.numel(), m)).remainder_(_PRIME).sum()
        for m in _LANE_MULTIPLIERS
    ]
    high, low = (int(v) for v in torch.stack(lanes).remainder(_PRIME).tolist())
    return ((high << 31) | low) or 1  # 0 means "not checked" on the wire


def _position_coefficients(device: torch.device, count: int, multiplier: int) -> torch.Tensor:
    key = (device, multiplier)
    cached = _coefficients.get(key)
    if cached is None or cached.numel() < count:
        size = max(count, 2 * (cached.numel() if cached is not None else 0), 1 << 16)
        positions = torch.arange(1, size + 1, dtype=torch.int64, device=device)
        base = positions.mul_(multiplier).remainder_(_PRIME)
        cached = _coefficients[key] = base.mul(base).remainder_(_PRIME)
    return cached[:count]
