"""Values that contradict each other, or that would be ignored, are refused by `helm template` with a message
naming them (templates/_helpers.tpl, splitserve.validate; values.schema.json); each refusal is paired with the
nearby values that do render, so a test fails if the chart refuses too much as well as too little. Also: what a
`helm upgrade` must change for rotated secrets to take effect, the served model name, and extra pod env."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from router.config import cors_origin_list
from tests.deploy.conftest import (
    CHART,
    GPU_VALUES,
    HelmError,
    chart_objects,
    head_container,
    helm,
    one,
    value_args,
    worker_group,
)
from tests.deploy.test_placement import configmap_config

KEYS = {"create": True, "keys": ["key-one"]}


def _refused(message: str, values: dict | None = None, value_files=(), extra=()) -> None:
    with pytest.raises(HelmError, match=message):
        chart_objects(value_files, values, extra=extra)


def _head_annotations(objects: list[dict]) -> dict:
    return one(objects, "RayCluster")["spec"]["headGroupSpec"]["template"]["metadata"]["annotations"]


def _notes(values: dict | None = None) -> str:
    args = ["install", "splitserve", str(CHART), "--dry-run=client", "-o", "json", *value_args((), values)]
    return json.loads(helm(*args))["info"]["notes"]


# -- #1: rotated secrets take effect -------------------------------------------------------------


def test_rotating_the_charts_api_keys_changes_the_head_pod_template():
    """A keys-only upgrade must change the RayCluster, or upgradeStrategy Recreate replaces nothing and a revoked
    key keeps working (the router reads SPLITSERVE_API_KEYS once, at start)."""
    old = chart_objects(values={"apiKeys": {"create": True, "keys": ["old"]}})
    new = chart_objects(values={"apiKeys": {"create": True, "keys": ["new"]}})
    again = chart_objects(values={"apiKeys": {"create": True, "keys": ["new"]}})
    assert _head_annotations(old)["checksum/api-keys"] != _head_annotations(new)["checksum/api-keys"]
    assert _head_annotations(new) == _head_annotations(again), "the checksum must be stable across renders"
    assert _head_annotations(old)["checksum/cluster-config"] == _head_annotations(new)["checksum/cluster-config"]
    # The PodMonitor's token, the first key, lives in the same Secret: changing it alone restarts the head too.
    closed = {"router": {"openMetrics": False}, "metrics": {"podAnnotations": False, "podMonitor": {"enabled": True}}}
    first = chart_objects(values={**closed, "apiKeys": {"create": True, "keys": ["a", "b"]}})
    swapped = chart_objects(values={**closed, "apiKeys": {"create": True, "keys": ["b", "a"]}})
    assert _head_annotations(first)["checksum/api-keys"] != _head_annotations(swapped)["checksum/api-keys"]


def test_without_the_charts_secret_there_is_no_key_checksum():
    for values in (None, {"apiKeys": {"existingSecret": "mine"}}):
        assert not [
            k
            for k in _head_annotations(chart_objects(values=values))
            if k != "checksum/cluster-config" and k.startswith("checksum/")
        ]


def test_notes_say_to_restart_the_pods_after_rotating_a_secret_the_chart_does_not_own():
    restart = "delete pod -l ray.io/cluster=splitserve"
    assert restart not in _notes()
    assert restart not in _notes({"apiKeys": KEYS})
    for value in ("apiKeys", "adminToken", "clusterSecret", "tls", "clusterTLS"):
        notes = _notes({value: {"existingSecret": f"my-{value.lower()}"}})
        assert restart in notes and f"my-{value.lower()} ({value}.existingSecret)" in notes, notes


# -- #2: API keys are used or refused ------------------------------------------------------------


@pytest.mark.parametrize(
    "api_keys, message",
    [
        ({"keys": ["k1"]}, "apiKeys.keys is set but apiKeys.create is false"),
        ({"keys": ["k1"], "existingSecret": "s"}, "apiKeys.keys is set beside apiKeys.existingSecret"),
        ({"create": True, "keys": []}, "apiKeys.create needs at least one key in apiKeys.keys"),
        ({"create": True, "keys": ["k1"], "existingSecret": "s"}, "apiKeys.create and apiKeys.existingSecret"),
    ],
)
def test_api_keys_that_would_be_ignored_are_refused(api_keys, message):
    _refused(message, {"apiKeys": api_keys})


def test_api_keys_render_from_either_source():
    for api_keys, secret in ((KEYS, "splitserve-api-keys"), ({"existingSecret": "s"}, "s")):
        env = {
            e["name"]: e for e in head_container(one(chart_objects(values={"apiKeys": api_keys}), "RayCluster"))["env"]
        }
        assert env["SPLITSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == secret


# -- #3: router ports, CORS origins ---------------------------------------------------------------


RAY_HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}
# Ray binds these in the head pod too, undeclared: the dashboard agent (KubeRay's probes hit it), and the
# autoscaler's (a sidecar, same network) and the dashboard's metrics.
RAY_UNDECLARED_PORTS = {"dashboard-agent": 52365, "autoscaler-metrics": 44217, "dashboard-metrics": 44227}


def _ray_ports_in_the_head() -> dict[str, int]:
    """The head container's declared ports other than the router's, and the ones Ray binds undeclared."""
    ports = {p["name"]: p["containerPort"] for p in head_container(one(chart_objects(), "RayCluster"))["ports"]}
    del ports["http"], ports["grpc"]
    return {**ports, **RAY_UNDECLARED_PORTS}


def test_the_head_declares_rays_ports():
    ports = {p["name"]: p["containerPort"] for p in head_container(one(chart_objects(), "RayCluster"))["ports"]}
    assert ports == {**RAY_HEAD_PORTS, "http": 8000, "grpc": 50051}


@pytest.mark.parametrize("value", ["httpPort", "grpcPort"])
def test_router_ports_that_are_rays_are_refused(value):
    for name, port in _ray_ports_in_the_head().items():
        _refused(f"router.{value} {port} is Ray's {name} port", {"router": {value: port}})


def test_equal_router_ports_are_refused_and_distinct_ones_render():
    _refused("router.httpPort and router.grpcPort are both 8000", {"router": {"grpcPort": 8000}})
    _refused("router.httpPort and router.grpcPort are both 50051", {"router": {"httpPort": 50051}})
    config = configmap_config(chart_objects(values={"router": {"httpPort": 9000, "grpcPort": 9001}}))
    assert (config.router.port, config.router.grpc_port) == (9000, 9001)


def _splitserve_takes(origins: str) -> bool:
    try:
        cors_origin_list(origins)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(
    "origins",
    [
        "*",
        "http://a",
        "https://app.example.com:8443",
        "http://a, https://b:1",
        "*,http://x",
        "http://a,",
        ", http://a",
        "http://a,,http://b",
        "notanorigin",
        "",
        " ",
        ",",
        "http://a/path",
        "ftp://a",
        "http://a:",
        "http://a b",
        "http://a:123456",
        "https://",
        "http://a, nope",
    ],
)
def test_cors_origins_are_refused_by_helm_exactly_when_splitserve_refuses_them(origins):
    values = {"router": {"settings": {"cors_origins": origins}}}
    if _splitserve_takes(origins):
        config = configmap_config(chart_objects(values=values))
        assert config.router.cors_origins == origins
        config.router_config(cluster_secret=None, admin_token=None)
    else:
        _refused("cors_origins", values)


# -- #4: the served model name --------------------------------------------------------------------


def test_served_name_reaches_the_cluster_config_and_the_router():
    config = configmap_config(chart_objects([GPU_VALUES], extra=["--set", "model.servedName=llama-3-8b"]))
    assert config.served_model_name == "llama-3-8b"
    assert config.router_config(cluster_secret=None, admin_token=None).served_model_name == "llama-3-8b"
    assert configmap_config(chart_objects([GPU_VALUES])).served_model_name is None
    assert 'the name "llama-3-8b" (model.servedName)' in _notes({"model": {"servedName": "llama-3-8b"}})


@pytest.mark.parametrize("name", ["", "two words"])
def test_a_blank_served_name_is_refused(name):
    _refused("servedName", {"model": {"servedName": name}})


# -- #5: extra environment ------------------------------------------------------------------------

EVERYTHING_SET = {
    "apiKeys": KEYS,
    "adminToken": {"existingSecret": "admin"},
    "clusterSecret": {"existingSecret": "cluster"},
    "tls": {"existingSecret": "router-tls"},
    "clusterTLS": {"existingSecret": "cluster-tls", "serverName": "worker.splitserve"},
}


def _env_names(container: dict) -> list[str]:
    return [e["name"] for e in container.get("env", [])]


def test_head_and_pool_env_reach_their_containers_after_the_charts_own():
    otel = {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel:4317"}
    ucx = {"name": "UCX_NET_DEVICES", "value": "mlx5_0:1"}
    token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    values = {**EVERYTHING_SET, "head": {"env": [otel]}, "decode": {"env": [ucx, token]}}
    raycluster = one(chart_objects(values=values), "RayCluster")
    plain = one(chart_objects(values=EVERYTHING_SET), "RayCluster")
    head = head_container(raycluster)
    assert head["env"] == head_container(plain)["env"] + [otel]
    decode = worker_group(raycluster, "decode")["template"]["spec"]["containers"][0]
    prefill = worker_group(raycluster, "prefill")["template"]["spec"]["containers"][0]
    assert decode["env"] == worker_group(plain, "decode")["template"]["spec"]["containers"][0]["env"] + [ucx, token]
    assert prefill["env"] == worker_group(plain, "prefill")["template"]["spec"]["containers"][0]["env"]
    alone = one(chart_objects(values={"prefill": {"env": [ucx]}}), "RayCluster")
    assert worker_group(alone, "prefill")["template"]["spec"]["containers"][0]["env"] == [ucx]


def test_pods_with_extra_env_match_the_kubernetes_pod_schema():
    from tests.deploy.test_schemas import kubernetes_errors, pod_templates

    token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    values = {"head": {"env": [token]}, "prefill": {"env": [{"name": "UCX_TLS", "value": "rc,cuda_copy"}]}}
    for group, template in pod_templates(one(chart_objects(values=values), "RayCluster")).items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        assert kubernetes_errors(pod_template) == [], f"{group} pod template"


def _charts_own_env_names() -> set[str]:
    raycluster = one(chart_objects(values=EVERYTHING_SET), "RayCluster")
    names = set(_env_names(head_container(raycluster)))
    for role in ("prefill", "decode"):
        names |= set(_env_names(worker_group(raycluster, role)["template"]["spec"]["containers"][0]))
    return names


KUBERAY_ENV = ("KUBERAY_GEN_RAY_START_CMD", "RAY_ADDRESS", "RAY_PORT", "RAY_IP", "FQ_RAY_IP", "RAY_CLUSTER_NAME")


def test_env_names_the_chart_or_kuberay_set_are_refused():
    own = _charts_own_env_names()
    assert {"SPLITSERVE_API_KEYS", "SPLITSERVE_URL", "SPLITSERVE_TLS_SERVER_NAME"} <= own, own
    for name in sorted(own | set(KUBERAY_ENV)):
        for key in ("head", "decode"):
            _refused(f"{key}.env: {name} is set by", {key: {"env": [{"name": name, "value": "x"}]}})


def test_env_entries_are_checked_as_kubernetes_checks_them():
    _refused("decode.env: A is given twice", {"decode": {"env": [{"name": "A", "value": "1"}, {"name": "A"}]}})
    both = {"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    _refused("/head/env/0", {"head": {"env": [both]}})
    _refused("/head/env/0", {"head": {"env": [{"name": "A=B", "value": "1"}]}})
    _refused("/head/env/0", {"head": {"env": [{"name": "A", "valeu": "1"}]}})


# -- #6: contradictions ---------------------------------------------------------------------------

GPU_POOLS = {"prefill": {"gpusPerWorker": 1}, "decode": {"gpusPerWorker": 1}}


@pytest.mark.parametrize(
    "value_files, values, message",
    [
        ((), {"model": {"device": "cuda"}, **GPU_POOLS}, "model.device cuda and image.variant cpu disagree"),
        ((GPU_VALUES,), {"image": {"variant": "cpu"}}, "model.device cuda and image.variant cpu disagree"),
        ((), {"image": {"variant": "cuda"}}, "model.device cpu and image.variant cuda disagree"),
        ((), {"decode": {"gpusPerWorker": 1}}, "decode.gpusPerWorker is 1 but model.device is cpu"),
        ((GPU_VALUES,), {"prefill": {"gpusPerWorker": 0}}, "prefill: model.device cuda needs gpusPerWorker >= 1"),
    ],
)
def test_the_device_the_image_and_the_gpus_must_agree(value_files, values, message):
    _refused(message, values, value_files)


def test_a_gpu_deployment_renders_when_all_three_agree():
    values = {"model": {"device": "cuda"}, "image": {"variant": "cuda"}, **GPU_POOLS}
    objects = chart_objects(values=values)
    assert one(objects, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"].endswith(
        "-cuda"
    )
    assert configmap_config(objects).device == "cuda"


PVC = {"persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}


@pytest.mark.parametrize(
    "model, message",
    [
        ({"name": "/weights/llama", "volume": PVC}, "model.name /weights/llama is not under model.mountPath /models"),
        ({"name": "/models/../etc/llama", "volume": PVC}, "is not under model.mountPath /models"),
        ({"name": "/modelsx/llama", "volume": PVC}, "is not under model.mountPath /models"),
        ({"name": "/models/llama"}, "model.name /models/llama is a path, but model.volume is empty"),
        ({"name": "demo", "volume": PVC}, "model.volume is mounted at model.mountPath /models, but model.name demo"),
    ],
)
def test_a_model_path_off_its_mount_is_refused(model, message):
    _refused(message, {"model": model})


@pytest.mark.parametrize(
    "model",
    [
        {"name": "/models/llama", "volume": PVC},
        {"name": "/models", "volume": PVC},
        {"name": "/weights/llama", "volume": PVC, "mountPath": "/weights/"},
        {"name": "bench-125m"},
    ],
)
def test_a_model_on_its_mount_renders(model):
    config = configmap_config(chart_objects(values={"model": model}))
    assert config.model == model["name"]


def test_the_planner_needs_the_autoscaler():
    off = {"autoscaler": {"enabled": False}}
    for value in ("ttftSeconds", "tpotSeconds"):
        _refused(f"slo.{value} turns the SLO planner on.*autoscaler.enabled is false", {**off, "slo": {value: 0.5}})
    assert not configmap_config(chart_objects(values=off)).planner.enabled
    assert configmap_config(chart_objects(values={"slo": {"ttftSeconds": 0.5}})).planner.enabled


@pytest.mark.parametrize(
    "pool, message",
    [
        ({"threads": 3}, r"decode.threads \(3\) is more than decode.cpusPerWorker \(2\)"),
        ({"cpusPerWorker": 4, "threads": 4}, r"decode.cpusPerWorker \(4\) is more than decode.resources.requests.cpu"),
        (
            {"resources": {"requests": {"cpu": "1500m", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}},
            r"decode.cpusPerWorker \(2\) is more than decode.resources.requests.cpu \(1500m\)",
        ),
        (
            {"resources": {"requests": {"cpu": "2k", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}}},
            "decode.resources.requests.cpu 2k: give CPUs as a number",
        ),
    ],
)
def test_ray_cpus_threads_and_the_pods_cpus_must_fit(pool, message):
    _refused(message, {"decode": pool})


@pytest.mark.parametrize("cpu", ["4", 4, "4000m", "4.5", 4.5])
def test_fitting_cpus_render(cpu):
    resources = {"requests": {"cpu": cpu, "memory": "4Gi"}, "limits": {"cpu": "5", "memory": "4Gi"}}
    config = configmap_config(
        chart_objects(values={"decode": {"cpusPerWorker": 4, "threads": 3, "resources": resources}})
    )
    assert (config.decode.num_cpus, config.decode.threads) == (4, 3)


# -- #8 and the lower-severity refusals -------------------------------------------------------------

CLOSED = {"router": {"openMetrics": False}, "metrics": {"podAnnotations": False, "podMonitor": {"enabled": True}}}


def test_the_metrics_token_key_may_not_overwrite_the_api_keys():
    collide = {
        "metrics": {**CLOSED["metrics"], "podMonitor": {"enabled": True, "bearerTokenSecret": {"key": "api-keys"}}}
    }
    _refused(
        "metrics.podMonitor.bearerTokenSecret.key and apiKeys.secretKey are both api-keys",
        {**CLOSED, **collide, "apiKeys": {"create": True, "keys": ["k1", "k2"]}},
    )
    secret = one(chart_objects(values={**CLOSED, "apiKeys": {"create": True, "keys": ["k1", "k2"]}}), "Secret")
    assert sorted(secret["data"]) == ["api-keys", "metrics-api-key"]
    # With its own Secret for the token, the chart's Secret holds only the keys, and the names may coincide.
    own = {
        "metrics": {
            **CLOSED["metrics"],
            "podMonitor": {"enabled": True, "bearerTokenSecret": {"name": "t", "key": "api-keys"}},
        }
    }
    chart_objects(values={**CLOSED, **own, "apiKeys": KEYS})


def test_the_secret_has_no_duplicate_keys():
    """A duplicate mapping key is kept last by lenient decoders: the check reads the text, not a parsed dict."""
    text = helm(
        "template",
        "splitserve",
        str(CHART),
        "-s",
        "templates/secret.yaml",
        *value_args((), {**CLOSED, "apiKeys": KEYS}),
    )
    data = yaml.compose(text).value
    (mapping,) = [value for key, value in data if key.value == "data"]
    names = [key.value for key, _ in mapping.value]
    assert len(names) == len(set(names)) == 2, names


@pytest.mark.parametrize("annotation", ["checksum/cluster-config", "checksum/api-keys", "prometheus.io/scrape"])
def test_head_annotations_the_chart_owns_are_refused(annotation):
    _refused(
        f"head.podAnnotations: {re.escape(annotation)} is the chart's own",
        {"head": {"podAnnotations": {annotation: "x"}}},
    )


def test_scrape_annotations_are_the_users_when_the_chart_sets_none():
    values = {"metrics": {"podAnnotations": False}, "head": {"podAnnotations": {"prometheus.io/scrape": "false"}}}
    assert _head_annotations(chart_objects(values=values))["prometheus.io/scrape"] == "false"


@pytest.mark.parametrize(
    "values",
    [
        {"clusterSecret": {"existingSecret": "c", "secretKey": "../../x"}},
        {"apiKeys": {**KEYS, "secretKey": "a/b"}},
        {"adminToken": {"existingSecret": "a", "secretKey": ".."}},
        {"tls": {"existingSecret": "t", "caKey": "ca crt"}},
    ],
)
def test_secret_keys_must_be_kubernetes_secret_keys(values):
    _refused("secretKey|caKey", values)
