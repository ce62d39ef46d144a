"""Smoke test of `splitserve bench engine`: a tiny in-process run on the demo preset."""

from __future__ import annotations

import json

from cluster.cli import main


def test_quick_bench_writes_rows_and_agrees_with_transformers(tmp_path, capsys):
    path = tmp_path / "bench.json"
    code = main(["bench", "engine", "--model", "demo", "--quick", "--json", str(path)])
    printed = capsys.readouterr().out

    assert code == 0, printed
    report = json.loads(path.read_text())
    assert report["sanity"]["agree"], report["sanity"]
    assert [row["name"] for row in report["rows"]] == ["prefill", "decode@1", "decode@4"]
    for row in report["rows"]:
        assert row["engine_tok_s"] > 0 and row["hf_tok_s"] > 0 and row["ratio"] > 0, row
        assert row["name"] in printed
    assert report["flops"]["matmul_flop_s"] > 0 and report["flops"]["engine_fraction_of_matmul"] > 0
    assert report["metadata"]["model"] == "demo" and report["metadata"]["dtype"] == "bfloat16"
