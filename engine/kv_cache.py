"""The paged KV pool: one tensor per worker.

Layout ``[num_layers, num_blocks, 2 (K,V), block_size, num_kv_heads, head_dim]``::

    data[layer, block]  ->  [ K: block_size x kv_heads x head_dim | V: same ]   one contiguous region
    token at position p of a sequence lives in block_table[p // block_size], slot p % block_size

so one (layer, block) pair is a single contiguous byte range: the unit both KV transports move.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, cached_property

import torch

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class KVLayout:
    """Shape and dtype of a KV pool; two workers exchange KV only if their layouts agree."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @cached_property  # read per region on the transports' paths
    def region_elements(self) -> int:
        return 2 * self.block_size * self.num_kv_heads * self.head_dim

    @cached_property
    def region_bytes(self) -> int:
        """Bytes of one (layer, block) region."""
        return self.region_elements * _DTYPE_BYTES[self.dtype]

    def region_offset(self, layer: int, block: int) -> int:
        """Byte offset of (layer, block) from the start of the pool."""
        return (layer * self.num_blocks + block) * self.region_bytes


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_POPULATE_CHUNK = 64 << 20


def host_pool(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor on transparent huge pages where Linux grants them on request (THP's
    "madvise" mode, the usual default): a fresh private mapping (the kernel hands its pages out
    zeroed), 2 MiB-aligned and advised before any page exists.

    Every pass over a KV pool walks its pages: UCX's CMA copy (NIXL on one host) pins each page it
    writes, memcpy and the checksums walk the TLB. Side by side on 64 MiB (2-core Xeon): NIXL's
    write 15.2 -> 11.7 ms, xxh3 5.2 -> 3.6 ms, memcpy 10.8 -> 10.1 ms. A huge page costs more to
    fault in (~3 ms per 2 MiB here, against ~0.5 ms for 4 KiB pages), so a background thread faults
    the pool in without writing to it (``_populate``): neither the worker's start nor its first
    requests wait for it. Where the advice is refused (another OS, THP off) the pool is ordinary
    memory."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _HUGE_PAGE or not sys.platform.startswith("linux"):
        return torch.zeros(shape, dtype=dtype)
    mapping = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping for the tensor's life
    start = -raw.data_ptr() % _HUGE_PAGE
    pool = raw[start : start + nbytes]
    _madvise(pool.data_ptr(), nbytes, _MADV_HUGEPAGE)
    populate = threading.Thread(target=_populate, args=(pool, nbytes), name="kv-pool-populate", daemon=True)
    populate.start()
    return pool.view(dtype).view(shape)


def _populate(pool: torch.Tensor, nbytes: int) -> None:
    """Faults the pool's pages in, chunk by chunk, as a write would but writing nothing: safe beside
    the engine and the transports writing KV. The GIL is released inside each call. A kernel without
    MADV_POPULATE_WRITE refuses the first chunk; pages then fault in on first use."""
    address = pool.data_ptr()  # ``pool`` stays referenced (and mapped) until this returns
    for offset in range(0, nbytes, _POPULATE_CHUNK):
        if _madvise(address + offset, min(_POPULATE_CHUNK, nbytes - offset), _MADV_POPULATE_WRITE) != 0:
            return


def _madvise(address: int, nbytes: int, advice: int) -> int:
    """madvise(2); nonzero when refused (no harm: the memory stays ordinary)."""
    madvise = _libc_madvise()
    if madvise is None:
        return -1
    return madvise(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), advice)


@cache
def _libc_madvise():
    """The C library's madvise, looked up once; None where there is none."""
    try:
        return ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None


