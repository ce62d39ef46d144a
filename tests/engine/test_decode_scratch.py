"""The CPU decode scratch (engine/decode_scratch.py) and stale KV: decodes append to rows kept between
steps, fall back to the pool whenever a row cannot be trusted, and nothing a mask hides — NaN or inf
in free blocks, block tails, table padding, a row's earlier occupant — reaches the output."""

from __future__ import annotations

import math
import random

import pytest
import torch

from contract.sampling import SamplingParams
from engine.attention import TorchPagedAttention
from engine.config import EngineConfig
from engine.decode_scratch import DecodeScratch
from engine.engine import Engine
from engine.kv_cache import KVLayout, PagedKVCache
from tests.checkpoints import hf_greedy, write_checkpoint

NEW_TOKENS = 14
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-scratch")
    model = write_checkpoint(directory, "LlamaForCausalLM", seed=5)
    return str(directory), model


@pytest.fixture(scope="module")
def expected(checkpoint):
    """transformers' greedy tokens for prompts of many lengths (so decodes are padded and masked)."""
    _, model = checkpoint
    prompts = _prompts(7, seed=4)
    return prompts, [_hf_tokens(model, p) for p in prompts]


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randint(3, 60))] for _ in range(count)]


def _hf_tokens(model, prompt: list[int]) -> tuple[int, ...]:
    model.generation_config.eos_token_id = None  # ignore_eos, as the engine's requests do
    return tuple(hf_greedy(model, prompt, NEW_TOKENS))


def _engine(model_dir: str, scratch_max_bytes: int | None = None, **overrides) -> Engine:
    engine = Engine(EngineConfig(model=model_dir, dtype="float32", **{"num_kv_blocks": 64, **overrides}))
    if scratch_max_bytes is not None:
        engine.runner.attention = TorchPagedAttention(scratch_max_bytes)
    return engine


# -- through the engine, against transformers ----------------------------------------------------------


@pytest.mark.parametrize("poison", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("scratch_max_bytes", [None, 0], ids=["scratch", "gather-fallback"])
def test_stale_non_finite_kv_never_reaches_the_output(checkpoint, expected, poison, scratch_max_bytes):
    """Every pool slot starts as NaN/inf (free blocks, the tails of last blocks, the block that pads
    the gather's table); chunked prefill and prefix hits read cached blocks too. Then the rows' earlier
    occupants are poisoned before a second round of shorter requests reuses them."""
    model_dir, _ = checkpoint
    prompts, tokens = expected
    engine = _engine(model_dir, scratch_max_bytes, max_num_batched_tokens=40)
    engine.kv_cache.data.fill_(poison)
    assert [r.token_ids for r in engine.generate(prompts, GREEDY)] == tokens
    scratch = engine.runner.attention.scratch
    assert (scratch.rows_refilled > 0) == (scratch_max_bytes is None)

    for row, written in enumerate(scratch._dirty):  # what earlier occupants wrote (their own KV, were it NaN)
        scratch._storage[:, :, row, :, :written] = poison
    uncached = [b for b in range(engine.layout.num_blocks) if engine.allocator.block_hash(b) is None]
    engine.kv_cache.data[:, uncached] = poison  # everything but the prefix cache's published blocks
    shorter = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))[:4]
    again = engine.generate([prompts[i] for i in shorter], GREEDY)  # prefix hits for all of them
    assert [r.token_ids for r in again] == [tokens[i] for i in shorter]


def test_scratch_and_gather_paths_agree_on_a_mixed_stream(checkpoint):
    """Requests arriving and finishing at different steps: rows are reassigned, compacted and refilled."""
    model_dir, _ = checkpoint
    prompts = _prompts(9, seed=8)
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(len(prompts))]
    results = {}
    for name, budget in (("scratch", None), ("gather", 0)):
        engine = _engine(model_dir, budget, max_num_seqs=4, max_num_batched_tokens=48)
        results[name] = [r.token_ids for r in engine.generate(prompts, params)]
    assert results["scratch"] == results["gather"]


def test_a_failed_step_leaves_no_stale_row(checkpoint, expected):
    """Attention fails midway through a decode step (after some layers appended to their rows): the
    engine re-runs the step in halves; the rows it had claimed are refilled, never trusted."""
    model_dir, _ = checkpoint
    prompts, tokens = expected
    engine = _engine(model_dir)
    backend = engine.runner.attention
    original = backend.attend
    calls = {"decode layers": 0, "refilled when it failed": None}

    def attend(q, k, v, cache, layer, batch, scale):
        if not batch.prefills and calls["refilled when it failed"] is None:
            calls["decode layers"] += 1
            if calls["decode layers"] == 2 * engine.layout.num_layers + 2:  # layer 1 of the third decode step
                calls["refilled when it failed"] = backend.scratch.rows_refilled
                raise RuntimeError("injected")
        return original(q, k, v, cache, layer, batch, scale)

    backend.attend = attend
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt, GREEDY)
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).extend(output.token_ids)
    assert calls["refilled when it failed"] is not None
    assert engine.take_failures() == {}
    assert [tuple(outputs[f"r{i}"]) for i in range(len(prompts))] == tokens
    assert backend.scratch.rows_refilled >= calls["refilled when it failed"] + len(prompts)


