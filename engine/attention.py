"""Attention over the paged KV pool, behind one seam with two backends (engine/attention_flex.py
holds the FlexAttention one, for CUDA; the torch path here is the reference and the CPU backend).

A step's flat token batch is laid out prefill chunks first, then single-token decodes::

    tokens: [ chunk A (Ta) | chunk B (Tb) | d0 | d1 | ... ]      decodes share one padded gather

A chunk whose first position is ``start`` attends to every cached key before it and causally
within itself — the lower-right causal mask: query i sees keys j <= start + i.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from engine.kv_cache import PagedKVCache

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


class AttentionBackend(Protocol):
    """One implementation of paged attention. ``plan`` runs once per step (host side, before the
    layers); ``attend`` once per layer: write the new K/V into the pool, then attend."""

    name: str

    def plan(self, sequences: StepSequences, device: torch.device) -> object: ...

    def attend(self, q, k, v, cache: PagedKVCache, layer: int, batch: AttentionBatch, scale: float) -> torch.Tensor: ...


class TorchPagedAttention:
    """The reference path: SDPA for prefill chunks, a padded gather + two matmuls for decodes."""

    name = "torch"

    def plan(self, sequences: StepSequences, device: torch.device) -> object:
        return None

    def attend(self, q, k, v, cache: PagedKVCache, layer: int, batch: AttentionBatch, scale: float) -> torch.Tensor:
        return torch_paged_attention(q, k, v, cache, layer, batch, scale)


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
) -> torch.Tensor:
    """q ``[tokens, heads, head_dim]``, k/v ``[tokens, kv_heads, head_dim]`` of this step's new tokens.

    Writes k/v into the pool, then returns the attention output ``[tokens, heads, head_dim]``."""
    cache.write(layer, k, v, batch.slot_block, batch.slot_offset)
    out = torch.empty_like(q)
    for seg in batch.prefills:
        out[seg.begin : seg.end] = _prefill_attention(q, k, v, cache, layer, seg, scale)
    if batch.decode_block_table is not None:
        out[batch.decode_begin :] = _decode_attention(q[batch.decode_begin :], cache, layer, batch, scale)
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


def _decode_attention(q, cache, layer, batch: AttentionBatch, scale) -> torch.Tensor:
    """One query per sequence: two small batched matmuls beat SDPA's masked flash kernel here
    (which costs milliseconds per layer on CPU for a single query row)."""
    key, value = cache.gather(layer, batch.decode_block_table)  # [kvh, B, S, D]
    kv_heads, decodes, _, head_dim = key.shape
    groups = q.shape[1] // kv_heads  # query head h reads KV head h // groups
    query = q.view(decodes, kv_heads, groups, head_dim).transpose(0, 1)  # [kvh, B, groups, D]
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale  # [kvh, B, groups, S]
    scores.masked_fill_(~batch.decode_mask.view(1, decodes, 1, -1), float("-inf"))
    probs = scores.softmax(dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [kvh, B, groups, D]
    return out.transpose(0, 1).reshape(decodes, kv_heads * groups, head_dim)
