"""A second Ctrl-C or SIGTERM stops a router (`splitserve router`, `splitserve up`) even when something its stop waits
for never ends: ``on_stop_signals`` cancels the process's main coroutine ``FORCED_STOP_S`` after the second signal, or
at a third, so its ``finally`` blocks still run (``up`` shuts Ray down there) and the process exits with status 1.

The process here is a small script over the real ``on_stop_signals`` and ``run_event_loop``, whose stop path waits
forever by design: a stand-in for a stop stuck on a peer, which a real router cannot be made to do on demand."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
STUCK_STOP = """
import asyncio, sys
from router import server
server.FORCED_STOP_S = float(sys.argv[1])

async def main():
    stop, cut = server.on_stop_signals()
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        print("stopping", flush=True)
        try:
            await asyncio.Event().wait()  # a stop that never ends by itself
        finally:
            print("stop's finally ran", flush=True)

try:
    server.run_event_loop(main())
except asyncio.CancelledError:
    sys.exit(1)
"""


def _start(forced_stop_s: float) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", STUCK_STOP, str(forced_stop_s)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "ready", process.stderr.read()
    return process


def _stop_begun(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.stdout.readline().strip() == "stopping"


def test_a_stop_still_stuck_after_the_second_signal_is_cancelled_at_its_deadline():
    process = _start(forced_stop_s=1.0)
    try:
        _stop_begun(process)
        process.send_signal(signal.SIGTERM)
        cut_at = time.monotonic()
        time.sleep(0.3)
        assert process.poll() is None, "the second signal gives the stop its deadline first, not an exit at once"
        status = process.wait(20)
        took = time.monotonic() - cut_at
        out, err = process.communicate()
    finally:
        process.kill()
    assert status == 1 and 1.0 <= took < 15, (status, took, err)
    assert "stop's finally ran" in out, "the cancelled stop unwinds through its finally blocks"
    assert "the stop had not ended 1 s after a second signal" in err, err


def test_a_third_signal_cancels_a_stuck_stop_at_once():
    process = _start(forced_stop_s=600.0)
    try:
        _stop_begun(process)
        process.send_signal(signal.SIGINT)  # either signal counts
        time.sleep(0.2)
        assert process.poll() is None, "a second signal alone leaves the stop its deadline"
        process.send_signal(signal.SIGTERM)
        status = process.wait(20)
        out, err = process.communicate()
    finally:
        process.kill()
    assert status == 1, (status, err)
    assert "stop's finally ran" in out
    assert "a third stop signal" in err, err
