"""A worker stops cleanly however many stop signals come at once: a supervisor's SIGTERM twice, Ctrl-C twice. Its
handler once took the lock of the event the main thread waited on, and a signal that arrived while the first one's
handler held it left the worker stuck until SIGKILL."""

from __future__ import annotations

import signal

import pytest

from tests.workers.harness import start_worker


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_burst_of_stop_signals_stops_a_worker_cleanly(signum):
    worker = start_worker("decode", "demo")
    try:
        assert worker.stats().role == "decode"
        for _ in range(200):
            worker.process.send_signal(signum)  # none once it has exited
        assert worker.process.wait(10) == 0
    finally:
        worker.stop()
