"""The router's configuration, built once at start-up."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from contract.bounds import AT_LEAST_ONE, LEASE_MS, NON_NEGATIVE, PORT, POSITIVE, check_bounds
from contract.model_card import check_served_model_name

ROUTING_POLICIES = ("kv_aware", "load")
MIGRATION_POLICIES = ("prefill", "local")
LEASE_POLICIES = ("recompute", "fail")
SCHEDULING_POLICIES = ("fcfs", "priority")
REASONING_PARSERS = ("none", "qwen3", "deepseek_r1")  # router/reasoning.py: both read <think>…</think>


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
    # "fcfs": the queues (the router's, the workers') in arrival order; "priority": by each request's priority (lower
    # first), then arrival, and a worker preempts the highest value first
    scheduling_policy: str = "fcfs"
    # The Responses API's store (router/stored_responses.py): the memory its stored responses may take, in MiB; past it
    # the least recently used go first. 0: nothing is stored (a request that asks to store, or to continue one, is
    # refused).
    responses_store_mb: float = 64.0
    # A reasoning model's thinking (<think>…</think>) returned apart from its answer, as a chat completion's
    # reasoning_content (router/reasoning.py); "none": the output text as the model wrote it.
    reasoning_parser: str = "none"
    # routing
    routing_policy: str = "kv_aware"  # "kv_aware" | "load"
    kv_weight: float = 1.0  # w in: cost(P) = w * uncached prompt blocks on P + active load of P
    local_prefill_threshold: int = 128  # uncached prompt tokens on D below which D prefills itself
    prefill_saturation: int = 8  # in-flight prefills per worker at which the pool counts as saturated
    # Conditional disaggregation by time: when a prompt would wait longer than this on the best prefill worker (the
    # prompts it has not reported computed, at its measured speed: router/prefill_clock.py), and the decode worker has
    # less prefill queued, the decode worker prefills it itself. 0: off (the prefill pool takes every long prompt until
    # prefill_saturation).
    max_prefill_wait_ms: float = 0.0
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
    # Guards /admin/* and the dashboard's data; None: $SPLITSERVE_ADMIN_TOKEN[_FILE] (router.server resolves it).
    admin_token: str | None = field(default=None, repr=False)
    # With API keys set, /metrics and the API docs (/docs, /redoc, /openapi.json) want a key unless opened here: open
    # /metrics for a scraper that reaches the router only from inside the cluster.
    open_metrics: bool = False
    open_docs: bool = False
    # Read deadlines of the public HTTP server (router/http_protocol.py): a request's headers must arrive within
    # header_timeout_s of its first byte (of the connection, for its first request), its body within body_timeout_s
    # of its headers. Past either: 408 when a response can still be written, else the connection is closed.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # How long an idle client connection stays open for its next request. Behind a load balancer that keeps
    # connections to its backends, set it above that balancer's idle timeout (nginx and AWS ALB 60 s, Google Cloud's
    # 600 s): else the balancer may send a request down a connection the router is closing, and its client gets a
    # 502. The chart sets 620 s; uvicorn's and vLLM's 5 s here, for clients that connect directly.
    keep_alive_s: float = 5.0
    # One INFO line per request on the "splitserve.access" logger, whatever the log level: client, method and path
    # (or the public gRPC method), status, time to the answer's end, request id (X-Request-Id, gRPC's request_id).
    # uvicorn's own access log stays off.
    access_log: bool = False
    # Web pages allowed to call the API from a browser (CORS): their origins, comma-separated ("https://chat.example,
    # http://localhost:3000"), or "*" for any. None: no CORS headers, so browsers keep other pages' scripts out.
    cors_origins: str | None = None
    # On SIGTERM or Ctrl-C the router first serves on for shutdown_delay_s while /ready and gRPC health say it is
    # stopping, so that load balancers take it out of rotation before its listeners refuse anyone (0: at once; the
    # Helm chart sets a few seconds, the time a Service takes to drop an ending pod). Then the listeners close (HTTP,
    # gRPC) and the requests in flight have shutdown_grace_s to finish before they are cut: each ends with an error
    # naming the stop (an SSE error event, gRPC UNAVAILABLE). A second signal skips what is left of both.
    # Delay and grace together stay under the pod's termination grace.
    shutdown_delay_s: float = 0.0
    shutdown_grace_s: float = 25.0
    # The cluster secret workers require on every call (None: $SPLITSERVE_CLUSTER_SECRET[_FILE]).
    cluster_secret: str | None = field(default=None, repr=False)
    # TLS for the public HTTP and gRPC endpoints: PEM certificate (chain) and key; both or neither.
    tls_certfile: str | None = None
    tls_keyfile: str | None = None

    def __post_init__(self) -> None:
        check_served_model_name(self.served_model_name)
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together: give both or neither")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be {' or '.join(allowed)}, got {getattr(self, name)!r}")
        check_bounds(self, BOUNDS)
        check_listeners(self)
        cors_origin_list(self.cors_origins)  # ValueError naming a malformed one
        for flag, addresses in (
            ("prefill_addresses (--prefill)", self.prefill_addresses),
            ("decode_addresses (--decode)", self.decode_addresses),
        ):
            for address in addresses:
                check_worker_address(address, flag)
        both = sorted(set(self.prefill_addresses) & set(self.decode_addresses))
        if both:
            raise ValueError(f"a worker has one role: {', '.join(both)} given as both --prefill and --decode")


def check_worker_address(address: str, flag: str) -> None:
    """A worker's gRPC address as gRPC dials it: host:port ([v6]:port), the port in 1-65535; ValueError naming
    ``flag`` for anything else (gRPC would take port 99999 as 34463, or no port as 443, or a URL as a host)."""
    host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or "/" in host or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{flag} {address!r} is no worker address: host:port, the port between 1 and 65535")


def check_listeners(config: RouterConfig) -> None:
    """What the router binds, refused with the config (before `splitserve up` starts Ray), not by a failed bind."""
    if not isinstance(config.host, str) or not config.host.strip():
        # bound as given, '' would listen on every address; that takes a wildcard said out loud
        raise ValueError(f"host (--host) must name an address to listen on (0.0.0.0: every one), got {config.host!r}")
    if config.port and config.port == config.grpc_port:
        raise ValueError(
            f"port (--port) and grpc_port (--grpc-port) are both {config.port}: the HTTP and the gRPC API each need "
            "a port of their own (0: any free one)"
        )


def cors_origin_list(origins: str | None) -> list[str]:
    """The origins ``cors_origins`` names; ValueError for one that is not "*" or scheme://host[:port]."""
    listed = [origin.strip() for origin in (origins or "").split(",") if origin.strip()]
    for origin in listed:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s:]+(:\d{1,5})?", origin):
            raise ValueError(f"cors_origins: {origin!r} is not an origin (scheme://host[:port], no path) or *")
    if origins is not None and not listed:
        raise ValueError("cors_origins names no origin; leave it unset for none")
    return listed