class PagedKVCache:
    """Owns the pool tensor. Written by the model runner (new tokens) and by KV transports
    (blocks received from a prefill worker); both happen on the engine's thread or while the
    engine guarantees the target blocks are not being read.

    Every value in the pool is finite: it starts zeroed and ``write``/``write_regions`` store NaN
    and +-inf as 0. A masked slot then contributes exactly 0 to attention even where it is read —
    FlexAttention reads whole key tiles in place, other sequences' blocks, free blocks and block
    tails included, and 0 x NaN would be NaN. Transports that land bytes in place (bulk, NIXL)
    bypass both: an honest peer's regions are finite by the same rule, but a faulty or hostile one's
    need not be (its checksum covers what it sent, not whether that is sane), so where the attention
    reads masked slots the inbox ``sanitize``s what landed before anyone may read it.
    A request whose model diverges still gets its own garbage; its KV reaches no one else."""

    def __init__(self, layout: KVLayout, device: str = "cpu") -> None:
        self.layout = layout
        shape = (layout.num_layers, layout.num_blocks, 2, layout.block_size, layout.num_kv_heads, layout.head_dim)
        dtype = getattr(torch, layout.dtype)
        on_host = torch.device(device).type == "cpu"
        self.data = host_pool(shape, dtype) if on_host else torch.zeros(shape, dtype=dtype, device=device)
        # The same memory as rows of bytes, one per (layer, block) region: what transports copy.
        self.regions = self.data.view(torch.uint8).view(layout.num_layers, layout.num_blocks, layout.region_bytes)
        # The same rows as the widest integer words that divide a region, for copying whole regions by index:
        # torch's CPU index_copy_/index_select move one element per step, so on uint8 rows they ran at
        # ~0.14 GiB/s (a Zen 1), on int64 rows at ~3 GiB/s.
        word = next(dtype for dtype in _WORDS if layout.region_bytes % dtype.itemsize == 0)
        self._region_words = self.regions.view(word)

    def write(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, slot_block: torch.Tensor, slot_offset: torch.Tensor
    ) -> torch.Tensor:
        """Store K/V ``[tokens, kv_heads, head_dim]`` at the given (block, offset) slots of one layer
        (non-finite values as 0). Returns what it stored, ``[tokens, 2 (K,V), kv_heads, head_dim]``."""
        key_value = torch.stack((key, value), 1).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        # K and V in one index_put, through a [blocks, block_size, 2, ...] view of the layer.
        self.data[layer].transpose(1, 2).index_put_((slot_block, slot_offset), key_value)
        return key_value

    def gather(self, layer: int, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V for ``block_table [batch, blocks]``, kv-heads first for attention: each
        ``[kv_heads, batch, blocks*block_size, head_dim]``, contiguous.

        One pass: index_select on a heads-first view of the layer writes the result in its final
        order (gathering blocks, then transposing, would copy the KV twice)."""
        batch, blocks = block_table.shape
        layout = self.layout
        heads_first = self.data[layer].permute(1, 3, 0, 2, 4)  # [2, kvh, num_blocks, bs, hd], a view
        gathered = heads_first.index_select(2, block_table.reshape(-1))  # [2, kvh, batch*blocks, bs, hd]
        shape = (2, layout.num_kv_heads, batch, blocks * layout.block_size, layout.head_dim)
        key, value = gathered.view(shape).unbind(0)
        return key, value

    def read_regions(self, layer: int, blocks: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """A copy of the regions of ``blocks`` on ``layer``, back to back: ``[len(blocks), region_bytes]`` uint8.
        ``blocks`` may be a long tensor on the pool's device already (then no copy is made of it)."""
        index = torch.as_tensor(blocks, dtype=torch.long, device=self.data.device)
        return self._region_words[layer].index_select(0, index).view(torch.uint8)

    def write_regions(self, layer: int, blocks: Sequence[int], data: torch.Tensor) -> None:
        """Store ``data`` (``[len(blocks), region_bytes]`` uint8) into the regions of ``blocks`` on ``layer``
        (non-finite values as 0)."""
        index = torch.as_tensor(blocks, dtype=torch.long, device=self.data.device)
        finite = _finite(data.to(self.data.device).view(self.data.dtype))  # a new tensor, so aligned for any word
        words = self._region_words
        words[layer].index_copy_(0, index, finite.view(torch.uint8).view(words.dtype))

    def sanitize(self, layer: int, blocks: Sequence[int]) -> None:
        """Replaces non-finite values in the regions of ``blocks`` on ``layer`` by 0, in place: for
        bytes that landed there without passing through ``write_regions``."""
        self.write_regions(layer, blocks, self.read_regions(layer, blocks))

    def region(self, layer: int, block: int) -> torch.Tensor:
        """The contiguous ``[2, block_size, kv_heads, head_dim]`` view of one (layer, block)."""
        return self.data[layer, block]


_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)


def _finite(values: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
