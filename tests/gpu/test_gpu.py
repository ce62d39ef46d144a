"""What only a GPU can show: the engine on CUDA (compiled FlexAttention, CUDA graphs for decode steps)
token-identical to transformers and to each other, the ordering contract with real CUDA events,
the device checksum across two pools. Run by scripts/gpu_check.sh (which leaves out the ``parity``
tests: its parity section runs the same comparison and records it); skipped here (no CUDA)."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from bench.gpu_check import compare_tokens, engine_greedy, hf_greedy, parity_prompts
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
    write_checkpoint(directory)
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


@pytest.mark.parametrize("transport", ["grpc", "bulk", "nixl"])
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


@pytest.mark.parametrize("transport", ["grpc", "bulk"])
def test_a_staged_push_of_a_completed_layer_lands(transport):
    """A push that passes no event (``COMPLETED``: the layer is already in the pool) from a VRAM pool:
    the side stream's wait on it is a no-op, and the bytes land."""
    receiver = Receiver(transport, device="cuda")
    source = PagedKVCache(LAYOUT, "cuda")
    source.data.normal_()
    sender = _sender(transport, source, receiver.layout)
    try:
        receiver.inbox.open("r", DST_BLOCKS)
        session = sender.open("r", receiver.ticket("r", transport))
        for layer in range(LAYOUT.num_layers):
            session.push_layer(source, layer, SRC_BLOCKS, DST_BLOCKS)
        session.commit(first_token_id=1, first_logprob=None, timeout=60)
        session.close(10)
        assert torch.equal(receiver.cache.data[:, DST_BLOCKS], source.data[:, SRC_BLOCKS])
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


def sample_every_field(device: str) -> dict:
    """The sampler over random logits on ``device`` with every SamplingParams field at once, a batch of
    three rows (seeded, unseeded, greedy with logprobs), 24 steps; a JSON-schema grammar to its end; and a reasoning
    model's row, its thinking closed by its budget before the grammar holds its answer. Returns what the GPU test
    checks (tests/engine covers the fields' meaning on CPU; test_thinking.py runs this on the CPU too)."""
    from contract import grammar as specs
    from engine.grammar import GrammarCompiler
    from engine.sampler import Sampler, SamplingState
    from engine.thinking import ThinkTags, Thoughts
    from engine.tokenizer import ByteTokenizer

    vocab, banned = 320, 7
    noise = torch.Generator(device=device).manual_seed(11)
    logits = [torch.randn(3, vocab, generator=noise, device=device) * 4 for _ in range(24)]
    for step in logits:
        step[:, banned] += 50.0  # the favourite of every row, unless its bias holds
    common = dict(
        max_tokens=24,
        top_k=40,
        top_p=0.9,
        min_p=0.01,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        repetition_penalty=1.2,
        logit_bias=((banned, -100.0),),
    )

    def run() -> tuple[list[list[int]], list]:
        params = [
            SamplingParams(temperature=0.8, seed=1234, **common),
            SamplingParams(temperature=1.0, **common),
            SamplingParams(temperature=0.0, logprobs=3, **common),
        ]
        states = [SamplingState(p, [5, 6, 7]) for p in params]
        sampler, tokens, logprobs = Sampler(vocab), [[], [], []], []
        for step in logits:
            result = sampler.sample(step, states)
            for row, (state, token) in enumerate(zip(states, result.token_ids)):
                state.record(token)
                tokens[row].append(token)
            logprobs.append(result.logprobs[2])
        return tokens, logprobs

    first, logprobs = run()
    again, _ = run()
    tokenizer = ByteTokenizer(vocab)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    schema["additionalProperties"] = False
    grammar = specs.json_schema(schema, "gpu")
    compiler = GrammarCompiler(tokenizer, vocab, tokenizer.eos_token_ids)
    params = SamplingParams(max_tokens=64, temperature=1.0, seed=3, grammar=grammar)
    state = SamplingState(params, [5], grammar=compiler.matcher(grammar, [5]))
    sampler, generated = Sampler(vocab), []
    while not state.grammar.terminated and len(generated) < 64:
        (token,) = sampler.sample(torch.randn(1, vocab, generator=noise, device=device) * 5, [state]).token_ids
        state.record(token)
        generated.append(token)
    # A reasoning model's row (engine/thinking.py): free while it thinks, </think> forced once 3 tokens are thought,
    # then the grammar holds the answer.
    tags = ThinkTags(open_id=300, close_id=301)
    thinking = SamplingParams(
        max_tokens=64, temperature=1.0, seed=4, grammar=grammar, thinking=True, thinking_token_budget=3
    )
    prompt = [5, tags.open_id]
    matcher, thoughts = compiler.matcher(grammar, prompt), Thoughts(tags.after(prompt), 3)
    thinker = SamplingState(thinking, prompt, grammar=matcher, thoughts=thoughts)
    thought: list[int] = []
    while not thinker.grammar.terminated and len(thought) < 64:
        (token,) = sampler.sample(torch.randn(1, vocab, generator=noise, device=device) * 5, [thinker]).token_ids
        thinker.record(token)
        thought.append(token)
    closed = thought.index(tags.close_id) if tags.close_id in thought else None
    return {
        "tokens": first,
        "seeded_repeats": first[0] == again[0],
        "greedy_repeats": first[2] == again[2],
        "banned_sampled": any(banned in row for row in first),
        "logprobs_complete": all(entry is not None for entry in logprobs),
        "grammar_text": tokenizer.decode(generated),
        "grammar_terminated": state.grammar.terminated,
        "thinking_closed_at": closed,
        "thinking_answer": None if closed is None else tokenizer.decode(thought[closed + 1 :]),
        "thinking_terminated": thinker.grammar.terminated,
    }


def test_every_sampling_field_runs_on_cuda_logits():
    """Seeds, penalties, bias, top-k/p/min-p, logprobs and a grammar mask on CUDA logits: each row's
    tokens are in the vocabulary, the bias holds, seeded and greedy rows repeat, the grammar's text parses."""
    got = sample_every_field("cuda")
    assert all(0 <= t < 320 for row in got["tokens"] for t in row)
    assert got["seeded_repeats"] and got["greedy_repeats"]
    assert not got["banned_sampled"]
    assert got["logprobs_complete"]
    assert got["grammar_terminated"]
    assert isinstance(json.loads(got["grammar_text"])["n"], int)
    assert got["thinking_closed_at"] is not None and got["thinking_closed_at"] <= 3 and got["thinking_terminated"]
    assert isinstance(json.loads(got["thinking_answer"])["n"], int)
