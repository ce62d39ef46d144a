"""Hardware the simulator knows, and the model shapes it can place on it.

GPU numbers are NVIDIA's published datasheet values (SXM form factor, dense BF16 — the sparse
figures are twice these and do not apply to LLM inference):

- H100 SXM5 80 GB: 989 TFLOP/s BF16 dense, 3.35 TB/s HBM3, NVLink 900 GB/s.
  (NVIDIA H100 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h100/)
- H200 SXM 141 GB: 989 TFLOP/s BF16 dense, 4.8 TB/s HBM3e, NVLink 900 GB/s.
  (NVIDIA H200 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h200/)
- Prefill -> decode link: one 400 Gb/s NDR InfiniBand / ConnectX-7 NIC per GPU, as in DGX H100
  and DGX H200 systems. Override with ``--link-gbps``.

Assumed, not published (flags override): 60% of peak FLOP/s on GEMMs, 80% of peak HBM bandwidth,
2 ms fixed cost per engine step, 90% of HBM usable for weights + KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.sim.latency import GPU
from engine.config import ModelConfig
from engine.presets import PRESETS

H100 = GPU("H100-SXM5-80GB", bf16_tflops=989.0, hbm_tb_s=3.35, memory_gb=80.0, nvlink_gb_s=900.0, nic_gbps=400.0)
H200 = GPU("H200-SXM-141GB", bf16_tflops=989.0, hbm_tb_s=4.8, memory_gb=141.0, nvlink_gb_s=900.0, nic_gbps=400.0)
GPUS = {"h100": H100, "h200": H200}

# Public config.json values of common shapes, so GPU plans need no download.
_PUBLIC_SHAPES = {
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "llama-3-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
    ),
    "llama-3.1-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
    ),
    "qwen2.5-7b": dict(
        architectures=["Qwen2ForCausalLM"],
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
    ),
}
MODEL_CHOICES = (*PRESETS, *_PUBLIC_SHAPES)


def resolve_model(name: str) -> ModelConfig:
    """A preset, a public shape above, a Hugging Face model directory, or a ``config.json`` path."""
    if name in PRESETS:
        return PRESETS[name]
    if name in _PUBLIC_SHAPES:
        return ModelConfig.from_hf_dict(
            {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16", **_PUBLIC_SHAPES[name]}
        )
    path = Path(name)
    if path.is_dir():
        return ModelConfig.from_dir(path)
    if path.is_file():
        return ModelConfig.from_hf_dict(json.loads(path.read_text()))
    raise ValueError(
        f"unknown model {name!r}: use one of {', '.join(MODEL_CHOICES)}, a model directory or a config.json"
    )
