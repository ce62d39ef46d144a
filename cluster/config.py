"""The cluster's configuration: one frozen dataclass, from defaults, a YAML/TOML file, then flags.

The router's settings are router.config.RouterConfig's, in the file's ``router:`` section under the field names;
the few RouterConfig fields the whole cluster shares (CLUSTER_WIDE) are top-level keys, handed to the router."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from contract.bounds import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Bound, check_bounds
from contract.model_card import check_served_model_name
from engine.config import DEVICES, DTYPES, EngineConfig, check_step_limits
from router.config import BOUNDS, RouterConfig

MIN_DECODE_REPLICAS = 1  # the cluster serves through its decode workers: none, and it can never serve
MIB = 1024 * 1024
# Torch intra-op threads of one worker, under `up` (PoolSpec.threads) and `splitserve worker`: one, as a worker
# reserves one CPU of Ray by default (PoolSpec.num_cpus) and several workers share a machine (a laptop's `up`, a
# node's pools, the benchmarks' processes); torch's own default, a thread per core in every worker, oversubscribes
# the cores. A worker given a node of its own (the Helm chart's pools) is given more threads with it.
WORKER_THREADS = 1


def engine_default(name: str):
    """EngineConfig's default of a field: the one a pool's and `splitserve worker`'s settings start from."""
    return {f.name: f.default for f in dataclasses.fields(EngineConfig)}[name]


@dataclass(frozen=True)
class PoolSpec:
    """One worker pool: how many, within which bounds, with which resources."""

    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 4
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # at most 1: a worker runs on one device (the engine has no tensor or pipeline parallelism)
    resources: dict = field(default_factory=dict)  # custom Ray resources, e.g. {"prefill_node": 1}
    threads: int = WORKER_THREADS  # torch intra-op threads per worker
    kv_cache_mb: int = engine_default("kv_cache_memory_bytes") // MIB
    # The engine's step limits (engine.config.EngineConfig); None: the engine's own default.
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    prefill_chunk_beside_decodes: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(
                f"need 0 <= min_replicas <= replicas <= max_replicas, got min_replicas {self.min_replicas}, "
                f"replicas {self.replicas}, max_replicas {self.max_replicas}"
            )
        if self.num_gpus > 1:
            raise ValueError(
                f"num_gpus must be at most 1, got {self.num_gpus!r}: a worker runs on one device (the engine has no "
                "tensor or pipeline parallelism)"
            )
        check_bounds(self, POOL_BOUNDS)
        check_step_limits(self)
        self._check_resources()

    def _check_resources(self) -> None:
        """Custom Ray resources: names and non-negative amounts, refused here rather than by Ray's placement."""
        for name, amount in self.resources.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"resources: {name!r} is not a resource name")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not NON_NEGATIVE.admits(amount):
                raise ValueError(f"resources.{name} must be a number >= 0, got {amount!r}")

    @property
    def ray_resources(self) -> dict:
        """What one worker asks Ray for (the manifests in deploy/ must offer the same names)."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.resources)}


POOL_BOUNDS = {"num_cpus": NON_NEGATIVE, "num_gpus": NON_NEGATIVE, "threads": AT_LEAST_ONE, "kv_cache_mb": AT_LEAST_ONE}


# The flag of `splitserve up` that sets each planner target (and turns the planner on).
SLO_FLAGS = {"ttft_target_s": "--ttft-slo", "tpot_target_s": "--tpot-slo"}


@dataclass(frozen=True)
class PlannerSpec:
    """The SLO planner. Each pool is planned by its own target only, and only when that target is set: a target
    nobody set is None, never a default that would scale a pool against it (cluster.planner)."""

    # None: on exactly when a target is set (a target turns the planner on for its pool, in a file as with its flag);
    # false beside a target is refused. Set by __post_init__, so that `enabled` is a plain bool once built.
    enabled: bool | None = None
    ttft_target_s: float | None = None  # SLO on time to first token -> prefill pool; None: prefill is not planned
    tpot_target_s: float | None = None  # SLO on time per output token -> decode pool; None: decode is not planned
    interval_s: float = 2.0
    window_s: float = 10.0  # latencies older than this are not considered
    scale_up_cooldown_s: float = 10.0
    scale_down_cooldown_s: float = 30.0
    hysteresis: float = 0.2  # scale down only when the p90 is below (1 - hysteresis) * target
    min_samples: int = 5

    def __post_init__(self) -> None:
        check_bounds(self, PLANNER_BOUNDS)
        if self.enabled is None:
            object.__setattr__(self, "enabled", bool(self.planned_roles))
        if not self.enabled and self.planned_roles:
            targets = " and ".join(f"{name} ({SLO_FLAGS[name]})" for name in self._set_targets)
            raise ValueError(
                f"enabled is false, but {targets} is set: a target turns the planner on for its pool; drop "
                "enabled: false, or the target"
            )
        if self.enabled and not self.planned_roles:
            raise ValueError(
                "enabled is true, but neither ttft_target_s nor tpot_target_s is set "
                f"({' / '.join(SLO_FLAGS.values())}): the planner would have nothing to plan; set a target or "
                "leave the planner disabled"
            )

    @property
    def targets(self) -> dict[str, float | None]:
        """Each pool's target: TTFT sizes prefill, TPOT sizes decode."""
        return {"prefill": self.ttft_target_s, "decode": self.tpot_target_s}

    @property
    def planned_roles(self) -> tuple[str, ...]:
        """The pools whose own target is set: the only ones the planner resizes."""
        return tuple(role for role, target in self.targets.items() if target is not None)

    @property
    def _set_targets(self) -> tuple[str, ...]:
        return tuple(name for name in SLO_FLAGS if getattr(self, name) is not None)


