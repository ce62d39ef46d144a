"""The manifests and the controller cannot drift: what the controller asks Ray for (per worker, and
from the autoscaler) is offered by exactly one worker group, the one of that pool, once per pod;
the head's command line builds the ClusterConfig of the ConfigMap; and the shell lines KubeRay runs
pass the custom resources to `ray start` intact."""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
from pathlib import Path

import yaml

from cluster.cli import build_parser, cluster_config_from_args
from cluster.config import ClusterConfig, from_dict
from tests.deploy.conftest import head_container, one, worker_group

ROLES = ("prefill", "decode")
GPU = "nvidia.com/gpu"


# -- reading the manifests ----------------------------------------------------------------------


def head_up_argv(raycluster: dict) -> list[str]:
    """The arguments of `splitserve` in the head container's shell line."""
    container = head_container(raycluster)
    assert container["command"] == ["/bin/bash", "-c", "--"] and len(container["args"]) == 1
    tokens = shlex.split(container["args"][0])
    starts = [i for i in range(len(tokens) - 1) if tokens[i : i + 2] == ["exec", "splitserve"]]
    assert len(starts) == 1, f"expected one `exec splitserve` in {container['args'][0]!r}"
    return tokens[starts[0] + 2 :]


def configmap_text(objects: list[dict], path: str) -> str:
    """The file at ``path`` inside the head container, from the ConfigMap mounted there."""
    raycluster = one(objects, "RayCluster")
    pod = raycluster["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = [
        m
        for m in head_container(raycluster).get("volumeMounts", [])
        if path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert len(mounts) == 1, f"nothing (or several volumes) mounted at {path}"
    volume = {v["name"]: v for v in pod["volumes"]}[mounts[0]["name"]]
    assert "configMap" in volume and "items" not in volume, f"{path} is not a plain ConfigMap mount"
    configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    configmap = configmaps.get(volume["configMap"]["name"])
    assert configmap is not None, (
        f"the head mounts ConfigMap {volume['configMap']['name']!r}, which the manifests do not hold"
    )
    key = path[len(mounts[0]["mountPath"].rstrip("/")) + 1 :]
    assert key in configmap["data"], f"ConfigMap {configmap['metadata']['name']} has no key {key!r}"
    return configmap["data"][key]


def head_config(objects: list[dict], tmp_path: Path) -> ClusterConfig:
    """The ClusterConfig `splitserve up` builds in the head pod: its flags over the mounted file."""
    argv = head_up_argv(one(objects, "RayCluster"))
    assert argv[0] == "up"
    at = argv.index("--config") + 1
    local = tmp_path / "cluster.yaml"
    local.write_text(configmap_text(objects, argv[at]))
    argv[at] = str(local)
    return cluster_config_from_args(build_parser().parse_args(argv))


def configmap_config(objects: list[dict]) -> ClusterConfig:
    argv = head_up_argv(one(objects, "RayCluster"))
    return from_dict(yaml.safe_load(configmap_text(objects, argv[argv.index("--config") + 1])))


def quantity(text) -> float:
    match = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", str(text))
    assert match, f"not a Kubernetes quantity: {text!r}"
    scale = {
        None: 1,
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "P": 1e15,
        "E": 1e18,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "Pi": 2**50,
        "Ei": 2**60,
    }[match.group(2)]
    return float(match.group(1)) * scale


def ray_start_resources(group: dict) -> dict:
    """rayStartParams.resources as Ray's KubeRay autoscaler reads it (quoted, escaped JSON)."""
    text = group["rayStartParams"]["resources"]
    return json.loads(text[1:-1].replace("\\", ""))


# -- what the controller asks Ray for -----------------------------------------------------------


class _ActorClassRecorder:
    """Stands in for the worker actor class: records the options of ``.options(...).remote(...)``."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def options(self, **options):
        self.calls.append(options)
        return self

    def remote(self, *args, **kwargs):
        return object()


def spawn_options(config: ClusterConfig, role: str) -> dict:
    """The options the controller passes to Ray when it starts one worker of ``role``."""
    from cluster import controller as controller_module

    recorder = _ActorClassRecorder()
    controller = controller_module.Controller(config.to_json())
    controller._actor_class = recorder
    controller._spawn(role)
    (options,) = recorder.calls
    return options


def demand_of(options: dict) -> dict:
    demand = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **(options.get("resources") or {})}
    return {k: v for k, v in demand.items() if v}


def workers_fitting(node_resources: dict, demand: dict) -> int:
    return min(math.floor(node_resources.get(k, 0) / v) for k, v in demand.items())


def autoscaler_node_types(raycluster: dict) -> dict:
    """The node types the in-tree Ray autoscaler derives from this RayCluster (Ray's own code)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = json.loads(json.dumps(raycluster))
    cr["metadata"].setdefault("namespace", "default")
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]


# -- the tests ----------------------------------------------------------------------------------


def test_worker_groups_offer_what_each_pool_asks_for(objects):
    """PoolSpec.ray_resources (the controller's request) == the worker group's rayStartParams
    resources and GPU requests, one worker per pod."""
    config, raycluster = configmap_config(objects), one(objects, "RayCluster")
    for role in ROLES:
        wanted, group = config.pool(role).ray_resources, worker_group(raycluster, role)
        assert wanted["resources"], f"the {role} pool is pinned to no custom resource: it could land on any node"
        assert ray_start_resources(group) == wanted["resources"], (
            f"{role}: rayStartParams.resources vs the ConfigMap's {role}.resources"
        )
        container = group["template"]["spec"]["containers"][0]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert quantity(limits.get(GPU, 0)) == wanted["num_gpus"], f"{role}: {GPU} limit vs num_gpus"
        assert requests.get(GPU) == limits.get(GPU), f"{role}: {GPU} requests must equal limits"
        params = group["rayStartParams"]
        assert float(params.get("num-gpus", 0)) == wanted["num_gpus"]
        assert float(params["num-cpus"]) == wanted["num_cpus"], f"{role}: num-cpus vs num_cpus"
        assert quantity(limits["cpu"]) >= wanted["num_cpus"], (
            f"{role}: the pod has fewer cores than its worker's Ray CPUs"
        )


def test_each_worker_fits_its_own_group_only_once_per_pod(objects):
    config, raycluster = configmap_config(objects), one(objects, "RayCluster")
    node_types = autoscaler_node_types(raycluster)
    for role in ROLES:
        options = spawn_options(config, role)
        demand = demand_of(options)
        fits = {name for name, t in node_types.items() if workers_fitting(t["resources"], demand) >= 1}
        assert fits == {role}, f"a {role} worker asking for {demand} fits node types {sorted(fits)}"
        assert workers_fitting(node_types[role]["resources"], demand) == 1, f"{role}: one worker per pod"
        pool = config.pool(role)
        assert node_types[role]["max_workers"] >= pool.max_replicas, f"{role}: the pool may grow past its worker group"
        assert node_types[role]["min_workers"] <= pool.min_replicas


def test_autoscaler_requests_land_in_the_right_groups(objects, tmp_path, monkeypatch):
    import ray.autoscaler.sdk

    from cluster.controller import Controller

    config = head_config(objects, tmp_path)
    assert config.address == "auto", "the head must join the KubeRay cluster (and ask its autoscaler for nodes)"
    requested = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles=None, **_: requested.append(bundles))
    controller = Controller(config.to_json())
    controller.desired = {"prefill": config.prefill.max_replicas, "decode": config.decode.max_replicas}
    controller._request_resources()
    (bundles,) = requested
    node_types = autoscaler_node_types(one(objects, "RayCluster"))
    landed = {role: 0 for role in ROLES}
    for bundle in bundles:
        fits = [
            name
            for name, t in node_types.items()
            if workers_fitting(t["resources"], {k: v for k, v in bundle.items() if v}) >= 1
        ]
        assert len(fits) == 1 and fits[0] in ROLES, f"bundle {bundle} fits {fits}"
        landed[fits[0]] += 1
    assert landed == controller.desired
    for role in ROLES:
        assert landed[role] <= node_types[role]["max_workers"]


