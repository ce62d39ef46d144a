"""The committed gRPC stubs are exactly what protoc makes of the committed .proto files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_protos(tmp_path):
    (tmp_path / "protos").mkdir()
    protos = sorted((ROOT / "protos").glob("*.proto"))
    assert protos, "no .proto files found"
    for proto in protos:
        shutil.copy(proto, tmp_path / "protos" / proto.name)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I.",
        "--python_out=.",
        "--pyi_out=.",
        "--grpc_python_out=.",
        *(f"protos/{p.name}" for p in protos),
    ]
    subprocess.run(command, cwd=tmp_path, check=True)
    generated = sorted(p.name for p in (tmp_path / "protos").iterdir() if p.suffix in (".py", ".pyi"))
    committed = sorted(
        p.name for p in (ROOT / "protos").iterdir() if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    )
    assert generated == committed, "stub files differ from the .proto set: run protos/generate.sh"
    stale = [
        name for name in generated if (tmp_path / "protos" / name).read_bytes() != (ROOT / "protos" / name).read_bytes()
    ]
    assert not stale, f"stale stubs {stale}: run protos/generate.sh and commit the result"


def test_router_never_imports_torch():
    """The router uses these modules and must never import torch."""
    code = "import sys, router.server, router.openai_api; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
