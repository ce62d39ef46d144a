"""Placement across nodes with ray.cluster_utils.Cluster: each pool lands on its kind of node."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time

import pytest
import ray

from cluster.config import ClusterConfig, PoolSpec
from cluster.controller import controller_class
from cluster.worker_actor import CONTROLLER_NAME

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
READY = "CLUSTER "

# The three nodes start in a process of their own. Started from the test process, they came up in seconds
# alone, but twice in a full suite one never did: once the head's GCS wrote no port file, once the head's raylet
# never started (no raylet log) and Ray gave up after 30 s. By then the test process holds the threads of every
# earlier test (gRPC among them), and Ray forks each node's processes from it; a fresh process has none.
# Three raylets on a loaded 2-core machine: no dashboard and no prestarted workers, so each registers with the
# GCS inside Ray's fixed 30 s start-up wait.
_START_CLUSTER = f"""
import json, sys
from ray.cluster_utils import Cluster
head = {{"num_cpus": 1, "include_dashboard": False, "_system_config": {{"enable_worker_prestart": False}}}}
cluster = Cluster(initialize_head=True, head_node_args=head)
prefill = cluster.add_node(num_cpus=2, resources={{"prefill_node": 4}})
decode = cluster.add_node(num_cpus=2, resources={{"decode_node": 4}})
cluster.wait_for_nodes()
print({READY!r} + json.dumps([cluster.address, prefill.node_id, decode.node_id]), flush=True)
sys.stdin.read()  # until the test closes it
cluster.shutdown()
"""


def _ready_line(process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster process exited ({process.wait()}) before its nodes were up")
        if line.startswith(READY):
            return line[len(READY) :]
    raise TimeoutError(f"the cluster's three nodes were not up within {timeout:.0f} s")


@pytest.fixture
def three_nodes():
    if ray.is_initialized():
        ray.shutdown()
    process = subprocess.Popen(
        [sys.executable, "-c", _START_CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        address, prefill_node, decode_node = json.loads(_ready_line(process, START_TIMEOUT_S))
        ray.init(address=address)
        yield prefill_node, decode_node
    finally:
        ray.shutdown()
        process.stdin.close()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
