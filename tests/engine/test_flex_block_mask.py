"""FlexAttention's block mask lists sparse, absolute key-tile numbers: a sequence whose blocks sit
high in a large pool (block 200 of 256) must build a mask and attend exactly like the torch path.

BlockMask.from_kv_blocks would by default also derive the transposed (query-per-key-tile) lists the
backward pass needs; that derivation assumes the listed tiles span every key tile and indexes out
of bounds on CPU (a device-side assert on CUDA) for high tile numbers. Inference needs no backward."""

from __future__ import annotations

import random

import pytest
import torch

from contract.sampling import SamplingParams
from engine.attention import StepSequences, TorchPagedAttention, select_attention_backend
from engine.attention_flex import FLEX_ENV, FlexPagedAttention, flex_available
from engine.config import EngineConfig
from engine.engine import Engine
from tests.checkpoints import write_checkpoint
from tests.engine.test_attention_backends import assert_block_mask_exact_and_covered

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

POOL_BLOCKS = 256
HELD_LOW_BLOCKS = 200  # taken from the allocator first, so the requests land on blocks 200..255
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-flex-high")
    write_checkpoint(directory, "LlamaForCausalLM", seed=11)
    return str(directory)


@pytest.mark.parametrize("tables", [((200,),), ((255, 201), (230,)), ((3, 250, 120),)], ids=["one", "two", "spread"])
def test_block_mask_on_high_block_ids_is_exact_and_covered(tables):
    bs = 16
    rows, positions = [], []
    for seq, table in enumerate(tables):
        length = len(table) * bs - 3
        rows += [seq] * length
        positions += range(length)
    sequences = StepSequences(torch.tensor(rows), torch.tensor(positions), tables, bs, POOL_BLOCKS)
    assert_block_mask_exact_and_covered(sequences)


def _generate_on_high_blocks(model_dir: str, backend, prompts) -> list[tuple[int, ...]]:
    engine = Engine(
        EngineConfig(model=model_dir, dtype="float32", num_kv_blocks=POOL_BLOCKS, max_num_batched_tokens=40)
    )
    engine.runner.attention = backend
    held = engine.allocator.allocate(HELD_LOW_BLOCKS)
    assert held == list(range(HELD_LOW_BLOCKS))
    return [c.token_ids for c in engine.generate(prompts, GREEDY)]


def test_flex_on_high_block_ids_is_token_identical_to_the_torch_path(model_dir):
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randint(5, 45))] for _ in range(4)]
    expected = _generate_on_high_blocks(model_dir, TorchPagedAttention(), prompts)
    got = _generate_on_high_blocks(model_dir, FlexPagedAttention(compiled=False), prompts)
    assert got == expected


def test_the_flex_switch_selects_the_torch_path_on_cuda(monkeypatch):
    """scripts/gpu_check.sh falls back with SPLITSERVE_FLEX_ATTENTION=0 when flex cannot compile there."""
    assert select_attention_backend("cuda").name == "flex"
    monkeypatch.setenv(FLEX_ENV, "0")
    assert not flex_available()
    assert select_attention_backend("cuda").name == "torch"
    monkeypatch.setenv(FLEX_ENV, "off")
    with pytest.raises(ValueError, match=FLEX_ENV):
        flex_available()