def test_head_command_builds_the_configmap_config(objects, tmp_path):
    config = head_config(objects, tmp_path)
    assert (config.router.host, config.worker_host) == ("0.0.0.0", "auto")
    assert config.prefill == configmap_config(objects).prefill and config.decode == configmap_config(objects).decode
    ports = {p["name"]: p["containerPort"] for p in head_container(one(objects, "RayCluster"))["ports"]}
    assert (ports["http"], ports["grpc"]) == (config.router.port, config.router.grpc_port), (
        "the head's ports must be the router's"
    )


def test_cpu_and_gpu_renders_differ_where_they_should():
    from tests.deploy.conftest import RENDERS

    cpu, gpu = (configmap_config(RENDERS[name]()) for name in ("chart-default", "chart-gpu"))
    assert (cpu.device, cpu.prefill.num_gpus, cpu.decode.num_gpus) == ("cpu", 0, 0)
    assert (gpu.device, gpu.prefill.num_gpus, gpu.decode.num_gpus) == ("cuda", 1, 1)
    assert gpu.planner.enabled and not cpu.planner.enabled


# -- the shell lines KubeRay runs ---------------------------------------------------------------


def _set_missing_ray_start_params(params: dict, head: bool, cluster: str) -> dict:
    """KubeRay v1.7.0 common/pod.go setMissingRayStartParams."""
    params = dict(params)
    if head:
        params.setdefault("dashboard-host", "0.0.0.0")
    else:
        params.setdefault("address", f"{cluster}-head-svc.default.svc.cluster.local:6379")
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", "52365")
    return params


