"""The CUDA-graph decode path's bucketing and padding, on CPU: a decode step padded to its bucket
gives the real rows the same logits and writes no live block (capture/replay: tests/gpu/)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from contract.sampling import SamplingParams
from engine.config import EngineConfig
from engine.cuda_graphs import CudaGraphDecoder, batch_buckets, bucket_for, pad_decode_step, width_bucket
from engine.engine import Engine
from tests.checkpoints import write_checkpoint


def test_buckets():
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_buckets(0) == ()
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    assert [width_bucket(w) for w in (1, 2, 3, 4, 5, 17)] == [1, 2, 4, 4, 8, 32]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-graphs")
    write_checkpoint(directory, "LlamaForCausalLM", seed=9)
    return Engine(EngineConfig(model=str(directory), dtype="float32", num_kv_blocks=64))


def test_padded_decode_step_gives_the_real_rows_the_same_logits(engine):
    for index, length in enumerate((5, 20, 33)):
        engine.add_request(f"g{index}", list(range(3, 3 + length)), SamplingParams(max_tokens=4, temperature=0.0))
    engine.step()  # prefill
    plan = engine.scheduler.schedule()
    inputs = engine.runner.prepare(plan.chunks)
    # The gather path, as graphs run it (on CPU the decodes would read the decode scratch instead, which
    # needs no block table).
    table, mask = engine.runner._decode_tensors(plan.chunks)
    gather = dataclasses.replace(inputs.batch, plan=None, decode_block_table=table, decode_mask=mask)
    inputs = dataclasses.replace(inputs, batch=gather)
    (scratch,) = engine.allocator.allocate(1)
    model, cache = engine.runner.model, engine.kv_cache
    plain = model(inputs.input_ids, inputs.positions, cache, inputs.batch, inputs.logits_rows)
    before = cache.data.clone()
    decoder = CudaGraphDecoder(model, cache, max_batch=8, scratch_block=scratch, max_width=16)
    shape = decoder.shape_for(inputs)
    assert shape == (4, width_bucket(inputs.batch.decode_block_table.shape[1]))
    padded = pad_decode_step(inputs, shape[0], shape[1] * 2, cache.layout.block_size, scratch)
    logits = model(padded.input_ids, padded.positions, cache, padded.batch, padded.logits_rows)
    torch.testing.assert_close(logits[:3], plain, rtol=1e-5, atol=1e-5)
    # The real rows' own slots are written again with their K/V, which a matmul over 4 rows instead of 3
    # may round differently (AVX2 kernels do): only values that moved beyond that count as written.
    moved = ~torch.isclose(cache.data, before, rtol=1e-5, atol=1e-5, equal_nan=True)
    changed = moved.flatten(2).any(-1).any(0).nonzero().flatten().tolist()
    assert changed in ([], [scratch]), f"padding wrote live blocks {changed}"
    engine.scheduler.step_done(plan, engine.requests)
    engine.allocator.free([scratch])


def test_steps_with_a_prefill_or_too_large_run_eagerly(engine):
    engine.add_request("e0", list(range(3, 40)), SamplingParams(max_tokens=2, temperature=0.0))
    plan = engine.scheduler.schedule()
    inputs = engine.runner.prepare(plan.chunks)
    decoder = CudaGraphDecoder(engine.runner.model, engine.kv_cache, max_batch=8, scratch_block=0, max_width=16)
    assert decoder.shape_for(inputs) is None  # a prefill chunk
    while engine.has_unfinished():
        engine.step()
