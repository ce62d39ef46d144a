"""The CPU KV pool's memory (engine/kv_cache.py ``host_pool``): zeroed, 2 MiB-aligned and, where the
kernel grants transparent huge pages on request, backed by them; elsewhere ordinary memory."""

from __future__ import annotations

import threading
import time
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


def _populated() -> None:
    """Waits (bounded) for the pools' background population threads to finish."""
    deadline = time.monotonic() + 30
    while any(t.name == "kv-pool-populate" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a pool's population never finished"
        time.sleep(0.01)


def test_the_pool_is_on_huge_pages_where_the_kernel_grants_them():
    pool = host_pool((8 * HUGE_PAGE // 4,), torch.float32)  # 8 huge pages
    pool.fill_(2.0)
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    huge_kb = _anon_huge_kb(pool.data_ptr())
    if "[never]" in mode:
        assert huge_kb == 0  # refused: ordinary memory, and the pool still works
    else:
        assert huge_kb > 0, f"THP mode {mode.strip()!r}, but no part of the pool is on huge pages"
    assert float(pool.sum()) == 2.0 * pool.numel()


def test_background_population_keeps_what_was_written_and_zeroes_the_rest():
    """The pool is faulted in by a thread while the engine may already write KV: nothing it wrote
    is lost, nothing else reads anything but zero."""
    pool = host_pool((64 << 20,), torch.uint8)
    stride = 4096 + 7  # hits every page, at shifting offsets
    pool[::stride] = 7  # at once: the population thread has barely started
    _populated()
    assert pool[::stride].eq(7).all()
    assert int(pool.ne(0).sum()) == pool[::stride].numel()
