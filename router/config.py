"""The router's configuration, built once at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RouterConfig:
    # Preset or model directory: the router loads its config and tokenizer (and fingerprints its weights,
    # if there) and checks every worker's model card against it. None: adopt the workers' card.
    model: str | None = None
    served_model_name: str | None = None  # the name clients use; default: the model card's
    prefill_addresses: tuple[str, ...] = ()
    decode_addresses: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    max_body_bytes: int = 4 * 1024 * 1024
    request_timeout_s: float = 600.0
    max_model_len: int | None = None  # lowers the model card's max_model_len (never raises it)
    # admission: requests beyond max_running wait in a queue of max_queued; beyond that, 429
    max_running: int = 256
    max_queued: int = 512
    queue_timeout_s: float = 30.0
    # routing
    routing_policy: str = "kv_aware"  # "kv_aware" | "load"
    kv_weight: float = 1.0  # w in: cost(P) = w * uncached prompt blocks on P + active load of P
    local_prefill_threshold: int = 128  # uncached prompt tokens on D below which D prefills itself
    prefill_saturation: int = 8  # in-flight prefills per worker at which the pool counts as saturated
    # failures
    prefill_timeout_s: float = 60.0
    prefill_retries: int = 2
    retry_backoff_s: float = 0.05
    migration_retries: int = 2
    # D lost mid-decode: "prefill" re-pushes the KV from a prefill worker (its prefix cache holds the prompt, so
    # only the generated tokens are computed); "local" has the new D recompute prompt + output itself.
    migration_policy: str = "prefill"
    lease_ms: int = 30_000
    lease_policy: str = "recompute"  # "recompute" | "fail"
    health_interval_s: float = 0.5
    admin_token: str | None = None
    # The cluster secret workers require on every call (None: $SPLITSERVE_CLUSTER_SECRET[_FILE]).
    cluster_secret: str | None = field(default=None, repr=False)
    # TLS for the public HTTP and gRPC endpoints: PEM certificate (chain) and key; both or neither.
    tls_certfile: str | None = None
    tls_keyfile: str | None = None

    def __post_init__(self) -> None:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together: give both or neither")
        if self.routing_policy not in ("kv_aware", "load"):
            raise ValueError(f"routing_policy must be kv_aware or load, got {self.routing_policy!r}")
        if self.migration_policy not in ("prefill", "local"):
            raise ValueError(f"migration_policy must be prefill or local, got {self.migration_policy!r}")
        if self.lease_policy not in ("recompute", "fail"):
            raise ValueError(f"lease_policy must be recompute or fail, got {self.lease_policy!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")


def api_keys_from_env(configured: tuple[str, ...]) -> tuple[str, ...]:
    """Keys from config plus SPLITSERVE_API_KEYS (comma-separated)."""
    from_env = tuple(k.strip() for k in os.environ.get("SPLITSERVE_API_KEYS", "").split(",") if k.strip())
    return configured + from_env
