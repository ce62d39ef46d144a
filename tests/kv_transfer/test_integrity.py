"""Checksums of KV in flight: a flipped byte is caught, on the host (xxh3) and with the device
hash — which is plain torch, so it runs here on CPU tensors too (on CUDA in tests/gpu/)."""

from __future__ import annotations

import torch

from engine.kv_cache import KVLayout, PagedKVCache
from kv_transfer import integrity
from kv_transfer.integrity import (
    checksum,
    device_checksum,
    in_cache_sized,
    region_checksum,
    region_views,
    running_checksum,
    views_checksum,
)

LAYOUT = KVLayout(num_layers=2, num_blocks=12, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")
BLOCKS = [7, 0, 3, 11]


def _pool(seed: int = 0) -> PagedKVCache:
    cache = PagedKVCache(LAYOUT)
    cache.data.copy_(torch.randn(cache.data.shape, generator=torch.Generator().manual_seed(seed)))
    return cache


def test_host_region_checksum_equals_checksum_of_the_bytes_sent():
    cache = _pool()
    sent = cache.read_regions(1, BLOCKS).numpy().tobytes()
    assert region_checksum(cache, 1, BLOCKS) == checksum(sent)


def test_every_single_flipped_byte_is_caught_by_both_hashes():
    cache = _pool()
    regions = cache.read_regions(0, BLOCKS)
    host, device = checksum(regions.numpy().tobytes()), device_checksum(regions)
    flat = regions.view(-1)
    for index in range(0, flat.numel(), 37):
        for bit in (0, 7):
            flipped = flat.clone()
            flipped[index] ^= 1 << bit
            assert checksum(flipped.numpy().tobytes()) != host
            assert device_checksum(flipped.view_as(regions)) != device


def test_device_hash_is_order_sensitive_deterministic_and_never_zero():
    cache = _pool(seed=3)
    forward = device_checksum(cache.read_regions(0, BLOCKS))
    assert forward == device_checksum(cache.read_regions(0, BLOCKS))
    assert forward != device_checksum(cache.read_regions(0, BLOCKS[::-1]))
    zeros = torch.zeros(3, LAYOUT.region_bytes, dtype=torch.uint8)
    assert device_checksum(zeros) != 0
    assert 0 < forward < 1 << 62


def test_sender_and_receiver_pools_agree_when_the_regions_do():
    """Same bytes in different blocks of different pools: equal checksums (what NIXL relies on)."""
    sender, receiver = _pool(seed=1), PagedKVCache(LAYOUT)
    targets = [1, 2, 4, 5]
    receiver.write_regions(1, targets, sender.read_regions(1, BLOCKS))
    assert device_checksum(receiver.read_regions(1, targets)) == device_checksum(sender.read_regions(1, BLOCKS))
    assert region_checksum(receiver, 1, targets) == region_checksum(sender, 1, BLOCKS)


def test_region_views_are_the_regions_in_order_however_the_blocks_lie():
    """What the host transports send from, land into and hash: the regions of the blocks in the order given,
    adjacent ascending blocks as one run, for blocks in one run, scattered, descending, repeated or one."""
    cache = _pool(seed=5)
    for blocks in ([4, 5, 6, 7], (4, 5, 6, 9, 10), [7, 6, 5], [2, 2], [11], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]):
        views = region_views(cache, 1, blocks)
        runs = 1 + sum(1 for a, b in zip(blocks, blocks[1:]) if b != a + 1)
        assert len(views) == runs, (blocks, len(views))
        expected = cache.read_regions(1, list(blocks)).numpy().tobytes()
        assert b"".join(bytes(view) for view in views) == expected, blocks
        assert views_checksum(views) == checksum(expected) == region_checksum(cache, 1, blocks)


def test_region_views_write_into_the_pool_itself():
    """A receiver lands bytes through the views: they are the pool's memory, not a copy, also once the pool's
    byte view is reused for later calls."""
    cache = _pool(seed=6)
    region_views(cache, 0, [3])  # the pool's byte view is made here and reused below
    view = region_views(cache, 0, [8, 9])[0]
    view[:] = bytes(range(256)) * (len(view) // 256)
    assert cache.read_regions(0, [8, 9]).numpy().tobytes() == bytes(view)
    assert cache.read_regions(0, [8]).view(-1)[:4].tolist() == [0, 1, 2, 3]


def test_in_cache_sized_cuts_views_into_chunks_of_at_most_the_limit_in_order(monkeypatch):
    monkeypatch.setattr(integrity, "IN_CACHE_BYTES", 100)
    data = bytes(range(256)) * 4
    views = [memoryview(data)[a:b] for a, b in [(0, 30), (30, 30), (30, 250), (250, 300), (300, 1024)]]
    chunks = list(in_cache_sized(views))
    assert [sum(len(part) for _, part in chunk) for chunk in chunks] == [100] * 10 + [24]
    by_view = {}
    for chunk in chunks:
        for index, part in chunk:
            by_view[index] = by_view.get(index, b"") + bytes(part)
    assert by_view == {i: bytes(v) for i, v in enumerate(views) if len(v)}  # each view whole, in order; none empty
    digest = running_checksum()  # a checksum streamed over the cuts is the whole one
    for chunk in chunks:
        for _, part in chunk:
            digest.update(part)
    assert digest.intdigest() == checksum(data)
