"""What only a GPU can show: the engine on CUDA (compiled FlexAttention, CUDA graphs for decode steps)
token-identical to transformers and to each other, the ordering contract with real CUDA events,
the device checksum across two pools. Run by scripts/gpu_check.sh (which leaves out the ``parity``
tests: its parity section runs the same comparison and records it); skipped here (no CUDA)."""

from __future__ import annotations

import random
import time

import pytest
import torch

from bench.gpu_check import compare_tokens, engine_greedy, hf_greedy, parity_prompts, write_tiny_checkpoint
from contract.sampling import SamplingParams
from engine.attention import TorchPagedAttention
from engine.config import EngineConfig
from engine.engine import Engine
from engine.kv_cache import PagedKVCache
from engine.layer_ready import record_layer_ready
from kv_transfer.integrity import device_checksum, region_checksum
from tests.checkpoints import write_checkpoint
from tests.engine.test_kv_isolation import land_in_place_and_adopt, run_prompts
from tests.kv_transfer.test_layer_ordering import DST_BLOCKS, LAYOUT, SRC_BLOCKS, Receiver, _sender

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NEW_TOKENS = 16
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
SLEEP_CYCLES = 1_000_000_000  # ~0.5 s of GPU time at 2 GHz: far longer than push_layer may take


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-gpu")
    write_checkpoint(directory, "LlamaForCausalLM", seed=5)
    return str(directory)


@pytest.fixture(scope="module")
def parity_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-gpu-parity")
    write_tiny_checkpoint(str(directory))
    return str(directory)


def _prompts() -> list[list[int]]:
    rng = random.Random(2)
    return [[rng.randrange(3, 320) for _ in range(rng.randint(3, 70))] for _ in range(6)]


def _generate(model_dir: str, attention=None, hold_low_blocks: int = 0, **overrides) -> tuple[list, Engine]:
    """Greedy tokens of the engine on CUDA (``attention``: instead of the device's choice); the first
    ``hold_low_blocks`` pool blocks taken first, so that the requests land on high block ids."""
    config = dict(num_kv_blocks=256, max_num_batched_tokens=40) | overrides
    engine = Engine(EngineConfig(model=model_dir, dtype="float32", device="cuda", **config))
    if attention is not None:
        engine.runner.attention = attention
    if hold_low_blocks:
        engine.allocator.allocate(hold_low_blocks)
    return [list(c.token_ids) for c in engine.generate(_prompts(), GREEDY)], engine


@pytest.mark.parity
def test_engine_fp32_is_token_identical_to_transformers(parity_dir):
    prompts = parity_prompts(6)
    expected = hf_greedy(parity_dir, "cuda", torch.float32, prompts, NEW_TOKENS)
    for attention in (None, TorchPagedAttention()):
        got, _ = engine_greedy(parity_dir, "cuda", "float32", prompts, NEW_TOKENS, attention)
        assert compare_tokens(got, expected)["identical"] == len(prompts)


@pytest.mark.parity
def test_engine_bf16_first_tokens_match_transformers(parity_dir):
    prompts = parity_prompts(6)
    got, _ = engine_greedy(parity_dir, "cuda", "bfloat16", prompts, 3)
    expected = hf_greedy(parity_dir, "cuda", torch.bfloat16, prompts, 3)
    agree = sum(a[:1] == b[:1] for a, b in zip(got, expected))
    assert agree >= len(prompts) - 1, "bf16: first tokens disagree with transformers on more than one prompt"


def test_compiled_flex_matches_the_torch_path_on_high_block_ids(model_dir):
    """Sequences on blocks 200..255 of 256: the block mask's tile lists hold high tile numbers."""
    flex, engine = _generate(model_dir, hold_low_blocks=200, cuda_graph_max_batch=0)
    assert engine.runner.attention.name == "flex"
    torch_path, _ = _generate(model_dir, TorchPagedAttention(), hold_low_blocks=200, cuda_graph_max_batch=0)
    assert flex == torch_path


def test_cuda_graphs_replay_on_the_torch_path_and_change_no_token(model_dir):
    graphs, engine = _generate(model_dir, TorchPagedAttention())
    assert engine.runner.graphs.replays > 0, "no decode step replayed a graph"
    eager, _ = _generate(model_dir, TorchPagedAttention(), cuda_graph_max_batch=0)
    assert graphs == eager


