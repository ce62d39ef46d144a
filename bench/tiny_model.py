"""Small random checkpoints written by ``transformers`` itself: the models the correctness tests and the
GPU check (bench/gpu_check.py) set the engine's tokens against transformers' with.

Weights are drawn wider than transformers' init so that logits are peaked: greedy decoding then has
clear winners, and a token-for-token comparison tests the math, not float noise."""

from __future__ import annotations

from pathlib import Path

TINY_SHAPE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def hf_config(architecture: str, **overrides):
    """transformers' config of ``architecture`` in the tiny shape, with ``overrides``."""
    import transformers

    shape = dict(TINY_SHAPE, **overrides)
    if architecture == "LlamaForCausalLM":
        return transformers.LlamaConfig(**shape)
    if architecture == "MistralForCausalLM":
        return transformers.MistralConfig(sliding_window=None, **shape)
    if architecture == "Qwen2ForCausalLM":
        return transformers.Qwen2Config(use_sliding_window=False, **shape)
    if architecture == "Qwen3ForCausalLM":
        return transformers.Qwen3Config(head_dim=16, use_sliding_window=False, **shape)
    raise ValueError(f"no tiny shape for {architecture!r}")


def write_checkpoint(
    directory: str | Path,
    architecture: str = "LlamaForCausalLM",
    seed: int = 0,
    max_shard_size: str | None = None,
    **overrides,
):
    """Builds a random model with transformers, saves it (safetensors) to ``directory`` and returns it in
    fp32 eval mode."""
    import torch
    import transformers

    config = hf_config(architecture, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.15 * torch.randn(param.shape, generator=generator))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model
