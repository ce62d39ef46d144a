"""Names of the engine's threads as the OS sees them (no torch: ``bench compare`` and the simulator
import this too)."""

from __future__ import annotations

import ctypes
import sys

_PR_SET_NAME = 15


def engine_thread_name(role: str) -> str:
    """The engine loop's thread in a worker of ``role`` (``prefill``, ``decode``): within the OS's 15 bytes."""
    return f"{role}-engine"


def name_os_thread(name: str) -> None:
    """Gives the calling thread ``name`` in the OS too (Linux: its first 15 bytes), so ``top -H``, py-spy and
    ``/proc/PID/task/TID/comm`` show which thread is the engine's (``bench compare`` reads its CPU that way).
    Python 3.11 names its threads for itself only."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the OS name stays "python"
            pass
