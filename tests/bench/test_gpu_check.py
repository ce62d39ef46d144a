"""scripts/gpu_check.sh runs on CPU (``--dry-run``: DRAM instead of VRAM), so CI proves the script is
not broken: every section passes and its numbers land in OUT_DIR; a missing or too-old wheel is a FAIL
line naming it; a section that runs out of time is a FAIL and the sections after it still run; a wheel
the python lacks is installed offline into an overlay that still sees this python's torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
PREFLIGHT = ROOT / "scripts" / "gpu_preflight.py"


def _run_script(out: Path, *args: str, timeout: float = 400, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHON=sys.executable, **env)
    environment.pop("OUT", None)
    command = ["bash", str(SCRIPT), "--dry-run", *args, str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=ROOT)


def test_the_dry_run_passes_every_section_and_writes_its_numbers(tmp_path):
    done = _run_script(tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    sections = ("versions", "deps", "imports", "flex-probe", "parity", "disaggregated", "transfer", "kv-bench")
    sections += ("decode",)
    for section in sections:
        assert f"{section} " in summary and "FAIL" not in summary, summary
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(row["ok"] for row in report["parity"]["rows"])
    disaggregated = report["disaggregated"]["rows"]
    assert [row["transport"] for row in disaggregated] == ["nixl", "grpc"]
    assert all(row["identical"] == row["prompts"] for row in disaggregated)
    assert all(request["kv_bytes_sent"] > 0 for row in disaggregated for request in row["requests"])
    assert disaggregated[0]["ucx"]["transports_named"], "UCX_PROTO_INFO named no transport for NIXL's writes"
    assert report["transfer"]["intact"] and report["transfer"]["ucx"]["transports_named"]
    assert {(row["path"], row["checksums"]) for row in report["kv-bench"]["rows"]} >= {("bulk", True), ("nixl", True)}
    # a step faster than the roofline would mean bytes or bandwidth miscounted
    assert 0 < report["decode"]["roofline_fraction"] <= 1.0
    assert report["decode"]["graphs"]["replays"] == 0  # CPU: no CUDA graphs, and the row says so
    assert report["decode"]["mixed_step_ms"] > 0 and report["decode"]["decode_step_ms"] > 0
    assert (tmp_path / "pytest-junit.xml").exists() and (tmp_path / "logs" / "worker-nixl-decode.log").exists()


def test_a_missing_wheel_is_named_and_a_timed_out_section_does_not_stop_the_rest(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("splitserve-absent-dist>=1.0\nxxhash>=999  # import: xxhash\n")
    out = tmp_path / "out"
    done = _run_script(
        out,
        "--only",
        "deps,parity,decode",
        GPU_CHECK_REQUIREMENTS=str(requirements),
        WHEELS_DIR=str(tmp_path / "no-wheels"),
        GPU_CHECK_TIMEOUT_PARITY="1",
    )
    output = done.stdout
    assert done.returncode == 1, output[-4000:]
    assert "FAIL: splitserve-absent-dist>=1.0: not installed, and WHEELS_DIR=" in output
    assert "FAIL: xxhash>=999: installed " in output and "does not satisfy >=999" in output
    assert "FAIL: parity timed out after 1 s" in output
    table = (out / "summary.txt").read_text()
    assert "parity         FAIL (timed out after 1 s)" in table
    assert "decode         PASS" in table, table
    assert "deps           FAIL (exit 1)" in table


def _wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel holding one module ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}.py", "VALUE = 42\n")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        archive.writestr(f"{info}/WHEEL", wheel)
        archive.writestr(f"{info}/RECORD", f"{name}.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return path


def _preflight(python: str, *args: str, no_pip: bool = False) -> subprocess.CompletedProcess:
    if no_pip:  # as on a python without pip: the wheels are unpacked instead
        code = "import sys, gpu_preflight as g; g._has_pip = lambda: False; sys.exit(g.main(sys.argv[1:]))"
        command = [python, "-c", code, *args]
    else:
        command = [python, str(PREFLIGHT), *args]
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'scripts'}{os.pathsep}{ROOT}")
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)


def test_a_wheel_from_wheels_dir_goes_into_an_overlay_that_still_sees_torch(tmp_path):
    for no_pip in (False, True):
        name = "splitserve_overlay_probe"
        requirements = tmp_path / "requirements.txt"
        requirements.write_text(f"{name.replace('_', '-')}>=1.0  # import: {name}\nxxhash>=3.4\n")
        wheels, overlay = tmp_path / "wheels", tmp_path / f"overlay-{no_pip}"
        _wheel(wheels, name)
        done = _preflight(sys.executable, "install", str(requirements), str(wheels), str(overlay), no_pip=no_pip)
        assert done.returncode == 0, done.stdout + done.stderr
        python = done.stdout.strip().splitlines()[-1].removeprefix("PYTHON ")
        assert Path(python).parent.parent == overlay
        checked = _preflight(python, "imports", str(requirements), "engine.engine")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        sees = subprocess.run([python, "-c", f"import torch, {name}; print({name}.VALUE)"], capture_output=True)
        assert sees.stdout.strip() == b"42", sees.stderr


def test_the_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_nixl_requirement_follows_torchs_cuda_major(tmp_path, monkeypatch):
    """NIXL's UCX links one CUDA runtime: the preflight asks for the wheel that matches the torch it runs
    with, and kv_transfer imports the same build (a CPU torch here: the default, nixl-cu12)."""
    sys.path.insert(0, str(PREFLIGHT.parent))
    try:
        import gpu_preflight
    finally:
        sys.path.remove(str(PREFLIGHT.parent))
    from kv_transfer.nixl_agent import nixl_build_name

    requirements = tmp_path / "requirements.txt"
    requirements.write_text("nixl-cu{cuda}>=0.6  # import: nixl_cu{cuda}\n")
    monkeypatch.setattr(gpu_preflight, "torch_cuda_major", lambda: "13")
    (nixl,) = gpu_preflight.read_requirements(requirements)
    assert (nixl.name, nixl.module) == ("nixl-cu13", "nixl_cu13")
    assert nixl_build_name("13.0") == "nixl_cu13" and nixl_build_name("12.8") == "nixl_cu12"
    assert nixl_build_name(None) == "nixl_cu12"  # this machine: CPU torch, nixl-cu12 installed
