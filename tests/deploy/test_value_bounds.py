"""The chart admits the numbers the pods admit: every numeric value that becomes a cluster-config setting has, in
values.schema.json, the bound of that setting in the Python bound tables (router.config.BOUNDS, cluster.config's
POOL_BOUNDS and PLANNER_BOUNDS, engine.config.STEP_LIMITS), so `helm install` refuses, naming the value, what
`splitserve up` would refuse at start in a crash loop. The tables own the bounds; this test holds the schema to them,
at each bound's edges, as numbers and as the decimal strings `--set`/`--set-string` pass."""

from __future__ import annotations

import copy
import json
import subprocess

import jsonschema
import pytest
import yaml

from cluster.config import PLANNER_BOUNDS, POOL_BOUNDS, PoolSpec
from contract.bounds import AT_LEAST_ONE, PORT, POSITIVE, Bound
from engine.config import STEP_LIMITS
from router.config import BOUNDS
from tests.deploy.conftest import CHART, HelmError, chart_objects, find_helm, helm
from tests.deploy.test_placement import configmap_config

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
POOLS = ("prefill", "decode")


def _router_settings() -> dict[str, Bound]:
    names = SCHEMA["properties"]["router"]["properties"]["settings"]["properties"]
    return {f"router.settings.{name}": BOUNDS[name] for name in names if name in BOUNDS}


def _per_pool(values: dict[str, Bound]) -> dict[str, Bound]:
    return {f"{pool}.{key}": bound for pool in POOLS for key, bound in values.items()}


# Chart value -> the bound of the setting it becomes (templates/_helpers.tpl, splitserve.clusterConfig).
OWNED = {
    "router.localPrefillThreshold": BOUNDS["local_prefill_threshold"],
    "router.leaseMs": BOUNDS["lease_ms"],
    "router.shutdownDelaySeconds": BOUNDS["shutdown_delay_s"],
    "router.keepAliveSeconds": BOUNDS["keep_alive_s"],
    **_router_settings(),
    "slo.ttftSeconds": PLANNER_BOUNDS["ttft_target_s"],
    "slo.tpotSeconds": PLANNER_BOUNDS["tpot_target_s"],
    "planner.intervalSeconds": PLANNER_BOUNDS["interval_s"],
    "planner.windowSeconds": PLANNER_BOUNDS["window_s"],
    "planner.scaleUpCooldownSeconds": PLANNER_BOUNDS["scale_up_cooldown_s"],
    "planner.scaleDownCooldownSeconds": PLANNER_BOUNDS["scale_down_cooldown_s"],
    **_per_pool({"threads": POOL_BOUNDS["threads"], "kvCacheMb": POOL_BOUNDS["kv_cache_mb"]}),
    # engine.config.check_step_limits: each, when set, at least 1.
    **_per_pool(
        {
            key: AT_LEAST_ONE
            for key, name in {
                "maxNumSeqs": "max_num_seqs",
                "maxNumBatchedTokens": "max_num_batched_tokens",
                "prefillChunkBesideDecodes": "prefill_chunk_beside_decodes",
            }.items()
            if name in STEP_LIMITS
        }
    ),
}

# Where the chart admits less than the setting does, and why; each stays inside the setting's own bound.
NARROWER = {
    # A containerPort and a Service port are 1..65535: the router's 0 ("any free port") has no place in a pod spec.
    "router.httpPort": (Bound(1, PORT.high), PORT),
    "router.grpcPort": (Bound(1, PORT.high), PORT),
    # Each worker pod offers Ray its worker's CPUs (rayStartParams num-cpus) and requests them from Kubernetes.
    **_per_pool({"cpusPerWorker": (Bound(1), POOL_BOUNDS["num_cpus"])}),
    # PoolSpec refuses num_gpus > 1 itself (a worker runs on one device): the table holds only the low end.
    **_per_pool({"gpusPerWorker": (Bound(0, 1), POOL_BOUNDS["num_gpus"])}),
    # Whole seconds in the chart (a timeout in a values file); ClusterConfig takes any positive fraction.
    "startTimeoutSeconds": (Bound(1), POSITIVE),
}

# Numeric values that become no bounded setting: the replica counts (PoolSpec checks their order, and so does the
# chart: splitserve.validate) and the autoscaler's, which is KubeRay's.
UNBOUNDED_HERE = {
    *(f"{pool}.{key}" for pool in POOLS for key in ("replicas", "minReplicas", "maxReplicas")),
    "autoscaler.idleTimeoutSeconds",
}


