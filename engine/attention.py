"""Attention over the paged KV pool, behind one seam with two backends (engine/attention_flex.py
holds the FlexAttention one, for CUDA; the torch path here is the reference and the CPU backend).

A step's flat token batch is laid out prefill chunks first, then single-token decodes::

    tokens: [ chunk A (Ta) | chunk B (Tb) | d0 | d1 | ... ]      decodes share one padded gather

A chunk whose first position is ``start`` attends to every cached key before it and causally
within itself — the lower-right causal mask: query i sees keys j <= start + i.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from engine.decode_scratch import DECODE_SCRATCH_MAX_BYTES, DecodeScratch, ScratchStep
from engine.kv_cache import PagedKVCache
from engine.native_kernels import NativeKernels, native_kernels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillSegment:
    """One prefill chunk: flat rows [begin, end), first position ``start``, its block table."""

    begin: int
    end: int
    start: int
    block_table: torch.Tensor  # [num_blocks] long, covering positions [0, start + end - begin)


@dataclass(frozen=True)
class AttentionBatch:
    """Everything attention needs for one step, built by the model runner."""

    slot_block: torch.Tensor  # [tokens] block id each new token's K/V goes to
    slot_offset: torch.Tensor  # [tokens] slot within that block
    prefills: tuple[PrefillSegment, ...]
    decode_begin: int  # flat row where the decodes start
    decode_block_table: torch.Tensor | None  # [decodes, max_blocks], padded with a valid id
    decode_mask: torch.Tensor | None  # [decodes, 1, 1, max_blocks*block_size] True where attended
    backend: AttentionBackend | None = None  # None: the torch path
    plan: object = None  # the backend's per-step metadata, shared by every layer


@dataclass(frozen=True)
class StepSequences:
    """What a backend's ``plan`` may need beyond AttentionBatch: for each flat row its sequence
    (index into ``block_tables``) and position; each sequence's physical blocks in logical order."""

    row_sequence: torch.Tensor  # [tokens] long
    positions: torch.Tensor  # [tokens] long
    block_tables: tuple[tuple[int, ...], ...]
    block_size: int
    num_blocks: int  # of the pool
    serials: tuple[int, ...] = ()  # per sequence: its request incarnation (ScheduledChunk.serial)
    num_decodes: int = 0  # the last sequences are single-token decodes, in the last rows


class AttentionBackend(Protocol):
    """One implementation of paged attention. ``plan`` runs once per step (before the layers; it may
    read the pool, which holds every position before the step's tokens); ``attend`` once per layer:
    write the new K/V into the pool, then attend."""

    name: str
    # Masked pool slots enter the arithmetic (a tile read in place: 0 x NaN is NaN), so the pool must
    # hold only finite values, KV that peers land in place included (kv_transfer/inbox.py).
    reads_masked_slots: bool

    def plan(self, sequences: StepSequences, cache: PagedKVCache) -> object: ...

    def attend(self, q, k, v, cache: PagedKVCache, layer: int, batch: AttentionBatch, scale: float) -> torch.Tensor: ...


class TorchPagedAttention:
    """The reference path: SDPA for prefill chunks, and for decodes over their KV.

    On CPU the decodes read the decode scratch (engine/decode_scratch.py): their KV kept batch-major
    between steps, one position appended per step; a step the scratch cannot hold (``scratch_max_bytes``)
    gathers every decode's blocks into one buffer reused by every layer and step (a fresh multi-megabyte
    allocation per layer costs as much as the copy itself: page faults). Not on CUDA: a captured graph
    must keep the addresses it read, and the caching allocator is cheap."""

    name = "torch"
    reads_masked_slots = False  # it attends over what it gathered, masked

    def __init__(self, scratch_max_bytes: int = DECODE_SCRATCH_MAX_BYTES, native: bool = True) -> None:
        self._gather_buffer = GatherBuffer()
        self.scratch = DecodeScratch(scratch_max_bytes)
        self.native = native_kernels() if native else None  # CPU K/V stores and decode attention; None: torch's

    def plan(self, sequences: StepSequences, cache: PagedKVCache) -> ScratchStep | None:
        decodes = sequences.num_decodes
        if cache.data.device.type != "cpu" or not decodes:
            return None
        first = len(sequences.block_tables) - decodes
        return self.scratch.plan(
            cache,
            list(sequences.serials[first:]),
            sequences.positions[-decodes:].tolist(),
            list(sequences.block_tables[first:]),
        )

    def attend(self, q, k, v, cache: PagedKVCache, layer: int, batch: AttentionBatch, scale: float) -> torch.Tensor:
        buffer = self._gather_buffer if q.device.type == "cpu" else None
        return torch_paged_attention(q, k, v, cache, layer, batch, scale, buffer, self.native)


