"""The CPU KV pool's memory (engine/kv_cache.py ``host_pool``): zeroed, 2 MiB-aligned and, where the
kernel grants transparent huge pages on request, backed by them; elsewhere ordinary memory."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.kv_cache import KVLayout, PagedKVCache, host_pool

HUGE_PAGE = 2 << 20


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_the_pool_is_zeroed_aligned_contiguous_and_shaped():
    layout = KVLayout(num_layers=4, num_blocks=256, block_size=16, num_kv_heads=4, head_dim=64, dtype="bfloat16")
    cache = PagedKVCache(layout)
    assert cache.data.shape == (4, 256, 2, 16, 4, 64) and cache.data.dtype == torch.bfloat16
    assert cache.data.is_contiguous() and cache.data.data_ptr() % HUGE_PAGE == 0
    assert not cache.data.any()
    cache.data[-1, -1] = 1.5  # the last byte is inside the allocation
    assert cache.regions[-1, -1].view(torch.bfloat16).eq(1.5).all()


def test_the_pool_is_on_huge_pages_where_the_kernel_grants_them():
    pool = host_pool((8 * HUGE_PAGE // 4,), torch.float32)  # 8 huge pages
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    huge_kb = _anon_huge_kb(pool.data_ptr())
    if "[never]" in mode:
        assert huge_kb == 0  # refused: ordinary memory, and the pool still works
    else:
        assert huge_kb > 0, f"THP mode {mode.strip()!r}, but no part of the pool is on huge pages"
    pool.fill_(2.0)
    assert float(pool.sum()) == 2.0 * pool.numel()
