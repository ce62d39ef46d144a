"""The CPU kernels (engine/native_kernels.py). Decode attention: exact against a float64 reference where it
builds. The bf16 elementwise steps: torch's results to the bit, where the CPU has AVX-512 BF16. Never
used where they cannot run; the engine then runs torch's kernels to the same tokens. The attention's use
through the engine is also covered by the greedy-vs-transformers tests (tests/engine/test_decode_scratch.py,
test_model_vs_hf.py), which run the decode scratch, and so this kernel, on CPU."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from contract.sampling import SamplingParams
from engine import native_kernels
from engine.attention import TorchPagedAttention
from engine.config import EngineConfig
from engine.decode_scratch import ScratchStep
from engine.engine import Engine
from engine.errors import EngineError
from engine.kv_cache import KVLayout, PagedKVCache
from tests.checkpoints import write_checkpoint


def _compiler_here() -> bool:
    return shutil.which("cc") is not None or shutil.which("gcc") is not None


def _cpu_has_avx512_bf16() -> bool:
    with open("/proc/cpuinfo") as cpuinfo:
        return any(line.startswith("flags") and " avx512_bf16" in line for line in cpuinfo)


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """native_kernels() forgets its process-wide choice; builds go to a private cache."""
    monkeypatch.setattr(native_kernels, "_loaded", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    yield
    native_kernels._loaded.clear()


def _reference(q, key, value, lengths, scale) -> torch.Tensor:
    """float64 attention of each row over its first ``lengths[b]`` keys, query heads grouped on KV heads."""
    batch, heads, dim = q.shape
    groups = heads // key.shape[1]
    out = torch.empty(batch, heads, dim, dtype=torch.float64)
    for b in range(batch):
        n = int(lengths[b])
        k = key[b, :, :n].double().repeat_interleave(groups, 0)  # [H, n, D]
        v = value[b, :, :n].double().repeat_interleave(groups, 0)
        weights = torch.softmax((q[b].double()[:, None, :] * k).sum(-1) * scale, dim=-1)  # [H, n]
        out[b] = (weights[:, :, None] * v).sum(1)
    return out


@pytest.mark.parametrize("mode", ["auto", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(12, 4, 64), (8, 8, 128), (4, 1, 16), (6, 2, 40)])
def test_kernel_matches_reference_or_is_absent(fresh_kernel, monkeypatch, mode, dtype, heads, kv_heads, dim):
    monkeypatch.setenv(native_kernels.CPU_KERNELS_ENV, mode)  # avx2: the path a CPU without AVX-512 BF16 runs
    kernel = native_kernels.native_kernels()
    if not _compiler_here():
        assert kernel is None  # nothing to build it with: SDPA runs
        return
    assert kernel is not None, "a C compiler is here, so the kernel must build and load"
    generator = torch.Generator().manual_seed(heads * dim)
    batch, capacity = 5, 80
    wide = torch.randn(batch, heads + 2 * kv_heads, dim, generator=generator).to(dtype)
    q = wide[:, :heads]  # strided, as the model's split of its fused projection hands it over
    storage = torch.randn(2, batch, kv_heads, capacity, dim, generator=generator).to(dtype)
    key, value = storage[0, :, :, :70], storage[1, :, :, :70]  # a width below the capacity, as the scratch's
    lengths = torch.tensor([70, 1, 9, 33, 64])
    assert kernel.accepts(q, key, value)
    scale = dim**-0.5
    out = kernel.decode_attention(q, key, value, lengths, scale)
    expected = _reference(q, key, value, lengths, scale)
    error = (out.double() - expected).abs().max().item()
    if dtype == torch.float32:
        assert error < 1e-5
    else:  # one bf16 rounding of the output; SDPA's own bf16 result is held to the same bound
        mask = (torch.arange(70)[None, :] < lengths[:, None])[:, None, None, :]
        grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim)
        sdpa = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scale)
        sdpa = sdpa.reshape(batch, heads, dim)
        bound = max((sdpa.double() - expected).abs().max().item(), 2**-8 * expected.abs().max().item())
        assert error <= bound


def test_kernel_refuses_shapes_it_cannot_take(fresh_kernel):
    q = torch.zeros(2, 4, 12)  # head_dim not a multiple of 8
    key = torch.zeros(2, 2, 5, 12)
    assert not native_kernels.NativeKernels.accepts(q, key, key)
    assert not native_kernels.NativeKernels.accepts(q.half(), key.half(), key.half())


@pytest.mark.parametrize("mode", ["auto", "avx2"])
def test_bf16_elementwise_kernels_give_torchs_results_to_the_bit(fresh_kernel, monkeypatch, mode):
    monkeypatch.setenv(native_kernels.CPU_KERNELS_ENV, mode)
    generator = torch.Generator().manual_seed(11)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16)

    x, stream, weight = randn(7, 256), randn(7, 256), (torch.rand(256, generator=generator) + 0.5).bfloat16()
    kernels = native_kernels.elementwise_for(x, stream, weight)
    if not _compiler_here():
        assert kernels is None  # torch's kernels run
        return
    assert kernels is not None
    assert kernels.isa == ("avx512" if mode == "auto" and _cpu_has_avx512_bf16() else "avx2")
    assert native_kernels.elementwise_for(x.float()) is None and native_kernels.elementwise_for(randn(3, 40)) is None

    def torch_norm(rows):
        return weight * F.rms_norm(rows.float(), (256,), eps=1e-6).to(torch.bfloat16)

    expected_stream = x + stream
    out, updated = kernels.add_rms_norm(x, stream, weight, 1e-6)
    assert updated is stream and torch.equal(stream, expected_stream), "the residual stream is updated in place"
    assert torch.equal(out, torch_norm(expected_stream))
    alone, same = kernels.add_rms_norm(x, None, weight, 1e-6)
    assert same is x and torch.equal(alone, torch_norm(x))

    for head_dim in (32, 64, 128):
        fused = randn(5, 11 * head_dim)
        heads = fused[:, : 8 * head_dim].view(5, 8, head_dim)  # strided: a slice of a fused projection's output
        cos, sin = randn(5, 1, head_dim), randn(5, 1, head_dim)
        half = head_dim // 2
        rotated = torch.cat((-heads[..., half:], heads[..., :half]), dim=-1)
        assert torch.equal(kernels.rotary(heads, cos, sin), heads * cos + rotated * sin), head_dim

    for cols in (517, 4096, 7):  # the greedy pick: torch's first maximum, a NaN being the maximum
        logits = randn(9, cols + 3)[:, :cols]
        logits[1, cols // 2] = logits[2, -1] = logits[2, 1] = float("nan")
        logits[3], logits[4], logits[5] = 1.0, -float("inf"), 0.0
        logits[5, 2], logits[6, -1] = -0.0, float("inf")
        assert kernels.argmax(logits) == logits.max(dim=-1).indices.tolist(), cols

    gate_up = torch.cat((randn(9, 96, scale=6.0), randn(9, 96)), dim=1)
    gate_up[0, :4] = torch.tensor([0.0, -100.0, 100.0, -0.0])  # e^x's clamps, and silu(0)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(kernels.silu_mul(gate_up), F.silu(gate) * up)


def _greedy(engine: Engine) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for index, prompt in enumerate([[5, 6, 7, 8], [9, 10], list(range(3, 40))]):
        engine.add_request(f"r{index}", prompt, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.token_ids)
    return tokens


def test_without_a_compiler_the_engine_gets_the_same_tokens_from_sdpa(fresh_kernel, monkeypatch, tmp_path, caplog):
    directory = tmp_path / "model"
    write_checkpoint(directory, "LlamaForCausalLM", seed=3)
    config = EngineConfig(model=str(directory), dtype="float32", num_kv_blocks=32)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.INFO, logger="engine.native_kernels"):
        sdpa_engine = Engine(config)
    assert "torch's (native kernels unavailable: building cpu_kernels.c" in caplog.text
    assert isinstance(sdpa_engine.runner.attention, TorchPagedAttention)
    assert sdpa_engine.runner.attention.native is None
    with_sdpa = _greedy(sdpa_engine)
    assert sorted(len(t) for t in with_sdpa.values()) == [8, 8, 8]

    monkeypatch.delenv("CC")
    native_kernels._loaded.clear()
    native_engine = Engine(config)
    assert (native_engine.runner.attention.native is not None) == _compiler_here()
    assert _greedy(native_engine) == with_sdpa


def test_a_bf16_engine_gets_the_same_tokens_from_either_build_and_from_torchs_steps(fresh_kernel, monkeypatch):
    """demo in bf16: every norm, rotary, SiLU, K/V store and greedy pick native, on this CPU's best build and on
    the AVX2 build, against the same engine with torch's (attention is native throughout, on its AVX2 path at
    head_dim 32: it is not bit-exact to SDPA, and bf16 near-ties would flip on that)."""
    config = EngineConfig(model="demo", dtype="bfloat16", num_kv_blocks=32)
    kernels = native_kernels.native_kernels()
    assert (kernels is not None) == _compiler_here()
    best = _greedy(Engine(config))
    monkeypatch.setenv(native_kernels.CPU_KERNELS_ENV, "avx2")
    assert _greedy(Engine(config)) == best
    avx2 = native_kernels.native_kernels()
    if avx2 is not None:
        monkeypatch.setattr(avx2, "bf16_elementwise", False)
    assert _greedy(Engine(config)) == best


def test_the_kernel_choice_is_honoured_or_refused(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv(native_kernels.CPU_KERNELS_ENV, "torch")
    with caplog.at_level(logging.INFO, logger="engine.native_kernels"):
        assert native_kernels.native_kernels() is None
    assert "SPLITSERVE_CPU_KERNELS=torch" in caplog.text
    engine = Engine(EngineConfig(model="demo", num_kv_blocks=16))
    assert engine.runner.attention.native is None
    monkeypatch.setenv(native_kernels.CPU_KERNELS_ENV, "fast")
    with pytest.raises(EngineError, match="SPLITSERVE_CPU_KERNELS must be one of auto, avx2, torch, got 'fast'"):
        Engine(EngineConfig(model="demo", num_kv_blocks=16))


def test_native_kv_store_writes_what_the_pool_and_the_scratch_write(fresh_kernel):
    """Prefill rows then decodes, NaN and inf among them: the pool and the decode scratch end up as
    PagedKVCache.write and ScratchStep.append leave them (finite values, the same bytes)."""
    layout = KVLayout(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=32, dtype="bfloat16")
    generator = torch.Generator().manual_seed(5)
    fused = torch.randn(7, 6, 32, generator=generator).bfloat16()  # [tokens, q heads + k + v, D]
    fused[1, 4, 3], fused[5, 5, 0], fused[6, 4, 7] = float("nan"), float("inf"), -float("inf")
    key, value = fused[:, 2:4], fused[:, 4:6]  # strided, as the model's split hands them over
    slot_block, slot_offset = torch.tensor([0, 0, 0, 3, 5, 6, 7]), torch.tensor([0, 1, 2, 0, 3, 1, 2])
    decode_begin, rows, positions = 4, torch.tensor([2, 0, 1]), torch.tensor([3, 9, 6])

    def scratch_step():
        storage = torch.zeros(2, 2, 3, 2, 16, 32, dtype=torch.bfloat16)  # [layers, K|V, rows, heads, positions, D]
        return ScratchStep(storage, rows, positions, None, 10, None, positions + 1)

    expected_cache, expected_step = PagedKVCache(layout), scratch_step()
    finite = expected_cache.write(1, key, value, slot_block, slot_offset)
    expected_step.append(1, finite[decode_begin:, 0], finite[decode_begin:, 1])
    kernels = native_kernels.native_kernels()
    cache, step = PagedKVCache(layout), scratch_step()
    stored = kernels is not None and kernels.store_kv(cache, 1, key, value, slot_block, slot_offset, step, decode_begin)
    assert stored == _compiler_here()
    if stored:
        assert torch.equal(cache.data, expected_cache.data) and torch.equal(step.storage, expected_step.storage)
        assert torch.isfinite(cache.data).all() and cache.data[1, 3].abs().sum() > 0
        # Not host memory (a GPU's, here "meta"): the kernel declines, and torch's path stores.
        elsewhere = key.to("meta"), value.to("meta")
        assert not kernels.store_kv(cache, 1, *elsewhere, slot_block, slot_offset, None, decode_begin)
