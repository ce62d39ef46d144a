"""One request's KV never reaches another request's output, on the FlexAttention backend too.

FlexAttention reads whole key tiles of the pool in place (engine/attention_flex.py): a masked slot gets
probability 0, but 0 x NaN (or inf) is NaN in P.V, so a non-finite value anywhere in a listed tile —
another sequence's blocks, a freed block's earlier occupant, the tail of a block — would poison every
row of the query tile. Non-finite KV gets into the pool three ways, each made to happen here, while
other requests run beside it and after it (the torch path too, which masks what it gathers):

- a request's own numerical blow-up (its K/V rows turn NaN or inf);
- KV received from a peer: written through ``write_regions`` (gRPC chunks), or landed in place
  (NIXL, bulk TCP) and sanitized by the inbox where the attention reads masked slots;
- either of them left behind in blocks that are freed and handed to the next requests.

On CPU flex_attention runs uncompiled (the unfused reference evaluates the same mask), as in
tests/engine/test_attention_backends.py; the greedy fp32 tokens must equal transformers'."""

from __future__ import annotations

import math
import random

import pytest
import torch

from contract.sampling import SamplingParams
from engine.attention_flex import FlexPagedAttention
from engine.config import EngineConfig
from engine.engine import Engine
from engine.kv_cache import KVLayout, PagedKVCache
from kv_transfer.inbox import KVInbox
from tests.checkpoints import hf_greedy, write_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

NEW_TOKENS = 8
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
POISONS = pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
BACKENDS = pytest.mark.parametrize("backend", ["flex", "torch"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-isolation")
    model = write_checkpoint(directory, "LlamaForCausalLM", seed=9)
    model.generation_config.eos_token_id = None  # ignore_eos, as the engine's requests do
    return str(directory), model


@pytest.fixture(scope="module")
def expected(checkpoint):
    """Two rounds of healthy prompts and transformers' greedy tokens for each."""
    _, model = checkpoint
    rng = random.Random(12)
    rounds = [[[rng.randrange(3, 320) for _ in range(rng.randint(3, 40))] for _ in range(4)] for _ in range(2)]
    return [[(p, tuple(hf_greedy(model, p, NEW_TOKENS))) for p in prompts] for prompts in rounds]


def _engine(model_dir: str, backend: str) -> Engine:
    # A small pool and a step budget that keeps every step's rows in one 128-row query tile: each
    # step's listed key tiles hold the blocks of every sequence in it, the poisoned one's included.
    engine = Engine(EngineConfig(model=model_dir, dtype="float32", num_kv_blocks=48, max_num_batched_tokens=64))
    if backend == "flex":
        engine.runner.attention = FlexPagedAttention(compiled=False)
    return engine


def run_prompts(
    engine: Engine, prompts: dict[str, list[int]], params: SamplingParams = GREEDY
) -> dict[str, tuple[int, ...]]:
    """Adds ``prompts`` and steps until nothing is left; the tokens of every request that produced any."""
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params)
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).extend(output.token_ids)
    return {request_id: tuple(tokens) for request_id, tokens in outputs.items()}


def _blow_up(engine: Engine, victim: str, poison: float) -> None:
    """From now on the K/V rows ``victim`` writes are ``poison``: its model diverged."""
    backend = engine.runner.attention
    original = backend.attend

    def attend(q, k, v, cache, layer, batch, scale):
        request = engine.requests.get(victim)
        if request is not None and not request.state.finished:
            rows = torch.isin(batch.slot_block, torch.tensor(request.block_ids, dtype=batch.slot_block.dtype))
            k, v = k.clone(), v.clone()
            k[rows], v[rows] = poison, poison
        return original(q, k, v, cache, layer, batch, scale)

    backend.attend = attend


def _second_round(engine: Engine, expected) -> None:
    """Fresh prompts on the blocks the poisoned request left behind (freed, or free and cached)."""
    prompts = {f"b{i}": p for i, (p, _) in enumerate(expected[1])}
    got = run_prompts(engine, prompts)
    assert [got[f"b{i}"] for i in range(len(prompts))] == [tokens for _, tokens in expected[1]]


@POISONS
@BACKENDS
def test_a_request_blowing_up_does_not_reach_its_neighbours_or_its_blocks_next_occupants(
    checkpoint, expected, backend, poison
):
    model_dir, _ = checkpoint
    engine = _engine(model_dir, backend)
    _blow_up(engine, "victim", poison)
    prompts = {"victim": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]}
    prompts |= {f"a{i}": p for i, (p, _) in enumerate(expected[0])}
    got = run_prompts(engine, prompts)
    assert [got[f"a{i}"] for i in range(len(expected[0]))] == [tokens for _, tokens in expected[0]]
    _second_round(engine, expected)


