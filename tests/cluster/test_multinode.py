"""Placement across nodes with ray.cluster_utils.Cluster: each pool lands on its kind of node."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.config import ClusterConfig, PoolSpec
from cluster.controller import controller_class
from cluster.worker_actor import CONTROLLER_NAME

GCS_START_ATTEMPTS = 2


@pytest.fixture
def three_nodes(monkeypatch):
    if ray.is_initialized():
        ray.shutdown()
    # Three raylets on a loaded 2-core machine: no dashboard and no prestarted workers, so each registers
    # with the GCS inside Ray's fixed 30 s start-up wait.
    head = {"num_cpus": 1, "include_dashboard": False, "_system_config": {"enable_worker_prestart": False}}
    # Once in a full suite run the head's GCS never wrote its port file (no GCS log at all) and Ray gave up after
    # its 30 s; the same test alone started in seconds. A head that does not come up is started again, once, with
    # a longer wait: that is Ray starting, not the placement under test.
    monkeypatch.setenv("RAY_gcs_server_port_wait_time_s", "60")
    for attempt in range(1, GCS_START_ATTEMPTS + 1):
        try:
            cluster = Cluster(initialize_head=True, head_node_args=head)
            break
        except RuntimeError as exc:
            if attempt == GCS_START_ATTEMPTS or "Timed out waiting for file" not in str(exc):
                raise
    prefill_node = cluster.add_node(num_cpus=2, resources={"prefill_node": 4})
    decode_node = cluster.add_node(num_cpus=2, resources={"decode_node": 4})
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield prefill_node.node_id, decode_node.node_id
    ray.shutdown()
    cluster.shutdown()


def test_pools_land_on_their_node_kind(three_nodes):
    prefill_node, decode_node = three_nodes
    config = ClusterConfig(
        model="demo",
        namespace="splitserve-multinode",
        prefill=PoolSpec(replicas=2, max_replicas=2, num_cpus=0.5, resources={"prefill_node": 1}, kv_cache_mb=32),
        decode=PoolSpec(replicas=1, max_replicas=2, num_cpus=0.5, resources={"decode_node": 1}, kv_cache_mb=32),
    )
    controller = (
        controller_class()
        .options(name=CONTROLLER_NAME, namespace=config.namespace, num_cpus=0)
        .remote(config.to_json())
    )
    try:
        ray.get(controller.start.remote())
        assert ray.get(controller.wait_ready.remote(240))
        workers = ray.get(controller.status.remote())["workers"]
        placed = sorted((w["role"], w["node_id"]) for w in workers if w["state"] == "ready")
        assert placed == [("decode", decode_node), ("prefill", prefill_node), ("prefill", prefill_node)]
    finally:
        ray.get(controller.shutdown.remote())
