"""Renders of the chart and the plain manifests, shared by the deploy tests (no cluster, no network)."""

from __future__ import annotations

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

import render_chart  # noqa: E402

# Everything the chart can switch on, to validate the optional objects too.
ALL_OPTIONS = {
    "nameOverride": "llm",
    "apiKeys": {"create": True, "keys": ["key-one", "key-two"]},
    "adminToken": {"existingSecret": "splitserve-admin"},
    "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "model": {"name": "/models/m", "volume": {"persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}},
    "imagePullSecrets": [{"name": "registry"}],
    "slo": {"ttftSeconds": 0.25},
    "service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
    "head": {"podAnnotations": {"example.com/team": "llm"}, "nodeSelector": {"pool": "cpu"}},
}

RENDERS = {
    "chart-default": lambda: render_chart.manifests(CHART),
    "chart-gpu": lambda: render_chart.manifests(CHART, [CHART / "values-gpu.yaml"]),
    "chart-all-options": lambda: render_chart.manifests(
        CHART, [CHART / "values-gpu.yaml"], ALL_OPTIONS, release="prod"
    ),
    "manifest-splitserve.yaml": lambda: _load_manifest("splitserve.yaml"),
    "manifest-splitserve-gpu.yaml": lambda: _load_manifest("splitserve-gpu.yaml"),
}


def _load_manifest(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text()) if d is not None]


@pytest.fixture(scope="session")
def shared_crds() -> Path:
    if not CRD_DIR.is_dir():
        pytest.fail(
            f"the KubeRay CRDs are missing: expected {CRD_DIR} (the project's shared/ beside the repository, "
            f"<repo>/../shared); the deploy tests validate against them and cannot run without them"
        )
    return CRD_DIR


_cache: dict[str, list[dict]] = {}


@pytest.fixture(params=sorted(RENDERS))
def objects(request) -> list[dict]:
    """Every Kubernetes object of one render (a deep copy per test: tests may mutate it)."""
    import copy

    if request.param not in _cache:
        _cache[request.param] = RENDERS[request.param]()
    return copy.deepcopy(_cache[request.param])


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
