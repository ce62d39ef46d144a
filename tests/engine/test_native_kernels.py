"""The CPU decode-attention kernel (engine/native_kernels.py): exact against a float64 reference where
it builds, never used where it cannot run (the engine then attends with SDPA, as transformers expects).
Its use through the engine is covered by the greedy-vs-transformers tests (tests/engine/test_decode_scratch.py,
test_model_vs_hf.py), which run the decode scratch and so this kernel on CPU."""

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
from engine.engine import Engine
from tests.checkpoints import write_checkpoint


def _compiler_here() -> bool:
    return shutil.which("cc") is not None or shutil.which("gcc") is not None


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(12, 4, 64), (8, 8, 128), (4, 1, 16), (6, 2, 40)])
def test_kernel_matches_reference_or_is_absent(fresh_kernel, dtype, heads, kv_heads, dim):
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
