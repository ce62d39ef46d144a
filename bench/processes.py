"""Starting splitserve processes for benchmarks (workers, routers) through the CLI, and stopping them."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from protos.cluster_auth import ensure_secret_in_env


def start(args: list[str], ready_marker: str, timeout_s: float = 180.0) -> tuple[subprocess.Popen, str]:
    """Runs ``splitserve ARGS``; returns the process and the line that contained ``ready_marker``."""
    ensure_secret_in_env()  # the workers started here, and this process's clients, share it
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    process = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=exits_with_this_process(env),
    )
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if ready_marker in line:
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, line
    process.kill()
    raise RuntimeError(f"splitserve {' '.join(args)} did not start:\n{''.join(lines[-30:])}")


def exits_with_this_process(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a ``splitserve`` child that is to stop when this process dies (an aborted run leaves no workers):
    the child's CLI arms it itself (cluster.cli). Not a ``preexec_fn``: code run between fork and exec in a process
    with gRPC and other threads alive can deadlock or kill the child before it prints a line."""
    return dict(env, SPLITSERVE_EXIT_WITH_PARENT=str(os.getpid()))


def start_worker(role: str, *extra: str) -> tuple[subprocess.Popen, str]:
    process, line = start(["worker", role, "--port", "0", *extra], "READY ")
    return process, json.loads(line.split("READY ", 1)[1])["address"]


def start_router(port: int, grpc_port: int, prefill: list[str], decode: list[str], *extra: str) -> subprocess.Popen:
    args = ["router", "--port", str(port), "--grpc-port", str(grpc_port), "--log-level", "WARNING", "--decode", *decode]
    if prefill:
        args += ["--prefill", *prefill]
    process, _ = start([*args, *extra], "OpenAI API at")
    return process


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def running(*processes: subprocess.Popen):
    try:
        yield processes
    finally:
        stop(*processes)


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port on 127.0.0.1 that is free now, for a server this process starts next to bind. It lies below the
    kernel's ephemeral range, so no port-0 bind (a worker's gRPC server) and no outgoing connection can take it
    in between, and it is never given twice by this process."""
    low = _ephemeral_low()
    for _ in range(2000):
        port = random.randrange(10_000, low) if low > 12_000 else 0
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = sock.getsockname()[1]
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # not Linux: the kernel picks (port 0)
