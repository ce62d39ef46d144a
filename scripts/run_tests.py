"""The whole pytest suite as `make test` runs it: the tests that must run alone, then two pytest processes side by side.

Most of the suite waits (a keepalive to expire, a worker to start, a stream to stall): one pytest process left a
2-core machine ~45% idle. Two processes side by side fill it. The split is by directory:

- every test that starts Ray (only ``cluster/`` imports it) is on one side, so two Ray clusters of tests never start
  at once (``ray.cluster_utils.Cluster`` heads and ``splitserve up`` in one machine's shared /tmp/ray);
- the tests whose pass depends on a bound measured on a loaded machine, and that load both cores themselves, run
  alone, first, on a quiet machine: the chaos soak (a count of completions under faults, two clusters at once) and
  the shaped links between test hosts (a link's fill and its silence bound).

Every file under tests/ runs in exactly one process: the second side is "everything else" (``--ignore`` of the
others), so a new test file lands there without a list to update. Arguments are passed to every pytest process
(``--durations=0``, ``-x``); a test path is refused: to run a part of the suite, call pytest directly.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY_SIDE = ("tests/cluster", "tests/dashboard", "tests/deploy", "tests/router")
ALONE = ("tests/bench/test_chaos.py", "tests/kv_transfer/test_bulk_across_hosts.py")
# Router tests that start no Ray, run on the other side so that both sides take about as long (on a 2-core Zen 1 the
# Ray side's directories took 784 s alone, the rest 682 s). test_routing.py (~21 s with its workers' start) followed
# when its mixed-pool tests made the Ray side the longer one: 802 s against 765 in a fresh run.
TO_THE_OTHER_SIDE = (
    "tests/router/test_defaulted_max_tokens.py",
    "tests/router/test_stalled_decode.py",
    "tests/router/test_routing.py",
    "tests/router/test_shutdown.py",  # ~37 s, new on 2026-12-06, when the Ray side was the longer one (661 s to 609)
    "tests/router/test_worker_shutdown.py",  # ~25 s, new on 2026-12-06 (the Ray side 666 s to the rest's 571)
)
# And one file the other way: with the tests' workers forked (tests/workers/forked.py), the rest took ~50 s longer
# than the Ray side in three fresh runs (796/735, 800/765, 831/771 s); this file takes ~28 s.
TO_THE_RAY_SIDE = ("tests/bench/test_transfer_bench.py",)
NO_TESTS_COLLECTED = 5  # pytest's exit status when nothing was collected: a pass where the caller selected tests
SELECTING = ("-k", "-m", "--deselect", "--lf", "--last-failed")  # the arguments that may leave a process nothing
INTERRUPT_GRACE_S = 10.0  # after Ctrl-C, how long the children have to stop on the SIGINT they got themselves


def pytest_runs(extra: list[str]) -> list[list[tuple[str, list[str]]]]:
    """Phases in order; each phase's (name, pytest arguments) run side by side."""
    ray_side = [*RAY_SIDE, *TO_THE_RAY_SIDE, *(f"--ignore={path}" for path in TO_THE_OTHER_SIDE)]
    in_ray_directories = (path for directory in RAY_SIDE for path in (ROOT / directory).rglob("test_*.py"))
    # file by file: pytest does not collect a file named on its command line inside an ignored directory
    ray_side_files = [*sorted(path.relative_to(ROOT).as_posix() for path in in_ray_directories), *TO_THE_RAY_SIDE]
    rest = ["tests", *(f"--ignore={path}" for path in (*ray_side_files, *ALONE) if path not in TO_THE_OTHER_SIDE)]
    return [
        [("alone", [*ALONE, *extra])],
        [("ray+router", [*ray_side, *extra]), ("rest", [*rest, *extra])],
    ]


def run_phase(runs: list[tuple[str, list[str]]]) -> dict[str, tuple[int, float]]:
    """Starts each run, relays its output line by line under its name, and waits for all: name → (status, seconds)."""
    began = time.monotonic()
    results: dict[str, tuple[int, float]] = {}
    lock = threading.Lock()  # one line at a time on our stdout

    def relay(name: str, process: subprocess.Popen) -> None:
        for line in process.stdout:
            with lock:
                sys.stdout.write(f"[{name}] {line}")
                sys.stdout.flush()
        results[name] = (process.wait(), time.monotonic() - began)

    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "pytest", *args], cwd=ROOT, text=True, bufsize=1,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for name, args in runs
    }  # fmt: skip
    relays = [threading.Thread(target=relay, args=item, daemon=True) for item in processes.items()]
    for thread in relays:
        thread.start()
    try:
        for thread in relays:
            thread.join()
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reached the children too (one process group): a second SIGINT would make pytest stop
        # at once, without its summary. Only a child still running after a moment gets one from here.
        deadline = time.monotonic() + INTERRUPT_GRACE_S
        for process in processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGINT)
        for process in processes.values():
            process.wait()
        raise
    return results


def passed(status: int, extra: list[str]) -> bool:
    selected = any(arg.startswith(SELECTING) for arg in extra)
    return status == 0 or (status == NO_TESTS_COLLECTED and selected)


def main(extra: list[str]) -> int:
    paths = [arg for arg in extra if not arg.startswith("-") and (ROOT / arg.split("::")[0]).exists()]
    if paths:  # every process would run them beside its own part
        print(f"run_tests.py: {' '.join(paths)}: the runner splits the whole suite; run pytest itself for a part")
        return 2
    results: dict[str, tuple[int, float]] = {}
    for phase in pytest_runs(extra):
        results.update(run_phase(phase))
    for name, (status, seconds) in results.items():
        print(f"pytest {name}: {'passed' if passed(status, extra) else f'FAILED (exit {status})'} in {seconds:.0f} s")
    return 0 if all(passed(status, extra) for status, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
