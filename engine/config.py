"""Model and engine configuration: frozen dataclasses built once at start-up."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from contract.model_card import check_served_model_name
from engine.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (``rope_scaling.rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family model, read from a Hugging Face ``config.json`` or a preset."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )
        if self.dtype not in DTYPES:
            raise ModelLoadError(f"unsupported torch_dtype {self.dtype!r}; supported: {', '.join(DTYPES)}")

    @property
    def qkv_bias(self) -> bool:
        return self.architecture == "Qwen2ForCausalLM"

    @property
    def qk_norm(self) -> bool:
        return self.architecture == "Qwen3ForCausalLM"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_context(self) -> int:
        """Longest context the model attends over exactly (a sliding window caps it)."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def num_parameters(self) -> int:
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * self.hidden_size) + embed + self.hidden_size

    def fingerprint_fields(self) -> dict:
        """What two workers must agree on to exchange KV (weights identity is added by the loader)."""
        return {
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_hf_dict(cls, hf: dict) -> ModelConfig:
        architectures = hf.get("architectures") or [hf.get("model_type", "?")]
        num_heads = _required(hf, "num_attention_heads")
        hidden = _required(hf, "hidden_size")
        # transformers >= 5 writes "rope_parameters" (theta included); older configs "rope_scaling".
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        return cls(
            architecture=architectures[0],
            vocab_size=_required(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_required(hf, "intermediate_size"),
            num_layers=_required(hf, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rope_scaling=_rope_scaling(rope),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            eos_token_ids=_int_tuple(hf.get("eos_token_id")),
            bos_token_id=hf.get("bos_token_id"),
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"model directory {str(model_dir)!r} has no config.json")
        try:
            hf = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}") from exc
        generation = Path(model_dir) / "generation_config.json"
        if generation.is_file() and hf.get("eos_token_id") is None:
            hf["eos_token_id"] = json.loads(generation.read_text()).get("eos_token_id")
        try:
            return cls.from_hf_dict(hf)
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"malformed {path}: {exc}") from exc


def _required(hf: dict, key: str):
    if key not in hf:
        raise ModelLoadError(f"config.json lacks required field {key!r}")
    return hf[key]


def _int_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_scaling(raw: dict | None) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type") or raw.get("type")
    if kind == "default":
        return None
    if kind != "llama3":
        raise ModelLoadError(f"unsupported rope_scaling type {kind!r}; supported: llama3")
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw["low_freq_factor"]),
        high_freq_factor=float(raw["high_freq_factor"]),
        original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
    )


# The limits of one engine step (EngineConfig fields, also settable per pool and in the simulator); None where
# allowed means the engine's default.
STEP_LIMITS = ("max_num_seqs", "max_num_batched_tokens", "prefill_chunk_beside_decodes")


def check_step_limits(owner) -> None:
    """ValueError naming the first of ``owner``'s STEP_LIMITS that is set and below 1."""
    for name in STEP_LIMITS:
        value = getattr(owner, name, None)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def add_prefill_chunk_argument(parser, whose: str = "") -> None:
    """``--prefill-chunk-beside-decodes``, as each CLI that sets it declares it (``whose``: e.g. "every worker's: ")."""
    parser.add_argument(
        "--prefill-chunk-beside-decodes",
        type=int,
        default=None,
        metavar="TOKENS",
        help=f"{whose}a step that also decodes holds at most this many prompt tokens (default: the whole step "
        "budget): bounds how long a prompt stalls the decodes beside it",
    )


def step_prompt_budget(max_num_batched_tokens: int, prefill_chunk_beside_decodes: int | None, decodes: bool) -> int:
    """Prompt tokens one step may hold: the cap beside decodes if the step decodes, else the whole budget
    (the engine's scheduler and the simulator's both ask this)."""
    if prefill_chunk_beside_decodes is not None and decodes:
        return min(prefill_chunk_beside_decodes, max_num_batched_tokens)
    return max_num_batched_tokens


@dataclass(frozen=True)
class EngineConfig:
    """How one engine runs a model.

    ``model`` is a preset name (``demo``, ``bench-125m``) or a local Hugging Face directory.
    The KV pool holds ``num_kv_blocks`` blocks if given, else as many as ``kv_cache_memory_bytes`` allows.
    """

    model: str = "demo"
    served_model_name: str | None = None  # the name the worker's model card gives; default: preset or dir name
    dtype: str | None = None  # None: the model's own torch_dtype
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int = 512 * 1024 * 1024
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # A step that also decodes holds at most this many prompt tokens (None: the whole budget): a small value
    # bounds how long a prompt stalls the decodes beside it, at some prefill speed (engine/scheduler.py).
    prefill_chunk_beside_decodes: int | None = None
    max_model_len: int | None = None
    enable_prefix_cache: bool = True
    seed: int = 0
    num_threads: int | None = None
    cuda_graph_max_batch: int = 64  # CUDA: decode steps up to this batch replay captured graphs; 0: never

    def __post_init__(self) -> None:
        check_served_model_name(self.served_model_name)
        if self.cuda_graph_max_batch < 0:
            raise ValueError(f"cuda_graph_max_batch must be >= 0, got {self.cuda_graph_max_batch}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_step_limits(self)


def kv_block_bytes(model: ModelConfig, block_size: int, dtype_bytes: int) -> int:
    """Bytes one block occupies across all layers (K and V)."""
    return model.num_layers * 2 * block_size * model.kv_size * dtype_bytes


def blocks_for_budget(model: ModelConfig, block_size: int, dtype_bytes: int, budget_bytes: int) -> int:
    return max(1, math.floor(budget_bytes / kv_block_bytes(model, block_size, dtype_bytes)))


DEVICES = ("cpu", "cuda")  # the kinds of torch device the engine runs on (a GPU worker: the first Ray gives it)


def check_device(device: str) -> None:
    """--device: a device of a kind the engine runs on (DEVICES), present in this torch; ValueError naming it."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in DEVICES:
        raise ValueError(f"--device {device!r}: not a device the engine runs on; use cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: this machine's torch sees no CUDA device; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"--device {device}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