class GatherBuffer:
    """Flat storage that grows to the largest gather seen and is handed out as views of it.
    One user at a time: the views of one call are dead before the next call."""

    def __init__(self) -> None:
        self._storage: torch.Tensor | None = None

    def view(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        size = math.prod(shape)
        storage = self._storage
        if storage is None or storage.numel() < size or storage.dtype != like.dtype or storage.device != like.device:
            storage = self._storage = torch.empty(size, dtype=like.dtype, device=like.device)
        return storage[:size].view(shape)


_chosen: set[tuple[str, str]] = set()


def select_attention_backend(device: torch.device | str) -> AttentionBackend:
    """FlexAttention over the pool in place on CUDA (when this torch has it), else the torch path.
    The choice is logged once per (device type, backend)."""
    device = torch.device(device)
    backend: AttentionBackend = TorchPagedAttention()
    if device.type == "cuda":
        from engine.attention_flex import FlexPagedAttention, flex_available

        if flex_available():
            backend = FlexPagedAttention(compiled=True)
    if (device.type, backend.name) not in _chosen:
        _chosen.add((device.type, backend.name))
        log.info("attention backend on %s: %s", device.type, backend.name)
    return backend


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """q ``[tokens, heads, head_dim]``, k/v ``[tokens, kv_heads, head_dim]`` of this step's new tokens.

    Writes k/v into the pool, then returns the attention output ``[tokens, heads, head_dim]``,
    through the batch's backend (the torch path when it names none)."""
    if batch.backend is not None:
        return batch.backend.attend(q, k, v, cache, layer, batch, scale)
    return torch_paged_attention(q, k, v, cache, layer, batch, scale)


def torch_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: PagedKVCache,
    layer: int,
    batch: AttentionBatch,
    scale: float,
    gather_buffer: GatherBuffer | None = None,
    native: NativeKernels | None = None,
) -> torch.Tensor:
    """q ``[tokens, heads, head_dim]``, k/v ``[tokens, kv_heads, head_dim]`` of this step's new tokens.

    Writes k/v into the pool, then returns the attention output ``[tokens, heads, head_dim]``.
    ``gather_buffer``: where the decodes' KV gather goes (default: a fresh tensor); ``native``: the
    decode scratch's kernel (default: SDPA)."""
    begin = batch.decode_begin
    scratch = batch.plan if isinstance(batch.plan, ScratchStep) else None
    # One pass into the pool and the decode scratch where the native kernel takes this layout.
    stored = native is not None and native.store_kv(
        cache, layer, k, v, batch.slot_block, batch.slot_offset, scratch, begin
    )
    if not stored:
        finite = cache.write(layer, k, v, batch.slot_block, batch.slot_offset)
    decodes = None
    if scratch is not None:
        if not stored:
            scratch.append(layer, finite[begin:, 0], finite[begin:, 1])  # the scratch holds what the pool holds
        decodes = _scratch_decode_attention(q[begin:], scratch, layer, scale, native)
    elif batch.decode_block_table is not None:
        decodes = gathered_decode_attention(q[begin:], cache, layer, batch, scale, gather_buffer)
    if not batch.prefills and decodes is not None:
        return decodes  # a decode-only step: nothing to assemble
    out = torch.empty_like(q)
    for seg in batch.prefills:
        out[seg.begin : seg.end] = _prefill_attention(q, k, v, cache, layer, seg, scale)
    if decodes is not None:
        out[begin:] = decodes
    return out


