"""Every rendered object validates: KubeRay kinds against the real KubeRay v1.7.0 CRD schemas in
shared/kuberay-crds (strictly: an unknown field is an error, as `kubectl apply` reports it), core
kinds against Kubernetes' own schemas (kubernetes-validate, offline), plus the checks the KubeRay
operator makes before it accepts a RayCluster."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import head_container, one, worker_group

KUBERNETES_VERSION = "1.33.0"
KUBERAY_GROUP = "ray.io"
MAX_RAYCLUSTER_NAME = 53  # KubeRay utils.MaxRayClusterNameLength


def _strict(schema):
    """Closes every object schema that lists its properties (CRDs prune unknown fields; kubectl's
    default field validation rejects them, and so do these tests)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 60,000 lines


def crd_kinds(crd_dir: Path) -> dict[tuple[str, str], Path]:
    """(apiVersion, kind) -> CRD file, read from each file's header only."""
    kinds = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        head = path.read_text()[:4000]
        group = re.search(r"^  group: (\S+)$", head, re.M).group(1)
        kind = re.search(r"^    kind: (\S+)$", head, re.M).group(1)
        for version in re.findall(r"^    name: (v\w+)$", path.read_text(), re.M):
            kinds[(f"{group}/{version}", kind)] = path
    assert kinds, f"no CRDs found in {crd_dir}"
    return kinds


@functools.cache
def crd_validator(path: Path, api_version: str, kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.load(path.read_text(), Loader=_YAML_LOADER)
    assert crd["spec"]["names"]["kind"] == kind
    for version in crd["spec"]["versions"]:
        if f"{crd['spec']['group']}/{version['name']}" == api_version:
            return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
    raise AssertionError(f"{path} has no version {api_version}")


def crd_errors(obj: dict, crd_dir: Path) -> list[str]:
    key = (obj["apiVersion"], obj["kind"])
    path = crd_kinds(crd_dir).get(key)
    assert path is not None, f"no CRD schema for {key[0]} {key[1]} in {crd_dir}"
    validator = crd_validator(path, *key)
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}" for e in validator.iter_errors(obj)]


def kubernetes_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path)) or '(root)'}: {exc.message[:300]}"]
    return []


