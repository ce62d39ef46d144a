"""What pyproject.toml promises about the package holds."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("contract", "engine", "kv_transfer", "worker_server", "prefill_worker", "decode_worker")
PACKAGES += ("router", "cluster", "protos", "bench")


def test_requires_python_is_the_oldest_python_the_code_runs_on():
    """vermin reads the code's syntax and standard-library use and names the oldest Python it needs."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert declared.startswith(">="), declared
    vermin = Path(sys.executable).with_name("vermin")
    out = subprocess.run(
        [str(vermin), "--no-tips", "--exclude-regex", "_pb2", *PACKAGES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    needed = re.search(r"Minimum required versions: (?:[^,\n]*, )?(3\.\d+)", out)
    assert needed, out
    assert declared == f">={needed[1]}", f"requires-python says {declared}, the code needs {needed[1]}"


def test_every_package_is_packaged():
    """A top-level package the setuptools include list misses would be absent from a base install."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert packages == {name.rstrip("*") for name in include}