PLANNER_BOUNDS = {
    "ttft_target_s": POSITIVE,
    "tpot_target_s": POSITIVE,
    "interval_s": POSITIVE,
    "window_s": POSITIVE,
    "scale_up_cooldown_s": NON_NEGATIVE,
    "scale_down_cooldown_s": NON_NEGATIVE,
    "hysteresis": Bound(0, 1),
    "min_samples": AT_LEAST_ONE,
}


# RouterConfig fields the cluster owns: set once, at the top level of the cluster config, because the workers or the
# controller use them too; `splitserve up` hands them to the router. A router section naming one is refused.
CLUSTER_WIDE = {
    "model": "the workers load it too",
    "served_model_name": "the workers' model cards carry it",
    "lease_ms": "the decode workers use it too",
    "health_interval_s": "the controller checks the workers at the same interval",
}
# RouterConfig fields `splitserve up` sets itself; a router section naming one is refused.
_MEMBERSHIP = "`splitserve up` routes to the workers its controller starts (size the prefill and decode pools)"
SET_BY_UP = {
    "prefill_addresses": _MEMBERSHIP,
    "decode_addresses": _MEMBERSHIP,
    "cluster_secret": "the cluster secret comes from SPLITSERVE_CLUSTER_SECRET[_FILE], or `splitserve up` makes one",
}
# The keys of a cluster config's `router:` section: every other RouterConfig field, named as RouterConfig names it.
ROUTER_KEYS = tuple(f.name for f in dataclasses.fields(RouterConfig) if f.name not in CLUSTER_WIDE | SET_BY_UP)


def router_default(name: str):
    """RouterConfig's default of a field: the one the cluster's copy of a cluster-wide fact starts from."""
    return {f.name: f.default for f in dataclasses.fields(RouterConfig)}[name]


