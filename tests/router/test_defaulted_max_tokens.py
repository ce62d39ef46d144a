"""A limit the client did not set is the deployment's: with SmolLM2 (an 8,192-token context) on a decode worker whose
KV pool holds 352 tokens, a request without max_tokens runs to what that pool holds after its prompt and ends with
"length" — token for token transformers' greedy output — over HTTP chat and completions and over gRPC, aggregated and
disaggregated. A max_tokens the client set that does not fit stays a 400 naming max_tokens."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest
import torch
import transformers

from engine.presets import model_directory, prepare_model
from protos import common_pb2, generate_pb2, generate_pb2_grpc
from router.config import RouterConfig
from tests.router.conftest import RouterThread, greedy_ignoring_eos, token_ids
from tests.workers.harness import start_workers, stop_workers

PRESET = "smollm2-135m-instruct"
POOL_TOKENS = 22 * 16  # --kv-cache-mb 16 in float32: 22 blocks of 16 tokens
# Rendered by the chat template, a little under the pool: the room left is a few tokens, cheap to decode.
MESSAGES = [{"role": "user", "content": "Repeat after me: " + " ".join(f"word{i}" for i in range(103))}]  # 336 tokens
AS_IDS = {"ignore_eos": True, "return_tokens_as_token_ids": True}


@pytest.fixture(scope="module")
def hf():
    prepare_model(PRESET)  # built once per machine (a no-op after)
    directory = model_directory(PRESET)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def workers(hf) -> Iterator[tuple]:
    prefill, decode = start_workers(
        ("prefill", PRESET, "grpc", "--dtype", "float32"),
        ("decode", PRESET, "grpc", "--dtype", "float32", "--kv-cache-mb", "16"),
    )
    yield prefill, decode
    stop_workers([prefill, decode])


@pytest.fixture(scope="module", params=["aggregated", "disaggregated"])
def router(request, workers) -> Iterator[RouterThread]:
    prefill, decode = workers
    stats = decode.stats()
    assert stats.kv_blocks_total * stats.block_size == POOL_TOKENS
    disaggregated = request.param == "disaggregated"
    config = RouterConfig(
        model=PRESET,
        port=0,
        grpc_port=0,
        prefill_addresses=(prefill.address,) if disaggregated else (),
        decode_addresses=(decode.address,),
        health_interval_s=0.2,
        local_prefill_threshold=0,  # with a prefill worker, every prompt is prefilled there
        request_timeout_s=120,
    )
    router = RouterThread(config)
    yield router
    router.stop()


def _chat_prompt(hf_tokenizer) -> list[int]:
    ids = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_chat_without_max_tokens_runs_to_what_the_pool_holds(router, hf):
    model, tokenizer = hf
    prompt = _chat_prompt(tokenizer)
    room = POOL_TOKENS - len(prompt)
    assert 0 < room < 32, f"the prompt ({len(prompt)} tokens) should leave a little room"
    answer = router.openai(timeout=120).chat.completions.create(
        model=PRESET, messages=MESSAGES, temperature=0, logprobs=True, extra_body=AS_IDS
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), room)
    assert token_ids([t.token for t in choice.logprobs.content]) == greedy_ignoring_eos(model, prompt, room)


def test_completions_and_grpc_default_limits_are_lowered_too(router, hf):
    """Both default max_tokens to 16 when it is unset; a prompt that leaves less room in the pool gets what fits."""
    model, _ = hf
    prompt = [int(t) for t in torch.randint(100, 40000, (POOL_TOKENS - 9,), generator=torch.Generator().manual_seed(3))]
    expected = greedy_ignoring_eos(model, prompt, 9)
    completion = router.openai(timeout=120).completions.create(
        model=PRESET, prompt=[prompt], temperature=0, logprobs=0, extra_body=AS_IDS
    )
    assert completion.choices[0].finish_reason == "length"
    assert token_ids(completion.choices[0].logprobs.tokens) == expected

    unset = common_pb2.SamplingParams(temperature=0, ignore_eos=True)  # max_tokens 0: unset
    # A gRPC client may mark its own limit as one to lower to what fits.
    marked = common_pb2.SamplingParams(max_tokens=1000, max_tokens_defaulted=True, temperature=0, ignore_eos=True)
    for params in (unset, marked):
        ids = generate_pb2.TokenIds(ids=prompt)
        request = generate_pb2.CompletionRequest(model=PRESET, token_ids=ids, params=params)
        with grpc.insecure_channel(router.grpc) as channel:
            chunks = list(generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=120))
        assert [t for c in chunks for t in c.token_ids] == expected
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 9


def test_an_explicit_max_tokens_too_big_for_the_pool_is_refused(router, hf):
    prompt = _chat_prompt(hf[1])
    room = POOL_TOKENS - len(prompt)
    for limit in ("max_tokens", "max_completion_tokens"):
        body = {"model": PRESET, "messages": MESSAGES, limit: room + 1}
        response = httpx.post(f"{router.http}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        # Named as the request spelled it: the worker's refusal carries its field (it came with param null).
        assert error["param"] == limit and f"{limit} ({room + 1})" in error["message"], error
        assert "do not fit" in error["message"], error
    # A prompt that leaves the pool no room is the prompt's to shorten: messages, as chat calls it.
    long = [{"role": "user", "content": MESSAGES[0]["content"] + " and more" * 20}]
    response = httpx.post(f"{router.http}/v1/chat/completions", json={"model": PRESET, "messages": long}, timeout=120)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages", response.text
    ok = {"model": PRESET, "messages": MESSAGES, "max_tokens": room, "temperature": 0, "ignore_eos": True}
    assert httpx.post(f"{router.http}/v1/chat/completions", json=ok, timeout=120).status_code == 200