def _prefill_attention(q, k, v, cache, layer, seg: PrefillSegment, scale) -> torch.Tensor:
    rows = seg.end - seg.begin
    query = q[seg.begin : seg.end].transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
    if seg.start == 0:
        # Nothing cached before the chunk: attend over the chunk's own K/V, plain causal.
        key = k[seg.begin : seg.end].transpose(0, 1).unsqueeze(0)
        value = v[seg.begin : seg.end].transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)
    context = seg.start + rows
    key, value = cache.gather(layer, seg.block_table.unsqueeze(0))  # [kvh, 1, S, D]
    key, value = key.transpose(0, 1)[:, :, :context], value.transpose(0, 1)[:, :, :context]
    positions = torch.arange(seg.start, context, device=q.device)
    mask = torch.arange(context, device=q.device)[None, :] <= positions[:, None]  # lower-right causal
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def _scratch_decode_attention(q, step: ScratchStep, layer: int, scale, native=None) -> torch.Tensor:
    """The decodes over the scratch rows (this step's K/V appended): attend over each row's keys (the native
    kernel when given and it takes the shapes, else SDPA over ``step.width`` keys, masked).
    Queries go to their rows' order and come back (a few KB) when rows are not in decode order."""
    key, value = step.key_value(layer)
    decodes, kv_heads, _, head_dim = key.shape
    if step.order is not None:
        q = q.index_select(0, step.order)
    if native is not None and native.accepts(q, key, value):
        out = native.decode_attention(q, key, value, step.lengths, scale)
    else:
        query = q.view(decodes, kv_heads, -1, head_dim)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=step.mask, scale=scale)
        out = out.reshape(decodes, -1, head_dim)  # CUDA's SDPA kernels may return it non-contiguous
    return out if step.order is None else out.index_select(0, step.rows)


def gathered_decode_attention(q, cache, layer, batch: AttentionBatch, scale, gather_buffer=None) -> torch.Tensor:
    """One query per sequence. The query heads sharing a KV head become that head's query rows
    (``[B, kv_heads, groups, D]``), so SDPA reads each sequence's KV once, without repeating it.

    The padded gather holds stale slots (the tail of a sequence's last block, the blocks padding the
    table): they are zeroed, since a masked NaN or inf key or value still poisons the output."""
    key, value = _gather_decode_kv(cache, layer, batch.decode_block_table, gather_buffer)  # [B, kvh, S, D] views
    decodes, kv_heads, _, head_dim = key.shape
    hidden = ~batch.decode_mask[:, :, 0, :, None]  # [B, 1, S, 1]
    key.masked_fill_(hidden, 0)
    value.masked_fill_(hidden, 0)
    query = q.view(decodes, kv_heads, -1, head_dim)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=batch.decode_mask, scale=scale)
    return out.reshape(decodes, -1, head_dim)  # CUDA's SDPA kernels may return it non-contiguous


def _gather_decode_kv(cache: PagedKVCache, layer: int, table: torch.Tensor, buffer: GatherBuffer | None):
    """K and V of the decodes' blocks, each a ``[B, kv_heads, blocks*block_size, head_dim]`` view of one
    kv-heads-first copy (written in its final order by one index_select, into ``buffer`` when given)."""
    if buffer is None:
        key, value = cache.gather(layer, table)
        return key.transpose(0, 1), value.transpose(0, 1)
    layout = cache.layout
    decodes, blocks = table.shape
    heads_first = cache.data[layer].permute(1, 3, 0, 2, 4)  # [2, kvh, num_blocks, bs, hd], a view
    shape = (2, layout.num_kv_heads, decodes * blocks, layout.block_size, layout.head_dim)
    gathered = torch.index_select(heads_first, 2, table.reshape(-1), out=buffer.view(shape, cache.data))
    key, value = gathered.view(2, layout.num_kv_heads, decodes, blocks * layout.block_size, -1).unbind(0)
    return key.transpose(0, 1), value.transpose(0, 1)
