"""A worker actor that dies while it is still starting (before it registers): the controller on real local Ray
sees it, says why in its status, restarts it (bounded) and stops waiting for it, rather than waiting for ever."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray

from cluster.admin_client import format_status
from cluster.config import ClusterConfig, PoolSpec
from cluster.controller import controller_class
from cluster.up import AlreadyRunning, run_cluster
from cluster.worker_actor import CONTROLLER_NAME
from tests.cluster.harness import start_local_ray

NO_PREFILL = PoolSpec(replicas=0, min_replicas=0, max_replicas=1, kv_cache_mb=16)
ONE_DECODE = PoolSpec(replicas=1, min_replicas=1, max_replicas=1, kv_cache_mb=16)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    start_local_ray(num_cpus=4)
    yield
    ray.shutdown()


def _start_controller(config: ClusterConfig):
    controller = (
        controller_class()
        .options(name=CONTROLLER_NAME, namespace=config.namespace, num_cpus=0, max_concurrency=100)
        .remote(config.to_json())
    )
    ray.get(controller.start.remote())
    return controller


def _stop(controller) -> None:
    ray.get(controller.shutdown.remote())
    ray.kill(controller)


def _workers(controller) -> list[dict]:
    return ray.get(controller.status.remote())["workers"]


def test_a_worker_whose_constructor_raises_is_shown_failed_with_why_and_not_waited_for(tmp_path):
    missing = tmp_path / "no-such-model"
    config = ClusterConfig(
        model=str(missing), prefill=NO_PREFILL, decode=ONE_DECODE, max_restarts=1, namespace="splitserve-start-fails"
    )
    controller = _start_controller(config)
    try:
        began = time.monotonic()
        assert ray.get(controller.wait_ready.remote(90)) is False
        assert time.monotonic() - began < 60, "waited out the whole start timeout for a worker that had died"
        failed = [w for w in _workers(controller) if w["state"] == "failed"]
        assert len(failed) == 1, _workers(controller)
        assert failed[0]["restarts"] == 1  # max_restarts, then given up on
        assert failed[0]["last_error"].startswith("died while starting:")
        assert str(missing) in failed[0]["last_error"] and "ModelLoadError" in failed[0]["last_error"]
        reason = ray.get(controller.not_ready_reason.remote())  # what `up` stops with
        assert failed[0]["worker_id"] in reason and str(missing) in reason
        shown = format_status({"cluster": ray.get(controller.status.remote())})  # `splitserve status`
        assert f"{failed[0]['worker_id']} (failed): died while starting:" in shown and str(missing) in shown
        # The pool is not left short: a new worker takes the failed one's place.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            others = [w for w in _workers(controller) if w["worker_id"] != failed[0]["worker_id"]]
            if others:
                break
            time.sleep(0.25)
        assert others and others[0]["role"] == "decode"
    finally:
        _stop(controller)


def test_a_worker_killed_while_starting_is_restarted_and_serves(tmp_path):
    config = ClusterConfig(
        model="demo", prefill=NO_PREFILL, decode=ONE_DECODE, max_restarts=2, namespace="splitserve-start-killed"
    )
    controller = _start_controller(config)
    try:
        (starting,) = _workers(controller)  # recorded as soon as its actor is asked for
        assert starting["state"] == "starting" and not starting["address"]
        actor = ray.get_actor(f"splitserve-{starting['worker_id']}-0", namespace=config.namespace)
        ray.kill(actor, no_restart=True)  # its process dies while the constructor loads the model
        assert ray.get(controller.wait_ready.remote(180)) is True
        (worker,) = _workers(controller)
        assert worker["worker_id"] == starting["worker_id"] and worker["state"] == "ready"
        assert worker["restarts"] == 1 and worker["registrations"] == 1, worker  # only the restart registered
        assert worker["last_error"].startswith("died while starting:"), worker
    finally:
        _stop(controller)


def test_up_on_a_ray_that_runs_a_cluster_in_its_namespace_starts_nothing_and_says_so():
    """`up --address` joined to a Ray cluster whose namespace already has a splitserve controller crashed with Ray's
    ActorAlreadyExistsError traceback (advising ray.get_actor); it now refuses, naming the namespace setting."""

    @ray.remote(num_cpus=0)
    class Taken:
        pass

    holder = Taken.options(name=CONTROLLER_NAME, namespace="splitserve-taken").remote()
    try:
        with pytest.raises(AlreadyRunning, match="already runs a splitserve cluster in namespace 'splitserve-taken'"):
            asyncio.run(run_cluster(ClusterConfig(model="demo", namespace="splitserve-taken"), asyncio.Event()))
    finally:
        ray.kill(holder)