@POISONS
@BACKENDS
def test_non_finite_kv_received_from_a_peer_does_not_reach_other_requests(checkpoint, expected, backend, poison):
    """The decode worker's path: blocks reserved, the peer's KV written into them, adopted, decoded."""
    model_dir, _ = checkpoint
    engine = _engine(model_dir, backend)
    layout = engine.layout
    peer_prompt = list(range(40, 75))
    reservation = engine.reserve("peer", peer_prompt, GREEDY)
    blocks = list(reservation.block_ids)
    received = torch.full((len(blocks), layout.region_elements), poison, dtype=engine.kv_cache.data.dtype)
    for layer in range(layout.num_layers):
        engine.kv_cache.write_regions(layer, blocks, received.view(torch.uint8))
    engine.complete_reservation("peer", first_token_id=7)
    got = run_prompts(engine, {f"a{i}": p for i, (p, _) in enumerate(expected[0])})
    assert [got[f"a{i}"] for i in range(len(expected[0]))] == [tokens for _, tokens in expected[0]]
    _second_round(engine, expected)


def land_in_place_and_adopt(engine: Engine, poison: float, transport: str = "nixl") -> None:
    """A reservation whose KV a peer lands in place as ``poison`` (NIXL's WRITE, or bulk TCP's recv_into),
    through an inbox set up as the decode worker sets it up for this engine's attention; then adopted."""
    inbox = KVInbox(
        engine.kv_cache,
        on_commit=lambda *_: None,
        on_abort=lambda *_: None,
        verify_checksums=False,
        sanitize_in_place=engine.runner.attention.reads_masked_slots,
    )
    blocks = list(engine.reserve("peer", list(range(40, 75)), GREEDY).block_ids)
    inbox.open("peer", blocks)
    for layer in range(engine.layout.num_layers):

        def land(layer=layer):  # what the peer's WRITE (or recv_into) put there
            engine.kv_cache.data[layer, blocks] = poison

        if transport == "nixl":
            land()
            inbox.landed("peer", [(layer, blocks, 0)])
        else:
            inbox.receive_in_place("peer", [(layer, blocks)], fill=lambda *piece: land() or 0, checksums=lambda: [0])
    engine.complete_reservation("peer", first_token_id=7)


@POISONS
@BACKENDS
@pytest.mark.parametrize("transport", ["nixl", "bulk"])
def test_non_finite_kv_landed_in_place_by_a_peer_does_not_reach_other_requests(
    checkpoint, expected, backend, poison, transport
):
    """NIXL and bulk TCP put the peer's bytes straight into the pool, past ``write_regions``; the
    checksum only proves they are what the peer sent. The inbox, set up as the decode worker sets
    it up for this attention backend, must not let them reach anyone else."""
    model_dir, _ = checkpoint
    engine = _engine(model_dir, backend)
    land_in_place_and_adopt(engine, poison, transport)
    got = run_prompts(engine, {f"a{i}": p for i, (p, _) in enumerate(expected[0])})
    assert [got[f"a{i}"] for i in range(len(expected[0]))] == [tokens for _, tokens in expected[0]]
    _second_round(engine, expected)


def test_the_pool_holds_only_finite_values_after_any_write():
    """What the flex path relies on: every way into the pool replaces NaN and +-inf by 0."""
    cache = PagedKVCache(KVLayout(2, 6, 4, 2, 8, "float32"))
    values = torch.randn(3, 2, 8)
    values[0, 0, 0], values[1, 1, 3], values[2, 0, 7] = math.nan, math.inf, -math.inf
    cache.write(1, values, values, torch.tensor([0, 2, 5]), torch.tensor([1, 3, 0]))
    received = torch.randn(2, cache.layout.region_elements)
    received[0, 5], received[1, -1] = math.nan, -math.inf
    cache.write_regions(0, [3, 4], received.view(torch.uint8))
    assert torch.isfinite(cache.data).all()
    assert cache.data[1, 2, 1, 3, 1, 3] == 0 and cache.data[1, 5, 0, 0, 0, 6] == values[2, 0, 6]
    assert cache.data[0, 3].flatten()[5] == 0 and cache.data[0, 3].flatten()[4] == received[0, 4]


@pytest.mark.parametrize(
    ("layout", "word"),
    [
        (KVLayout(2, 9, 4, 2, 8, "bfloat16"), torch.int64),  # 256-byte regions
        (KVLayout(2, 9, 1, 1, 3, "bfloat16"), torch.int32),  # 12
        (KVLayout(2, 9, 1, 1, 5, "float32"), torch.int64),  # 40
    ],
)
def test_regions_copied_by_index_in_words_land_exactly_where_named(layout, word):
    """Transports copy whole regions by index, through the widest words that divide a region: every byte of
    the named blocks, in the order named, and none of any other block."""
    cache = PagedKVCache(layout)
    assert cache._region_words.dtype == word
    before = cache.regions.clone()
    blocks = [7, 2, 5]
    values = torch.randn(len(blocks), layout.region_elements).to(getattr(torch, layout.dtype))
    cache.write_regions(1, blocks, values.view(torch.uint8))
    assert torch.equal(cache.read_regions(1, blocks), values.view(torch.uint8))
    assert torch.equal(cache.read_regions(1, [5]), values[2:].view(torch.uint8))
    untouched = [block for block in range(layout.num_blocks) if block not in blocks]
    assert torch.equal(cache.regions[1, untouched], before[1, untouched]) and torch.equal(cache.regions[0], before[0])
    assert cache.read_regions(0, []).shape == (0, layout.region_bytes)
    cache.write_regions(0, [], torch.empty(0, layout.region_bytes, dtype=torch.uint8))
