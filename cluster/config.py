"""The cluster's configuration: one frozen dataclass, from defaults, a YAML/TOML file, then flags."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass(frozen=True)
class PoolSpec:
    """One worker pool: how many, within which bounds, with which resources."""

    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 4
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # > 1: the worker spans devices and is placed with a placement group
    resources: dict = field(default_factory=dict)  # custom Ray resources, e.g. {"prefill_node": 1}
    threads: int = 1  # torch intra-op threads per worker
    kv_cache_mb: int = 512

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(
                f"need 0 <= min_replicas <= replicas <= max_replicas, got {self.min_replicas}, "
                f"{self.replicas}, {self.max_replicas}"
            )

    @property
    def ray_resources(self) -> dict:
        """What one worker asks Ray for (the manifests in deploy/ must offer the same names)."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.resources)}


@dataclass(frozen=True)
class PlannerSpec:
    enabled: bool = False
    ttft_target_s: float = 1.0  # SLO on time to first token -> prefill pool
    tpot_target_s: float = 0.1  # SLO on time per output token -> decode pool
    interval_s: float = 2.0
    window_s: float = 10.0  # latencies older than this are not considered
    scale_up_cooldown_s: float = 10.0
    scale_down_cooldown_s: float = 30.0
    hysteresis: float = 0.2  # scale down only when the p90 is below (1 - hysteresis) * target
    min_samples: int = 5


@dataclass(frozen=True)
class ClusterConfig:
    model: str = "demo"
    served_model_name: str | None = None  # default: the preset or directory name
    dtype: str | None = None
    device: str = "cpu"
    transport: str = "grpc"
    address: str | None = None  # Ray address to join; None: start embedded Ray
    ray_num_cpus: int | None = None  # embedded Ray only; default: enough logical CPUs for the pools
    namespace: str = "splitserve"
    host: str = "127.0.0.1"  # the router's HTTP/gRPC bind address
    port: int = 8000
    grpc_port: int = 50051
    worker_host: str = "127.0.0.1"  # where workers bind; "auto": the node's IP (multi-node clusters)
    prefill: PoolSpec = field(default_factory=PoolSpec)
    decode: PoolSpec = field(default_factory=PoolSpec)
    planner: PlannerSpec = field(default_factory=PlannerSpec)
    max_restarts: int = 3
    lease_ms: int = 30_000
    local_prefill_threshold: int = 128
    # Secrets: here from a config file, the environment or files (cluster.cli), never a command line. The router
    # keeps them; the controller and the workers never receive them (cluster.up.run_cluster).
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    admin_token: str | None = field(default=None, repr=False)
    open_metrics: bool = False  # router.config.RouterConfig's: /metrics without an API key
    open_docs: bool = False  # ... and the API docs
    header_timeout_s: float = 10.0  # the router's HTTP read deadlines (router/http_protocol.py)
    body_timeout_s: float = 30.0
    health_interval_s: float = 0.5
    # TLS for the router's public HTTP and gRPC endpoints (PEM paths; both or neither). Worker-to-worker
    # mutual TLS is configured per process through SPLITSERVE_TLS_* (protos/cluster_auth.py).
    tls_certfile: str | None = None
    tls_keyfile: str | None = None

    def __post_init__(self) -> None:
        if self.transport not in ("grpc", "nixl"):
            raise ValueError(f"transport must be grpc or nixl, got {self.transport!r}")

    def pool(self, role: str) -> PoolSpec:
        return self.prefill if role == "prefill" else self.decode

    def with_pool(self, role: str, **changes) -> ClusterConfig:
        return dataclasses.replace(self, **{role: dataclasses.replace(self.pool(role), **changes)})

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ClusterConfig:
        return from_dict(json.loads(text))


def from_dict(raw: dict) -> ClusterConfig:
    """A config from plain data (a parsed file); unknown keys are an error naming them."""
    raw = dict(raw)
    nested = {"prefill": PoolSpec, "decode": PoolSpec, "planner": PlannerSpec}
    for key, kind in nested.items():
        if key in raw:
            raw[key] = _build(kind, raw[key], key)
    if "api_keys" in raw:
        raw["api_keys"] = tuple(raw["api_keys"])
    return _build(ClusterConfig, raw, "config")


def _build(kind, values: dict, where: str):
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {where} keys: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    return kind(**values)


def load_file(path: str | Path) -> ClusterConfig:
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".toml",):
        return from_dict(tomllib.loads(text))
    return from_dict(yaml.safe_load(text) or {})
