"""bf16 projections on a CPU without bf16 arithmetic (every AVX2-only x86): torch multiplies a bf16 ``F.linear`` there
one row at a time, ~5x slower than float32 at prefill sizes, so ``engine.model.Linear`` takes a product of
WIDEN_BF16_FROM_ROWS rows or more in float32 and rounds it to bf16 once; fewer rows (decode) stay on the bf16 product,
which reads half the bytes. (The speed is a benchmark: `bench engine`, and the numbers in the README.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import model as model_module
from engine.model import WIDEN_BF16_FROM_ROWS, Linear


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_the_row_by_row_cpus_are_the_ones_without_bf16_arithmetic():
    flags = _cpu_flags()
    has_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert model_module._cpu_multiplies_bf16_row_by_row() == (not has_bf16), sorted(flags & {"avx512f", "avx2"})


@pytest.mark.parametrize("bias", [False, True])
def test_from_the_threshold_a_bf16_product_is_taken_in_float32_and_rounded_once(monkeypatch, bias):
    monkeypatch.setattr(model_module, "_cpu_multiplies_bf16_row_by_row", lambda: True)
    generator = torch.Generator().manual_seed(3)
    layer = Linear(96, 80, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(80, 96, generator=generator))
        if bias:
            layer.bias.copy_(torch.randn(80, generator=generator))
    for rows in (1, WIDEN_BF16_FROM_ROWS - 1, WIDEN_BF16_FROM_ROWS, 4 * WIDEN_BF16_FROM_ROWS + 5):
        x = torch.randn(rows, 96, generator=generator).to(torch.bfloat16)
        with torch.inference_mode():
            out = layer(x)
        b = None if layer.bias is None else layer.bias.float()
        widened = F.linear(x.float(), layer.weight.float(), b).to(torch.bfloat16)
        expected = widened if rows >= WIDEN_BF16_FROM_ROWS else F.linear(x, layer.weight, layer.bias)
        assert out.dtype == torch.bfloat16 and torch.equal(out, expected), rows
    # a batch of sequences ([B, T, H]) counts its rows, not its last dimension's
    x = torch.randn(2, WIDEN_BF16_FROM_ROWS // 2, 96, generator=generator).to(torch.bfloat16)
    with torch.inference_mode():
        out = layer(x)
    b = None if layer.bias is None else layer.bias.float()
    assert torch.equal(out, F.linear(x.float(), layer.weight.float(), b).to(torch.bfloat16))


def test_a_cpu_with_bf16_arithmetic_and_float32_models_keep_the_plain_product(monkeypatch):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(4 * WIDEN_BF16_FROM_ROWS, 64, generator=generator)
    for row_by_row, dtype in ((False, torch.bfloat16), (True, torch.float32)):
        monkeypatch.setattr(model_module, "_cpu_multiplies_bf16_row_by_row", lambda row_by_row=row_by_row: row_by_row)
        layer = Linear(64, 48, bias=False).to(dtype)
        with torch.inference_mode():
            assert torch.equal(layer(x.to(dtype)), F.linear(x.to(dtype), layer.weight))
