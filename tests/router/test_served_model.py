"""Which model the router serves, without processes: adopting a worker's card, refusing when it cannot,
checking workers against the router's own card, and 503 (never a default tokenizer) until it knows."""

from __future__ import annotations

import dataclasses

import pytest

from engine.presets import build_model_card, load_model_tokenizer, model_weights_fingerprint, resolve_model_config
from router.config import RouterConfig
from router.frontend import Frontend
from router.orchestrator import GenerationError
from router.served_model import ModelBinding
from router.workers import WorkerPool
from tests.checkpoints import write_checkpoint
from tests.engine.test_tokenizer import write_model_dir


def worker_card(model: str, block_size: int = 16, dtype: str = "float32", **overrides):
    """The card a worker on ``model`` advertises (the same function the worker calls)."""
    config = resolve_model_config(model)
    card = build_model_card(
        model,
        config,
        load_model_tokenizer(model, config),
        weights=model_weights_fingerprint(model, config),
        max_model_len=config.max_context,
        dtype=dtype,
        block_size=block_size,
    )
    return dataclasses.replace(card, **overrides)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("served") / "bpe-model"
    write_checkpoint(directory, "LlamaForCausalLM", vocab_size=512)
    write_model_dir(directory)
    return directory


def test_without_a_card_requests_get_503_not_a_default_tokenizer():
    frontend = Frontend(RouterConfig(), WorkerPool())
    for call in (lambda: frontend.check_model(None), lambda: frontend.encode_text("hi"), lambda: frontend.model_name):
        with pytest.raises(GenerationError) as info:
            call()
        assert info.value.status == 503 and "model card" in str(info.value)


def test_adopts_the_first_card_and_its_tokenizer(bpe_dir):
    binding = ModelBinding(RouterConfig(max_model_len=100))
    card = worker_card(str(bpe_dir), block_size=32)
    assert binding.check(card) is None
    served = binding.require()
    assert (served.name, served.block_size, served.max_model_len) == ("bpe-model", 32, 100)
    assert served.tokenizer.encode("Hello world", add_special_tokens=False) == load_model_tokenizer(
        str(bpe_dir), resolve_model_config(str(bpe_dir))
    ).encode("Hello world", add_special_tokens=False)
    # Adopted, the card is the reference: a worker with other blocks is not routed to.
    verdict = binding.check(dataclasses.replace(card, block_size=16))
    assert verdict.fields == ("block_size",) and "block size: router 32, worker 16" in verdict.reason
    # Nor one that names the model otherwise: clients would have to use whichever name came first.
    verdict = binding.check(dataclasses.replace(card, served_model_name="alpha"))
    assert verdict.fields == ("served_model_name",) and "'bpe-model', worker 'alpha'" in verdict.reason


def test_told_the_model_the_workers_still_name_it_alike(bpe_dir):
    """A router told --model (and a name of its own) pins the workers' name from the first: the rest share it."""
    binding = ModelBinding(RouterConfig(model=str(bpe_dir), served_model_name="mine"))
    assert binding.check(worker_card(str(bpe_dir))) is None
    assert binding.check(worker_card(str(bpe_dir), served_model_name="alpha")).fields == ("served_model_name",)
    assert binding.require().name == "mine"


def test_max_model_len_flag_never_raises_the_cards(caplog):
    binding = ModelBinding(RouterConfig(max_model_len=10**6))
    assert binding.check(worker_card("demo")) is None
    takes = resolve_model_config("demo").max_context
    assert binding.require().max_model_len == takes
    assert f"--max-model-len 1000000 is more than the model takes ({takes} tokens)" in caplog.text  # said, not hid


def test_unreadable_source_refuses_and_says_to_pass_model(bpe_dir):
    binding = ModelBinding(RouterConfig())
    card = dataclasses.replace(worker_card(str(bpe_dir)), source="/nowhere/on/this/router")
    verdict = binding.check(card)
    assert verdict.fields == ("source_unreadable",)
    with pytest.raises(GenerationError) as info:
        binding.require()
    assert info.value.status == 503 and "--model" in str(info.value) and "/nowhere/on/this/router" in str(info.value)


def test_source_with_other_files_here_is_not_adopted(bpe_dir, tmp_path):
    here = tmp_path / "bpe-model"  # the same path name, other tokenizer files on this machine
    write_checkpoint(here, "LlamaForCausalLM", vocab_size=512)
    card = dataclasses.replace(worker_card(str(bpe_dir)), source=str(here))
    binding = ModelBinding(RouterConfig())
    assert binding.check(card).fields == ("source_unreadable",)
    assert "tokenizer files, chat template" in binding.refusal and "--model" in binding.refusal


def test_told_the_model_it_checks_every_worker(bpe_dir, tmp_path):
    other = tmp_path / "other"
    write_checkpoint(other, "LlamaForCausalLM", seed=9, vocab_size=512)
    write_model_dir(other)
    binding = ModelBinding(RouterConfig(model=str(bpe_dir), served_model_name="mine"))
    assert binding.served is None  # dtype and block size come from the workers
    verdict = binding.check(worker_card(str(other)))
    assert verdict.fields == ("weights_fingerprint",) and str(other.resolve()) in verdict.reason
    assert binding.served is None, "a mismatched worker must not pin the reference"
    assert binding.check(worker_card(str(bpe_dir), block_size=32)) is None
    assert (binding.require().name, binding.require().block_size) == ("mine", 32)
    assert binding.check(worker_card(str(bpe_dir), block_size=16)).fields == ("block_size",)
    assert binding.check(worker_card(str(bpe_dir), block_size=32, dtype="bfloat16")).fields == ("dtype",)
    assert binding.check(None).fields == ("model_card",)
