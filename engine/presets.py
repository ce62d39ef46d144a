"""Built-in model presets (seeded dummy weights, byte-level tokenizer) and model-config lookup.

Torch-free, so the router can read a model's shape without loading it."""

from __future__ import annotations

from pathlib import Path

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

_BYTE_VOCAB_EOS = 2
_BYTE_VOCAB_BOS = 1

PRESETS: dict[str, ModelConfig] = {
    "demo": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        dtype="float32",
        eos_token_ids=(_BYTE_VOCAB_EOS,),
        bos_token_id=_BYTE_VOCAB_BOS,
    ),
    "bench-125m": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        head_dim=64,
        max_position_embeddings=16384,
        rope_theta=500000.0,
        dtype="bfloat16",
        eos_token_ids=(_BYTE_VOCAB_EOS,),
        bos_token_id=_BYTE_VOCAB_BOS,
    ),
}

DUMMY_WEIGHT_SEED = 1234


def resolve_model_config(model: str) -> ModelConfig:
    """The ModelConfig of a preset name or a local model directory (no weights loaded)."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if not path.is_dir():
        raise ModelLoadError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")
    return ModelConfig.from_dir(path)


def load_model_tokenizer(model: str, config: ModelConfig) -> Tokenizer:
    """The tokenizer that goes with a preset (byte-level) or a model directory."""
    if model in PRESETS:
        return ByteTokenizer(config.vocab_size)
    return load_tokenizer(model, config.vocab_size)
