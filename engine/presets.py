"""Built-in model presets (seeded dummy weights, byte-level tokenizer) and model-config lookup.

Torch-free, so the router can read a model's shape, and build its model card, without loading it."""

from __future__ import annotations

from pathlib import Path

from contract.model_card import (
    ModelCard,
    ModelCardError,
    chat_template_fingerprint,
    checkpoint_identity,
    checkpoint_shards,
    default_served_model_name,
    preset_identity,
    tokenizer_fingerprint,
    weights_fingerprint,
)
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


# -- the model card: a worker builds its own from its loaded engine, a router told --model its
# reference from the files, with these same functions.


def model_source(model: str) -> str:
    """What a card names as the source: the preset's name, or the directory's absolute path."""
    return model if model in PRESETS else str(Path(model).resolve())


def shard_files(model_dir: Path) -> list[Path]:
    try:
        return checkpoint_shards(model_dir)
    except ModelCardError as exc:
        raise ModelLoadError(str(exc)) from exc


def model_weights_fingerprint(model: str, config: ModelConfig) -> str:
    """The weights fingerprint of a preset or checkpoint (reads every shard of a checkpoint)."""
    if model in PRESETS:
        identity = preset_identity(model, DUMMY_WEIGHT_SEED)
    else:
        identity = checkpoint_identity(shard_files(Path(model)))
    return weights_fingerprint(config.fingerprint_fields(), identity)


def build_model_card(
    model: str,
    config: ModelConfig,
    tokenizer: Tokenizer,
    *,
    weights: str | None,
    max_model_len: int,
    served_model_name: str | None = None,
    dtype: str | None = None,
    block_size: int | None = None,
) -> ModelCard:
    """The card of ``model`` (preset or directory) with ``weights`` its weights fingerprint."""
    try:
        tokenizer_files = tokenizer_fingerprint(None if model in PRESETS else Path(model), tokenizer.vocab_size)
    except ModelCardError as exc:
        raise ModelLoadError(str(exc)) from exc
    return ModelCard(
        served_model_name=served_model_name or default_served_model_name(model),
        source=model_source(model),
        weights_fingerprint=weights,
        tokenizer_fingerprint=tokenizer_files,
        chat_template_fingerprint=chat_template_fingerprint(tokenizer.chat_template_source),
        vocab_size=config.vocab_size,
        max_model_len=max_model_len,
        dtype=dtype,
        block_size=block_size,
    )
