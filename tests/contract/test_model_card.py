"""The model card: fingerprints (the weights one is the engine's KV fingerprint), the wire round trip,
and the comparison that decides whether a router routes to a worker."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from contract.model_card import (
    MISMATCH_FIELDS,
    ModelCard,
    card_mismatch,
    card_of_stats,
    default_served_model_name,
    mismatched_fields,
    tokenizer_fingerprint,
)
from engine.presets import build_model_card, load_model_tokenizer, model_weights_fingerprint, resolve_model_config
from protos import common_pb2
from protos.version import PROTOCOL_VERSION
from tests.checkpoints import write_checkpoint
from tests.engine.test_tokenizer import CHATML_TEMPLATE, write_model_dir

CARD = ModelCard(
    served_model_name="tiny",
    source="/models/tiny",
    weights_fingerprint="w" * 16,
    tokenizer_fingerprint="t" * 16,
    chat_template_fingerprint="c" * 16,
    vocab_size=320,
    max_model_len=2048,
    dtype="float32",
    block_size=16,
)


def test_wire_round_trip():
    assert ModelCard.from_wire(CARD.to_wire()) == CARD
    stats = common_pb2.WorkerStats(worker_id="w", model_card=CARD.to_wire())
    assert card_of_stats(common_pb2.WorkerStats.FromString(stats.SerializeToString())) == CARD
    assert card_of_stats(common_pb2.WorkerStats(worker_id="old-worker")) is None


def test_equal_cards_match_and_the_source_path_does_not_count():
    elsewhere = dataclasses.replace(CARD, source="/elsewhere/tiny")  # a path means nothing on another machine
    assert card_mismatch(CARD, elsewhere) is None
    assert mismatched_fields(CARD, elsewhere) == ()
    # The name clients use does: workers that name the model otherwise would split one model in two.
    assert mismatched_fields(CARD, dataclasses.replace(CARD, served_model_name="alias")) == ("served_model_name",)
    assert card_mismatch(dataclasses.replace(CARD, served_model_name=None), elsewhere) is None  # None: not checked


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("weights_fingerprint", "x" * 16, "weights"),
        ("tokenizer_fingerprint", "x" * 16, "tokenizer files"),
        ("chat_template_fingerprint", "x" * 16, "chat template"),
        ("vocab_size", 512, "vocab size"),
        ("dtype", "bfloat16", "dtype"),
        ("block_size", 32, "block size"),
        ("protocol_version", PROTOCOL_VERSION + 1, "protocol version"),
    ],
)
def test_each_differing_field_is_named(field, value, named):
    worker = dataclasses.replace(CARD, **{field: value})
    reason = card_mismatch(CARD, worker)
    assert reason is not None and f"{named}: router {getattr(CARD, field)!r}, worker {value!r}" in reason
    assert "/models/tiny" in reason
    assert mismatched_fields(CARD, worker) == (field,)


def test_every_difference_is_named_at_once():
    worker = dataclasses.replace(CARD, weights_fingerprint="x" * 16, block_size=32, max_model_len=1024)
    reason = card_mismatch(CARD, worker)
    assert "weights" in reason and "block size" in reason and "max_model_len" in reason
    assert set(mismatched_fields(CARD, worker)) == {"weights_fingerprint", "block_size", "max_model_len"}
    assert set(mismatched_fields(CARD, worker)) <= set(MISMATCH_FIELDS)


def test_max_model_len_must_cover_what_the_router_admits():
    assert card_mismatch(CARD, dataclasses.replace(CARD, max_model_len=4096)) is None
    assert "router admits 2048 tokens, worker takes only 1024" in card_mismatch(
        CARD, dataclasses.replace(CARD, max_model_len=1024)
    )


def test_a_worker_without_a_card_is_refused():
    assert card_mismatch(CARD, None) == "the worker advertises no model card"
    assert mismatched_fields(CARD, None) == ("model_card",)


def test_unknown_reference_fields_are_pinned_by_the_first_worker():
    reference = dataclasses.replace(CARD, dtype=None, block_size=None, weights_fingerprint=None)
    worker = dataclasses.replace(CARD, block_size=32)
    assert card_mismatch(reference, worker) is None
    pinned = reference.pinned_by(worker)
    assert (pinned.dtype, pinned.block_size, pinned.weights_fingerprint) == ("float32", 32, "w" * 16)
    assert "block size" in card_mismatch(pinned, CARD)


def test_default_served_name_is_never_a_path():
    assert default_served_model_name("demo") == "demo"
    assert default_served_model_name("/srv/models/Llama-3.2-1B/") == "Llama-3.2-1B"
    assert default_served_model_name("relative/qwen") == "qwen"


def test_weights_fingerprint_is_the_engines_kv_fingerprint(tmp_path):
    from engine.weights import load_model

    for name, seed in (("a", 1), ("b", 2)):
        write_checkpoint(tmp_path / name, "LlamaForCausalLM", seed=seed)
    for model in ("demo", str(tmp_path / "a"), str(tmp_path / "b")):
        assert model_weights_fingerprint(model, resolve_model_config(model)) == load_model(model).fingerprint
    a, b = (model_weights_fingerprint(str(tmp_path / n), resolve_model_config(str(tmp_path / n))) for n in "ab")
    assert a != b


def _card(directory: Path) -> ModelCard:
    config = resolve_model_config(str(directory))
    tokenizer = load_model_tokenizer(str(directory), config)
    return build_model_card(str(directory), config, tokenizer, weights="w", max_model_len=512)


def test_tokenizer_and_template_fingerprints_are_separate(tmp_path):
    base = tmp_path / "base"
    write_checkpoint(base, "LlamaForCausalLM", vocab_size=512)
    write_model_dir(base)
    card = _card(base)
    assert card.served_model_name == "base" and card.source == str(base.resolve())

    other_template = tmp_path / "template"
    write_checkpoint(other_template, "LlamaForCausalLM", vocab_size=512)
    write_model_dir(other_template, chat_template=CHATML_TEMPLATE.replace("assistant", "bot"))
    assert mismatched_fields(card, _card(other_template)) == ("served_model_name", "chat_template_fingerprint")

    other_tokenizer = tmp_path / "tokenizer"
    write_checkpoint(other_tokenizer, "LlamaForCausalLM", vocab_size=512)
    write_model_dir(other_tokenizer, bos_token="<pad>")
    assert mismatched_fields(card, _card(other_tokenizer)) == ("served_model_name", "tokenizer_fingerprint")


def test_byte_tokenizers_of_one_vocab_agree(tmp_path):
    assert tokenizer_fingerprint(None, 320) == tokenizer_fingerprint(tmp_path, 320) != tokenizer_fingerprint(None, 512)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {}}))
    assert tokenizer_fingerprint(tmp_path, 320) != tokenizer_fingerprint(None, 320)


def test_contract_imports_neither_torch_nor_the_engine():
    code = (
        "import sys, contract.model_card; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'engine', 'transformers')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