# The numeric settings' bounds (RouterConfig checks them, so the flags, the config file and `splitserve up` share them).
BOUNDS = {
    "port": PORT,
    "grpc_port": PORT,
    "max_body_bytes": AT_LEAST_ONE,
    "request_timeout_s": POSITIVE,
    "max_model_len": AT_LEAST_ONE,
    "max_running": AT_LEAST_ONE,
    "max_queued": NON_NEGATIVE,
    "queue_timeout_s": POSITIVE,
    "responses_store_mb": NON_NEGATIVE,  # 0: off
    "kv_weight": NON_NEGATIVE,
    "local_prefill_threshold": NON_NEGATIVE,
    "prefill_saturation": AT_LEAST_ONE,
    "max_prefill_wait_ms": NON_NEGATIVE,  # 0: off
    "prefill_timeout_s": POSITIVE,
    "prefill_retries": NON_NEGATIVE,
    "retry_backoff_s": NON_NEGATIVE,
    "migration_retries": NON_NEGATIVE,
    "lease_ms": LEASE_MS,
    "health_interval_s": POSITIVE,
    "header_timeout_s": POSITIVE,
    "body_timeout_s": POSITIVE,
    "keep_alive_s": POSITIVE,
    "shutdown_delay_s": NON_NEGATIVE,
    "shutdown_grace_s": NON_NEGATIVE,
}

# The settings with a fixed set of values (RouterConfig checks them; the CLI offers them as choices).
CHOICES = {
    "routing_policy": ROUTING_POLICIES,
    "migration_policy": MIGRATION_POLICIES,
    "lease_policy": LEASE_POLICIES,
    "scheduling_policy": SCHEDULING_POLICIES,
    "reasoning_parser": REASONING_PARSERS,
}

