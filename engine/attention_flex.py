"""Paged attention with torch's FlexAttention, reading the pool in place through a block-table mask.

The pool layer ``[num_blocks, 2, block_size, kv_heads, head_dim]`` is seen as one long row
sequence, K and V interleaved per block; K and V are two views of it, V shifted by one half-block::

    rows:   | K b0 (bs) | V b0 (bs) | K b1 | V b1 | ...        r = block * 2*bs + slot
    key[j]   = rows[j]          value[j] = rows[j + bs]         (valid where slot = j % 2bs < bs)

A query row (sequence s, position p) may see key j iff its block j // 2bs is in s's block table at
logical index L and L*bs + slot <= p — the lower-right causal rule of prefill chunks, one mask for
the step's prefill rows. The sparse block mask lists, per 128 query rows, only the key tiles holding
blocks of the sequences in those rows. Decode rows (one query each) attend over their gathered blocks
as the torch path does (``attend`` says why).

Those tiles hold masked slots too — other sequences' blocks, free blocks, block tails, and the next
block's K under a V-half key row — read with probability 0; 0 x NaN is NaN, so this path relies on
the pool holding only finite values (engine/kv_cache.py) for one request's KV never to reach another.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from engine.attention import AttentionBatch, StepSequences, gathered_decode_attention
from engine.kv_cache import PagedKVCache

Q_TILE = 128
_MIN_KV_TILE = 128  # the kernels' key tile sizes (32-128) divide any multiple of this


FLEX_ENV = "SPLITSERVE_FLEX_ATTENTION"  # "0": the torch path even where flex runs (a CUDA host without a C compiler)


def flex_available() -> bool:
    """This torch ships FlexAttention and ``SPLITSERVE_FLEX_ATTENTION`` (unset, "1" or "0") does not turn it off."""
    setting = os.environ.get(FLEX_ENV, "1")
    if setting not in ("0", "1"):
        raise ValueError(f"{FLEX_ENV} must be 0 or 1, got {setting!r}")
    if setting == "0":
        return False
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


class FlexPagedAttention:
    """``compiled``: run the fused FlexAttention kernel (torch.compile; the CUDA backend). Uncompiled,
    flex_attention falls back to an unfused reference that materialises every score (tests only)."""

    name = "flex"
    reads_masked_slots = True  # whole key tiles of the pool, other sequences' slots included

    def __init__(self, compiled: bool = True) -> None:
        from torch.nn.attention.flex_attention import flex_attention

        self._flex = torch.compile(flex_attention, dynamic=True) if compiled else flex_attention
        self.name = "flex" if compiled else "flex-eager"

    def plan(self, sequences: StepSequences, cache: PagedKVCache):
        """The block mask of the prefill rows; None for a decode-only step."""
        prefills = prefill_sequences(sequences)
        return None if prefills is None else build_block_mask(prefills, cache.data.device)

    def attend(self, q, k, v, cache: PagedKVCache, layer: int, batch: AttentionBatch, scale: float) -> torch.Tensor:
        """Flex over the prefill rows; the decode rows (one query each) attend over their gathered blocks
        as the torch path does. A decode row in flex shares its query tile with every other sequence in
        it and walks all of their key tiles: 5.1 ms per layer for 32 decodes on an H200 (scripts/gpu_check.sh
        probe), where the gather and SDPA take a fraction of that."""
        cache.write(layer, k, v, batch.slot_block, batch.slot_offset)
        begin = batch.decode_begin
        decodes = None
        if batch.decode_block_table is not None:
            decodes = gathered_decode_attention(q[begin:], cache, layer, batch, scale)
        if not begin:
            return decodes
        key, value = pool_key_value(cache, layer)
        query = q[:begin].transpose(0, 1).unsqueeze(0)  # [1, H, prefill rows, D]
        out = self._flex(query, key, value, block_mask=batch.plan, scale=scale, enable_gqa=True)[0].transpose(0, 1)
        return out if decodes is None else torch.cat([out, decodes])


def prefill_sequences(sequences: StepSequences) -> StepSequences | None:
    """``sequences`` without its decodes (the last sequences, in the last rows); None when nothing is left."""
    rows = sequences.row_sequence.numel() - sequences.num_decodes
    if rows == 0:
        return None
    if not sequences.num_decodes:
        return sequences
    return dataclasses.replace(
        sequences,
        row_sequence=sequences.row_sequence[:rows],
        positions=sequences.positions[:rows],
        block_tables=sequences.block_tables[: len(sequences.block_tables) - sequences.num_decodes],
        serials=sequences.serials[: len(sequences.serials) - sequences.num_decodes],
        num_decodes=0,
    )


def pool_key_value(cache: PagedKVCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, kv_heads, rows, head_dim]`` views of one pool layer as keys and values (no copy)."""
    layout = cache.layout
    bs = layout.block_size
    rows = cache.data[layer].view(layout.num_blocks * 2 * bs, layout.num_kv_heads, layout.head_dim)
    length = layout.num_blocks * 2 * bs - bs
    key = rows[:length].permute(1, 0, 2).unsqueeze(0)
    value = rows[bs : bs + length].permute(1, 0, 2).unsqueeze(0)
    return key, value


