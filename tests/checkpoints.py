"""Small random checkpoints written by `transformers` itself, for correctness tests."""

from __future__ import annotations

from pathlib import Path

import torch

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
    raise ValueError(architecture)


def write_checkpoint(directory: Path, architecture: str, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Builds a random model with transformers, saves it (safetensors) and returns it in fp32 eval mode.

    Weights are drawn wider than transformers' init so that logits are peaked: greedy decoding then
    has clear winners and token-for-token comparisons test the math, not float noise."""
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


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generation, one prompt at a time (no padding involved)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=model.config.eos_token_id,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


def write_thinking_model(directory: Path, chat_template: str, seed: int = 11):
    """A random Qwen2 whose BPE tokenizer (tests/engine/test_tokenizer.py's) has ``<think>`` and ``</think>`` tokens,
    with ``chat_template``; returns the transformers model (fp32, eval)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as BackendTokenizer

    from engine.thinking import CLOSE, OPEN
    from tests.engine.test_tokenizer import write_model_dir

    write_model_dir(directory, chat_template=chat_template)
    backend = BackendTokenizer.from_file(str(directory / "tokenizer.json"))
    backend.add_tokens([AddedToken(OPEN, special=False), AddedToken(CLOSE, special=False)])
    backend.save(str(directory / "tokenizer.json"))
    vocab = backend.get_vocab_size(with_added_tokens=True)
    return write_checkpoint(directory, "Qwen2ForCausalLM", seed=seed, vocab_size=vocab, max_position_embeddings=2048)


def close_thinking_at(model, directory: Path, prompt_ids: list[int], position: int, close_id: int) -> None:
    """Makes the model close its thinking partway, and saves it: ``close_id``'s output row becomes a little more than
    the row of the token its greedy output after ``prompt_ids`` gives at ``position``, which it then gives there
    instead (and wherever that token would win)."""
    there = hf_greedy(model, prompt_ids, position + 1)[position]
    with torch.no_grad():
        rows = model.get_output_embeddings().weight
        rows[close_id] = 1.1 * rows[there]
    model.save_pretrained(directory)
