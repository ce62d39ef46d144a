"""The objects point at each other correctly once KubeRay has made the pods: the Service and the
PodMonitor select the head pod and name its ports, probes hit endpoints the router serves without
an API key, Prometheus' scrape job finds exactly the router, and Secrets are referenced as made."""

from __future__ import annotations

import base64
import http.server
import json
import re
import subprocess
import sys
import threading
import urllib.parse

import pytest
import yaml

from cluster.config import from_dict
from router.openai_api import _OPEN_PATHS, open_paths
from tests.deploy.conftest import DEPLOY, RENDERS, HelmError, chart_objects, head_container, one
from tests.deploy.test_placement import configmap_text

SCRAPE_CONFIG = DEPLOY / "prometheus" / "scrape-config.yaml"


def kuberay_pods(raycluster: dict) -> list[dict]:
    """The head and one pod of each worker group, labelled as KubeRay v1.7.0 labels them."""
    name, spec = raycluster["metadata"]["name"], raycluster["spec"]
    groups = [("head", "headgroup", spec["headGroupSpec"])] + [
        ("worker", g["groupName"], g) for g in spec["workerGroupSpecs"]
    ]
    pods = []
    for node_type, group_name, group in groups:
        template = group["template"]
        labels = {
            **template.get("metadata", {}).get("labels", {}),
            "ray.io/cluster": name,
            "ray.io/node-type": node_type,
            "ray.io/group": group_name,
            "ray.io/is-ray-node": "yes",
        }
        pods.append(
            {
                "metadata": {
                    "name": f"{name}-{group_name}-x",
                    "namespace": "default",
                    "labels": labels,
                    "annotations": template.get("metadata", {}).get("annotations", {}),
                },
                "spec": template["spec"],
            }
        )
    return pods


def selected(selector: dict, pods: list[dict]) -> list[dict]:
    return [p for p in pods if all(p["metadata"]["labels"].get(k) == v for k, v in selector.items())]


def container_ports(pod: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}


def test_service_reaches_the_router_on_the_head(objects):
    service, raycluster = one(objects, "Service"), one(objects, "RayCluster")
    (pod,) = selected(service["spec"]["selector"], kuberay_pods(raycluster))
    assert pod["metadata"]["labels"]["ray.io/node-type"] == "head"
    ports = container_ports(pod)
    assert {p["name"]: ports.get(p["targetPort"]) for p in service["spec"]["ports"]} == {
        "http": ports["http"],
        "grpc": ports["grpc"],
    }
    assert [p["port"] for p in service["spec"]["ports"]] == [ports["http"], ports["grpc"]]


def test_probes_use_router_endpoints_open_without_an_api_key(objects):
    container = head_container(one(objects, "RayCluster"))
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready" and probes["livenessProbe"]["path"] == "/health"
    for kind, probe in probes.items():
        assert probe["path"] in _OPEN_PATHS, f"{kind} {probe['path']} would get 401 once API keys are set"
        assert probe["port"] in {p["name"] for p in container["ports"]}
    config = from_dict(yaml.safe_load(configmap_text(objects, "/etc/splitserve/cluster.yaml")))
    assert "/metrics" in open_paths(config.router), (
        "the chart's default: Prometheus in the cluster scrapes without a key"
    )


CLOSED_METRICS = {
    "apiKeys": {"create": True, "keys": ["key-one", "key-two"]},
    "router": {"openMetrics": False},
    "metrics": {"podAnnotations": False, "podMonitor": {"enabled": True}},
}


