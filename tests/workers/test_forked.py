"""Workers forked from the test forkserver (tests/workers/forked.py) behave as the subprocess they stand for: the
command's own environment and exit status, its output on the pipe, signals delivered to it and not to the server."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.procfs import parent_of
from tests.workers.forked import ForkedProcess
from tests.workers.harness import launch_worker, wait_ready


def test_a_forked_worker_serves_stops_on_sigterm_and_dies_on_sigkill():
    first, second = (wait_ready(launch_worker(role, "demo")) for role in ("decode", "prefill"))
    try:
        for worker in (first, second):
            assert isinstance(worker.process, ForkedProcess)
            assert worker.stats().model_card.served_model_name == "demo"
        server = parent_of(first.process.pid)
        assert server == parent_of(second.process.pid) != os.getpid()  # one server forked both
        assert parent_of(server) == os.getpid()
        with pytest.raises(subprocess.TimeoutExpired):
            first.process.wait(0.2)
        assert first.process.poll() is None

        first.process.terminate()
        assert first.process.wait(15) == 0  # its graceful stop, as under `kill -TERM`
        assert first.process.returncode == 0
        second.process.kill()
        assert second.process.wait(15) == -9
        assert parent_of(server) == os.getpid()  # the server lives on
        assert any(line.startswith("READY ") for line in first.log_lines)
    finally:
        for worker in (first, second):
            worker.stop()


def test_a_forked_command_sees_its_own_environment_and_exit_status(tmp_path):
    """The server's environment is not the command's: a value only the command was given reaches it."""
    env = dict(os.environ, SPLITSERVE_EXIT_WITH_PARENT="not-a-pid")
    process = ForkedProcess(["worker", "decode", "--model", "demo", "--port", "0"], env)
    assert process.wait(30) == 1
    assert "SPLITSERVE_EXIT_WITH_PARENT must be a process id, got 'not-a-pid'" in process.stdout.read()

    process = ForkedProcess(["worker", "decode", "--model", str(tmp_path / "absent"), "--port", "0"], dict(os.environ))
    assert process.wait(30) == 2
    assert str(tmp_path / "absent") in process.stdout.read()
