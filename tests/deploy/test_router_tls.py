"""With tls.existingSecret the router serves HTTPS only, and every consumer the chart makes follows: the helm test
Pod, the PodMonitor, the scrape annotations, the Service's appProtocol, NOTES and `splitserve` in the head pod. NOTES'
scale command is one the CLI takes, aimed at router.httpPort."""

from __future__ import annotations

import http.server
import json
import shlex
import ssl
import subprocess
import sys
import threading
import urllib.parse

import pytest

from cluster.cli import build_parser
from tests.deploy.conftest import CHART, chart_objects, head_container, helm, one
from tests.deploy.test_schemas import kubernetes_errors, pod_templates
from tests.deploy.test_wiring import _StandInRouter
from tests.worker_server.certs import TestCA

TLS = {"tls": {"existingSecret": "router-tls", "caKey": "ca.crt"}}
SERVICE_NAME = "splitserve.default.svc"


def _env(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def test_service_and_scrape_annotations_say_https():
    objects = chart_objects(values=TLS)
    ports = {p["name"]: p["appProtocol"] for p in one(objects, "Service")["spec"]["ports"]}
    assert ports == {"http": "https", "grpc": "https"}
    annotations = one(objects, "RayCluster")["spec"]["headGroupSpec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scheme"] == "https"
    plain = chart_objects()
    assert {p["name"]: p["appProtocol"] for p in one(plain, "Service")["spec"]["ports"]} == {
        "http": "http",
        "grpc": "kubernetes.io/h2c",
    }
    head = one(plain, "RayCluster")["spec"]["headGroupSpec"]["template"]
    assert "prometheus.io/scheme" not in head["metadata"]["annotations"]


@pytest.mark.parametrize("ca_key", ["ca.crt", "tls.crt"])
def test_pod_monitor_scrapes_https_verifying_with_the_secrets_ca(ca_key):
    values = {"tls": {"existingSecret": "router-tls", "caKey": ca_key}, "metrics": {"podMonitor": {"enabled": True}}}
    (endpoint,) = one(chart_objects(values=values), "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["scheme"] == "https"
    ca = {"secret": {"name": "router-tls", "key": ca_key}}
    assert endpoint["tlsConfig"] == {"serverName": SERVICE_NAME, "ca": ca}
    assert "insecureSkipVerify" not in json.dumps(endpoint)


def test_pod_monitor_trusts_the_system_cas_when_ca_key_is_empty():
    values = {"tls": {"existingSecret": "router-tls", "caKey": ""}, "metrics": {"podMonitor": {"enabled": True}}}
    objects = chart_objects(values=values)
    (endpoint,) = one(objects, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"] == {"serverName": SERVICE_NAME}
    assert "SPLITSERVE_ROUTER_CA" not in _env(head_container(one(objects, "RayCluster")))
    assert "volumes" not in one(objects, "Pod")["spec"]


def test_head_pod_environment_points_splitserve_at_its_router():
    raycluster = one(chart_objects(values={**TLS, "router": {"httpPort": 9000}}), "RayCluster")
    spec = raycluster["spec"]["headGroupSpec"]["template"]["spec"]
    env = _env(head_container(raycluster))
    assert env["SPLITSERVE_URL"] == f"https://{SERVICE_NAME}:9000"
    assert spec["hostAliases"] == [{"ip": "127.0.0.1", "hostnames": [SERVICE_NAME]}]
    # The CA file lies in the router-tls Secret's mount.
    mounts = {m["name"]: m["mountPath"] for m in head_container(raycluster)["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert secrets["router-tls"] == "router-tls"
    assert env["SPLITSERVE_ROUTER_CA"] == mounts["router-tls"] + "/ca.crt"
    plain = one(chart_objects(values={"router": {"httpPort": 9000}}), "RayCluster")
    assert _env(head_container(plain))["SPLITSERVE_URL"] == "http://127.0.0.1:9000"
    assert "hostAliases" not in plain["spec"]["headGroupSpec"]["template"]["spec"]


def test_tls_objects_match_the_kubernetes_schemas():
    values = {**TLS, "metrics": {"podMonitor": {"enabled": True}}, "apiKeys": {"create": True, "keys": ["k"]}}
    objects = chart_objects(values=values)
    for obj in objects:
        if obj["kind"] in ("Service", "ConfigMap", "Secret", "Pod", "NetworkPolicy"):
            assert kubernetes_errors(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"
    for group, template in pod_templates(one(objects, "RayCluster")).items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        assert kubernetes_errors(pod_template) == [], f"{group} pod template"


def test_helm_test_pod_gets_only_the_ca():
    pod = one(chart_objects(values=TLS), "Pod")
    (container,) = pod["spec"]["containers"]
    env = _env(container)
    assert env["SPLITSERVE_URL"] == f"https://{SERVICE_NAME}:8000"
    (volume,) = pod["spec"]["volumes"]
    assert volume["secret"] == {"secretName": "router-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    (mount,) = container["volumeMounts"]
    assert mount["name"] == volume["name"] and env["SPLITSERVE_ROUTER_CA"] == mount["mountPath"] + "/ca.crt"


def _run_tls_test_pod(tmp_path, trust_ca: bool) -> subprocess.CompletedProcess:
    """The hook Pod's container against a stand-in router serving HTTPS with a certificate of the test's CA, the
    Secret's ca.crt being that CA (or, with trust_ca False, another CA)."""
    pod = one(chart_objects(values=TLS), "Pod")
    (container,) = pod["spec"]["containers"]
    env = _env(container)
    ca = TestCA(tmp_path)
    issued = ca.issue("router")
    other = TestCA(tmp_path, name="another-ca")
    handler = type("Router", (_StandInRouter,), {"api_keys": (), "ready": True})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # The test's certificate names 127.0.0.1, not the Service: the scheme is the chart's, the address the test's.
    url = urllib.parse.urlsplit(env["SPLITSERVE_URL"])
    env["SPLITSERVE_URL"] = url._replace(netloc=f"127.0.0.1:{server.server_address[1]}").geturl()
    env["SPLITSERVE_ROUTER_CA"] = ca.path if trust_ca else other.path
    try:
        return subprocess.run(
            [sys.executable, *container["command"][1:], *container["args"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()


def test_helm_test_pod_checks_an_https_router_with_the_secrets_ca(tmp_path):
    passed = _run_tls_test_pod(tmp_path, trust_ca=True)
    assert passed.returncode == 0, passed.stderr
    assert "serving ['demo']" in passed.stdout
    refused = _run_tls_test_pod(tmp_path, trust_ca=False)
    assert refused.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr


def _notes(*set_args: str) -> str:
    release = json.loads(helm("install", "splitserve", str(CHART), "--dry-run=client", "-o", "json", *set_args))
    return release["info"]["notes"]


def _scale_command(notes: str) -> list[str]:
    """The CLI part of NOTES' `kubectl exec ... -- <command>`."""
    text = notes.replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if " exec " in line]
    return shlex.split(line.split(" -- ", 1)[1])


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_notes_scale_command_is_one_the_cli_takes(tls):
    args = ["--set", "apiKeys.create=true", "--set", "apiKeys.keys={K1}", "--set", "router.httpPort=9000"]
    notes = _notes(*args, *(["--set", "tls.existingSecret=router-tls"] if tls else []))
    command = _scale_command(notes)
    assert command[0] == "splitserve"
    parsed = build_parser().parse_args(command[1:])  # exits 2 on a refused flag such as --api-key
    assert (parsed.command, parsed.role, parsed.replicas) == ("scale", "decode", 2)
    assert "--api-key" not in notes
    scheme = "https" if tls else "http"
    curl = [line for line in notes.splitlines() if line.strip().startswith("curl")]
    assert curl and f"{scheme}://" in curl[0] and ":9000/v1/models" in curl[0]
    if tls:
        assert f"--resolve {SERVICE_NAME}:9000:127.0.0.1" in curl[0] and "--cacert router-ca.crt" in curl[0]
        assert "jsonpath='{.data.ca\\.crt}'" in notes
