"""A CPU host shared by several workers: what the simulator models of it (``Host``) and what the
benchmarks measure for it (``CpuMeter``: how many cores everything *but* the measured processes
kept busy — the router, the client, idle stacks, other users of the machine).

Why it matters: a torch step runs its threads in lock step. A worker whose threads fill every core
loses a whole step's progress to any other process that takes one of them; one that leaves a core
idle loses nothing until another worker takes that core too::

    2 cores, aggregated (2 threads)      2 cores, disaggregated (1 + 1 threads)
    core 0  [P/D step ][router]          core 0  [prefill ......]
    core 1  [P/D step ]........ <- waits core 1  [decode][router][decode]   (prefill unaffected)

Workers that step on every core at once also slow each other beyond that CPU (``Host.co_step``): each
worker's serving threads (gRPC pollers, token streams, KV links), the router's and the client's wake on a
core an engine thread is stepping on, and what they leave in the cores' caches costs it more than their
own CPU time shows. On a 2-vCPU Zen 5, engine steps timed in service took 12-19% (prompt steps) and 9-17%
(decode steps) longer while the other worker stepped than while it did not, where two bare engines stepping
side by side slowed each other 2-3% (docs/PERFORMANCE.md, "Workers that step together").
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    """Every worker on one CPU machine of ``cores``, beside other work keeping ``other_cores`` busy."""

    cores: int
    other_cores: float = 0.0
    co_step: float = 0.0  # a step's extra share of time while other workers' threads step on every other core

    def slowdown(self, threads: int, busy_threads: int) -> float:
        """A step of a ``threads``-thread worker while ``busy_threads`` (its own included) step. The
        other work that finds no idle core preempts stepping threads, this worker's share of it
        ``threads / busy_threads``; its other threads wait at the next barrier, so all of that share
        is time its step loses."""
        excess = busy_threads + self.other_cores - self.cores
        return 1.0 + max(0.0, min(excess, self.other_cores)) * threads / busy_threads

    def crowding(self, threads: int, busy_threads: int) -> float:
        """How much longer a ``threads``-thread worker's step runs while ``busy_threads`` (its own included)
        step: ``1 + co_step`` while other workers' threads step on every other core, else 1."""
        return 1.0 + self.co_step if busy_threads >= self.cores and busy_threads > threads else 1.0


@dataclass(frozen=True)
class CpuSample:
    wall_s: float
    machine_busy_ticks: int  # every core, every process
    measured_ticks: int  # the measured processes, all their threads
    engine_ticks: dict[str, int | None]  # by worker: its engine thread alone (None: not found)


class CpuMeter:
    """CPU time of the machine and of some processes (``/proc``), between two samples; and of one thread
    of each of ``engines`` (label -> (worker pid, its engine thread's OS name)): a worker whose engine
    thread keeps its core busy steps no faster, whatever the rest of the machine has left.

    ``sample()`` returns None where there is no ``/proc`` (the simulator then assumes no other work)."""

    def __init__(self, pids: list[int], engines: dict[str, tuple[int, str]] | None = None) -> None:
        self.pids = pids
        self.engines = engines or {}
        self._engine_threads: dict[str, str] = {}  # label -> /proc path of its engine thread's stat
        self.tick_s = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01

    def sample(self) -> CpuSample | None:
        try:
            with open("/proc/stat") as handle:
                fields = [int(v) for v in handle.readline().split()[1:]]
            measured = sum(_process_ticks(pid) for pid in self.pids)
        except (OSError, ValueError, IndexError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        engines = {label: self._engine_ticks(label, *worker) for label, worker in self.engines.items()}
        return CpuSample(time.monotonic(), user + nice + system + irq + softirq + steal, measured, engines)

    def usage(self, before: CpuSample | None, after: CpuSample | None) -> dict | None:
        """Cores kept busy on average between the samples: all, by the measured processes, by the rest."""
        if before is None or after is None or after.wall_s <= before.wall_s:
            return None
        seconds = after.wall_s - before.wall_s
        machine = (after.machine_busy_ticks - before.machine_busy_ticks) * self.tick_s / seconds
        measured = (after.measured_ticks - before.measured_ticks) * self.tick_s / seconds
        engines = {
            name: (after.engine_ticks[name] - ticks) * self.tick_s / seconds
            for name, ticks in before.engine_ticks.items()
            if ticks is not None and after.engine_ticks.get(name) is not None
        }
        return {
            "machine_cores": machine,
            "measured_cores": measured,
            "other_cores": max(0.0, machine - measured),
            "engine_cores": engines,
        }

    def _engine_ticks(self, label: str, pid: int, thread_name: str) -> int | None:
        """The CPU ticks of the worker's thread OS-named ``thread_name`` (engine/threads.py), or None."""
        path = self._engine_threads.get(label)
        if path is None:
            for task in sorted(glob.glob(f"/proc/{pid}/task/*")):
                try:
                    with open(f"{task}/comm") as handle:
                        if handle.read().strip() == thread_name:
                            path = self._engine_threads[label] = f"{task}/stat"
                            break
                except OSError:
                    continue
        try:
            return stat_ticks(path) if path else None
        except OSError:  # the worker or its thread is gone
            return None


def _process_ticks(pid: int) -> int:
    """utime + stime of a process, every thread."""
    return stat_ticks(f"/proc/{pid}/stat")


def stat_ticks(path: str) -> int:
    """utime + stime (fields 14 and 15) of a ``/proc/PID/stat`` (every thread of the process) or a
    ``/proc/PID/task/TID/stat`` (that thread alone), in clock ticks."""
    with open(path) as handle:
        after_name = handle.read().rsplit(")", 1)[1].split()
    return int(after_name[11]) + int(after_name[12])
