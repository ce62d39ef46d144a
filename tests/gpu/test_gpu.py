"""What only a GPU can show: the engine on CUDA (FlexAttention, CUDA graphs) token-identical to
transformers, the ordering contract with real CUDA events, the device checksum across two pools.
Run by scripts/gpu_check.sh; skipped here (no CUDA)."""

from __future__ import annotations

import random
import time

import pytest
import torch

from contract.sampling import SamplingParams
from engine.attention import TorchPagedAttention
from engine.config import EngineConfig
from engine.engine import Engine
from engine.kv_cache import PagedKVCache
from engine.layer_ready import record_layer_ready
from kv_transfer.integrity import device_checksum, region_checksum
from tests.checkpoints import write_checkpoint
from tests.kv_transfer.test_layer_ordering import DST_BLOCKS, LAYOUT, SRC_BLOCKS, Receiver, _sender

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-gpu")
    write_checkpoint(directory, "LlamaForCausalLM", seed=5)
    return str(directory)


def _prompts() -> list[list[int]]:
    rng = random.Random(2)
    return [[rng.randrange(3, 320) for _ in range(rng.randint(3, 70))] for _ in range(6)]


def _hf_greedy(model_dir: str, dtype: torch.dtype, prompt: list[int], new_tokens: int) -> list[int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).cuda().eval()
    ids = torch.tensor([prompt], device="cuda")
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def _engine(model_dir: str, dtype: str, **overrides) -> Engine:
    return Engine(EngineConfig(model=model_dir, dtype=dtype, device="cuda", num_kv_blocks=256, **overrides))


@pytest.mark.parametrize("graphs", [64, 0], ids=["cuda-graphs", "eager"])
def test_engine_fp32_is_token_identical_to_transformers(model_dir, graphs):
    engine = _engine(model_dir, "float32", cuda_graph_max_batch=graphs, max_num_batched_tokens=48)
    assert engine.runner.attention.name == "flex"
    assert (engine.runner.graphs is not None) == bool(graphs)
    prompts = _prompts()
    got = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))]
    expected = [_hf_greedy(model_dir, torch.float32, p, NEW_TOKENS) for p in prompts]
    assert [list(t) for t in got] == expected


def test_engine_bf16_first_tokens_match_transformers(model_dir):
    engine = _engine(model_dir, "bfloat16")
    prompts = _prompts()
    got = engine.generate(prompts, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    expected = [_hf_greedy(model_dir, torch.bfloat16, p, 3) for p in prompts]
    agree = sum(list(c.token_ids[:1]) == e[:1] for c, e in zip(got, expected))
    assert agree >= len(prompts) - 1, "bf16: first tokens disagree with transformers on more than one prompt"


def test_flex_matches_the_torch_path_on_cuda(model_dir):
    prompts = _prompts()
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    flex = _engine(model_dir, "float32", cuda_graph_max_batch=0, max_num_batched_tokens=40)
    torch_path = _engine(model_dir, "float32", cuda_graph_max_batch=0, max_num_batched_tokens=40)
    torch_path.runner.attention = TorchPagedAttention()
    assert [c.token_ids for c in flex.generate(prompts, params)] == [
        c.token_ids for c in torch_path.generate(prompts, params)
    ]


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
        for layer in range(LAYOUT.num_layers):
            torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the layer's K/V is written
            source.data[layer, SRC_BLOCKS] = expected[layer]
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


def test_device_checksum_agrees_across_pools_and_catches_a_flipped_byte():
    sender, receiver = PagedKVCache(LAYOUT, "cuda"), PagedKVCache(LAYOUT, "cuda")
    sender.data.normal_()
    receiver.write_regions(1, DST_BLOCKS, sender.read_regions(1, SRC_BLOCKS))
    assert region_checksum(sender, 1, SRC_BLOCKS) == region_checksum(receiver, 1, DST_BLOCKS)
    assert region_checksum(sender, 1, SRC_BLOCKS) == device_checksum(sender.read_regions(1, SRC_BLOCKS).cpu())
    receiver.regions[1, DST_BLOCKS[1], 17] ^= 4
    assert region_checksum(sender, 1, SRC_BLOCKS) != region_checksum(receiver, 1, DST_BLOCKS)