def test_a_request_id_used_again_is_another_sequence(checkpoint, expected):
    """Abort a decoding request and add another prompt under the same id: it is refilled, not appended to."""
    model_dir, model = checkpoint
    prompts, tokens = expected
    engine = _engine(model_dir)
    engine.add_request("same", prompts[0], GREEDY)
    for _ in range(4):
        engine.step()
    assert engine.abort("same")
    engine.add_request("same", prompts[1], GREEDY)
    generated: list[int] = []
    while engine.has_unfinished():
        generated += [t for o in engine.step() if o.request_id == "same" for t in o.token_ids]
    assert tuple(generated) == tokens[1]


# -- the scratch's own rules -----------------------------------------------------------------------------


def _pool(num_blocks: int = 12, block_size: int = 4) -> PagedKVCache:
    cache = PagedKVCache(KVLayout(2, num_blocks, block_size, 2, 8, "float32"))
    cache.data.copy_(torch.randn(cache.data.shape))
    return cache


def _row_of_pool(cache: PagedKVCache, table: tuple[int, ...], length: int) -> torch.Tensor:
    """[layers, 2, kvh, length, hd]: the sequence's first ``length`` positions, as a scratch row holds them."""
    blocks = cache.data[:, list(table)]  # [L, nb, 2, bs, kvh, hd]
    return blocks.permute(0, 2, 4, 1, 3, 5).flatten(3, 4)[:, :, :, :length]


def test_rows_are_kept_only_for_the_next_position_of_the_same_incarnation():
    cache, scratch = _pool(), DecodeScratch()
    tables = [(0, 1, 2), (3, 4, 5)]
    scratch.plan(cache, [11, 12], [5, 7], tables)
    assert scratch.rows_refilled == 2
    scratch.plan(cache, [11, 12], [6, 8], tables)  # both decoded at p - 1 last time: kept
    assert scratch.rows_refilled == 2
    scratch.plan(cache, [11, 12], [7, 9], tables)
    scratch.plan(cache, [11, 12], [7, 9], tables)  # the same step again (a failed forward re-run): refilled
    assert scratch.rows_refilled == 4
    scratch.plan(cache, [11, 13], [8, 10], tables)  # 13: the id of 12 used again, another incarnation
    assert scratch.rows_refilled == 5
    scratch.plan(cache, [13], [11], tables[1:])  # 13 alone: moves from row 1 to row 0 (refilled)
    assert scratch.rows_refilled == 6
    scratch.plan(cache, [11, 13], [9, 12], tables)  # 11 skipped a step: forgotten; 13 kept
    assert scratch.rows_refilled == 7


def test_a_refilled_row_holds_the_pool_and_zeros_beyond():
    cache, scratch = _pool(), DecodeScratch()
    long_table, short_table = (0, 1, 2, 3), (4, 5)
    scratch.plan(cache, [1], [15], [long_table])
    scratch.plan(cache, [2], [6], [short_table])  # the same row, a shorter occupant
    storage = scratch._storage
    assert torch.equal(storage[:, :, 0, :, :6], _row_of_pool(cache, short_table, 6))
    assert not storage[:, :, 0, :, 6:].any()


def test_rows_are_compacted_and_queries_reordered():
    cache, scratch = _pool(), DecodeScratch()
    tables = [(0, 1), (2, 3), (4, 5)]
    scratch.plan(cache, [1, 2, 3], [4, 4, 4], tables)
    step = scratch.plan(cache, [3, 2], [5, 5], [tables[2], tables[1]])  # 1 finished; 3 moves down to row 0
    assert step.rows.tolist() == [0, 1] and step.order is None
    assert scratch.rows_refilled == 4  # only 3 moved (refilled); 2 kept its row
    assert step.mask is None and step.width == 6
    step = scratch.plan(cache, [2, 3], [6, 6], [tables[1], tables[2]])
    assert step.rows.tolist() == [1, 0] and step.order.tolist() == [1, 0]
    assert scratch.rows_refilled == 4


def test_over_budget_falls_back_and_forgets():
    cache = _pool()
    scratch = DecodeScratch(max_bytes=1)
    assert scratch.plan(cache, [1], [3], [(0,)]) is None
    roomy = DecodeScratch()
    roomy.plan(cache, [1], [3], [(0,)])
    roomy.max_bytes = 1
    assert roomy.plan(cache, [1], [400], [(0,)]) is None  # would have to grow past the budget
    assert roomy.rows_held == 0
