"""Worker processes forked from a server that imported the worker's modules once.

A worker's start is mostly imports (torch, grpc, the engine: ~2.5 s of CPU on a 2-core Zen 1), and the suite starts
~90 workers on two cores. The standard library's forkserver (``multiprocessing``) imports them once per pytest process
(``tests/workers/forked_imports.py``, which refuses to be forked from with a second thread) and forks each worker
from there: the same ``splitserve`` command line, run by ``cluster.cli.main`` with the environment and working
directory it was given, its output (stdout and stderr) on a socket the test reads.

``ForkedProcess`` answers what the tests ask a ``subprocess.Popen`` (pid, stdout, poll, wait, terminate, kill,
send_signal, returncode). A command that needs an exec of its own (under ``ip netns exec``, or armed to die with
its launcher) stays a subprocess.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import signal
import socket
import subprocess
import sys
import threading

SERVER_IMPORTS = "tests.workers.forked_imports"
# Read by the C libraries as they load, in the server: one OpenMP/BLAS thread, so that it forks with a single thread.
SERVER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# multiprocessing reads a child's exit status off its sentinel once; the reading (a start also polls the children
# it started) happens under this lock, or two threads could each take it for the other's EOF.
_lock = threading.Lock()
_context: multiprocessing.context.ForkServerContext | None = None


def _forkserver() -> multiprocessing.context.ForkServerContext:
    """The context, its server started (once per process) with ``SERVER_ENV`` in its environment."""
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([SERVER_IMPORTS])
        saved = {name: os.environ.get(name) for name in SERVER_ENV}
        os.environ.update(SERVER_ENV)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            for name, value in saved.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value
        _context = context
    return _context


class ForkedProcess:
    """``python -m cluster.cli *argv`` with ``env``, forked from the server."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.args = [sys.executable, "-m", "cluster.cli", *argv]
        ours, theirs = socket.socketpair()
        with _lock:
            arguments = (list(argv), dict(env), os.getcwd(), theirs)
            self._process = _forkserver().Process(target=_run, args=arguments, name=argv[0], daemon=True)
            self._process.start()
        theirs.close()
        self.pid = self._process.pid
        self.stdout = ours.makefile("r", encoding="utf-8", errors="replace")
        ours.close()  # the file holds the socket open until it is closed

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        with _lock:
            return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        if not multiprocessing.connection.wait([self._process.sentinel], timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.poll()

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:  # once reaped, its pid may be another process's
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _run(argv: list[str], env: dict[str, str], cwd: str, output: socket.socket) -> None:
    """In the forked child: become the command a subprocess would have run, then run it."""
    for fd in (1, 2):
        os.dup2(output.fileno(), fd)
    output.close()
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = ["splitserve", *argv]
    if "numpy" in sys.modules:  # random reseeds itself after a fork; numpy's global state is the server's
        sys.modules["numpy"].random.seed()

    from cluster.cli import main

    sys.exit(main(argv))
