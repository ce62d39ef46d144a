"""A whole cluster (controller, router, worker actors) on local Ray, inside the test process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import ray

from cluster.config import ClusterConfig
from cluster.up import run_cluster
from router.server import new_event_loop
from tests.procfs import cmdlines, parent_of


class RunningCluster:
    """Runs ``run_cluster`` on its own event-loop thread; ``stop()`` tears it down."""

    def __init__(self, config: ClusterConfig, timeout_s: float = 240.0) -> None:
        self.config = config
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop = new_event_loop()  # the router process's own kind of loop
        self._stop: asyncio.Event | None = None
        self.router = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("cluster did not come up")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = asyncio.Event()

            def ready(router) -> None:
                self.router = router
                self._ready.set()

            await run_cluster(self.config, self._stop, on_ready=ready)

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self._error = exc
            self._ready.set()

    @property
    def url(self) -> str:
        return self.router.urls["http"]

    @property
    def admin_headers(self) -> dict:
        return {"X-Admin-Token": self.router.config.admin_token}

    def status(self) -> dict:
        return httpx.get(f"{self.url}/admin/status", headers=self.admin_headers, timeout=10).json()["cluster"]

    def workers(self, role: str, state: str = "ready") -> list[dict]:
        return [w for w in self.status()["workers"] if w["role"] == role and w["state"] == state]

    def wait_for(self, predicate, timeout_s: float = 120.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.25)
        raise TimeoutError(f"timed out waiting for {what}: {self.status()}")

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


RAY_SESSION_LATEST = "/tmp/ray/session_latest"  # the session Ray's last start made (Ray's default temp dir)


@contextlib.contextmanager
def local_cluster(num_cpus: int, **config) -> Iterator[RunningCluster]:
    """A test module's cluster on a local Ray of ``num_cpus`` logical CPUs: the demo model, health checked every
    0.25 s, ``config`` the rest of its ClusterConfig; stopped, with its Ray, at the end."""
    start_local_ray(num_cpus=num_cpus)
    running = RunningCluster(ClusterConfig(model="demo", health_interval_s=0.25, **config))
    try:
        yield running
    finally:
        running.stop()
        ray.shutdown()


def start_local_ray(num_cpus: int = 8, attempts: int = 3) -> None:
    """Local Ray for a test module. Start-up can time out on a loaded machine (a previous module's
    Ray still exiting): try again a bounded number of times, each on a machine rid of the last try's head."""
    for attempt in range(attempts):
        if ray.is_initialized():
            ray.shutdown()
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception on a start-up timeout
            _kill_failed_head()
            if attempt == attempts - 1:
                raise
            time.sleep(5)


def _kill_failed_head() -> None:
    """A ``ray.init`` that timed out leaves the head it started running (GCS, monitor, dashboard, and its raylet if
    that started), unknown to ``ray.shutdown()``: seen in a fresh ``make test``, three such heads loaded the machine
    until the pytest process ended, and each later try timed out too. They are this process's children whose command
    lines name the session that start made."""
    try:
        session = os.readlink(RAY_SESSION_LATEST).encode()
    except OSError:
        return
    for pid, cmdline in cmdlines().items():
        with contextlib.suppress(OSError):  # gone meanwhile
            if session in cmdline and parent_of(pid) == os.getpid():
                os.kill(pid, signal.SIGKILL)
