"""An open dashboard is no request in flight: a router stopping ends its event feed at once, rather than waiting out
its shutdown grace for the page to go (a pod's SIGTERM then outlasted terminationGracePeriodSeconds).

A real Router (no workers: the feed needs none) and a real HTTP client holding the feed open."""

from __future__ import annotations

import threading
import time

import httpx

from router.config import RouterConfig
from tests.router.conftest import RouterThread

GRACE_S = 20.0


def test_a_router_stopping_ends_an_open_dashboard_feed_at_once():
    config = RouterConfig(
        decode_addresses=("127.0.0.1:9",), port=0, grpc_port=0, admin_token="adm", shutdown_grace_s=GRACE_S
    )
    router = RouterThread(config, ready=False)
    events, ended = [], threading.Event()

    def watch() -> None:
        headers = {"X-Admin-Token": "adm"}
        with httpx.stream("GET", f"{router.http}/dashboard/events", headers=headers, timeout=60) as feed:
            for line in feed.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
        ended.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        deadline = time.monotonic() + 20
        while not events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert events, "the feed sent nothing"
        began = time.monotonic()
        router.stop()
        took = time.monotonic() - began
        assert took < GRACE_S / 4, f"the router waited {took:.1f} s for an open dashboard"
        assert ended.wait(5), "the feed did not end"
    finally:
        router.stop()