def test_flex_decode_steps_replay_graphs_and_change_no_token(model_dir):
    """CUDA's default: prefill steps run compiled flex, decode-only steps replay the torch path's graphs
    (engine/cuda_graphs.py); the tokens are those of flex alone."""
    graphs, engine = _generate(model_dir)
    assert engine.runner.attention.name == "flex"
    assert engine.runner.graphs.replays > 0, "no decode step replayed a graph"
    eager, _ = _generate(model_dir, cuda_graph_max_batch=0)
    assert graphs == eager


def test_nan_kv_landed_in_place_reaches_no_other_request_on_compiled_flex(model_dir):
    """A peer's NaN KV landed in place in the VRAM pool (as NIXL lands it), through the inbox as the decode
    worker sets it up on CUDA: zeroed before adoption, so compiled FlexAttention, which reads masked slots of
    other sequences in place, gives the other requests the tokens it gives them without it."""
    expected, _ = _generate(model_dir)
    engine = Engine(
        EngineConfig(model=model_dir, dtype="float32", device="cuda", num_kv_blocks=256, max_num_batched_tokens=40)
    )
    assert engine.runner.attention.reads_masked_slots
    land_in_place_and_adopt(engine, float("nan"))
    assert torch.isfinite(engine.kv_cache.data).all()
    ids = [f"after-{i}" for i in range(len(_prompts()))]
    got = run_prompts(engine, dict(zip(ids, _prompts())), GREEDY)
    assert [list(got[request_id]) for request_id in ids] == expected


@pytest.mark.parametrize("transport", ["grpc", "nixl"])
def test_push_waits_for_the_cuda_event_behind_the_kv_writes(transport):
    """The compute stream sleeps, then writes the layer: the receiver must get the written bytes."""
    receiver = Receiver(transport, device="cuda")
    source = PagedKVCache(LAYOUT, "cuda")
    sender = _sender(transport, source, receiver.layout)
    try:
        receiver.inbox.open("r", DST_BLOCKS)
        session = sender.open("r", receiver.ticket("r", transport))
        expected = torch.randn(LAYOUT.num_layers, len(SRC_BLOCKS), *source.data.shape[2:], device="cuda")
        index = torch.tensor(SRC_BLOCKS, device="cuda")  # a list index would copy host -> device, blocking
        _warm_pinned_host_memory(source)
        torch.cuda.synchronize()
        for layer in range(LAYOUT.num_layers):
            torch.cuda._sleep(SLEEP_CYCLES)  # GPU time before the layer's K/V is written
            source.data[layer].index_copy_(0, index, expected[layer])
            ready = record_layer_ready(source.data.device)
            began = time.monotonic()
            session.push_layer(source, layer, SRC_BLOCKS, DST_BLOCKS, ready)
            assert time.monotonic() - began < 0.05, "push_layer blocked the engine thread"
            assert not ready.query(), "the sleep was too short to tell"
        session.commit(first_token_id=1, first_logprob=None, timeout=60)
        session.close(10)
        assert torch.equal(receiver.cache.data[:, DST_BLOCKS], expected)
    finally:
        sender.close()
        receiver.stop()


def _warm_pinned_host_memory(cache: PagedKVCache) -> None:
    """The gRPC sender stages each pushed layer through pinned host memory, every layer's buffers alive
    at once; cudaHostAlloc synchronizes the device, so allocate (and free to torch's cache) them first."""
    staging = []
    for _ in range(cache.layout.num_layers):
        staging.append(torch.empty(len(SRC_BLOCKS) * cache.layout.region_bytes, dtype=torch.uint8, pin_memory=True))
        staging.append(torch.empty(len(SRC_BLOCKS), dtype=torch.long, pin_memory=True))  # the block index
    del staging


def test_device_checksum_agrees_across_pools_and_catches_a_flipped_byte():
    sender, receiver = PagedKVCache(LAYOUT, "cuda"), PagedKVCache(LAYOUT, "cuda")
    sender.data.normal_()
    receiver.write_regions(1, DST_BLOCKS, sender.read_regions(1, SRC_BLOCKS))
    assert region_checksum(sender, 1, SRC_BLOCKS) == region_checksum(receiver, 1, DST_BLOCKS)
    assert region_checksum(sender, 1, SRC_BLOCKS) == device_checksum(sender.read_regions(1, SRC_BLOCKS).cpu())
    receiver.regions[1, DST_BLOCKS[1], 17] ^= 4
    assert region_checksum(sender, 1, SRC_BLOCKS) != region_checksum(receiver, 1, DST_BLOCKS)
