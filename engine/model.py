"""Llama-family decoder in plain torch: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm).

Parameters are named as in Hugging Face checkpoints except two fused projections
(``qkv_proj`` = q|k|v, ``gate_up_proj`` = gate|up); the loader concatenates them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionBatch, paged_attention
from engine.config import ModelConfig
from engine.kv_cache import PagedKVCache
from engine.layer_ready import LayerReady, record_layer_ready
from engine.native_kernels import elementwise_for

LayerCallback = Callable[[int, LayerReady], None]  # (layer index, recorded after its K/V writes)


def _onednn_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def _cpu_multiplies_bf16_row_by_row() -> bool:
    """A CPU without bf16 arithmetic (no AVX512_BF16 nor AMX: every AVX2-only x86) gets no oneDNN bf16
    GEMM: torch multiplies a bf16 ``F.linear`` one row at a time, ~10 GFLOP/s on a Zen 1 core where float32
    runs ~57 at 512 rows (`bench engine` on such a CPU: bf16 prefill 5x slower than float32)."""
    return not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# From this many rows a bf16 product on such a CPU is taken in float32, the weight widened on each call: 1.4x
# faster at 32 rows for the widest weight (SmolLM2's lm_head), 2.5-5.5x from 64 to 512 rows for every
# projection; below ~16 rows widening the weight costs more than the row-by-row product it replaces.
WIDEN_BF16_FROM_ROWS = 32


class Linear(nn.Linear):
    """nn.Linear that, once ``pack``ed, multiplies by a copy of its weight in oneDNN's blocked layout.

    Why: on CPU a bf16 ``F.linear`` re-lays the weight out on every call, reading it twice; decode
    is bound by reading the weights. The copy follows the weight: a weight changed in place (its
    version moved, as ``load_state_dict`` does) is repacked on the next call."""

    _packed: torch.Tensor | None = None
    _packed_version = -1

    def pack(self, batch_hint: int) -> None:
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch_hint)
        self._packed_version = self.weight._version
        self._batch_hint = batch_hint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            if (
                x.dtype == torch.bfloat16
                and x.device.type == "cpu"
                and x.numel() >= WIDEN_BF16_FROM_ROWS * x.shape[-1]
                and _cpu_multiplies_bf16_row_by_row()
            ):
                bias = None if self.bias is None else self.bias.float()
                return F.linear(x.float(), self.weight.float(), bias).to(torch.bfloat16)
            return F.linear(x, self.weight, self.bias)
        if self._packed_version != self.weight._version:
            self.pack(self._batch_hint)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_forward(x, None)[0]

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(r), r)`` with ``r = x + residual``, the residual stream after a sublayer (the native kernel
        updates ``residual`` in place), or ``r = x`` when there is none yet. One pass on CPU in bf16."""
        kernels = elementwise_for(x, self.weight) if residual is None else elementwise_for(x, residual, self.weight)
        if kernels is not None and (residual is None or residual.is_contiguous()):
            return kernels.add_rms_norm(x, residual, self.weight, self.eps)
        stream = x if residual is None else x + residual
        # Normalised in fp32, scaled in the model dtype: the Hugging Face order.
        return self.weight * F.rms_norm(stream.float(), (x.shape[-1],), eps=self.eps).to(x.dtype), stream


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables, indexed by absolute position (rotate-half convention)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inv_freq = rope_inverse_frequencies(config)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[T, 1, D]`` of a step's positions: looked up once per step, used by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x ``[T, heads, D]``; q and k heads may share one call (same positions, same tables)."""
    cos, sin = tables
    kernels = elementwise_for(x, cos, sin)
    layout_fits = x.shape[2] % 32 == 0 and x.stride(1) == x.shape[2] and cos.stride() == sin.stride()  # halves of 16
    if kernels is not None and layout_fits:
        return kernels.rotary(x, cos, sin)
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.config = config
        self.layer = layer
        self.qkv_proj = Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.qkv_bias)
        self.o_proj = Linear(config.q_size, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.scale = config.head_dim**-0.5

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], cache: PagedKVCache, batch: AttentionBatch):
        cfg = self.config
        tokens = x.shape[0]
        qk, v = self.qkv_proj(x).split([cfg.q_size + cfg.kv_size, cfg.kv_size], dim=-1)
        qk = qk.view(tokens, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
        v = v.view(tokens, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        q, k = apply_rotary(qk, rope).split([cfg.num_heads, cfg.num_kv_heads], dim=1)  # one rotation for both
        out = paged_attention(q, k, v, cache, self.layer, batch, self.scale)
        return self.o_proj(out.reshape(tokens, cfg.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        kernels = elementwise_for(gate_up)
        native = kernels is not None and kernels.fast_silu_mul
        if native and gate_up.is_contiguous() and gate_up.shape[-1] % 32 == 0:  # halves of 16
            return self.down_proj(kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, rope, cache, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: the previous layer's MLP output, not yet added to the residual stream ``residual`` (None
        before the first layer: ``x`` is the embedding). Returns this layer's pair. Each norm adds its
        input into the stream first, so add and norm are one pass."""
        h, residual = self.input_layernorm.add_forward(x, residual)
        h, residual = self.post_attention_layernorm.add_forward(self.self_attn(h, rope, cache, batch), residual)
        return self.mlp(h), residual


class LlamaBackbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """The whole model. ``forward`` runs one engine step over a flat token batch and returns the
    final hidden states of the rows in ``logits_rows`` projected to vocabulary logits (model dtype)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaBackbone(config)
        self.rotary = RotaryEmbedding(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def pack_linear_weights(self, batch_hint: int) -> bool:
        """CPU, bf16, oneDNN: every projection multiplies by a blocked-layout copy of its weight
        (``Linear``), tuned for ``batch_hint`` rows. Costs one more copy of the projection weights.
        Returns whether it packed (elsewhere the plain path is as fast)."""
        weight = self.lm_head.weight
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not _onednn_packing_available():
            return False
        if _cpu_multiplies_bf16_row_by_row():  # no oneDNN bf16 GEMM to pack for
            return False
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack(batch_hint)
        return True

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        batch: AttentionBatch,
        logits_rows: torch.Tensor,
        on_layer_done: LayerCallback | None = None,
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary.tables(positions, x.dtype)
        residual = None
        for index, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, rope, cache, batch)
            if on_layer_done is not None:
                on_layer_done(index, record_layer_ready(x.device))
        hidden, _ = self.model.norm.add_forward(x[logits_rows], residual[logits_rows])
        return self.lm_head(hidden)  # in the model dtype: the sampler widens what it needs to float32
