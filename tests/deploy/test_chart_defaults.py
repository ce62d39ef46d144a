"""values.yaml writes out the Python defaults of the settings its values become (cluster/config.py's ClusterConfig,
PoolSpec, PlannerSpec; router/config.py's RouterConfig own them): each copy is held to its owner here, through the
config the chart renders. Where the chart's default differs on purpose, the difference is listed with its reason, and
the relation it keeps instead is checked. (rayVersion vs the Dockerfile's RAY_VERSION: tests/deploy/test_image.py.)"""

from __future__ import annotations

import operator
import re

import pytest
import yaml

from cluster.config import ClusterConfig
from tests.deploy.conftest import CHART, RENDERS, REPO, one, worker_group
from tests.deploy.test_placement import configmap_config, quantity

VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
POOLS = ("prefill", "decode")


def _per_pool(values: dict[str, str]) -> dict[str, str]:
    return {f"{pool}.{key}": f"{pool}.{name}" for pool in POOLS for key, name in values.items()}


# Chart value -> the cluster-config setting it becomes, whose default the chart's must be.
PINNED = {
    "model.name": "model",
    "model.dtype": "dtype",
    "model.device": "device",
    "transport": "transport",
    "router.httpPort": "router.port",
    "router.grpcPort": "router.grpc_port",
    "router.localPrefillThreshold": "router.local_prefill_threshold",
    "router.leaseMs": "lease_ms",
    "router.openDocs": "router.open_docs",
    "slo.ttftSeconds": "planner.ttft_target_s",
    "slo.tpotSeconds": "planner.tpot_target_s",
    "planner.intervalSeconds": "planner.interval_s",
    "planner.windowSeconds": "planner.window_s",
    "planner.scaleUpCooldownSeconds": "planner.scale_up_cooldown_s",
    "planner.scaleDownCooldownSeconds": "planner.scale_down_cooldown_s",
    **_per_pool(
        {
            "replicas": "replicas",
            "minReplicas": "min_replicas",
            "maxReplicas": "max_replicas",
            "gpusPerWorker": "num_gpus",
            "kvCacheMb": "kv_cache_mb",
            "maxNumSeqs": "max_num_seqs",
            "maxNumBatchedTokens": "max_num_batched_tokens",
            "prefillChunkBesideDecodes": "prefill_chunk_beside_decodes",
        }
    ),
}

# The chart's own defaults, and why (values.yaml says the same beside each).
DIFFERS = {
    # Prometheus scrapes the head pod from inside the cluster; `splitserve up` alone keeps /metrics closed.
    "router.openMetrics": "router.open_metrics",
    # A Service drops an ending pod's endpoint seconds late: the router says it is stopping and serves on meanwhile.
    # `splitserve up` on a laptop stops at once. The pods' termination grace follows: tests/deploy/test_pod_timing.py.
    "router.shutdownDelaySeconds": "router.shutdown_delay_s",
    # Load balancers keep connections to the router idle up to 60 s (ingress-nginx, AWS ALB) or 600 s (Google Cloud):
    # one closing a connection the balancer reuses answers 502. `splitserve up` keeps uvicorn's 5 s for direct clients.
    "router.keepAliveSeconds": "router.keep_alive_s",
    # A pod per worker: the worker gets the pod's cores, and torch as many threads; PoolSpec's 1 suits every worker
    # of `splitserve up` sharing one machine. Checked below: threads <= cpusPerWorker <= the pod's CPUs.
    **_per_pool({"cpusPerWorker": "num_cpus", "threads": "threads"}),
    # A worker pod may first wait for a node (the autoscaler's) and an image pull; `splitserve up` on one machine
    # waits for processes only. Checked below: the docs' `kubectl wait` outlasts it.
    "startTimeoutSeconds": "start_timeout_s",
}


def _value(path: str):
    values = VALUES
    for part in path.split("."):
        values = values[part]
    return values


def _setting(config: ClusterConfig, name: str):
    return operator.attrgetter(name)(config)


@pytest.mark.parametrize("path", sorted(PINNED))
def test_chart_default_is_the_settings_default(path):
    rendered = _setting(configmap_config(RENDERS["chart-default"]()), PINNED[path])
    default = _setting(ClusterConfig(), PINNED[path])
    assert (_value(path), rendered) == (default, default), (
        f"values.yaml {path}: {_value(path)!r} (renders {rendered!r}) vs {PINNED[path]}'s default {default!r}: "
        "change the copy, or list it in DIFFERS with a reason"
    )


@pytest.mark.parametrize("path", sorted(DIFFERS))
def test_chart_defaults_that_differ_on_purpose_do(path):
    rendered = _setting(configmap_config(RENDERS["chart-default"]()), DIFFERS[path])
    assert rendered == _value(path) != _setting(ClusterConfig(), DIFFERS[path]), (
        f"{path} is the Python default now: move it to PINNED"
    )


@pytest.mark.parametrize("render", ["chart-default", "chart-gpu"])
def test_threads_fit_the_workers_cpus_and_the_pods(render):
    objects = RENDERS[render]()
    config, raycluster = configmap_config(objects), one(objects, "RayCluster")
    for role in POOLS:
        pool = config.pool(role)
        container = worker_group(raycluster, role)["template"]["spec"]["containers"][0]
        pod_cpus = quantity(container["resources"]["requests"]["cpu"])
        assert 1 <= pool.threads <= pool.num_cpus <= pod_cpus, (
            f"{render} {role}: threads {pool.threads}, cpusPerWorker {pool.num_cpus}, pod CPUs {pod_cpus}"
        )


def test_the_docs_wait_outlasts_the_heads_wait_for_its_workers():
    """Each `kubectl wait` the docs give must wait out startTimeoutSeconds: a shorter one reports a failure while the
    head is still waiting for workers a node is being provisioned for."""
    wait = re.compile(r"kubectl .*wait --for=condition=Ready .*--timeout=(\d+)m")
    for doc in (REPO / "README.md", CHART / "README.md", CHART / "templates" / "NOTES.txt"):
        minutes = [int(m) for m in wait.findall(doc.read_text())]
        assert minutes, f"{doc}: no kubectl wait"
        assert all(m * 60 >= _value("startTimeoutSeconds") for m in minutes), (doc, minutes)