def pod_templates(raycluster: dict) -> dict[str, dict]:
    templates = {"head": raycluster["spec"]["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in raycluster["spec"]["workerGroupSpecs"]})
    return templates


def operator_errors(raycluster: dict) -> list[str]:
    """The checks of KubeRay v1.7.0's ValidateRayClusterMetadata / ValidateRayClusterSpec that
    these manifests could trip."""
    errors, spec, name = [], raycluster["spec"], raycluster["metadata"]["name"]
    if len(name) > MAX_RAYCLUSTER_NAME or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        errors.append(f"RayCluster name {name!r} is not a DNS-1035 label of at most {MAX_RAYCLUSTER_NAME} characters")
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for group_name, group in groups:
        params = group.get("rayStartParams", {})
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"{group_name}: resources set both in rayStartParams and in resources")
        if "labels" in params:
            errors.append(f"{group_name}: rayStartParams['labels'] is not supported")
        if not group["template"]["spec"].get("containers"):
            errors.append(f"{group_name}: no container")
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    if len(set(names)) != len(names):
        errors.append(f"worker group names repeat: {names}")
    for group in spec["workerGroupSpecs"]:
        low, high, replicas = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not spec.get("enableInTreeAutoscaling") and (low is None or high is None):
            errors.append(f"{group['groupName']}: minReplicas and maxReplicas are required without autoscaling")
        if low is not None and high is not None and not low <= (replicas if replicas is not None else low) <= high:
            errors.append(f"{group['groupName']}: need minReplicas <= replicas <= maxReplicas")
    return errors


# -- the tests ----------------------------------------------------------------------------------


def test_kuberay_objects_match_the_crd_schemas(objects, shared_crds):
    kuberay = [o for o in objects if o["apiVersion"].split("/")[0] == KUBERAY_GROUP]
    assert [o["kind"] for o in kuberay] == ["RayCluster"]
    for obj in kuberay:
        assert crd_errors(obj, shared_crds) == []


def test_core_objects_match_the_kubernetes_schemas(objects):
    core = [o for o in objects if "/" not in o["apiVersion"] or o["apiVersion"].split("/")[0].endswith(".k8s.io")]
    assert {o["kind"] for o in core} >= {"Service", "ConfigMap"}
    for obj in core:
        assert kubernetes_errors(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"


def test_pod_templates_match_the_kubernetes_pod_schema(objects):
    # The CRD embeds the pod schema loosely (maps of anything); Kubernetes' own is exact.
    raycluster = one(objects, "RayCluster")
    for group, template in pod_templates(raycluster).items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        assert kubernetes_errors(pod_template) == [], f"{group} pod template"


def test_raycluster_passes_the_operator_checks(objects):
    assert operator_errors(one(objects, "RayCluster")) == []


def test_every_object_is_known(objects, shared_crds):
    known = set(crd_kinds(shared_crds)) | {("monitoring.coreos.com/v1", "PodMonitor")}
    for obj in objects:
        if obj["kind"] in ("Service", "ConfigMap", "Secret", "Pod", "NetworkPolicy"):  # Kubernetes schemas, above
            continue
        assert (obj["apiVersion"], obj["kind"]) in known, f"{obj['apiVersion']} {obj['kind']} is validated by no test"


def test_pod_monitor_is_well_formed():
    from tests.deploy.conftest import RENDERS

    objects = RENDERS["chart-all-options"]()
    monitor = one(objects, "PodMonitor")
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings"}
    assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint["interval"])
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


# -- the validators themselves catch mistakes ---------------------------------------------------


def _first_render():
    from tests.deploy.conftest import RENDERS

    return RENDERS["chart-gpu"]()


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda rc: rc["spec"]["workerGroupSpecs"][0].update(minReplica=1), "minReplica"),
        (lambda rc: rc["spec"].update(upgradeStrategy={"type": "RollingUpdate"}), "RollingUpdate"),
        (lambda rc: rc["spec"]["workerGroupSpecs"][1].update(replicas="two"), "two"),
        (lambda rc: rc["spec"]["headGroupSpec"].pop("template"), "template"),
    ],
)
def test_crd_validation_catches_broken_rayclusters(mutate, expected, shared_crds):
    raycluster = copy.deepcopy(one(_first_render(), "RayCluster"))
    mutate(raycluster)
    errors = crd_errors(raycluster, shared_crds)
    assert errors and any(expected in e for e in errors), errors


def test_kubernetes_validation_catches_broken_objects():
    service = copy.deepcopy(one(_first_render(), "Service"))
    service["spec"]["ports"][0]["targetPrt"] = "http"
    assert kubernetes_errors(service)
    template = pod_templates(one(_first_render(), "RayCluster"))["prefill"]
    template["spec"]["containers"][0]["resources"]["limits"]["cpu"] = {"cores": 8}
    assert kubernetes_errors(
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template}
    )


def test_operator_checks_catch_broken_rayclusters():
    raycluster = one(_first_render(), "RayCluster")
    broken = copy.deepcopy(raycluster)
    broken["metadata"]["name"] = "x" * 54
    worker_group(broken, "decode")["resources"] = {"decode_node": "1"}
    worker_group(broken, "prefill")["minReplicas"] = 9
    errors = operator_errors(broken)
    assert len(errors) == 3, errors
    assert head_container(raycluster)["name"] == "ray-head"


def test_autoscaler_off_and_no_upgrade_strategy_still_validate(shared_crds):
    from tests.deploy.conftest import chart_objects

    objects = chart_objects(
        values={"autoscaler": {"enabled": False}, "upgradeStrategy": "None", "service": {"type": "NodePort"}}
    )
    raycluster = one(objects, "RayCluster")
    assert raycluster["spec"]["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in raycluster["spec"]
    assert crd_errors(raycluster, shared_crds) == [] and operator_errors(raycluster) == []
    assert kubernetes_errors(one(objects, "Service")) == []
