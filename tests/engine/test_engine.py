"""Engine paths that must not change the output: chunked prefill, prefix hits, preemption,
KV adopted from another engine; and the engine's handling of bad input."""

from __future__ import annotations

import random

import pytest

from contract.sampling import FieldError, SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidRequestError, ModelLoadError, NoFreeBlocksError
from tests.checkpoints import write_checkpoint

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    write_checkpoint(directory, "LlamaForCausalLM", seed=3)
    return str(directory)


def _engine(model_dir: str, **overrides) -> Engine:
    return Engine(EngineConfig(model=model_dir, dtype="float32", **{"num_kv_blocks": 256, **overrides}))


def _prompts(count: int, seed: int, low: int = 5, high: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randint(low, high))] for _ in range(count)]


@pytest.fixture(scope="module")
def reference(model_dir):
    prompts = _prompts(6, seed=11)
    engine = _engine(model_dir, enable_prefix_cache=False)
    return prompts, [r.token_ids for r in engine.generate(prompts, GREEDY)]


def test_chunked_prefill_matches_plain(model_dir, reference):
    prompts, expected = reference
    engine = _engine(model_dir, max_num_batched_tokens=7)
    assert [r.token_ids for r in engine.generate(prompts, GREEDY)] == expected


def test_prompt_chunks_beside_decodes_are_capped_and_match_plain(model_dir, reference):
    prompts, expected = reference
    engine = _engine(model_dir, max_num_batched_tokens=64, prefill_chunk_beside_decodes=8, max_num_seqs=3)
    steps = []
    schedule = engine.scheduler.schedule

    def recording():
        steps.append(schedule())
        return steps[-1]

    engine.scheduler.schedule = recording
    assert [r.token_ids for r in engine.generate(prompts, GREEDY)] == expected

    def prompt_tokens(step):
        return sum(len(c.token_ids) for c in step.chunks if len(c.token_ids) > 1)

    mixed = [s for s in steps if prompt_tokens(s) and any(len(c.token_ids) == 1 for c in s.chunks)]
    assert len(mixed) >= 3, "the prompts were meant to prefill beside decodes"
    assert max(prompt_tokens(s) for s in mixed) == 8
    assert max(prompt_tokens(s) for s in steps) > 8, "a step with no decode takes the whole budget"


def test_prompt_chunk_beside_decodes_must_be_positive():
    with pytest.raises(ValueError, match="prefill_chunk_beside_decodes must be >= 1, got 0"):
        EngineConfig(prefill_chunk_beside_decodes=0)


