"""The control plane on real local Ray: restart after a crash, scaling under load with draining,
and the planner acting on the router's latencies."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time

import httpx
import openai
import pytest
import ray

from cluster.config import PlannerSpec, PoolSpec
from router.config import RouterConfig
from tests.cluster.harness import local_cluster

POOL = PoolSpec(replicas=1, min_replicas=1, max_replicas=3, threads=1, kv_cache_mb=64)


@pytest.fixture(scope="module")
def cluster():
    router = RouterConfig(port=0, grpc_port=0, local_prefill_threshold=32, max_queued=100)
    with local_cluster(8, prefill=POOL, decode=POOL, namespace="splitserve-test", router=router) as running:
        yield running


class Load:
    """Background chat requests until stopped; records every outcome."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60, max_retries=0)
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        count = 0
        while not self._stop.is_set():
            count += 1
            try:
                reply = self.client.chat.completions.create(
                    model="demo",
                    messages=[{"role": "user", "content": f"worker {index} request {count} " * 6}],
                    max_tokens=12,
                    temperature=0,
                )
                assert reply.choices[0].finish_reason in ("stop", "length")
                self.ok += 1
            except openai.APIStatusError as exc:  # a clean error: status and body
                self.errors.append(f"{exc.status_code}: {exc.message}")
            except openai.APIConnectionError as exc:
                self.errors.append(f"connection: {exc}")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)
        assert not any(t.is_alive() for t in self._threads), "a request hung"


def test_the_router_runs_with_the_router_section_and_the_cluster_wide_facts(cluster):
    running, config = cluster.router.config, cluster.config
    assert (running.max_queued, running.local_prefill_threshold, running.port) == (100, 32, 0)
    assert (running.model, running.health_interval_s, running.lease_ms) == ("demo", 0.25, config.lease_ms)
    assert running.cluster_secret, "the router calls the workers with the cluster's secret"


def test_crashed_worker_is_restarted_and_serves_again(cluster):
    decode = cluster.workers("decode")[0]
    load = Load(cluster.url)
    time.sleep(2.0)
    os.kill(decode["pid"], signal.SIGKILL)
    cluster.wait_for(
        lambda: any(
            w["worker_id"] == decode["worker_id"] and w["registrations"] >= 2 and w["state"] == "ready"
            for w in cluster.status()["workers"]
        ),
        what="decode worker restart",
    )
    served_before = load.ok
    cluster.wait_for(lambda: load.ok >= served_before + 3, timeout_s=60, what="requests served after the restart")
    load.stop()
    restarted = next(w for w in cluster.status()["workers"] if w["worker_id"] == decode["worker_id"])
    assert restarted["address"] != decode["address"] or restarted["pid"] != decode["pid"]
    assert all(e.startswith(("502", "503", "504")) for e in load.errors), load.errors  # clean errors only, if any


def test_scale_up_and_down_under_load_fails_nothing(cluster, caplog):
    """... and a worker scaled away leaves the routers' membership before its server stops: they never see it refuse
    a health check, as a failed worker would (they logged every planned drain as a worker marked unhealthy)."""
    caplog.set_level(logging.WARNING, logger="router.workers")
    load = Load(cluster.url)
    for role in ("prefill", "decode"):
        reply = httpx.post(
            f"{cluster.url}/admin/scale", json={"role": role, "replicas": 2}, headers=cluster.admin_headers, timeout=30
        )
        assert reply.status_code == 200, reply.text
    cluster.wait_for(
        lambda: len(cluster.workers("prefill")) == 2 and len(cluster.workers("decode")) == 2, what="pools of 2"
    )
    time.sleep(2.0)
    for role in ("prefill", "decode"):
        reply = httpx.post(
            f"{cluster.url}/admin/scale", json={"role": role, "replicas": 1}, headers=cluster.admin_headers, timeout=30
        )
        assert reply.status_code == 200, reply.text
    cluster.wait_for(
        lambda: (
            len(cluster.workers("prefill")) == 1
            and len(cluster.workers("decode")) == 1
            and not cluster.workers("prefill", "draining")
            and not cluster.workers("decode", "draining")
        ),
        what="pools back to 1",
    )
    time.sleep(1.0)
    load.stop()
    assert load.ok > 0
    assert load.errors == []
    assert not [r.message for r in caplog.records if "marked unhealthy" in r.getMessage()]


