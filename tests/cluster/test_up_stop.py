"""`splitserve up` stops when asked while its workers are still starting: at once, tearing down what it started,
with a message rather than a traceback (on Kubernetes: SIGTERM during a slow start, not a SIGKILL a grace period
later)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procfs import alive, descendants

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_up_stops_while_its_workers_are_starting(tmp_path, signum):
    # A decode worker no node can place: the workers never become ready, as with pods that stay pending.
    config = tmp_path / "cluster.yaml"
    config.write_text("decode:\n  resources: {no_such_node: 1}\nrouter:\n  host: 127.0.0.1\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", XDG_RUNTIME_DIR=str(tmp_path))
    command = [sys.executable, "-m", "cluster.cli", "up", "--config", str(config), "--port", "0", "--grpc-port", "0"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        # The admin token is written once the router answers, before the wait for the workers.
        while not list(tmp_path.glob("splitserve-*.admin-token")) and time.monotonic() < deadline:
            assert process.poll() is None, "splitserve up exited early:\n" + process.stdout.read()
            time.sleep(0.2)
        assert list(tmp_path.glob("splitserve-*.admin-token")), "the router did not start"
        family = descendants(process.pid)
        process.send_signal(signum)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("splitserve up went on waiting for its workers after it was asked to stop")
        assert process.returncode == 0, output
        assert "asked to stop while the workers were starting; stopped" in output, output
        assert "Traceback" not in output and "is up" not in output, output
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(pid) for pid in family):
            time.sleep(0.5)
        assert not [pid for pid in family if alive(pid)], "processes left behind"
        assert not list(tmp_path.glob("splitserve-*.admin-token")), "the admin token outlives its cluster"
    finally:
        if process.poll() is None:  # failed: leave nothing behind (Ray's processes are its children)
            for pid in [*descendants(process.pid), process.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait(10)
