"""Renders of the chart (by helm itself) and the plain manifests, shared by the deploy tests (no
cluster, no network). helm comes from make setup: deploy/tools/find_helm.py."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "splitserve"
SHARED = REPO.parent / "shared"
CRD_DIR = SHARED / "kuberay-crds"

sys.path.insert(0, str(DEPLOY / "tools"))

import find_helm  # noqa: E402

# Everything the chart can switch on, to validate the optional objects too.
ALL_OPTIONS = {
    "nameOverride": "llm",
    "apiKeys": {"create": True, "keys": ["key-one", "key-two"]},
    "adminToken": {"existingSecret": "splitserve-admin"},
    "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    # --set-json model=... replaces values-gpu.yaml's model section whole: it restates the device.
    "model": {
        "name": "/models/m",
        "servedName": "m",
        "device": "cuda",
        "volume": {"persistentVolumeClaim": {"claimName": "weights", "readOnly": True}},
    },
    "imagePullSecrets": [{"name": "registry"}],
    "slo": {"ttftSeconds": 0.25},
    "service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
    "head": {
        "podAnnotations": {"example.com/team": "llm"},
        "nodeSelector": {"pool": "cpu"},
        "env": [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector:4317"}],
    },
    # Prometheus admitted by its own policy (the router's ports stay open to all: routerFrom is tested apart).
    "networkPolicy": {
        "enabled": True,
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
    },
}
GPU_VALUES = CHART / "values-gpu.yaml"


class HelmError(AssertionError):
    """helm exited non-zero; the message is its stderr."""


def helm(*args: str) -> str:
    """Runs the packaged helm in the repository root; its stdout, or HelmError."""
    result = subprocess.run([str(find_helm.helm_path()), *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise HelmError(result.stderr.strip())
    return result.stdout


def value_args(value_files=(), values: dict | None = None) -> list[str]:
    """-f for each file, then --set-json for each top-level key (merged into the values as -f would)."""
    args = [arg for path in value_files for arg in ("-f", str(path))]
    return args + [arg for key, value in (values or {}).items() for arg in ("--set-json", f"{key}={json.dumps(value)}")]


def helm_template(value_files=(), values: dict | None = None, release: str = "splitserve", extra=()) -> str:
    return helm("template", release, str(CHART), *value_args(value_files, values), *extra)


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def chart_objects(value_files=(), values: dict | None = None, release: str = "splitserve", extra=()) -> list[dict]:
    return documents(helm_template(value_files, values, release, extra))


def _once(make):
    """Renders once per session; each caller gets its own deep copy (tests may mutate it)."""
    cached: list = []

    def get() -> list[dict]:
        if not cached:
            cached.append(make())
        return copy.deepcopy(cached[0])

    return get


RENDERS = {
    "chart-default": _once(lambda: chart_objects()),
    "chart-gpu": _once(lambda: chart_objects([GPU_VALUES])),
    "chart-all-options": _once(lambda: chart_objects([GPU_VALUES], ALL_OPTIONS, "prod")),
    "manifest-splitserve.yaml": _once(lambda: documents((DEPLOY / "kuberay" / "splitserve.yaml").read_text())),
    "manifest-splitserve-gpu.yaml": _once(lambda: documents((DEPLOY / "kuberay" / "splitserve-gpu.yaml").read_text())),
}


@pytest.fixture(scope="session")
def shared_crds() -> Path:
    if not CRD_DIR.is_dir():
        pytest.fail(
            f"the KubeRay CRDs are missing: expected {CRD_DIR} (the project's shared/ beside the repository, "
            f"<repo>/../shared); the deploy tests validate against them and cannot run without them"
        )
    return CRD_DIR


@pytest.fixture(params=sorted(RENDERS))
def objects(request) -> list[dict]:
    """Every Kubernetes object of one render (a deep copy per test: tests may mutate it)."""
    return RENDERS[request.param]()


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def worker_group(raycluster: dict, role: str) -> dict:
    groups = {g["groupName"]: g for g in raycluster["spec"]["workerGroupSpecs"]}
    assert role in groups, f"no worker group {role!r} in {sorted(groups)}"
    return groups[role]


def head_container(raycluster: dict) -> dict:
    # KubeRay: the Ray container is the first container of a pod.
    return raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