def test_scale_and_drain_need_the_admin_token_and_valid_bounds(cluster):
    refused = httpx.post(f"{cluster.url}/admin/scale", json={"role": "decode", "replicas": 2}, timeout=10)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "invalid_admin_token"
    for action in ("scale", "drain"):  # refused before its body is read: no lesson in what it should hold
        refused = httpx.post(f"{cluster.url}/admin/{action}", json={}, timeout=10)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "invalid_admin_token"
    too_many = httpx.post(
        f"{cluster.url}/admin/scale", json={"role": "decode", "replicas": 99}, headers=cluster.admin_headers, timeout=10
    )
    assert too_many.status_code == 400
    refusal = too_many.json()["error"]["message"]  # the controller's own words, not Ray's wrapping of them
    assert "max_replicas" in refusal and "ray::" not in refusal and "Traceback" not in refusal, refusal
    unknown = httpx.post(
        f"{cluster.url}/admin/drain", json={"worker_id": "decode-nope"}, headers=cluster.admin_headers, timeout=10
    )
    assert unknown.status_code == 404
    assert cluster.status()["pools"]["decode"]["desired"] == 1


def test_planner_grows_prefill_on_slow_ttft_and_shrinks_when_idle(cluster):
    planner = PlannerSpec(
        enabled=True,
        ttft_target_s=0.2,
        tpot_target_s=10.0,
        interval_s=0.5,
        scale_up_cooldown_s=60,
        scale_down_cooldown_s=1,
        min_samples=1,
    )
    config = dataclasses.replace(cluster.config, planner=planner, namespace="splitserve-planner")
    from cluster.controller import controller_class
    from cluster.worker_actor import CONTROLLER_NAME

    controller = (
        controller_class()
        .options(name=CONTROLLER_NAME, namespace=config.namespace, num_cpus=0, max_concurrency=100)
        .remote(config.to_json())
    )
    try:
        ray.get(controller.start.remote())
        assert ray.get(controller.wait_ready.remote(240))
        slow = {
            "ttft_p90_s": 1.5,
            "tpot_p90_s": 0.01,
            "ttft_samples": 50,
            "tpot_samples": 50,
            "queue_depth": 4,
            "requests_in_window": 50,
        }
        ray.get(controller.report.remote(slow))
        _wait(lambda: ray.get(controller.status.remote())["pools"]["prefill"]["desired"] == 2, "prefill grows")
        time.sleep(1.5)  # within the scale-up cooldown: no second step
        status = ray.get(controller.status.remote())
        assert status["pools"]["prefill"]["desired"] == 2 and status["pools"]["decode"]["desired"] == 1
        decision = status["planner"]["decisions"][0]
        assert decision["role"] == "prefill" and decision["inputs"]["p90_s"] == 1.5
        idle = {
            "ttft_p90_s": None,
            "tpot_p90_s": None,
            "ttft_samples": 0,
            "tpot_samples": 0,
            "queue_depth": 0,
            "requests_in_window": 0,
        }
        ray.get(controller.report.remote(idle))
        _wait(
            lambda: ray.get(controller.status.remote())["pools"]["prefill"]["desired"] == 1,
            "prefill shrinks to its minimum",
        )
        time.sleep(1.5)
        assert ray.get(controller.status.remote())["pools"]["prefill"]["desired"] == 1
    finally:
        ray.get(controller.shutdown.remote())
        ray.kill(controller)


def _wait(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise TimeoutError(what)
