"""Small random checkpoints written by `transformers` itself, for correctness tests (the plain ones:
bench/tiny_model.py, which the GPU check shares), and transformers' own greedy output of them."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.tiny_model import write_checkpoint


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