def _generate_ray_start_command(head: bool, params: dict, resources: dict) -> str:
    """KubeRay v1.7.0 common/pod.go generateRayStartCommand + convertParamMap (no TPU/Neuron)."""
    params = dict(params)
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    if "num-cpus" not in params and (limits.get("cpu") or requests.get("cpu")):
        params["num-cpus"] = str(math.ceil(quantity(limits.get("cpu") or requests.get("cpu"))))
    if "memory" not in params and limits.get("memory"):
        params["memory"] = str(int(quantity(limits["memory"])))
    gpus = [
        v
        for k, v in sorted(limits.items())
        if (k.endswith("gpu") or re.search(r"nvidia\.com/mig-\d+g\.\d+gb$", k)) and quantity(v)
    ]
    if "num-gpus" not in params and gpus:
        params["num-gpus"] = str(int(quantity(gpus[0])))
    flags = ""
    for key in sorted(params):
        value = params[key]
        if value.lower() == "true":
            flags += f" --{key} "
        elif value.lower() != "false":
            flags += f" --{key}={value} "
    return ("ray start --head " if head else "ray start ") + flags


def _kuberay_ray_start(group: dict, head: bool, cluster: str) -> str:
    """What KubeRay puts in $KUBERAY_GEN_RAY_START_CMD for a pod of ``group``."""
    params = _set_missing_ray_start_params(group.get("rayStartParams", {}), head, cluster)
    return _generate_ray_start_command(head, params, group["template"]["spec"]["containers"][0].get("resources", {}))


def _run_container(
    container: dict, generated: str, tmp_path: Path, env: dict | None = None
) -> dict[str, list[list[str]]]:
    """Runs the container's command with stub `ray` and `splitserve` that record their arguments."""
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    for name in ("ray", "splitserve"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > "{log_dir}/{name}.$$"\n')
        stub.chmod(0o755)
    run_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "KUBERAY_GEN_RAY_START_CMD": generated, **(env or {})}
    result = subprocess.run(
        container["command"] + container["args"], env=run_env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    calls = {"ray": [], "splitserve": []}
    for path in sorted(log_dir.iterdir()):
        calls[path.name.split(".")[0]].append(path.read_text().split("\0")[:-1])
    return calls


def test_head_starts_ray_in_the_background_then_execs_splitserve_up(objects, tmp_path):
    raycluster = one(objects, "RayCluster")
    assert raycluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true", (
        "without the annotation KubeRay prepends our command to its own `ray start --block`"
    )
    generated = _kuberay_ray_start(raycluster["spec"]["headGroupSpec"], True, raycluster["metadata"]["name"])
    calls = _run_container(head_container(raycluster), generated, tmp_path, {"SPLITSERVE_ADMIN_TOKEN": "from-secret"})
    (ray_args,) = calls["ray"]
    assert ray_args[:2] == ["start", "--head"] and "--num-cpus=0" in ray_args, ray_args
    assert "--block" not in ray_args, "with --block, `ray start` never returns and `splitserve up` never runs"
    (up_args,) = calls["splitserve"]
    assert up_args[:9] == [
        "up",
        "--address",
        "auto",
        "--config",
        "/etc/splitserve/cluster.yaml",
        "--host",
        "0.0.0.0",
        "--worker-host",
        "auto",
    ]
    if "--admin-token" in up_args:
        assert up_args[up_args.index("--admin-token") + 1] == "from-secret"


def test_workers_pass_their_custom_resources_to_ray_start_intact(objects, tmp_path):
    raycluster, config = one(objects, "RayCluster"), configmap_config(objects)
    for role in ROLES:
        group = worker_group(raycluster, role)
        generated = _kuberay_ray_start(group, False, raycluster["metadata"]["name"])
        calls = _run_container(group["template"]["spec"]["containers"][0], generated, tmp_path / role)
        (ray_args,) = calls["ray"]
        assert ray_args[0] == "start" and "--block" in ray_args, "a worker pod lives as long as `ray start --block`"
        flags = dict(a[2:].split("=", 1) for a in ray_args if a.startswith("--") and "=" in a)
        pool = config.pool(role)
        try:
            offered = json.loads(flags["resources"])
        except json.JSONDecodeError:
            offered = None
        assert offered == pool.resources, (
            f"{role}: ray start got --resources={flags['resources']} (shell quoting lost?)"
        )
        assert float(flags["num-cpus"]) == pool.num_cpus
        assert float(flags.get("num-gpus", 0)) == pool.num_gpus
        assert calls["splitserve"] == []


def test_kuberay_command_port_matches_the_operator():
    """The port above against KubeRay v1.7.0's own expectations (common/pod_test.go)."""
    # TestGenerateRayStartCommand, "WorkerNode with GPU": the exact string, spaces included.
    assert _generate_ray_start_command(False, {}, {"limits": {"nvidia.com/gpu": "1"}}) == "ray start  --num-gpus=1 "
    # TestBuildPod's worker of raycluster-sample (compared as sorted words there too).
    group = {
        "rayStartParams": {"port": "6379"},
        "template": {
            "spec": {"containers": [{"resources": {"limits": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "3"}}}]}
        },
    }
    expected = (
        "ray start --block --dashboard-agent-listen-port=52365 --memory=1073741824 --num-cpus=1 --num-gpus=3 "
        "--address=raycluster-sample-head-svc.default.svc.cluster.local:6379 --port=6379 --metrics-export-port=8080"
    )
    assert sorted(_kuberay_ray_start(group, False, "raycluster-sample").split()) == sorted(expected.split())
