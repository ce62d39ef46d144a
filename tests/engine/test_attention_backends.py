"""Attention backends behind the one seam: FlexAttention over the pool in place must agree with
the torch path. On CPU flex_attention runs uncompiled (an unfused reference that evaluates the
block-table mask on every score); the compiled kernel is checked in tests/gpu/."""

from __future__ import annotations

import random

import pytest
import torch

from contract.sampling import SamplingParams
from engine.attention import StepSequences, TorchPagedAttention, select_attention_backend
from engine.attention_flex import FlexPagedAttention, build_block_mask, flex_available, kv_tile_size
from engine.config import EngineConfig
from engine.engine import Engine
from tests.checkpoints import write_checkpoint

# The pinned torch ships FlexAttention: its absence is a failure here, not a skip.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def test_this_torch_has_flex_attention():
    assert flex_available()


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-flex")
    write_checkpoint(directory, "LlamaForCausalLM", seed=7)
    return str(directory)


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randint(3, 40))] for _ in range(count)]


def _generate(model_dir: str, backend, prompts, **overrides) -> list[tuple[int, ...]]:
    config = EngineConfig(model=model_dir, dtype="float32", num_kv_blocks=64, **overrides)
    engine = Engine(config)
    engine.runner.attention = backend
    return [c.token_ids for c in engine.generate(prompts, GREEDY)]


def test_cpu_selects_the_torch_path():
    assert select_attention_backend("cpu").name == "torch"


def test_flex_matches_torch_path_through_the_engine(model_dir):
    """Mixed steps (prefill chunks after cached prefixes, decodes) over a shuffled pool."""
    prompts = _prompts(5, seed=3)
    expected = _generate(model_dir, TorchPagedAttention(), prompts, max_num_batched_tokens=24)
    got = _generate(model_dir, FlexPagedAttention(compiled=False), prompts, max_num_batched_tokens=24)
    assert got == expected


def _dense_mask(sequences: StepSequences) -> torch.Tensor:
    bs = sequences.block_size
    rows = sequences.num_blocks * 2 * bs - bs
    mask = torch.zeros(sequences.row_sequence.numel(), rows, dtype=torch.bool)
    for row, (seq, pos) in enumerate(zip(sequences.row_sequence.tolist(), sequences.positions.tolist())):
        for logical, block in enumerate(sequences.block_tables[seq]):
            for slot in range(bs):
                if logical * bs + slot <= pos:
                    mask[row, block * 2 * bs + slot] = True
    return mask


def test_block_mask_is_exact_and_its_tiles_cover_it():
    rng = random.Random(1)
    bs, num_blocks = 4, 80
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, rows, positions = [], [], []
    for seq, (start, length) in enumerate([(0, 9), (5, 150), (17, 1), (30, 1), (0, 1)]):
        blocks = -(-(start + length) // bs)
        tables.append(tuple(free[:blocks]))
        free = free[blocks:]
        rows += [seq] * length
        positions += range(start, start + length)
    sequences = StepSequences(torch.tensor(rows), torch.tensor(positions), tuple(tables), bs, num_blocks)
    assert_block_mask_exact_and_covered(sequences)


def assert_block_mask_exact_and_covered(sequences: StepSequences) -> None:
    """The block mask's mask_mod equals the dense mask, and its listed key tiles cover every visible key."""
    block_mask = build_block_mask(sequences, torch.device("cpu"))
    expected = _dense_mask(sequences)
    q = torch.arange(expected.shape[0])[:, None]
    kv = torch.arange(expected.shape[1])[None, :]
    assert torch.equal(block_mask.mask_mod(0, 0, q, kv), expected)
    tile = kv_tile_size(sequences.block_size)
    covered = torch.zeros_like(expected)
    kv_num, kv_indices = block_mask.kv_num_blocks[0, 0], block_mask.kv_indices[0, 0]
    for q_tile in range(kv_num.numel()):
        for index in kv_indices[q_tile, : kv_num[q_tile]].tolist():
            covered[q_tile * 128 : (q_tile + 1) * 128, index * tile : (index + 1) * tile] = True
    assert not (expected & ~covered).any(), "a visible key lies outside the listed tiles"


def test_flex_plans_the_prefill_rows_only(model_dir):
    """Decode rows attend over their gathered blocks, not through flex (a decode row in a flex query tile
    walks the key tiles of every sequence in it): the block mask spans the prefill rows, and a
    decode-only step has none."""
    engine = Engine(EngineConfig(model=model_dir, dtype="float32", num_kv_blocks=64, max_num_batched_tokens=24))
    runner = engine.runner
    runner.attention = FlexPagedAttention(compiled=False)
    prepared = []
    prepare = runner.prepare
    runner.prepare = lambda chunks: prepared.append(prepare(chunks)) or prepared[-1]
    engine.generate(_prompts(4, seed=5), GREEDY)
    kinds = set()
    for inputs in prepared:
        rows, prefill_rows = inputs.input_ids.numel(), inputs.batch.decode_begin
        if prefill_rows == 0:
            assert inputs.batch.plan is None
        else:
            assert inputs.batch.plan.seq_lengths[0] == prefill_rows
        kinds.add("decode-only" if prefill_rows == 0 else "mixed" if prefill_rows < rows else "prefill")
    assert kinds == {"decode-only", "mixed", "prefill"}