# What each RouterConfig field means, in a line: the one help text of `splitserve router`'s and `splitserve up`'s flags
# (cluster/cli.py derives them, names, types and defaults included, from the fields) and of the docs.
# tests/cluster/test_config.py checks that every field has one.
FIELD_HELP = {
    "model": "preset or model directory to check every worker's model card against (the router loads its config "
    "and tokenizer, and fingerprints its weights if present); default: adopt the workers' model card",
    "served_model_name": "the name clients use; default: the model card's",
    "prefill_addresses": "prefill worker addresses host:port",
    "decode_addresses": "decode worker addresses host:port",
    "host": "the router's HTTP and gRPC bind address",
    "port": "the OpenAI HTTP API's port (0: any free port)",
    "grpc_port": "the public gRPC API's port (0: any free port)",
    "api_keys": "API keys clients must send; empty: no authentication",
    "max_body_bytes": "largest request accepted, in bytes (larger: an HTTP 413, gRPC RESOURCE_EXHAUSTED)",
    "request_timeout_s": "seconds a request may take from getting its slot to its last token",
    "max_model_len": "admit at most this many tokens (prompt + max_tokens); lowers the model card's, never raises it",
    "max_running": "requests served at once; beyond it they queue",
    "max_queued": "requests waiting for a slot; beyond it: 429",
    "queue_timeout_s": "seconds a request may wait in the queue for a slot (then 503)",
    "scheduling_policy": "the order of the queues, the router's and the workers': fcfs (arrival) or priority (each "
    "request's priority, lower first, then arrival; also the order of preemption; with fcfs a request that sets one "
    "is refused)",
    "responses_store_mb": "MiB of memory the Responses API's stored responses may take (least recently used go first "
    "past it); 0: store none, and refuse store, previous_response_id and background",
    "reasoning_parser": "qwen3 or deepseek_r1: a chat completion returns the model's thinking (<think>…</think>) as "
    "reasoning_content, apart from content; none: the text as written",
    "routing_policy": "kv_aware: prefer workers whose prefix cache holds the prompt; load: least loaded only",
    "kv_weight": "w in cost(P) = w * uncached prompt blocks on P + active load of P",
    "local_prefill_threshold": "uncached prompt tokens below which the decode worker prefills itself",
    "prefill_saturation": "in-flight prefills per worker at which the prefill pool counts as saturated",
    "max_prefill_wait_ms": "expected wait on the best prefill worker (the prompts it has not reported computed, at "
    "its measured prefill speed) beyond which the decode worker prefills a prompt itself, if it has less queued; "
    "0: off",
    "prefill_timeout_s": "seconds one prefill call may take",
    "prefill_retries": "other prefill workers tried after a failed prefill",
    "retry_backoff_s": "base of the jittered backoff between retries, in seconds",
    "migration_retries": "times a request moves to another decode worker after losing one mid-decode",
    "migration_policy": "a decode worker lost mid-decode: re-push the KV from a prefill worker (its prefix cache holds "
    "the prompt) or have the new decode worker recompute prompt + output itself",
    "lease_ms": "how long a decode reservation waits for its KV, in milliseconds",
    "lease_policy": "a lease expired before the KV landed: recompute (prefill again) or fail the request",
    "health_interval_s": "seconds between health checks of each worker",
    "admin_token": "guards /admin/* and the dashboard's data; default: $SPLITSERVE_ADMIN_TOKEN[_FILE]",
    "open_metrics": "serve /metrics without an API key (a scraper inside the cluster)",
    "open_docs": "serve /docs, /redoc and /openapi.json without an API key",
    "header_timeout_s": "seconds a client has to send a request's headers",
    "body_timeout_s": "seconds a client has to send a request's body, once its headers are in",
    "keep_alive_s": "seconds an idle client connection stays open; above the idle timeout of a load balancer in front",
    "access_log": "log one line per request, HTTP or gRPC (client, request, status, ms, request id), at any log level",
    "cors_origins": "web origins whose pages may call the API from a browser, comma-separated, or * for any "
    "(default: none)",
    "shutdown_delay_s": "on SIGTERM or Ctrl-C, seconds the router serves on while /ready says it is stopping "
    "(load balancers take it out first); a second signal stops at once",
    "shutdown_grace_s": "on SIGTERM or Ctrl-C, after the delay, seconds the requests in flight have to finish (new "
    "ones are refused); a second signal stops at once",
    "cluster_secret": "the secret workers require; default: $SPLITSERVE_CLUSTER_SECRET[_FILE]",
    "tls_certfile": "PEM certificate (chain): serve HTTPS and gRPC over TLS",
    "tls_keyfile": "PEM private key of the TLS certificate",
}