def test_prefix_cache_hits_match_plain(model_dir, reference):
    prompts, expected = reference
    engine = _engine(model_dir)
    engine.generate(prompts, GREEDY)  # fills the prefix cache
    again = engine.generate(prompts, GREEDY)
    assert [r.token_ids for r in again] == expected
    assert all(r.num_cached_tokens >= 16 * ((len(p) - 1) // 16) for r, p in zip(again, prompts))
    assert sum(r.num_cached_tokens for r in again) > 0


def test_shared_prefix_is_reused_across_requests(model_dir):
    rng = random.Random(5)
    prefix = [rng.randrange(3, 320) for _ in range(48)]
    prompts = [prefix + [rng.randrange(3, 320) for _ in range(9)] for _ in range(3)]
    plain = [r.token_ids for r in _engine(model_dir, enable_prefix_cache=False).generate(prompts, GREEDY)]
    engine = _engine(model_dir)
    first = engine.generate(prompts[:1], GREEDY)
    rest = engine.generate(prompts[1:], GREEDY)
    assert [r.token_ids for r in first + rest] == plain
    assert [r.num_cached_tokens for r in rest] == [48, 48]


def recorded_preemptions(engine: Engine) -> list[str]:
    """The ids of the requests ``engine``'s scheduler preempts from now on, in order, as it preempts them."""
    preempted = []
    preempt = engine.scheduler._preempt

    def recording(request):
        preempted.append(request.request_id)
        preempt(request)

    engine.scheduler._preempt = recording
    return preempted


def test_preemption_by_recompute_matches_plain(model_dir, reference):
    prompts, expected = reference
    engine = _engine(model_dir, num_kv_blocks=14, enable_prefix_cache=False)
    preempted = recorded_preemptions(engine)
    assert [r.token_ids for r in engine.generate(prompts, GREEDY)] == expected
    assert preempted, "the pool was sized so that preemption must happen"
    assert engine.stats().preemptions == len(preempted)  # what a worker's Stats and /metrics count
    assert engine.allocator.num_used_blocks == 0


def test_kv_adopted_from_another_engine_decodes_identically(model_dir, reference):
    """The decode worker's path: reserve blocks, receive KV layer by layer, adopt it, decode."""
    prompts, expected = reference
    decode = _engine(model_dir)

    def copy_layer(plan, layer, ready):
        ready.synchronize()
        for chunk in plan.chunks:
            source = prefill.requests[chunk.request_id].block_ids
            target = reservations[chunk.request_id].block_ids
            decode.kv_cache.data[layer, list(target)] = prefill.kv_cache.data[layer, source[: len(target)]]

    prefill = Engine(EngineConfig(model=model_dir, dtype="float32", num_kv_blocks=256), on_layer_done=copy_layer)
    reservations = {}
    for index, prompt in enumerate(prompts):
        reservations[f"r{index}"] = decode.reserve(f"r{index}", prompt, GREEDY)
        prefill.add_request(f"r{index}", prompt, SamplingParams(max_tokens=1, temperature=0.0))
    assert decode.stats().waiting_for_kv == len(prompts)
    first_tokens = {}
    while prefill.has_unfinished():
        for out in prefill.step():
            first_tokens[out.request_id] = out.token_ids[0]
    for request_id, token in first_tokens.items():
        decode.complete_reservation(request_id, token)
    produced = {rid: [] for rid in first_tokens}
    while decode.has_unfinished():
        for out in decode.step():
            produced[out.request_id].extend(out.token_ids)
    assert [produced[f"r{i}"] for i in range(len(prompts))] == [list(e) for e in expected]
    assert decode.allocator.num_used_blocks == 0


def test_reserve_without_room_allocates_nothing(model_dir):
    engine = _engine(model_dir, num_kv_blocks=8)
    engine.reserve("a", list(range(3, 100)), GREEDY)  # 7 blocks
    free_before = engine.allocator.num_free_blocks
    with pytest.raises(NoFreeBlocksError):
        engine.reserve("b", list(range(3, 60)), GREEDY)
    assert engine.allocator.num_free_blocks == free_before
    assert engine.abort("a")
    assert engine.allocator.num_used_blocks == 0


def test_abort_in_every_state_frees_blocks(model_dir):
    engine = _engine(model_dir, max_num_seqs=1)
    prompts = _prompts(3, seed=9, low=40, high=60)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"q{index}", prompt, GREEDY)
    engine.reserve("kv", prompts[0], GREEDY)
    engine.step()
    engine.step()  # q0 running, q1/q2 waiting, kv waiting for KV
    states = {rid: r.state.name for rid, r in engine.requests.items()}
    assert states == {"q0": "RUNNING", "q1": "WAITING", "q2": "WAITING", "kv": "WAITING_FOR_KV"}
    for request_id in ["q1", "kv", "q0", "q2"]:
        assert engine.abort(request_id)
    outputs = engine.step()
    assert {o.request_id: o.finish_reason for o in outputs} == {r: "abort" for r in ["q0", "q1", "q2", "kv"]}
    assert not engine.has_unfinished()
    assert engine.allocator.num_used_blocks == 0
    assert not engine.abort("q0")


def test_stop_strings_and_streaming_deltas(model_dir):
    engine = _engine(model_dir)
    prompt = _prompts(1, seed=4)[0]
    full = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0]
    stop = full.text[10:13]
    assert len(stop) == 3
    cut = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text


def test_stop_token_ids_and_max_tokens(model_dir):
    engine = _engine(model_dir)
    prompt = _prompts(1, seed=6)[0]
    full = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert len(full.token_ids) == 12 and full.finish_reason == "length"
    stopper = full.token_ids[5]
    cut = engine.generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=(stopper,))
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[: full.token_ids.index(stopper) + 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_sampling_params_are_typed_errors(kwargs, message):
    with pytest.raises(FieldError, match=message) as caught:
        SamplingParams(**kwargs)
    assert caught.value.field == message


def test_bad_requests_are_typed_errors(model_dir):
    engine = _engine(model_dir)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("e", [], GREEDY)
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        engine.add_request("long", list(range(3, 300)) * 2, SamplingParams(max_tokens=10))
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request("vocab", [5, 99999], GREEDY)
    engine.add_request("dup", [5, 6], GREEDY)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("dup", [5, 6], GREEDY)


def test_missing_or_malformed_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a preset"):
        Engine(EngineConfig(model=str(tmp_path / "nope")))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        Engine(EngineConfig(model=str(tmp_path)))
    (tmp_path / "config.json").write_text(
        '{"architectures": ["GPT2LMHeadModel"], "vocab_size": 10, "hidden_size": 8,'
        ' "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}'
    )
    with pytest.raises(ModelLoadError, match="supported: LlamaForCausalLM"):
        Engine(EngineConfig(model=str(tmp_path)))


def test_demo_preset_generates_deterministically():
    first = Engine(EngineConfig(model="demo")).generate(["hello"], SamplingParams(max_tokens=8, temperature=0.0))
    second = Engine(EngineConfig(model="demo")).generate(["hello"], SamplingParams(max_tokens=8, temperature=0.0))
    assert first[0].token_ids == second[0].token_ids and len(first[0].token_ids) >= 1


def test_fingerprint_tells_checkpoints_of_the_same_shape_apart(tmp_path):
    from engine.weights import load_model

    write_checkpoint(tmp_path / "a", "LlamaForCausalLM", seed=1)
    write_checkpoint(tmp_path / "b", "LlamaForCausalLM", seed=2)
    write_checkpoint(tmp_path / "c", "LlamaForCausalLM", seed=1)
    fingerprints = [load_model(str(tmp_path / name)).fingerprint for name in "abc"]
    assert fingerprints[0] != fingerprints[1]
    assert fingerprints[0] == fingerprints[2]
