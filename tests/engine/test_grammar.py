"""The grammar mask in the engine: compiled with a real BPE vocabulary, applied by the sampler, advanced by every
recorded token, and resumable after tokens generated elsewhere (a migration)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from contract import grammar as specs
from contract.sampling import SamplingParams
from engine.errors import InvalidRequestError
from engine.grammar import GrammarCompiler
from engine.sampler import Sampler, SamplingState
from engine.tokenizer import ByteTokenizer, HFTokenizer
from tests.engine.test_tokenizer import write_model_dir

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "tag": {"enum": ["a", "bb"]}},
    "required": ["id", "tag"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    return HFTokenizer.from_dir(write_model_dir(tmp_path_factory.mktemp("grammar") / "model"))


def _run(tokenizer, vocab: int, params: SamplingParams, seed: int, prefix: list[int] = ()) -> list[int]:
    """Samples random logits through the mask until the grammar ends; returns the tokens."""
    compiler = GrammarCompiler(tokenizer, vocab, tokenizer.eos_token_ids)
    state = SamplingState(params, [5, *prefix], grammar=compiler.matcher(params.grammar, [5, *prefix]))
    sampler, noise, tokens = Sampler(vocab), torch.Generator().manual_seed(seed), []
    while not state.grammar.terminated:
        assert len(tokens) < 100, tokenizer.decode(tokens)
        (token,) = sampler.sample(torch.randn(1, vocab, generator=noise) * 5, [state]).token_ids
        state.record(token)
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_masked_random_logits_follow_a_json_schema(bpe, kind):
    tokenizer, vocab = (bpe, 512) if kind == "bpe" else (ByteTokenizer(320), 320)
    for seed, temperature in [(0, 0.0), (1, 1.0), (2, 1.5)]:
        params = SamplingParams(max_tokens=100, temperature=temperature, grammar=specs.json_schema(SCHEMA, "g"))
        text = tokenizer.decode(_run(tokenizer, vocab, params, seed))
        jsonschema.validate(json.loads(text), SCHEMA)


def test_a_matcher_resumes_after_the_tokens_so_far(bpe):
    done = bpe.encode('{"id":', add_special_tokens=False)
    grammar = specs.Grammar("json_schema", json.dumps(SCHEMA, separators=(",", ":")), accepted_prompt_tokens=len(done))
    params = SamplingParams(max_tokens=100, temperature=1.0, grammar=grammar)
    rest = bpe.decode(_run(bpe, 512, params, 3, prefix=done))
    jsonschema.validate(json.loads('{"id":' + rest), SCHEMA)
    compiler = GrammarCompiler(bpe, 512, bpe.eos_token_ids)
    broken = bpe.encode("[1]", add_special_tokens=False)
    with pytest.raises(InvalidRequestError, match="do not follow the grammar"):
        compiler.matcher(specs.Grammar("json_schema", grammar.text, accepted_prompt_tokens=len(broken)), [5, *broken])
    with pytest.raises(InvalidRequestError, match="exceeds the prompt"):
        compiler.matcher(specs.Grammar("regex", "a+", accepted_prompt_tokens=3), [5])


def test_compiled_matchers_are_cached_by_spec_key(bpe):
    compiler = GrammarCompiler(bpe, 512, bpe.eos_token_ids)
    first = specs.Grammar("regex", "[0-9]+")
    compiler.matcher(first, [1])
    compiler.matcher(specs.Grammar("regex", "[0-9]+", accepted_prompt_tokens=0), [1])
    assert list(compiler._compiled) == [first.key]


def test_a_regexs_digit_and_word_classes_are_ascii_as_json_schema_and_vllm_read_them():
    """llguidance reads \\d as any Unicode digit: a regex for a phone number gave U+1FBF8s. On random byte logits, a
    sample of \\d and \\w runs holds only ASCII."""
    tokenizer = ByteTokenizer(320)
    for seed in range(6):
        params = SamplingParams(
            max_tokens=100, temperature=1.5, grammar=specs.text_grammar("regex", r"\d{4}-[\w]{4}", "r")
        )
        text = tokenizer.decode(_run(tokenizer, 320, params, seed))
        assert re.fullmatch(r"[0-9]{4}-[0-9A-Za-z_]{4}", text), repr(text)
