"""scripts/run_tests.py (how `make test` runs pytest) runs every test file exactly once, and every one that may start
Ray on the same side."""

import functools
import re
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNER = runpy.run_path(str(ROOT / "scripts" / "run_tests.py"))
# What starts a Ray cluster in a test: Ray itself, the cluster tests' harness, or `splitserve up`.
STARTS_RAY = re.compile(r"ray\.init|cluster_utils|import ray|from ray|tests\.cluster\.harness|\"up\"")


@functools.cache
def _files_collected(args: tuple[str, ...]) -> tuple[str, ...]:
    """The test files whose tests pytest collects with these arguments, once per file each time it collects it."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    tests = [line for line in out.stdout.splitlines() if "::" in line]
    return tuple(dict.fromkeys(test.split("::")[0] for test in tests))


def _runs() -> dict[str, tuple[str, ...]]:
    return {name: tuple(args) for phase in RUNNER["pytest_runs"]([]) for name, args in phase}


def _test_files() -> set[str]:
    return {path.relative_to(ROOT).as_posix() for path in (ROOT / "tests").rglob("test_*.py")}


def test_the_runs_together_collect_every_test_file_once():
    runs = _runs()
    assert len(runs) >= 2
    collected = [path for args in runs.values() for path in _files_collected(args)]
    assert len(collected) == len(set(collected)), "a file runs in two pytest processes"
    assert set(collected) == _test_files()


def test_every_module_that_may_start_ray_runs_on_the_ray_side_or_alone():
    """Two Ray clusters of tests at once (a ``cluster_utils.Cluster`` head beside another test's) failed tests."""
    runs = _runs()
    (ray_side,) = [name for name in runs if name.startswith("ray")]
    allowed = {path for name in (ray_side, "alone") for path in _files_collected(runs[name])}
    starting = {path for path in _test_files() if STARTS_RAY.search((ROOT / path).read_text())} - {
        Path(__file__).relative_to(ROOT).as_posix()
    }
    assert "tests/cluster/test_multinode.py" in starting  # the pattern finds what it is for
    assert starting <= allowed, sorted(starting - allowed)