# Secrets come from the environment or from files, never from a command line (``ps`` shows those to every user).
API_KEYS_ENV = "SPLITSERVE_API_KEYS"  # comma-separated
API_KEYS_FILE_ENV = "SPLITSERVE_API_KEYS_FILE"  # a file of keys, one a line or comma-separated
ADMIN_TOKEN_ENV = "SPLITSERVE_ADMIN_TOKEN"
ADMIN_TOKEN_FILE_ENV = "SPLITSERVE_ADMIN_TOKEN_FILE"


def read_api_keys(path: str | os.PathLike, source: str = "--api-key-file") -> tuple[str, ...]:
    """The keys in a file: one a line or comma-separated (a mounted Secret holding SPLITSERVE_API_KEYS's value).
    A file that holds none is refused, naming ``source`` (the flag or variable that named it): no keys means no
    authentication, never what an operator who names a key file asks for."""
    keys = _split_keys(_read_secret_file(path, source))
    if not keys:
        raise ValueError(f"{source} {path} holds no API key (an empty list would mean no authentication)")
    return keys


def read_secret(path: str | os.PathLike, source: str) -> str:
    """The secret a file holds, stripped; ValueError naming ``source`` (its flag or variable): unreadable or empty."""
    value = _read_secret_file(path, source).strip()
    if not value:
        raise ValueError(f"{source} {path} is empty")
    return value


def _read_secret_file(path: str | os.PathLike, source: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{source} {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None


def _split_keys(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.replace("\n", ",").split(",") if k.strip())


def api_keys_from_env(configured: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Keys from config plus $SPLITSERVE_API_KEYS plus the file $SPLITSERVE_API_KEYS_FILE names. A variable set but
    naming no key is refused, as an empty key file is: it would turn authentication off."""
    from_env = ()
    if API_KEYS_ENV in os.environ:
        from_env = _split_keys(os.environ[API_KEYS_ENV])
        if not from_env:
            raise ValueError(f"{API_KEYS_ENV} is set but names no API key (an empty list would mean no authentication)")
    path = os.environ.get(API_KEYS_FILE_ENV)
    if path is not None and not path.strip():
        raise ValueError(f"{API_KEYS_FILE_ENV} is set but empty: name a file of API keys, or unset it")
    return configured + from_env + (read_api_keys(path, API_KEYS_FILE_ENV) if path else ())


def admin_token_from_env() -> str | None:
    """$SPLITSERVE_ADMIN_TOKEN, else the content of the file $SPLITSERVE_ADMIN_TOKEN_FILE names, else None."""
    if os.environ.get(ADMIN_TOKEN_ENV, "").strip():
        return os.environ[ADMIN_TOKEN_ENV].strip()
    path = os.environ.get(ADMIN_TOKEN_FILE_ENV)
    return read_secret(path, ADMIN_TOKEN_FILE_ENV) if path else None


# Where secrets go instead of a command line, as a refused flag names them (SecretOnCommandLine).
API_KEY_SOURCES = "--api-key-file PATH, SPLITSERVE_API_KEYS or SPLITSERVE_API_KEYS_FILE"
ADMIN_TOKEN_SOURCES = "--admin-token-file PATH, SPLITSERVE_ADMIN_TOKEN or SPLITSERVE_ADMIN_TOKEN_FILE"


class SecretOnCommandLine(argparse.Action):
    """A flag that would put a secret in argv, where ``ps`` and /proc/PID/cmdline show it to every user: refused,
    naming where the secret goes instead (every command that takes a secret: the cluster's and the benchmarks')."""

    def __init__(self, option_strings, dest, alternatives: str, **kwargs) -> None:
        self.alternatives = alternatives
        super().__init__(option_strings, dest, help=f"refused (`ps` would show it): use {alternatives}", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(
            f"{option_string} puts a secret on the command line, where `ps` shows it to every user of the machine; "
            f"use {self.alternatives}"
        )
