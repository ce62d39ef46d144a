"""scripts/run_tests.py (how `make test` runs pytest) runs every test file exactly once, and every one that may start
Ray on the same side."""

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNER = runpy.run_path(str(ROOT / "scripts" / "run_tests.py"))
# What starts a Ray cluster in a test: Ray itself, the cluster tests' harness, or `splitserve up`.
STARTS_RAY = re.compile(r"ray\.init|cluster_utils|import ray|from ray|tests\.cluster\.harness|\"up\"")

# Collects each of the runner's pytest runs in one process (the test modules are imported once, not once a run):
# prints {run name: [the test files it collects, once per file each time]}.
COLLECT_EACH_RUN = """
import json, runpy, sys
import pytest

class Files:
    def pytest_collection_finish(self, session):
        self.files = list(dict.fromkeys(item.nodeid.split("::")[0] for item in session.items))

runner = runpy.run_path("scripts/run_tests.py")
collected = {}
for phase in runner["pytest_runs"]([]):
    for name, args in phase:
        files = Files()
        status = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args], plugins=[files])
        assert status == 0, (name, status)
        collected[name] = files.files
print("COLLECTED " + json.dumps(collected))
"""


def _collected() -> dict[str, list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", COLLECT_EACH_RUN], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("COLLECTED ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("COLLECTED "))


def test_every_test_file_runs_once_and_every_one_that_may_start_ray_on_one_side():
    runs = _collected()
    assert len(runs) >= 2
    collected = [path for files in runs.values() for path in files]
    assert len(collected) == len(set(collected)), "a file runs in two pytest processes"
    test_files = {path.relative_to(ROOT).as_posix() for path in (ROOT / "tests").rglob("test_*.py")}
    assert set(collected) == test_files

    # Two Ray clusters of tests at once (a ``cluster_utils.Cluster`` head beside another test's) failed tests.
    (ray_side,) = [name for name in runs if name.startswith("ray")]
    allowed = set(runs[ray_side]) | set(runs["alone"])
    this_file = Path(__file__).relative_to(ROOT).as_posix()
    starting = {path for path in test_files - {this_file} if STARTS_RAY.search((ROOT / path).read_text())}
    assert "tests/cluster/test_multinode.py" in starting  # the pattern finds what it is for
    assert starting <= allowed, sorted(starting - allowed)


def test_a_test_path_is_refused_not_run_beside_every_part():
    main = RUNNER["main"]
    # --collect-only: were the path not refused, the runs would only collect (not run this test again)
    assert main(["--collect-only", "-q", "tests/router/test_errors.py::test_api_keys_and_body_limit"]) == 2
    assert main(["--collect-only", "-q", "tests/engine"]) == 2


def test_a_run_that_collects_nothing_fails_unless_the_caller_selected_tests():
    passed = RUNNER["passed"]
    assert passed(0, ["-q"]) and not passed(1, ["-q", "-k", "x"])
    assert not passed(5, ["-q"]) and not passed(5, ["--durations=30"])
    assert passed(5, ["-q", "-k", "grpc"]) and passed(5, ["-m", "not slow"]) and passed(5, ["--lf"])