def test_closed_metrics_are_scraped_with_an_api_key_from_a_secret():
    objects = chart_objects(values=CLOSED_METRICS)
    config = from_dict(yaml.safe_load(configmap_text(objects, "/etc/splitserve/cluster.yaml")))
    assert config.router.open_metrics is False and "/metrics" not in open_paths(config.router)
    (endpoint,) = one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]
    credentials = endpoint["authorization"]["credentials"]
    secret = one(objects, "Secret")
    assert endpoint["authorization"]["type"] == "Bearer" and credentials["name"] == secret["metadata"]["name"]
    assert base64.b64decode(secret["data"][credentials["key"]]).decode() == "key-one"
    own = chart_objects(
        values={
            **CLOSED_METRICS,
            "metrics": {
                "podAnnotations": False,
                "podMonitor": {"enabled": True, "bearerTokenSecret": {"name": "scraper", "key": "token"}},
            },
        }
    )
    (endpoint,) = one(own, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["authorization"]["credentials"] == {"name": "scraper", "key": "token"}


def test_closed_metrics_refuse_a_scrape_that_cannot_send_a_key():

    with pytest.raises(HelmError, match="metrics.podAnnotations"):
        chart_objects(values={**CLOSED_METRICS, "metrics": {"podAnnotations": True}})
    existing = {**CLOSED_METRICS, "apiKeys": {"existingSecret": "keys"}}
    with pytest.raises(HelmError, match="bearerTokenSecret"):
        chart_objects(values=existing)


def test_every_container_has_requests_and_limits(objects):
    raycluster = one(objects, "RayCluster")
    for pod in kuberay_pods(raycluster):
        for container in pod["spec"]["containers"]:
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][section]), (
                    f"{pod['metadata']['name']}: {section}"
                )
    autoscaler = raycluster["spec"].get("autoscalerOptions", {})
    assert raycluster["spec"]["enableInTreeAutoscaling"] is True and {"requests", "limits"} <= set(
        autoscaler["resources"]
    )