def kv_tile_size(block_size: int) -> int:
    return math.lcm(2 * block_size, _MIN_KV_TILE)


def build_block_mask(sequences: StepSequences, device: torch.device):
    """The step's BlockMask: the exact ``mask_mod`` above, plus, per query tile, the key tiles that
    hold any block of the tile's sequences (all treated as partial: the mask_mod decides per row)."""
    from torch.nn.attention.flex_attention import BlockMask

    bs, num_blocks = sequences.block_size, sequences.num_blocks
    tokens = sequences.row_sequence.numel()
    logical = torch.full((len(sequences.block_tables), num_blocks), -1, dtype=torch.int32)
    for index, table in enumerate(sequences.block_tables):
        logical[index, list(table)] = torch.arange(len(table), dtype=torch.int32)
    kv_num, kv_indices = _tile_lists(sequences, kv_tile_size(bs))
    logical = logical.to(device)
    row_sequence = sequences.row_sequence.to(device)
    positions = sequences.positions.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        block = kv_idx // (2 * bs)
        slot = kv_idx % (2 * bs)
        logical_block = logical[row_sequence[q_idx], block]
        return (slot < bs) & (logical_block >= 0) & (logical_block * bs + slot <= positions[q_idx])

    return BlockMask.from_kv_blocks(
        kv_num.to(device),
        kv_indices.to(device),
        BLOCK_SIZE=(Q_TILE, kv_tile_size(bs)),
        mask_mod=mask_mod,
        seq_lengths=(tokens, num_blocks * 2 * bs - bs),
        # The per-key-tile query lists serve only the backward pass, and torch derives them assuming
        # kv_indices span every key tile: ours are sparse tile numbers (a block high in the pool
        # indexes out of bounds there; a device-side assert on CUDA).
        compute_q_blocks=False,
    )


def _tile_lists(sequences: StepSequences, kv_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_num_blocks [1, 1, q_tiles]`` and ``kv_indices [1, 1, q_tiles, kv_tiles]`` (padded with 0)."""
    bs = sequences.block_size
    tokens = sequences.row_sequence.numel()
    q_tiles = -(-tokens // Q_TILE)
    kv_tiles_total = -(-(sequences.num_blocks * 2 * bs - bs) // kv_tile)
    per_tile: list[torch.Tensor] = []
    for tile in range(q_tiles):
        seqs = sequences.row_sequence[tile * Q_TILE : (tile + 1) * Q_TILE].unique().tolist()
        blocks = torch.tensor([b for s in seqs for b in sequences.block_tables[s]], dtype=torch.long)
        per_tile.append(torch.unique(blocks * (2 * bs) // kv_tile))
    width = max(1, min(kv_tiles_total, max(t.numel() for t in per_tile)))
    kv_num = torch.tensor([t.numel() for t in per_tile], dtype=torch.int32).view(1, 1, q_tiles)
    kv_indices = torch.zeros((1, 1, q_tiles, width), dtype=torch.int32)
    for tile, tiles in enumerate(per_tile):
        kv_indices[0, 0, tile, : tiles.numel()] = tiles.to(torch.int32)
    return kv_num, kv_indices
