"""A whole cluster (controller, router, worker actors) on local Ray, inside the test process."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import ray

from cluster.config import ClusterConfig
from cluster.up import run_cluster
from router.server import new_event_loop


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


def start_local_ray(num_cpus: int = 8, attempts: int = 3) -> None:
    """Local Ray for a test module. Start-up can time out on a loaded machine (a previous module's
    Ray still exiting): try again a bounded number of times."""
    for attempt in range(attempts):
        if ray.is_initialized():
            ray.shutdown()
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception on a start-up timeout
            if attempt == attempts - 1:
                raise
            time.sleep(5)
