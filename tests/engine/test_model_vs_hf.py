"""The engine against transformers on the same weights: logits and greedy tokens, per architecture."""

from __future__ import annotations

import random

import pytest
import torch

from contract.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from tests.checkpoints import hf_greedy, write_checkpoint

ARCHITECTURES = {
    "LlamaForCausalLM": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=True,
    ),
    "MistralForCausalLM": dict(rope_theta=1e6),
    "Qwen2ForCausalLM": dict(),
    "Qwen3ForCausalLM": dict(),
}


def _prompts(count: int, seed: int, vocab: int = 320) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 70))] for _ in range(count)]


def _full_logits(engine: Engine, prompt: list[int]) -> torch.Tensor:
    """Logits at every prompt position, computed by one engine prefill step."""
    engine.add_request("probe", prompt, SamplingParams(max_tokens=1))
    plan = engine.scheduler.schedule()
    inputs = engine.runner.prepare(plan.chunks)
    rows = torch.arange(len(prompt))
    logits = engine.runner.model(inputs.input_ids, inputs.positions, engine.kv_cache, inputs.batch, rows)
    engine.abort("probe")
    return logits


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def checkpoint(request, tmp_path_factory):
    architecture = request.param
    directory = tmp_path_factory.mktemp(architecture)
    # Sharded, so model.safetensors.index.json is exercised.
    model = write_checkpoint(directory, architecture, seed=7, max_shard_size="100KB", **ARCHITECTURES[architecture])
    assert (directory / "model.safetensors.index.json").is_file()
    return directory, model


def test_fp32_logits_match_transformers(checkpoint):
    directory, hf_model = checkpoint
    engine = Engine(EngineConfig(model=str(directory), dtype="float32", num_kv_blocks=64))
    for prompt in _prompts(3, seed=1):
        ours = _full_logits(engine, prompt)
        with torch.no_grad():
            theirs = hf_model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_greedy_batch_is_token_identical_to_transformers(checkpoint):
    directory, hf_model = checkpoint
    engine = Engine(EngineConfig(model=str(directory), dtype="float32", num_kv_blocks=128))
    prompts = _prompts(6, seed=2)
    results = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, result in zip(prompts, results):
        expected = hf_greedy(hf_model, prompt, 24)
        assert list(result.token_ids) == expected
        assert result.finish_reason == ("stop" if expected[-1] == 2 else "length")
