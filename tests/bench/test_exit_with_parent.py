"""A benchmark's children stop when the benchmark dies, armed after exec (no pre-exec hook in a threaded process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cluster.cli import EXIT_WITH_PARENT_ENV, _exit_with_parent

# The launcher starts a child the way bench/processes.py does, prints its PID, and exits at once.
LAUNCHER = """
import subprocess, sys, os
from bench.processes import exits_with_this_process
child = subprocess.Popen(
    [sys.executable, "-c", "import os, time; from cluster.cli import main; "
     "import cluster.cli as c; c._exit_with_parent(os.environ[c.EXIT_WITH_PARENT_ENV]); "
     "print('armed', flush=True); time.sleep(60)"],
    env=exits_with_this_process(dict(os.environ)), stdout=subprocess.PIPE, text=True,
)
assert child.stdout.readline().strip() == "armed"
print(child.pid, flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for init to reap it is gone too
        return stat.read().split(")")[1].split()[0] != "Z"


def test_child_stops_when_the_launcher_dies():
    launcher = subprocess.run([sys.executable, "-c", LAUNCHER], capture_output=True, text=True, timeout=60, check=True)
    child = int(launcher.stdout.strip())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the child outlived its launcher"


def test_a_child_whose_launcher_is_already_gone_exits():
    with pytest.raises(SystemExit, match="is gone"):
        _exit_with_parent(str(os.getppid() + 10_000_000))


def test_a_malformed_parent_is_refused_by_name():
    with pytest.raises(SystemExit, match=EXIT_WITH_PARENT_ENV):
        _exit_with_parent("not-a-pid")