def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = SCHEMA["definitions"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _property(path: str) -> dict:
    schema = SCHEMA
    for part in path.split("."):
        schema = _resolve(_resolve(schema)["properties"][part])
    return schema


def _admits_numbers(schema: dict) -> str | None:
    """'integer' or 'number' when the property takes one, else None."""
    schema = _resolve(schema)
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    for kind in ("number", "integer"):
        if kind in types:
            return kind
    for branch in schema.get("anyOf", []):
        kind = _admits_numbers(branch)
        if kind:
            return kind
    return None


def _numeric_paths(schema: dict, prefix: str = "") -> set[str]:
    schema = _resolve(schema)
    if "properties" not in schema:
        return {prefix.rstrip(".")} if _admits_numbers(schema) else set()
    return set().union(*(_numeric_paths(s, f"{prefix}{name}.") for name, s in schema["properties"].items()))


def _with_value(path: str, value) -> dict:
    values = copy.deepcopy(VALUES)
    *parents, leaf = path.split(".")
    target = values
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value
    return values


_VALIDATOR = jsonschema.Draft7Validator(SCHEMA)


def _schema_admits(path: str, value) -> bool:
    """Whether values.yaml with ``path`` set to ``value`` passes the schema (values.yaml itself does)."""
    return _VALIDATOR.is_valid(_with_value(path, value))


def _probes(bound: Bound, kind: str) -> list:
    """Values on and beside each edge of ``bound``; numbers as the property takes them, and as decimal strings."""
    step = 1 if kind == "integer" else 0.5
    edges = [bound.low] + ([bound.high] if bound.high is not None else [])
    numbers = sorted({edge + d for edge in edges for d in (-step, 0, step)})
    numbers = [int(n) for n in numbers] if kind == "integer" else numbers
    if kind == "number":  # --set 0.5 and --set-string hand helm strings: the schema takes decimal strings too
        numbers += [str(n) for n in numbers] + ["0.0", ".0", "0e5", "0.000", "00.001", "1e-3", "1."]
    return numbers


def _python_admits(bound: Bound, value) -> bool:
    return bound.admits(float(value))


def test_every_numeric_value_is_mapped_to_its_bound_or_said_to_have_none():
    numeric = _numeric_paths(SCHEMA)
    mapped = set(OWNED) | set(NARROWER) | UNBOUNDED_HERE
    assert numeric - mapped == set(), "numeric chart values with no bound here: map each in OWNED or NARROWER"
    assert mapped - numeric == set(), "mapped values the schema has no numeric property for"


@pytest.mark.parametrize("path", sorted(OWNED))
def test_schema_bound_is_the_settings_bound(path):
    bound, kind = OWNED[path], _admits_numbers(_property(path))
    wrong = {
        v: _schema_admits(path, v) for v in _probes(bound, kind) if _schema_admits(path, v) != _python_admits(bound, v)
    }
    assert not wrong, f"{path}: the schema admits {{value: admitted}} {wrong}, its setting is {bound}"


@pytest.mark.parametrize("path", sorted(NARROWER))
def test_narrower_schema_bounds_are_the_stated_ones_inside_the_settings(path):
    narrowed, owner = NARROWER[path]
    kind = _admits_numbers(_property(path))
    probes = _probes(narrowed, kind) + _probes(owner, kind)
    assert {v for v in probes if _schema_admits(path, v) != _python_admits(narrowed, v)} == set()
    assert {v for v in probes if _python_admits(narrowed, v) and not _python_admits(owner, v)} == set()


def test_poolspec_refuses_more_than_one_gpu_as_the_chart_does():
    PoolSpec(num_gpus=1)
    with pytest.raises(ValueError, match="num_gpus"):
        PoolSpec(num_gpus=2)


# -- under helm itself ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, setting",
    [
        ("--set", f"router.leaseMs={BOUNDS['lease_ms'].high + 1}"),
        ("--set", "router.settings.max_running=0"),
        ("--set", "router.settings.kv_weight=-0.5"),
        ("--set-string", "router.settings.request_timeout_s=0"),
        ("--set", "router.settings.header_timeout_s=0.0"),
        ("--set", "prefill.threads=0"),
        ("--set", "decode.maxNumSeqs=0"),
        ("--set-string", "slo.tpotSeconds=0.000"),
        ("--set", "planner.scaleDownCooldownSeconds=-1"),
    ],
)
def test_helm_refuses_an_out_of_range_value_naming_it(flag, setting):
    path = "/" + setting.split("=", 1)[0].replace(".", "/")
    with pytest.raises(HelmError, match=f"at '{path}'"):
        helm("template", "splitserve", str(CHART), flag, setting)
    lint = subprocess.run(
        [str(find_helm.helm_path()), "lint", "--strict", str(CHART), flag, setting],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert lint.returncode != 0 and f"[ERROR] values.yaml: - at '{path}'" in lint.stdout, lint.stdout + lint.stderr


def test_values_on_the_edges_render_a_config_the_pods_accept():
    edges = {
        "router.leaseMs": BOUNDS["lease_ms"].high,
        "router.localPrefillThreshold": 0,
        "router.settings.max_queued": 0,
        "router.settings.max_prefill_wait_ms": "0",
        "router.settings.request_timeout_s": "0.001",
        "planner.scaleUpCooldownSeconds": "0",
        "slo.tpotSeconds": ".01",
    }
    extra = [
        arg
        for path, value in edges.items()
        for arg in ("--set-string" if isinstance(value, str) else "--set", f"{path}={value}")
    ]
    config = configmap_config(chart_objects(extra=extra))
    assert (config.lease_ms, config.router.local_prefill_threshold, config.router.max_queued) == (
        BOUNDS["lease_ms"].high,
        0,
        0,
    )
    assert (config.router.max_prefill_wait_ms, config.router.request_timeout_s) == (0, 0.001)
    assert (config.planner.scale_up_cooldown_s, config.planner.tpot_target_s) == (0, 0.01)