def test_api_keys_come_from_a_secret_the_release_holds():
    objects = RENDERS["chart-all-options"]()
    env = {e["name"]: e for e in head_container(one(objects, "RayCluster"))["env"]}
    ref = env["SPLITSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]
    secret = one(objects, "Secret")
    assert (secret["metadata"]["name"], ref["key"] in secret["data"]) == (ref["name"], True)
    assert base64.b64decode(secret["data"][ref["key"]]).decode() == "key-one,key-two"
    assert env["SPLITSERVE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "splitserve-admin"
    assert "--admin-token" not in head_container(one(objects, "RayCluster"))["args"][0], (
        "a token on the command line shows in ps"
    )
    import os

    from cluster.cli import build_parser, cluster_config_from_args

    os.environ["SPLITSERVE_ADMIN_TOKEN"] = "from-the-secret"
    try:
        assert cluster_config_from_args(build_parser().parse_args(["up"])).router.admin_token == "from-the-secret"
    finally:
        del os.environ["SPLITSERVE_ADMIN_TOKEN"]


def test_default_render_has_no_secret_and_no_key_env():
    objects = RENDERS["chart-default"]()
    assert not [o for o in objects if o["kind"] == "Secret"]
    # Only where `splitserve status` finds the router: no key, token or secret file.
    assert head_container(one(objects, "RayCluster"))["env"] == [
        {"name": "SPLITSERVE_URL", "value": "http://127.0.0.1:8000"}
    ]


def test_pod_monitor_scrapes_the_router_only():
    objects = RENDERS["chart-all-options"]()
    monitor, raycluster = one(objects, "PodMonitor"), one(objects, "RayCluster")
    (pod,) = selected(monitor["spec"]["selector"]["matchLabels"], kuberay_pods(raycluster))
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert pod["metadata"]["labels"]["ray.io/node-type"] == "head"
    assert container_ports(pod)[endpoint["port"]] == 8000 and endpoint["path"] == "/metrics"


# -- the plain Prometheus job, run over what Kubernetes service discovery would list ------------


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def discovered_targets(pods: list[dict]) -> list[dict]:
    """Prometheus' kubernetes_sd `role: pod`: one target per declared container port."""
    targets = []
    for pod in pods:
        meta = {
            "__meta_kubernetes_namespace": pod["metadata"]["namespace"],
            "__meta_kubernetes_pod_name": pod["metadata"]["name"],
        }
        meta.update({f"__meta_kubernetes_pod_label_{_sanitize(k)}": v for k, v in pod["metadata"]["labels"].items()})
        meta.update(
            {f"__meta_kubernetes_pod_annotation_{_sanitize(k)}": v for k, v in pod["metadata"]["annotations"].items()}
        )
        for container in pod["spec"]["containers"]:
            for port in container.get("ports", []):
                targets.append(
                    {
                        **meta,
                        "__address__": f"10.0.0.1:{port['containerPort']}",
                        "__metrics_path__": "/metrics",
                        "__meta_kubernetes_pod_container_name": container["name"],
                        "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                        "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                    }
                )
    return targets


def relabel(target: dict, rules: list[dict]) -> dict | None:
    """Prometheus relabelling, for the actions the scrape job uses (RE2: no backreferences)."""
    for rule in rules:
        regex = rule.get("regex", "(.*)")
        assert not re.search(r"\\\d|\(\?[=!<]", regex), f"{regex!r} is not RE2 (Prometheus would refuse it)"
        value = rule.get("separator", ";").join(target.get(label, "") for label in rule.get("source_labels", []))
        match = re.fullmatch(regex, value)
        action = rule.get("action", "replace")
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            target[rule["target_label"]] = match.expand(rule.get("replacement", "$1").replace("$1", r"\1"))
        assert action in ("keep", "drop", "replace"), f"relabel action {action} is not simulated"
    return target


def test_scrape_config_finds_exactly_the_router(objects):
    (job,) = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    raycluster = one(objects, "RayCluster")
    kept = [
        t for t in (relabel(dict(t), job["relabel_configs"]) for t in discovered_targets(kuberay_pods(raycluster))) if t
    ]
    port = container_ports(kuberay_pods(raycluster)[0])["http"]
    assert [(t["__address__"], t["__metrics_path__"], t["ray_cluster"]) for t in kept] == [
        (f"10.0.0.1:{port}", "/metrics", raycluster["metadata"]["name"])
    ]


def test_scrape_config_ignores_pods_that_opted_out():
    raycluster = one(RENDERS["chart-default"](), "RayCluster")
    raycluster["spec"]["headGroupSpec"]["template"]["metadata"]["annotations"].pop("prometheus.io/scrape")
    (job,) = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    assert not [t for t in discovered_targets(kuberay_pods(raycluster)) if relabel(dict(t), job["relabel_configs"])]


# -- the `helm test` Pod, run against a stand-in router ----------------------------------------


class _StandInRouter(http.server.BaseHTTPRequestHandler):
    """Answers as the router's API guard does: paths outside _OPEN_PATHS need a configured key."""

    api_keys: tuple[str, ...] = ()
    ready = True

    def do_GET(self):
        supplied = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if self.api_keys and self.path not in _OPEN_PATHS and supplied not in self.api_keys:
            return self._reply(401, {"error": "unauthorized"})
        if self.path == "/ready" and not self.ready:
            return self._reply(503, {"ready": False})
        bodies = {"/health": {"status": "ok"}, "/ready": {"ready": True}, "/v1/models": {"data": [{"id": "demo"}]}}
        self._reply(200, bodies[self.path]) if self.path in bodies else self._reply(404, {})

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def _run_test_pod(objects: list[dict], api_keys: tuple[str, ...], ready: bool = True) -> subprocess.CompletedProcess:
    """The hook Pod's container, its URL pointed at a stand-in router on 127.0.0.1 instead of the Service."""
    pod, service = one(objects, "Pod"), one(objects, "Service")
    (container,) = pod["spec"]["containers"]
    env = {}
    for item in container["env"]:
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            (secret,) = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == ref["name"]]
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        else:
            env[item["name"]] = item["value"]
    url = urllib.parse.urlsplit(env["SPLITSERVE_URL"])
    http_port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["http"]
    assert (url.hostname, url.port) == (service["metadata"]["name"], http_port), "the test must go through the Service"
    handler = type("Router", (_StandInRouter,), {"api_keys": api_keys, "ready": ready})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env["SPLITSERVE_URL"] = f"http://127.0.0.1:{server.server_address[1]}"
    argv = [sys.executable if container["command"][0] == "python" else container["command"][0]]
    try:
        return subprocess.run(
            argv + container["command"][1:] + container["args"], env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        server.shutdown()


def test_helm_test_pod_checks_the_router_through_the_service():
    objects = RENDERS["chart-all-options"]()
    assert one(objects, "Pod")["metadata"]["annotations"]["helm.sh/hook"] == "test"
    passed = _run_test_pod(objects, api_keys=("key-one", "key-two"))
    assert passed.returncode == 0, passed.stderr
    assert "serving ['demo']" in passed.stdout
    open_api = _run_test_pod(RENDERS["chart-default"](), api_keys=())
    assert open_api.returncode == 0, open_api.stderr


def test_helm_test_pod_fails_when_the_router_is_not_ready_or_refuses_the_key():
    objects = RENDERS["chart-all-options"]()
    not_ready = _run_test_pod(objects, api_keys=("key-one",), ready=False)
    assert not_ready.returncode != 0 and "503" in not_ready.stderr
    wrong_key = _run_test_pod(objects, api_keys=("another-key",))
    assert wrong_key.returncode != 0 and "401" in wrong_key.stderr
