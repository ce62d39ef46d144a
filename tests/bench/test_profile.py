"""``splitserve bench profile``: the fits the simulator reads, and the mixed-step term (a prompt chunk
beside running decodes) measured at several chunk sizes, so a capped chunk
(``--prefill-chunk-beside-decodes``) is not charged what a full one costs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.profile import fit_mixed, link_from_transfer_report
from bench.sim.latency import Chunk, FittedModel, Step
from bench.sim.transfer import transports_from_report

ROOT = Path(__file__).resolve().parents[2]
PARTS = FittedModel("parts", prefill=(0.02, 1.5e-3, 1e-7, 3e-7), decode=(0.03, 2e-3, 1e-6))


def _mixed_step(tokens: int, batch: int = 4, context: int = 512) -> Step:
    return Step((Chunk(tokens),), batch, batch * (context + 1), context + 1)


def test_quick_profile_measures_mixed_steps_at_several_chunk_sizes(tmp_path):
    path = tmp_path / "profile.json"
    command = [sys.executable, "-m", "cluster.cli", "bench", "profile", "--quick", "--json", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)  # its own torch threads
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "mixed term" in done.stdout
    report = json.loads(path.read_text())
    fit, rows = report["fits"]["1"], report["points"]["1"]["mixed"]
    assert len({row["tokens"] for row in rows}) >= 2, rows  # a small chunk and a full one
    assert all(row["seconds"] > 0 and len(row["all_seconds"]) >= 1 for row in rows)

    # Each row's composition is the simulator's own step time with no mixed term: one formula.
    parts = FittedModel(
        "parts", tuple(fit["prefill"][k] for k in "abcd"), tuple(fit["decode"][k] for k in "abc")
    )  # fmt: skip
    for row in rows:
        step = _mixed_step(row["tokens"], row["batch"], row["context"])
        assert row["predicted_seconds"] == pytest.approx(parts.step_s(step), rel=1e-12)

    # The simulator reads both coefficients of the term (scaled with the rest for the host's toll).
    model = FittedModel.from_profile(report, 1)
    measured = [*(fit["prefill"][k] for k in "abcd"), *(fit["decode"][k] for k in "abc")]
    largest = max(range(len(measured)), key=lambda i: abs(measured[i]))  # a term of a noisy fit can come out 0
    scale = (*model.prefill, *model.decode)[largest] / measured[largest]
    assert [*model.prefill, *model.decode] == pytest.approx([c * scale for c in measured])
    assert model.mixed == pytest.approx(fit["mixed"]["a"] * scale)
    assert model.mixed_per_token == pytest.approx(fit["mixed"]["b"] * scale)


def test_the_mixed_term_is_fitted_over_the_chunk_size():
    rows = [
        {"tokens": t, "seconds": p + 0.004 + 3e-5 * t, "predicted_seconds": p}
        for t, p in ((32, 0.05), (128, 0.11), (496, 0.4), (128, 0.2))
    ]
    fit = fit_mixed(rows)
    assert fit["a"] == pytest.approx(0.004, abs=1e-9) and fit["b"] == pytest.approx(3e-5, rel=1e-6)
    assert fit["max_abs_residual_s"] < 1e-9
    one_size = fit_mixed([dict(row, tokens=496) for row in rows])
    assert one_size["b"] == 0.0 and one_size["a"] == pytest.approx(0.004 + 3e-5 * 128)  # the median


def test_a_small_chunk_beside_decodes_pays_a_small_share_of_the_mixed_term():
    model = FittedModel("m", PARTS.prefill, PARTS.decode, mixed=0.002, mixed_per_token=4e-5)
    extra = {t: model.step_s(_mixed_step(t)) - PARTS.step_s(_mixed_step(t)) for t in (16, 496)}
    assert extra[16] == pytest.approx(0.002 + 16 * 4e-5) and extra[496] == pytest.approx(0.002 + 496 * 4e-5)
    decodes_alone, prompt_alone = Step((), 4, 4 * 513, 513), Step((Chunk(16),))
    assert model.step_s(decodes_alone) == PARTS.step_s(decodes_alone)  # the term is for mixed steps only
    assert model.step_s(prompt_alone) == PARTS.step_s(prompt_alone)
    # However negative the fitted term, a mixed step takes at least as long as either of its parts alone.
    overlapping = FittedModel("o", PARTS.prefill, PARTS.decode, mixed=-0.05)
    longer_part = max(PARTS.step_s(decodes_alone), PARTS.step_s(prompt_alone))
    assert overlapping.step_s(_mixed_step(16)) == pytest.approx(longer_part)
    # Scaling a model scales the term with it.
    assert model.times(2.0).step_s(_mixed_step(64)) == pytest.approx(2.0 * model.step_s(_mixed_step(64)))


def test_the_profile_takes_the_grpc_transports_bytes_per_s_as_the_transfer_table_does(tmp_path):
    """Workers move gRPC-transport KV on its bulk TCP links: the profile's link (the simulator's, for
    CPU replays) and the GPU transfer table read the same row of a ``bench transfer`` report."""

    def row(path: str, gb_s: float, checksums: bool = True, mib: int = 16) -> dict:
        return {"path": path, "checksums": checksums, "size_bytes": mib << 20, "size_mib": mib, "gb_s": gb_s}

    report = tmp_path / "transfer.json"
    rows = [row("grpc", 0.3), row("bulk", 2.5), row("bulk", 3.1, checksums=False), row("bulk", 1.0, mib=1)]
    report.write_text(json.dumps({"bandwidth": rows}))
    link = link_from_transfer_report(str(report))
    table = next(t for t in transports_from_report(str(report)) if t.name == "grpc")
    assert link["bytes_per_s"] == table.bytes_per_s == 2.5e9 and link["source"] == table.source

    report.write_text(json.dumps({"bandwidth": [row("grpc", 0.3)]}))  # an older report: the PushKV path only
    assert link_from_transfer_report(str(report))["bytes_per_s"] == 0.3e9
    report.write_text(json.dumps({"bandwidth": [row("nixl", 4.0)]}))
    with pytest.raises(ValueError, match="no gRPC \\(with checksums\\) bandwidth row"):
        link_from_transfer_report(str(report))
