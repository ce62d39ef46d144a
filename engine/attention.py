"""Attention over the paged KV pool (CPU reference path; torch SDPA underneath).

A step's flat token batch is laid out prefill chunks first, then single-token decodes::

    tokens: [ chunk A (Ta) | chunk B (Tb) | d0 | d1 | ... ]      decodes share one padded gather

A chunk whose first position is ``start`` attends to every cached key before it and causally
within itself — the lower-right causal mask: query i sees keys j <= start + i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kv_cache import PagedKVCache


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
    key, value = cache.gather(layer, seg.block_table.unsqueeze(0))  # [1, kvh, S, D]
    key, value = key[:, :, :context], value[:, :, :context]
    positions = torch.arange(seg.start, context, device=q.device)
    mask = torch.arange(context, device=q.device)[None, :] <= positions[:, None]  # lower-right causal
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def _decode_attention(q, cache, layer, batch: AttentionBatch, scale) -> torch.Tensor:
    """One query per sequence: two small batched matmuls beat SDPA's masked flash kernel here
    (which costs milliseconds per layer on CPU for a single query row)."""
    key, value = cache.gather(layer, batch.decode_block_table)  # [B, kvh, S, D]
    decodes, kv_heads, _, head_dim = key.shape
    groups = q.shape[1] // kv_heads  # query head h reads KV head h // groups
    query = q.view(decodes, kv_heads, groups, head_dim)
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale  # [B, kvh, groups, S]
    scores.masked_fill_(~batch.decode_mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, kvh, groups, D]
    return out.reshape(decodes, kv_heads * groups, head_dim)
