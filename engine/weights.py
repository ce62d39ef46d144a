"""Building a model: built-in presets with seeded dummy weights, or a local Hugging Face directory
(single or sharded safetensors), a GGUF preset's built directory included."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.model import CausalLM
from engine.presets import (
    DUMMY_WEIGHT_SEED,
    PRESETS,
    load_model_tokenizer,
    model_directory,
    model_weights_fingerprint,
    prepare_model,
    resolve_model_config,
    shard_files,
)
from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    model: CausalLM
    tokenizer: Tokenizer
    fingerprint: str  # identifies config + weights; KV is only exchanged between equal fingerprints


def load_model(model: str, dtype: str | None = None, device: str = "cpu") -> LoadedModel:
    prepare_model(model)  # a GGUF preset is built on first use
    config = resolve_model_config(model)
    torch_dtype = getattr(torch, dtype or config.dtype)
    net = CausalLM(config)
    fingerprint = model_weights_fingerprint(model, config)  # the model card's code: one owner
    if model in PRESETS:
        _fill_dummy_weights(net, DUMMY_WEIGHT_SEED)
    else:
        _load_safetensors(net, model_directory(model))
    tokenizer: Tokenizer = load_model_tokenizer(model, config)
    net = net.to(device=device, dtype=torch_dtype).eval()
    net.rotary.to(torch.float32)  # cos/sin tables stay fp32 and are cast per use, as in transformers
    return LoadedModel(config, net, tokenizer, fingerprint)


@torch.no_grad()
def _fill_dummy_weights(net: CausalLM, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in net.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=generator)


# -- Hugging Face checkpoints --------------------------------------------------------------------

_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def _load_safetensors(net: CausalLM, model_dir: Path) -> None:
    """Copies checkpoint tensors into ``net``."""
    params = dict(net.named_parameters())
    loaded: set[str] = set()
    for shard in shard_files(model_dir):
        try:
            with safe_open(str(shard), framework="pt") as handle:
                for name in handle.keys():
                    loaded.add(_copy_tensor(params, name, handle.get_tensor(name), net.config))
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {shard}: {exc}") from exc
    missing = set(params) - loaded - ({"lm_head.weight"} if net.config.tie_word_embeddings else set())
    if missing:
        raise ModelLoadError(f"checkpoint in {str(model_dir)!r} lacks weights: {', '.join(sorted(missing)[:5])}")


@torch.no_grad()
def _copy_tensor(params: dict[str, torch.nn.Parameter], name: str, tensor: torch.Tensor, config: ModelConfig) -> str:
    target, part = _target_of(name)
    if target not in params:
        if "rotary_emb" in name:
            return target
        raise ModelLoadError(f"unexpected weight {name!r} in checkpoint")
    param = params[target]
    rows = _fused_rows(target, part, config)
    destination = param if rows is None else param[rows[0] : rows[1]]
    if destination.shape != tensor.shape:
        raise ModelLoadError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(destination.shape)}")
    destination.copy_(tensor.to(param.dtype))
    return target


def _target_of(name: str) -> tuple[str, int | None]:
    for suffix, (fused, part) in _FUSED.items():
        marker = f".{suffix}."
        if marker in name:
            prefix, rest = name.split(marker)
            return f"{prefix}.{fused}.{rest}", part
    return name, None


def _fused_rows(target: str, part: int | None, config: ModelConfig) -> tuple[int, int] | None:
    if part is None:
        return None
    if "qkv_proj" in target:
        sizes = [config.q_size, config.kv_size, config.kv_size]
    else:
        sizes = [config.intermediate_size, config.intermediate_size]
    begin = sum(sizes[:part])
    return begin, begin + sizes[part]
