"""A failure stays with the request it belongs to: the engine on its loop, a real model, no fakes.

The fault is real bad state — a token id the model has no embedding for in one request's input, as a
peer's unchecked first token once put there — so the step that runs it fails inside the model."""

from __future__ import annotations

import random

import pytest

from contract.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.loop import EngineLoop, RequestFailed
from engine.request import RequestState
from tests.checkpoints import write_checkpoint

VOCAB = 320
PARAMS = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-isolation")
    write_checkpoint(directory, "LlamaForCausalLM", seed=7)
    return str(directory)


def _engine(model_dir: str) -> Engine:
    return Engine(EngineConfig(model=model_dir, dtype="float32", num_kv_blocks=128))


def _prompts(count: int) -> list[list[int]]:
    rng = random.Random(17)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(5, 40))] for _ in range(count)]


def _poison(engine: Engine, request_id: str) -> None:
    """Loop thread: the request's next input is a token outside the vocabulary."""
    request = engine.requests[request_id]
    assert request.state is RequestState.RUNNING, "the request should be mid-stream"
    request.output_token_ids.append(VOCAB + 5)


def _rest(stream) -> list[int]:
    return [t for output in stream for t in output.token_ids]


@pytest.mark.parametrize("victim", [0, 2])
def test_a_request_that_breaks_its_step_fails_alone(model_dir, victim):
    prompts = _prompts(4)
    reference = [c.token_ids for c in _engine(model_dir).generate(prompts, PARAMS)]
    engine = _engine(model_dir)
    loop = EngineLoop(engine).start()
    try:
        ids = [f"r{i}" for i in range(len(prompts))]
        streams = [loop.add_request(rid, prompt, PARAMS) for rid, prompt in zip(ids, prompts)]
        firsts = [list(stream.get(timeout=60).token_ids) for stream in streams]
        loop.call(lambda e: _poison(e, ids[victim]))

        with pytest.raises(RequestFailed, match=f"request {ids[victim]}"):
            _rest(streams[victim])
        for index, stream in enumerate(streams):
            if index != victim:
                assert firsts[index] + _rest(stream) == list(reference[index]), f"request {index} went wrong"
        stats = loop.call(lambda e: e.stats())
        assert stats.blocks_used == 0 and stats.running == 0 and not loop.call(lambda e: e.requests)

        again = loop.add_request("after", prompts[victim], PARAMS)  # and the engine serves on
        assert _rest(again) == list(reference[victim])
    finally:
        loop.stop()


def test_a_lone_request_that_breaks_its_step_fails_and_frees_its_blocks(model_dir):
    engine = _engine(model_dir)
    loop = EngineLoop(engine).start()
    try:
        stream = loop.add_request("alone", _prompts(1)[0], PARAMS)
        stream.get(timeout=60)
        loop.call(lambda e: _poison(e, "alone"))
        with pytest.raises(RequestFailed):
            _rest(stream)
        assert loop.call(lambda e: e.stats()).blocks_used == 0
    finally:
        loop.stop()
