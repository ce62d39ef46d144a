"""The model card across processes: a router without --model adopts the workers' card and serves a BPE
checkpoint token-identical to transformers; a router told another model refuses (503, never a 200);
a mismatched decode worker gets no traffic; workers with 32-token blocks keep KV-aware routing.

Workers (started together): grpc P+D and nixl P+D on the BPE checkpoint, the nixl pair with
``--block-size 32``; one more grpc decode worker on a copy of it with another chat template."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from tokenizers import Tokenizer as BackendTokenizer

from cluster.admin_client import format_status
from engine.block_manager import compute_block_hashes
from router.config import RouterConfig
from tests.checkpoints import write_checkpoint
from tests.engine.test_tokenizer import CHATML_TEMPLATE, write_model_dir
from tests.router.conftest import RouterThread, greedy_ignoring_eos, token_ids, wait_for
from tests.workers.harness import WorkerProcess, start_workers, stop_workers, wait_idle

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
MAX_TOKENS = 12


@dataclass
class Setup:
    model_dir: Path
    other_dir: Path  # another checkpoint the router may be told about
    oracle: object  # transformers model
    hf_tokenizer: object  # transformers tokenizer
    grpc: tuple[WorkerProcess, WorkerProcess]  # (prefill, decode), 16-token blocks
    nixl: tuple[WorkerProcess, WorkerProcess]  # (prefill, decode), 32-token blocks
    twin_decode: WorkerProcess  # grpc, same weights, another chat template

    @property
    def workers(self) -> list[WorkerProcess]:
        return [*self.grpc, *self.nixl, self.twin_decode]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[Setup]:
    import transformers

    root = tmp_path_factory.mktemp("model-card")
    model_dir = write_model_dir(root / "bpe-llama")
    vocab = BackendTokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    oracle = write_checkpoint(model_dir, "LlamaForCausalLM", seed=7, vocab_size=vocab)
    twin_dir = root / "bpe-llama-twin"
    shutil.copytree(model_dir, twin_dir)
    config = json.loads((twin_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML_TEMPLATE.replace("assistant", "bot")
    (twin_dir / "tokenizer_config.json").write_text(json.dumps(config))
    other_dir = root / "other-llama"
    write_checkpoint(other_dir, "LlamaForCausalLM", seed=8, vocab_size=vocab)
    model = str(model_dir)
    workers = start_workers(
        ("prefill", model, "grpc"),
        ("decode", model, "grpc"),
        ("prefill", model, "nixl", "--block-size", "32"),
        ("decode", model, "nixl", "--block-size", "32"),
        ("decode", str(twin_dir), "grpc"),
    )
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    setup = Setup(model_dir, other_dir, oracle, hf_tokenizer, tuple(workers[:2]), tuple(workers[2:4]), workers[4])
    yield setup
    stop_workers(setup.workers)


@pytest.fixture
def make_router() -> Iterator:
    routers: list[RouterThread] = []

    def make(prefills, decodes, ready: bool = True, **settings) -> RouterThread:
        config = RouterConfig(
            port=0,
            grpc_port=0,
            prefill_addresses=tuple(w.address for w in prefills),
            decode_addresses=tuple(w.address for w in decodes),
            health_interval_s=0.2,
            request_timeout_s=60.0,
            **settings,
        )
        routers.append(RouterThread(config, ready))
        return routers[-1]

    yield make
    for router in routers:
        router.stop()


def _completion_ids(client, name: str, prompt: str) -> tuple[list[int], int]:
    out = client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS, logprobs=0, **GREEDY)
    return token_ids(out.choices[0].logprobs.tokens), out.usage.prompt_tokens


def _chat_ids(client, name: str, messages: list[dict]) -> tuple[list[int], int]:
    out = client.chat.completions.create(
        model=name, messages=messages, max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=0, **GREEDY
    )
    return token_ids([entry.token for entry in out.choices[0].logprobs.content]), out.usage.prompt_tokens


@pytest.mark.parametrize("transport", ["grpc", "nixl"])
def test_adopted_card_serves_the_workers_model_token_identical(setup, make_router, transport):
    prefill, decode = setup.grpc if transport == "grpc" else setup.nixl
    router = make_router([prefill], [decode], local_prefill_threshold=1)  # no --model: adopt
    served = router.router.frontend.model.require()
    assert served.name == "bpe-llama"  # the directory's name, not its path
    assert served.block_size == (16 if transport == "grpc" else 32)
    client = router.openai()
    assert [m.id for m in client.models.list().data] == ["bpe-llama"]

    for text in ("The quick brown fox", "你好，世界。今天 😀 café"):
        prompt = setup.hf_tokenizer(text).input_ids
        ids, prompt_tokens = _completion_ids(client, "bpe-llama", text)
        assert prompt_tokens == len(prompt), "the router tokenized otherwise than transformers"
        assert ids == greedy_ignoring_eos(setup.oracle, prompt, MAX_TOKENS)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    prompt = setup.hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    ids, prompt_tokens = _chat_ids(client, "bpe-llama", messages)
    assert prompt_tokens == len(prompt), "the router rendered or tokenized the chat otherwise than transformers"
    assert ids == greedy_ignoring_eos(setup.oracle, prompt, MAX_TOKENS)
    assert router.decisions() == {"remote_prefill": 3.0}, "the KV did not cross the transport"
    for worker in (prefill, decode):
        wait_idle(worker)


def test_router_told_another_model_refuses_with_the_reason(setup, make_router):
    prefill, decode = setup.grpc
    router = make_router([prefill], [decode], ready=False, model=str(setup.other_dir))
    wait_for(lambda: len(httpx.get(f"{router.http}/ready").json()["incompatible_workers"]) == 2, 20, "card checks")
    before = decode.stats().prompt_tokens, prefill.stats().prompt_tokens

    ready = httpx.get(f"{router.http}/ready")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    reasons = {w["role"]: w for w in ready.json()["incompatible_workers"]}
    assert set(reasons) == {"prefill", "decode"}
    assert "weights" in reasons["decode"]["reason"] and "tokenizer files" in reasons["decode"]["reason"]
    assert "weights_fingerprint" in reasons["decode"]["fields"]

    client = router.openai()
    for call in (
        lambda: client.completions.create(model="other-llama", prompt="Hello", max_tokens=4),
        lambda: client.chat.completions.create(
            model="other-llama", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        ),
    ):
        with pytest.raises(openai.APIStatusError) as info:
            call()
        assert info.value.status_code == 503
        assert "no decode worker serves this router's model" in str(info.value) and "weights" in str(info.value)
    assert (decode.stats().prompt_tokens, prefill.stats().prompt_tokens) == before, "a mismatched worker got work"

    metrics = router.metrics()
    assert metrics[("splitserve_incompatible_workers", (("field", "weights_fingerprint"), ("role", "decode")))] == 1
    assert metrics[("splitserve_incompatible_workers", (("field", "weights_fingerprint"), ("role", "prefill")))] == 1
    status = httpx.get(f"{router.http}/admin/status").json()
    assert all(w["incompatible"] for w in status["router_view"])
    assert "incompatible workers (not routed to):" in format_status(status)

    def dashboard_says() -> bool:  # its snapshot may be up to one interval old: taken before the card checks
        workers = httpx.get(f"{router.http}/dashboard/api/snapshot").json()["workers"]
        return bool(workers) and all("weights" in (w["incompatible"] or "") for w in workers)

    wait_for(dashboard_says, 5, "the dashboard to show the incompatible workers")


def test_mismatched_decode_worker_gets_no_traffic(setup, make_router):
    prefill, decode = setup.grpc
    twin = setup.twin_decode
    router = make_router([prefill], [decode, twin], model=str(setup.model_dir), local_prefill_threshold=1)
    wait_for(lambda: router.call(lambda: router.router.pool.workers[twin.address].incompatible), 20, "twin checked")
    twin_before, good_before = twin.stats().prompt_tokens, decode.stats().prompt_tokens
    reason = router.call(lambda: router.router.pool.workers[twin.address].incompatible.reason)
    assert "chat template" in reason and "weights" not in reason

    client = router.openai()
    rng = random.Random("mismatched-decode")
    for _ in range(6):
        client.completions.create(model="bpe-llama", prompt=[rng.randrange(5, 400) for _ in range(20)], max_tokens=2)
    assert twin.stats().prompt_tokens == twin_before, "the mismatched decode worker was routed to"
    assert decode.stats().prompt_tokens - good_before == 6 * 20
    metrics = router.metrics()
    key = ("splitserve_incompatible_workers", (("field", "chat_template_fingerprint"), ("role", "decode")))
    assert metrics[key] == 1
    body = httpx.get(f"{router.http}/ready").json()
    assert body["ready"] is True and [w["address"] for w in body["incompatible_workers"]] == [twin.address]
    wait_idle(decode)


def test_block_size_from_the_card_keeps_prefix_routing(setup, make_router):
    prefill, decode = setup.nixl  # --block-size 32
    router = make_router([prefill], [decode], local_prefill_threshold=32)
    rng = random.Random("block-size-32")
    prompt = [rng.randrange(5, 400) for _ in range(6 * 32)]
    client = router.openai()
    client.completions.create(model="bpe-llama", prompt=[prompt], max_tokens=2, temperature=0)
    assert router.decisions() == {"remote_prefill": 1.0}
    router.wait_synced(decode.address, compute_block_hashes(prompt, 32))
    hits_before = decode.stats().prefix_hit_tokens

    client.completions.create(model="bpe-llama", prompt=[prompt + [7, 8, 9]], max_tokens=2, temperature=0)
    # 3 uncached tokens on D (its 32-token blocks hashed as the worker hashes them): D prefills itself.
    assert router.decisions() == {"remote_prefill": 1.0, "local_prefill": 1.0}
    assert decode.stats().prefix_hit_tokens - hits_before == len(prompt)
    wait_idle(decode)