@dataclass(frozen=True)
class ClusterConfig:
    model: str = "demo"
    served_model_name: str | None = router_default("served_model_name")  # default: the preset or directory name
    dtype: str | None = None
    device: str = "cpu"
    transport: str = "grpc"
    address: str | None = None  # Ray address to join; None: start embedded Ray
    ray_num_cpus: int | None = None  # embedded Ray only; default: enough logical CPUs for the pools
    namespace: str = "splitserve"
    # Where workers bind; "auto": the node's IP (multi-node clusters); a wildcard (0.0.0.0): every address, the
    # workers naming their default route's (worker_server.security.advertised_host).
    worker_host: str = "127.0.0.1"
    prefill: PoolSpec = field(default_factory=PoolSpec)
    decode: PoolSpec = field(default_factory=PoolSpec)
    planner: PlannerSpec = field(default_factory=PlannerSpec)
    max_restarts: int = 3
    # How long `up` waits for its first workers (placement, a node's start, an image pull, the model's loading)
    # before it gives up and stops the cluster, naming what is still starting.
    start_timeout_s: float = 300.0
    lease_ms: int = router_default("lease_ms")
    health_interval_s: float = router_default("health_interval_s")
    # The router's own settings (router/config.py owns them and their defaults). Its secrets (api_keys,
    # admin_token) come from here, the environment or files (cluster.cli), never a command line; the router
    # keeps them, the controller and the workers never receive them (without_secrets).
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        check_served_model_name(self.served_model_name)
        self._check_worker_settings()
        if self.transport not in ("grpc", "nixl"):
            raise ValueError(f"transport must be grpc or nixl, got {self.transport!r}")
        if self.decode.min_replicas < MIN_DECODE_REPLICAS:
            raise ValueError(
                f"decode.min_replicas must be >= {MIN_DECODE_REPLICAS}, got {self.decode.min_replicas}: the cluster "
                "serves through its decode workers"
            )
        self._check_ray_settings()
        # The facts shared with the router have the router's bounds (lease_ms: the decode workers' cap too).
        check_bounds(self, {name: BOUNDS[name] for name in CLUSTER_WIDE if name in BOUNDS})
        if not isinstance(self.router, RouterConfig):
            raise ValueError(f"router must be a RouterConfig, got {type(self.router).__name__}")
        for name, why in (CLUSTER_WIDE | SET_BY_UP).items():
            if getattr(self.router, name) != router_default(name):
                raise ValueError(f"router.{name} is not a router section setting: {why}{_instead(name)}")

    def _check_worker_settings(self) -> None:
        """What every worker's engine is built with: refused here, not by each worker actor dying in Ray's log."""
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must name a preset or a model directory, got {self.model!r}")
        if not isinstance(self.worker_host, str) or not self.worker_host.strip():
            raise ValueError(
                f"worker_host (--worker-host) must name an address for the workers to listen on ('auto': the node's "
                f"IP; 0.0.0.0: every address), got {self.worker_host!r}"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (unset: the model's own), got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be {' or '.join(DEVICES)}, got {self.device!r}")
        for role in ("prefill", "decode"):
            pool = self.pool(role)
            # A cuda worker without a GPU reserved would land where Ray has none, or share one unaccounted for.
            # A pool that never starts a worker (max_replicas 0) needs none.
            if self.device == "cuda" and pool.num_gpus == 0 and pool.max_replicas > 0:
                raise ValueError(
                    f"device cuda (--device) needs a GPU reserved for each worker, but {role}.num_gpus is 0: set "
                    f"{role}.num_gpus in the config (1: a GPU each, or a share), or use device cpu"
                )

    def _check_ray_settings(self) -> None:
        if not self.namespace:
            raise ValueError("namespace must not be empty: it names the cluster's Ray namespace")
        if self.ray_num_cpus is not None and self.address is not None:
            raise ValueError(
                f"ray_num_cpus sizes the embedded Ray only; a joined Ray cluster (address {self.address!r}) has its "
                "own CPUs: leave ray_num_cpus unset"
            )
        check_bounds(self, {"ray_num_cpus": AT_LEAST_ONE, "max_restarts": NON_NEGATIVE, "start_timeout_s": POSITIVE})

    def pool(self, role: str) -> PoolSpec:
        return self.prefill if role == "prefill" else self.decode

    def with_pool(self, role: str, **changes) -> ClusterConfig:
        return dataclasses.replace(self, **{role: dataclasses.replace(self.pool(role), **changes)})

    def router_config(self, *, cluster_secret: str | None, admin_token: str | None) -> RouterConfig:
        """The config `splitserve up` starts its router with: the router section plus the facts the cluster owns."""
        shared = {name: getattr(self, name) for name in CLUSTER_WIDE}
        return dataclasses.replace(self.router, **shared, cluster_secret=cluster_secret, admin_token=admin_token)

    def without_secrets(self) -> ClusterConfig:
        """What the controller (and through it the workers) may see."""
        router = dataclasses.replace(self.router, api_keys=(), admin_token=None)
        return dataclasses.replace(self, router=router)

    def to_dict(self) -> dict:
        """Plain data in the file format: ``from_dict(config.to_dict()) == config``."""
        data = {f.name: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for f, v in self._items()}
        data["router"] = {name: getattr(self.router, name) for name in ROUTER_KEYS}
        return data

    def _items(self):
        return ((f, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "router")

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ClusterConfig:
        return from_dict(json.loads(text))


def _instead(name: str) -> str:
    return f"; set the top-level {name}" if name in CLUSTER_WIDE else ""


def from_dict(raw: dict) -> ClusterConfig:
    """A config from plain data (a parsed file); unknown keys are an error naming them."""
    raw = dict(_mapping(raw, "config"))
    moved = sorted(k for k in raw if k in ROUTER_KEYS)
    if moved:
        spelled = ", ".join(f"router.{k}" for k in moved)
        raise ValueError(f"{', '.join(moved)}: router settings go in the config's router section: use {spelled}")
    nested = {"prefill": PoolSpec, "decode": PoolSpec, "planner": PlannerSpec}
    for key, kind in nested.items():
        if key in raw:
            raw[key] = _build(kind, raw[key], key)
    if "router" in raw:
        raw["router"] = router_from_dict(raw["router"])
    return _build(ClusterConfig, raw, "config")


def router_from_dict(raw: dict) -> RouterConfig:
    """The router section of a cluster config; keys the cluster owns or `up` sets are refused, naming them."""
    raw = _mapping(raw, "router")
    for name, why in (CLUSTER_WIDE | SET_BY_UP).items():
        if name in raw:
            raise ValueError(f"router.{name} is not a router section setting: {why}{_instead(name)}")
    return _build(RouterConfig, raw, "router", known=ROUTER_KEYS)


def _mapping(values, where: str) -> dict:
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of settings, got {type(values).__name__}")
    for key in values:
        if not isinstance(key, str):
            raise ValueError(f"{where}: {key!r} is not a setting's name: keys are strings")
    return values


def _build(kind, values: dict, where: str, known=None):
    values = _mapping(values, where)
    known = set(known or (f.name for f in dataclasses.fields(kind)))
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {where} keys: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(kind)
    typed = {name: _typed(value, hints[name], f"{where}.{name}") for name, value in values.items()}
    if where == "config":
        return kind(**typed)
    try:
        return kind(**typed)
    except ValueError as exc:  # a section's own checks name its keys: say which section
        raise ValueError(f"{where}: {exc}") from None


def _typed(value, hint, where: str):
    """``value`` as a field of type ``hint`` takes it (a list for a tuple), or ValueError naming ``where``."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if option is str and isinstance(value, str):
            return value
        if option is dict and isinstance(value, dict):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            if all(isinstance(item, str) for item in value):
                return tuple(value)
        if dataclasses.is_dataclass(option) and isinstance(value, option):
            return value
    expected = " or ".join(_type_name(option) for option in options)
    raise ValueError(f"{where} must be {expected}, got {value!r}")


def _type_name(hint) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def load_file(path: str | Path) -> ClusterConfig:
    return from_dict(read_file(path))


def router_config_from_file(path: str | Path) -> RouterConfig:
    """What a router started by hand (`splitserve router --config`) takes from a cluster config file: its router
    section, and the cluster-wide facts (CLUSTER_WIDE) the file names, so one file configures `up` and every router.
    The whole file is checked as `up` checks it. A fact the file leaves out keeps RouterConfig's default, not the
    cluster's (no model named: the router adopts its workers', where `up` would serve the demo)."""
    raw = read_file(path)
    config = from_dict(raw)
    return dataclasses.replace(config.router, **{name: getattr(config, name) for name in CLUSTER_WIDE if name in raw})


def read_file(path: str | Path) -> dict:
    """A config file's data (`--config`): TOML by its suffix, else YAML. A file that cannot be read or does not
    parse, or that gives a key twice, is a one-line ValueError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--config {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.load(text, Loader=_UniqueKeyLoader)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    return {} if raw is None else raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently; TOML's
    parser refuses it too)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys given after it override, by design
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (give each setting once)", key_node.start_mark
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and where (PyYAML's own text quotes the line, over several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}"
