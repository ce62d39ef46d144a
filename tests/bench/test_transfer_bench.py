"""Smoke test of `splitserve bench transfer`: tiny sizes, the demo model, real processes."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main


def test_quick_transfer_bench_writes_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("bench.transfer_bench.TARGET_MIN_MIB", 1)  # judge the quick sizes too
    path = tmp_path / "transfer.json"
    code = main(["bench", "transfer", "--quick", "--model", "demo", "--json", str(path)])
    printed = capsys.readouterr().out

    assert code == 0, printed
    report = json.loads(path.read_text())
    paths = {(row["path"], row["checksums"]) for row in report["bandwidth"]}
    transports = {(t, checked) for t in ("grpc", "bulk", "nixl") for checked in (True, False)}
    assert paths == {("memcpy", None), ("tcp", None), ("cma", None), ("cma+xxh3", None)} | transports
    assert {row["size_mib"] for row in report["bandwidth"]} == {1, 4}
    for row in report["bandwidth"]:
        assert row["gb_s"] > 0 and row["vs_memcpy"] > 0 and row["vs_tcp"] > 0, row
        assert len(row["seconds"]) == len(row["cpu_seconds"]) == report["metadata"]["repeats"]
        assert row["cpu_ms"] > 0, row
        if row["path"] == "nixl":  # both ends work: the receiver's share is counted too
            memcpy = next(r for r in report["bandwidth"] if r["path"] == "memcpy" and r["size_mib"] == row["size_mib"])
            assert row["cpu_ms"] > memcpy["cpu_ms"], (row, memcpy)
    assert {(t["path"], t["size_mib"]) for t in report["targets"]} == {(p, s) for p in ("nixl", "bulk") for s in (1, 4)}
    for target in report["targets"]:
        row = next(
            r
            for r in report["bandwidth"]
            if r["path"] == target["path"] and r["checksums"] is True and r["size_mib"] == target["size_mib"]
        )
        assert target["cpu_ms"] == row["cpu_ms"] and target["cores"] >= 1
        assert target["cpu_allows"] > 0
        if target["path"] == "nixl":  # read against the kernel copy it rides on, too
            cma = next(r for r in report["bandwidth"] if r["path"] == "cma" and r["size_mib"] == target["size_mib"])
            assert target["vs_copy"] == pytest.approx(row["gb_s"] / cma["gb_s"])
            assert target["copy_ratio"] == pytest.approx(cma["vs_memcpy"])
            floor = next(
                r for r in report["bandwidth"] if r["path"] == "cma+xxh3" and r["size_mib"] == target["size_mib"]
            )
            assert target["floor_ratio"] == pytest.approx(floor["vs_memcpy"])
        else:
            assert target["vs_copy"] is None and target["floor_ratio"] is None
    combos = {(r["transport"], r["push_mode"], r["prompt_tokens"], r["decode_load"]) for r in report["exposure"]}
    idle = {(t, m, n, 0) for t in ("grpc", "nixl") for m in ("layer", "request") for n in (64, 256)}
    assert combos == idle | {(t, "layer", 64, 4) for t in ("grpc", "nixl")}  # beside 4 running decodes
    for row in report["exposure"]:
        assert row["median_prefill_ms"] > 0 and row["median_exposed_ms"] > 0 and row["exposed_share"] > 0, row
        assert row["kv_bytes"] > 0, row
    assert "of cma, its kernel copy" in printed and "both hashes at once reach" in printed
    assert "grpc (xxh3)" in printed and "exposed/prefill" in printed and "cpu ms" in printed
    assert "beside 4 running decodes" in printed


def test_a_device_is_honoured_for_the_bandwidth_rows_or_refused(capsys):
    """--device moves both ends' pools (CUDA: VRAM); the exposure rows run CPU workers, so a device
    there is refused, naming the flag, as is a device this torch cannot use (exit status 2: bad arguments)."""
    import torch

    def refusal(*argv: str) -> str:
        assert main(["bench", "transfer", *argv]) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "--skip-exposure" in refusal("--device", "cuda")
    if not torch.cuda.is_available():
        assert "no CUDA device" in refusal("--skip-exposure", "--device", "cuda:0")
    assert "--device 'warp-drive'" in refusal("--skip-exposure", "--device", "warp-drive")
