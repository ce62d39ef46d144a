"""The ``splitserve`` command line. Each subcommand imports its heavy modules only when run."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import sys
import threading

from cluster import log_setup
from contract.bounds import flag_type
from contract.heap import freeze_startup_heap
from engine.config import DTYPES, add_prefill_chunk_argument, check_device

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Of every command that serves (up, router, worker): at INFO they log state changes an operator wants to see (a
# worker joining, healthy or dropped, the model card adopted, a KV event gap), a few lines, never one a request
# (those are DEBUG; uvicorn's access log stays off). Under `up` the controller and the workers in Ray's processes log
# at the same level (cluster/log_setup.py); Ray's own logging has its own (cluster.up).
LOG_LEVEL = "INFO"
# A `splitserve worker` stopped by SIGTERM or Ctrl-C drains this long at most: as the router's default grace, under
# Kubernetes' default 30 s termination grace. (`splitserve up`'s workers are drained by its controller instead.)
DEFAULT_SHUTDOWN_GRACE_S = 25.0


def _add_log_level_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default=LOG_LEVEL,
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help=f"{', '.join(LOG_LEVELS)} (default: {LOG_LEVEL})",
    )


def _add_engine_args(parser: argparse.ArgumentParser, threads_default: int | None, threads_help: str) -> None:
    """The engine's settings; their defaults are EngineConfig's (threads: the command's own, ``threads_default``)."""
    from cluster.config import MIB, POOL_BOUNDS, engine_default

    parser.add_argument(
        "--model",
        default="demo",
        help="preset (demo, bench-125m, smollm2-135m-instruct) or a local Hugging Face directory",
    )
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="default: the model's own")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument(
        "--kv-cache-mb",
        type=flag_type(int, POOL_BOUNDS["kv_cache_mb"]),
        default=engine_default("kv_cache_memory_bytes") // MIB,
        help="KV pool memory budget in MiB (default: %(default)s)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=engine_default("block_size"),
        help="tokens per KV block, a power of two (default: %(default)s)",
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=engine_default("max_num_seqs"), help="(default: %(default)s)"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=engine_default("max_num_batched_tokens"),
        help="(default: %(default)s)",
    )
    add_prefill_chunk_argument(parser)
    parser.add_argument(
        "--threads",
        type=flag_type(int, POOL_BOUNDS["threads"]),
        default=threads_default,
        help=f"torch intra-op threads (default: {threads_help})",
    )


def engine_config_from_args(args: argparse.Namespace):
    """The engine's config from `generate`'s or `worker`'s flags; ValueError naming the flag of a bad value."""
    from cluster.config import MIB
    from engine.config import EngineConfig

    _check_engine_flags(args)
    check_device(args.device)
    return EngineConfig(
        model=args.model,
        served_model_name=getattr(args, "served_model_name", None),  # workers only
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_mb * MIB,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefill_chunk_beside_decodes=args.prefill_chunk_beside_decodes,
        num_threads=args.threads,
    )


# Engine flags whose rules EngineConfig owns (a power-of-two block size, step limits of at least 1), each the field's
# name dashed.
_ENGINE_CHECKED_FLAGS = ("block_size", "max_num_seqs", "max_num_batched_tokens", "prefill_chunk_beside_decodes")


def _check_engine_flags(args: argparse.Namespace) -> None:
    """Each flag checked alone by EngineConfig's own rules, so that its error names the flag."""
    from engine.config import EngineConfig

    for name in _ENGINE_CHECKED_FLAGS:
        value = getattr(args, name)
        if value is None:
            continue
        try:
            EngineConfig(**{name: value})
        except ValueError as exc:
            raise ValueError(f"--{name.replace('_', '-')} {value}: {exc}") from None


# The admin commands' router: --url, else this variable (the Helm chart sets it in the head pod), else
# default_router_url().
ROUTER_URL_ENV = "SPLITSERVE_URL"


def default_router_url() -> str:
    """Where `splitserve up` serves by default: RouterConfig's host and port."""
    from cluster.config import router_default

    return f"http://{router_default('host')}:{router_default('port')}"


def _add_secret_args(parser: argparse.ArgumentParser, api_key_help: str, admin_token_help: str) -> None:
    from router.config import ADMIN_TOKEN_SOURCES, API_KEY_SOURCES, SecretOnCommandLine

    parser.add_argument("--api-key", action=SecretOnCommandLine, alternatives=API_KEY_SOURCES)
    parser.add_argument("--api-key-file", default=None, metavar="PATH", help=api_key_help)
    parser.add_argument("--admin-token", action=SecretOnCommandLine, alternatives=ADMIN_TOKEN_SOURCES)
    parser.add_argument("--admin-token-file", default=None, metavar="PATH", help=admin_token_help)


# -- router settings as flags ------------------------------------------------------------------
# Derived from router.config.RouterConfig's fields (name, type, default, choices) and FIELD_HELP, so that `splitserve
# router` and `splitserve up` spell, type and document each setting once. Flags default to None ("not given"): a
# given flag overrides the config file, an absent one leaves the file's value, or else RouterConfig's default.

_FLAG_NAMES = {"tls_certfile": "--tls-cert", "tls_keyfile": "--tls-key"}  # the rest: the field's name, dashed, no _s
# Set otherwise: secrets through files and the environment (_add_secret_args), worker addresses by `router --prefill
# / --decode` (or the controller, under `up`).
_NOT_FLAGS = ("api_keys", "admin_token", "cluster_secret", "prefill_addresses", "decode_addresses")


def router_flag(name: str) -> str:
    """The command-line flag of a RouterConfig field."""
    return _FLAG_NAMES.get(name, "--" + name.removesuffix("_s").replace("_", "-"))


def router_flag_fields(command: str) -> tuple[str, ...]:
    """The RouterConfig fields a command takes as flags: under `up`, what its config file may set at the top level
    or in its router section (the model and its name are the cluster's flags there)."""
    import dataclasses

    from cluster.config import CLUSTER_WIDE, ROUTER_KEYS
    from router.config import RouterConfig

    if command == "router":
        return tuple(f.name for f in dataclasses.fields(RouterConfig) if f.name not in _NOT_FLAGS)
    shared = tuple(name for name in CLUSTER_WIDE if name not in ("model", "served_model_name"))
    return shared + tuple(name for name in ROUTER_KEYS if name not in _NOT_FLAGS)


def _add_router_setting_args(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    import dataclasses
    import types
    import typing

    from router.config import CHOICES, FIELD_HELP, RouterConfig

    hints = typing.get_type_hints(RouterConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(RouterConfig)}
    group = parser.add_argument_group(
        "router settings (router.config.RouterConfig's; a flag overrides the config file)"
    )
    for name in names:
        hint = hints[name]
        (kind,) = (
            [t for t in typing.get_args(hint) if t is not type(None)] if isinstance(hint, types.UnionType) else [hint]
        )
        default = defaults[name]
        if kind is bool and default is not None:
            default = "on" if default else "off"
        text = (FIELD_HELP[name] + ("" if default is None else f" (default: {default})")).replace("%", "%%")
        if kind is bool:
            group.add_argument(
                router_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
            continue
        metavar = (
            None if name in CHOICES else "SECONDS" if name.endswith("_s") else "MS" if name.endswith("_ms") else None
        )
        group.add_argument(
            router_flag(name), dest=name, type=kind, default=None, choices=CHOICES.get(name), metavar=metavar, help=text
        )


def _given_settings(args: argparse.Namespace, names) -> dict:
    """The settings among ``names`` whose flags were given."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    from cluster.config import MIN_DECODE_REPLICAS, PLANNER_BOUNDS, SLO_FLAGS, WORKER_THREADS, ClusterConfig
    from contract.bounds import NON_NEGATIVE, PORT, POSITIVE, Bound
    from router.config import BOUNDS

    parser = argparse.ArgumentParser(
        prog="splitserve",
        description="Serve an LLM with prefill and decode disaggregated: a router, prefill and decode workers, Ray.",
        epilog="Start here: `splitserve up` serves the OpenAI API on http://127.0.0.1:8000/v1. "
        "`splitserve COMMAND --help` describes each command.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text with the engine alone (no cluster)")
    # The engine alone, in this one process: every core is its own.
    _add_engine_args(generate, None, "torch's own, a thread per core: the engine runs alone here")
    generate.add_argument("--prompt", action="append", help="a prompt (repeatable); default: a short demo prompt")
    generate.add_argument("--chat", action="store_true", help="apply the model's chat template to each prompt")
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.set_defaults(run=_run_generate)

    worker = commands.add_parser("worker", help="run one prefill or decode worker as a plain process (no Ray)")
    worker.add_argument("role", choices=["prefill", "decode"])
    _add_engine_args(
        worker,
        WORKER_THREADS,
        f"{WORKER_THREADS}, as for a worker `splitserve up` starts; a worker alone on its machine: pass its cores",
    )
    worker.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every one)")
    worker.add_argument(
        "--advertise-host",
        default=None,
        help="the host peers dial, named in this worker's tickets and READY line; default: --host, or for a "
        "wildcard --host the address of the default route's interface",
    )
    worker.add_argument("--port", type=flag_type(int, PORT), default=0, help="0: any free port")
    worker.add_argument("--transport", choices=["grpc", "nixl"], default="grpc")
    worker.add_argument(
        "--lease-ms",
        type=flag_type(int, BOUNDS["lease_ms"]),
        default=None,
        help="decode: how long a reservation waits for its KV when the router does not say; default: the worker's own",
    )
    worker.add_argument("--no-verify-kv", action="store_true", help="skip KV checksums (faster)")
    worker.add_argument(
        "--no-kv-bulk",
        action="store_true",
        help="grpc transport: keep KV bytes inside gRPC messages instead of the bulk TCP path",
    )
    worker.add_argument(
        "--push-mode",
        choices=["layer", "request"],
        default=None,
        help="prefill: push KV layer by layer as computed (the default), or all of it after the prompt (a baseline)",
    )
    worker.add_argument("--worker-id", default=None)
    worker.add_argument(
        "--served-model-name", default=None, help="the name in the model card; default: the preset or directory name"
    )
    worker.add_argument(
        "--metrics-port",
        type=flag_type(int, PORT),
        default=None,
        help="serve Prometheus /metrics on this port (0: any)",
    )
    worker.add_argument(
        "--shutdown-grace",
        type=flag_type(float, NON_NEGATIVE),
        default=DEFAULT_SHUTDOWN_GRACE_S,
        metavar="SECONDS",
        help="on SIGTERM or Ctrl-C, seconds the requests in flight have to finish while routers send no new work "
        f"(0: stop at once; a second signal stops at once; default: {DEFAULT_SHUTDOWN_GRACE_S:g})",
    )
    worker.add_argument(
        "--insecure",
        action="store_true",
        help="serve without a cluster secret: anyone who can reach the port may push KV, reserve and abort "
        "(default: refuse to start unless SPLITSERVE_CLUSTER_SECRET or SPLITSERVE_CLUSTER_SECRET_FILE is set)",
    )
    _add_log_level_arg(worker)
    worker.set_defaults(run=_run_worker)

    up = commands.add_parser("up", help="start the cluster (embedded Ray by default) and serve the OpenAI API")
    up.add_argument("--config", default=None, help="a YAML or TOML cluster config; flags override it")
    up.add_argument(
        "--address", default=None, help="join this Ray cluster ('auto' on a Ray head) instead of starting one"
    )
    up.add_argument(
        "--model",
        default=None,
        help="preset (demo: the default, bench-125m, smollm2-135m-instruct: built once on first use) or a local "
        "Hugging Face directory",
    )
    up.add_argument(
        "--served-model-name", default=None, help="the name clients use; default: the preset or directory name"
    )
    up.add_argument("--dtype", default=None, choices=DTYPES)
    up.add_argument("--device", default=None, help="cpu or cuda")
    within = (
        "within the pool's min and max replicas where a flag or the config file sets them (outside one that is set: "
        "refused); a bound nobody set follows the count"
    )
    count = flag_type(int, NON_NEGATIVE)
    up.add_argument("--prefill", type=count, default=None, metavar="N", help=f"prefill workers, {within}")
    up.add_argument(
        "--decode",
        type=flag_type(int, Bound(MIN_DECODE_REPLICAS)),
        default=None,
        metavar="N",
        help=f"decode workers, {within}",
    )
    up.add_argument("--transport", choices=["grpc", "nixl"], default=None)
    up.add_argument("--worker-host", default=None, help="address workers bind to; 'auto': the node's IP")
    for name, pool, what in (
        ("ttft_target_s", "prefill", "time to first token"),
        ("tpot_target_s", "decode", "time per output token"),
    ):
        up.add_argument(
            SLO_FLAGS[name],
            dest=name,
            type=flag_type(float, PLANNER_BOUNDS[name]),
            default=None,
            metavar="SECONDS",
            help=f"the p90 {what} to hold: turns the planner on for the {pool} pool; a pool without its own "
            "target keeps its size",
        )
    up.add_argument(
        "--start-timeout-s",
        type=flag_type(float, POSITIVE),
        default=None,
        metavar="SECONDS",
        help="how long to wait for the first workers (placement, model loading) before stopping; default "
        f"{ClusterConfig.start_timeout_s:g}",
    )
    up.add_argument("--min-prefill", type=count, default=None, metavar="N")
    up.add_argument("--max-prefill", type=count, default=None, metavar="N")
    up.add_argument("--min-decode", type=flag_type(int, Bound(MIN_DECODE_REPLICAS)), default=None, metavar="N")
    up.add_argument("--max-decode", type=flag_type(int, Bound(MIN_DECODE_REPLICAS)), default=None, metavar="N")
    _add_secret_args(
        up,
        api_key_help="a file of API keys clients must send (one a line); also SPLITSERVE_API_KEYS[_FILE]",
        admin_token_help="a file holding the admin token; default: $SPLITSERVE_ADMIN_TOKEN[_FILE], else a random "
        "token written next to the runtime files",
    )
    _add_log_level_arg(up)
    _add_router_setting_args(up, router_flag_fields("up"))
    up.set_defaults(run=_run_up)

    for name, text in (
        ("status", "pools and workers of a running cluster"),
        ("scale", "set a pool's size"),
        ("drain", "drain a worker: no new work, finish, exit"),
    ):
        admin = commands.add_parser(name, help=text)
        admin.add_argument(
            "--url",
            default=None,
            help=f"the router's HTTP(S) address; default: ${ROUTER_URL_ENV}, else {default_router_url()} (a --url "
            f"given wins over ${ROUTER_URL_ENV})",
        )
        _add_secret_args(
            admin,
            api_key_help="a file holding the API key to send; default: the first of $SPLITSERVE_API_KEYS[_FILE]",
            admin_token_help="default: $SPLITSERVE_ADMIN_TOKEN[_FILE], else the token file of `up`",
        )
        if name == "scale":
            admin.add_argument("role", choices=["prefill", "decode"])
            admin.add_argument("replicas", type=int)
        if name == "drain":
            admin.add_argument("worker_id")
        admin.set_defaults(run=_run_admin)

    router = commands.add_parser("router", help="run the router (OpenAI HTTP + gRPC) over a static set of workers")
    router.add_argument("--prefill", nargs="*", default=[], metavar="ADDR", help="prefill worker addresses host:port")
    router.add_argument("--decode", nargs="+", required=True, metavar="ADDR", help="decode worker addresses host:port")
    _add_secret_args(
        router,
        api_key_help="a file of accepted API keys, one a line; also SPLITSERVE_API_KEYS[_FILE]",
        admin_token_help="a file holding the admin token (guards /admin and the dashboard's data); "
        "also SPLITSERVE_ADMIN_TOKEN[_FILE]",
    )
    router.add_argument(
        "--config",
        help="a cluster config file (YAML/TOML, as `splitserve up --config` reads): its router section and the "
        "cluster-wide keys it names (model, served_model_name, lease_ms, health_interval_s); flags override it",
    )
    _add_log_level_arg(router)
    _add_router_setting_args(router, router_flag_fields("router"))
    router.set_defaults(run=_run_router)

    # Benchmarks are not part of the serving runtime: `main` hands these commands to bench.cli, which
    # a base install (no extras) may lack. They are listed here for --help only.
    for name, text in DELEGATED_COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def _run_generate(args: argparse.Namespace) -> int:
    from contract.sampling import FieldError, SamplingParams
    from engine.engine import Engine
    from engine.errors import EngineError

    try:
        config = engine_config_from_args(args)
    except ValueError as exc:
        print(f"splitserve: {exc}", file=sys.stderr)
        return 2
    try:
        engine = Engine(config)
        prompts = args.prompt or ["The quick brown fox"]
        if args.chat:
            prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
        for prompt, result in zip(prompts, engine.generate(prompts, params)):
            print(
                f"--- prompt: {prompt!r}\n{result.text!r}\n[{len(result.token_ids)} tokens, "
                f"finish={result.finish_reason}]"
            )
    except (EngineError, FieldError) as exc:
        print(f"splitserve: {exc}", file=sys.stderr)
        return 2
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    import json

    from engine.errors import EngineError
    from protos.cluster_auth import MISSING_SECRET_HELP, ClusterAuth

    unused = _flag_of_the_other_role(args)
    if unused:
        print(f"splitserve worker {args.role}: {unused}", file=sys.stderr)
        return 2
    if not args.host.strip():  # bound as given, '' would listen on every address
        print("splitserve: --host '' names no address: give one (0.0.0.0 for every address)", file=sys.stderr)
        return 2
    log_setup.configure(args.log_level)
    try:
        auth = ClusterAuth.from_env()
    except (OSError, ValueError) as exc:
        print(f"splitserve: {exc}", file=sys.stderr)
        return 2
    if auth.secret is None and not args.insecure:
        print(f"splitserve worker: {MISSING_SECRET_HELP}; or pass --insecure to serve unauthenticated", file=sys.stderr)
        return 2
    common = dict(
        auth=auth,
        transport=args.transport,
        verify_checksums=not args.no_verify_kv,
        kv_bulk=not args.no_kv_bulk,
        host=args.host,
        advertise_host=args.advertise_host,
        port=args.port,
        worker_id=args.worker_id,
    )
    try:
        if args.role == "prefill":
            from prefill_worker.worker import PrefillWorker

            push = {} if args.push_mode is None else {"push_mode": args.push_mode}  # else: the worker's own
            worker = PrefillWorker(engine_config_from_args(args), **push, **common)
        else:
            from decode_worker.worker import DecodeWorker

            lease = {} if args.lease_ms is None else {"default_lease_ms": args.lease_ms}  # else: the worker's own
            worker = DecodeWorker(engine_config_from_args(args), **lease, **common)
        address = worker.start()
        freeze_startup_heap()
        if args.metrics_port is not None:
            print(f"metrics on port {worker.serve_metrics(args.metrics_port)}", flush=True)
    except (EngineError, OSError, ValueError) as exc:
        print(f"splitserve: {exc}", file=sys.stderr)
        return 2
    stop_signal = _stop_signal_pipe()
    trust = "cluster secret required" if auth.secret else "UNAUTHENTICATED (--insecure)"
    print(f"splitserve {args.role} worker serving on {address} (transport {args.transport}, {trust})", flush=True)
    print("READY " + json.dumps({"role": args.role, "address": address, "worker_id": worker.worker_id}), flush=True)
    _wait_for_stop(stop_signal)
    if args.shutdown_grace > 0:
        print(
            f"splitserve {args.role} worker: draining: routers send it no new work, and what is in flight has up to "
            f"{args.shutdown_grace:g} s to finish (a second Ctrl-C or SIGTERM stops now)",
            flush=True,
        )
        second = threading.Event()
        threading.Thread(target=lambda: (_wait_for_stop(stop_signal), second.set()), daemon=True).start()
        if not worker.drain(args.shutdown_grace, stop_early=second):
            print(f"splitserve {args.role} worker: stopping with requests still in flight", file=sys.stderr, flush=True)
    worker.stop()
    return 0


def _wait_for_stop(stop_signal: int) -> None:
    while os.read(stop_signal, 1)[0] not in (signal.SIGINT, signal.SIGTERM):
        pass  # another signal with a Python handler (none of ours): Python wrote its number too


def _stop_signal_pipe() -> int:
    """A pipe's read end that gets a byte on SIGINT or SIGTERM. Python's wakeup fd writes it, from C, on whichever
    thread the signal lands; the handlers themselves do nothing. A handler that took a lock (``Event.set``) deadlocked
    the worker when a second signal came in while the first one's handler held it: a supervisor's SIGTERM twice, or
    Ctrl-C twice, left it stuck until SIGKILL."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    return read_end


# Flags of one worker role: given to the other, they would be dropped.
_ROLE_FLAGS = {"lease_ms": ("--lease-ms", "decode"), "push_mode": ("--push-mode", "prefill")}


def _flag_of_the_other_role(args: argparse.Namespace) -> str | None:
    """Why a flag given is not this worker role's, or None."""
    for name, (flag, role) in _ROLE_FLAGS.items():
        if getattr(args, name) is not None and args.role != role:
            return f"{flag} is a {role} worker's setting; a {args.role} worker does not use it"
    return None


def cluster_config_from_args(args: argparse.Namespace):
    """The config file's ClusterConfig (or the defaults) with the given flags over it."""
    import dataclasses

    from cluster.config import CLUSTER_WIDE, SLO_FLAGS, ClusterConfig, from_dict, read_file

    raw = read_file(args.config) if args.config else {}  # read once: the config, and which keys the file sets
    config = from_dict(raw) if args.config else ClusterConfig()
    top = {
        "model": args.model,
        "served_model_name": args.served_model_name,
        "dtype": args.dtype,
        "device": args.device,
        "transport": args.transport,
        "address": args.address,
        "worker_host": args.worker_host,
        "start_timeout_s": args.start_timeout_s,
    }
    top = {k: v for k, v in top.items() if v is not None}
    settings = _given_settings(args, router_flag_fields("up"))
    router = {name: value for name, value in settings.items() if name not in CLUSTER_WIDE}
    top.update({name: value for name, value in settings.items() if name in CLUSTER_WIDE})
    secrets = {
        "admin_token": admin_token_from_args(args),
        "api_keys": api_keys_from_args(args),
    }
    router.update({k: v for k, v in secrets.items() if v is not None})
    config = dataclasses.replace(config, **top, router=dataclasses.replace(config.router, **router))
    for role in ("prefill", "decode"):
        in_file = set(raw.get(role) or ())  # from_dict checked it is a mapping
        config = config.with_pool(role, **_pool_size_from_args(args, role, config.pool(role), in_file))
    slo = {name: getattr(args, name) for name in SLO_FLAGS if getattr(args, name) is not None}
    if slo:  # enabled None: PlannerSpec's one rule, a target turns the planner on (as a file's target does)
        config = dataclasses.replace(config, planner=dataclasses.replace(config.planner, enabled=None, **slo))
    return config


def _pool_size_from_args(args: argparse.Namespace, role: str, pool, in_file: set[str]) -> dict:
    """A pool's replicas, min_replicas and max_replicas: each flag given over the config's value. Where the count
    and a bound disagree, the one nobody set (no flag, not in the config file) follows the other (`up --prefill 0`:
    min_replicas 0, an aggregated cluster; `up --min-decode 2`: two decode workers); where both were set, refused,
    naming the flags and keys involved. ``in_file``: the keys the config file sets in the pool's section."""
    flags = {"replicas": f"--{role}", "min_replicas": f"--min-{role}", "max_replicas": f"--max-{role}"}
    given = {key: getattr(args, flag[2:].replace("-", "_")) for key, flag in flags.items()}
    size = {key: getattr(pool, key) if value is None else value for key, value in given.items()}

    def is_set(key: str) -> bool:
        return given[key] is not None or key in in_file

    def named(key: str) -> str:
        return f"{flags[key]} {size[key]}" if given[key] is not None else f"{role}.{key} {size[key]}"

    if is_set("min_replicas") and is_set("max_replicas") and size["min_replicas"] > size["max_replicas"]:
        raise ValueError(f"{role} pool: {named('min_replicas')} is above {named('max_replicas')}")  # no count fits
    # Twice round: a count that follows the maximum down may then fall below a minimum nobody set.
    for bound, where in (("min_replicas", "below"), ("max_replicas", "above")) * 2:
        outside = size["replicas"] < size[bound] if bound == "min_replicas" else size["replicas"] > size[bound]
        if not outside:
            continue
        if not is_set(bound):
            size[bound] = size["replicas"]
        elif not is_set("replicas"):
            size["replicas"] = size[bound]
        else:
            raise ValueError(f"{named('replicas')} is {where} {named(bound)}")
    return size


def _run_up(args: argparse.Namespace) -> int:
    log_setup.configure(args.log_level)
    try:
        config = cluster_config_from_args(args)
    except (OSError, ValueError) as exc:
        print(f"splitserve: {exc}", file=sys.stderr)
        return 2
    if config.address is None:
        # The embedded Ray cluster uses token auth (Ray >= 2.59's default, which it warns about while
        # RAY_AUTH_MODE is unset); the token is Ray's own ~/.ray/auth_token, generated on first use.
        # Ray reads the mode once, when imported, so this precedes `cluster.up`. A joined cluster
        # (--address) keeps whatever mode its operator set; an explicit RAY_AUTH_MODE always wins.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    from cluster.up import up

    return up(config)


def _run_admin(args: argparse.Namespace) -> int:
    from cluster.admin_client import run_admin

    return run_admin(args)


def admin_token_from_args(args: argparse.Namespace) -> str | None:
    """--admin-token-file's content, else $SPLITSERVE_ADMIN_TOKEN[_FILE]'s."""
    from router.config import admin_token_from_env, read_secret

    return read_secret(args.admin_token_file, "--admin-token-file") if args.admin_token_file else admin_token_from_env()


def api_keys_from_args(args: argparse.Namespace) -> tuple[str, ...] | None:
    """--api-key-file's keys (None: not given). The environment's are checked too, here: the router reads them only
    when it starts, which under `up` is after Ray and the workers."""
    from router.config import api_keys_from_env, read_api_keys

    api_keys_from_env()  # ValueError naming the variable that names no key or an unreadable file
    return read_api_keys(args.api_key_file, "--api-key-file") if args.api_key_file else None


def router_config_from_args(args: argparse.Namespace):
    """The config file's router settings (or RouterConfig's defaults) with the given flags and secrets over them."""
    import dataclasses

    from cluster.config import router_config_from_file
    from router.config import RouterConfig

    config = router_config_from_file(args.config) if args.config else RouterConfig()
    secrets = {
        "admin_token": admin_token_from_args(args),
        "api_keys": api_keys_from_args(args),
    }
    return dataclasses.replace(
        config,
        prefill_addresses=tuple(args.prefill),
        decode_addresses=tuple(args.decode),
        **{name: value for name, value in secrets.items() if value is not None},
        **_given_settings(args, router_flag_fields("router")),
    )


def _run_router(args: argparse.Namespace) -> int:
    from engine.errors import EngineError
    from protos.cluster_auth import ListenError
    from router.server import on_stop_signals, run_event_loop, serve

    log_setup.configure(args.log_level)

    async def main(config) -> None:
        await serve(config, *on_stop_signals())

    try:
        config = router_config_from_args(args)
    except (OSError, ValueError) as exc:  # a secret file unreadable, or a bad flag value
        print(f"splitserve: {exc}", file=sys.stderr)
        return 2
    try:
        run_event_loop(main(config))
    except (EngineError, ValueError, ListenError) as exc:  # --model unreadable, a bad flag value, a port taken
        print(f"splitserve: {exc}", file=sys.stderr)
        return 2
    except asyncio.CancelledError:  # a stop forced by signals (on_stop_signals said why)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _exit_with_parent(os.environ.get(EXIT_WITH_PARENT_ENV))
    raise_open_files_limit()
    if argv and argv[0] in DELEGATED_COMMANDS:
        return _run_delegated(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.run(args)


# Open files a splitserve process asks for: a router holds a socket per client connection for as long as a streamed
# completion lasts, and under the soft limit most systems start a shell with (1024 on Linux, 256 on macOS) a router
# started under 256 answered 235 of 400 connections held open at once (tests/router/test_open_files.py).
OPEN_FILES = 65536
MACOS_OPEN_MAX = 10240


def raise_open_files_limit() -> None:
    """Raises this process's soft limit on open files to OPEN_FILES, or to its hard limit if that is lower (what an
    unprivileged process may do); children (`up`'s Ray and workers) inherit it. Where the OS refuses, it stays."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    for limit in (wanted, MACOS_OPEN_MAX):  # macOS refuses more than OPEN_MAX, whatever hard limit it reports
        if soft < limit <= wanted:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
                return
            except (ValueError, OSError):
                continue


# Set by a launcher (bench/processes.py) to its PID: this process gets SIGTERM when that one dies.
EXIT_WITH_PARENT_ENV = "SPLITSERVE_EXIT_WITH_PARENT"


def _exit_with_parent(parent: str | None) -> None:
    """Linux's parent-death signal, armed here after exec rather than in a pre-exec hook of the launcher; if the
    launcher already died (we were re-parented before arming it), exit now."""
    if not parent:
        return
    if not parent.isdigit():
        raise SystemExit(f"splitserve: {EXIT_WITH_PARENT_ENV} must be a process id, got {parent!r}")
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux: nothing arms it
    if os.getppid() != int(parent):
        raise SystemExit(f"splitserve: the launching process {parent} is gone")


_PR_SET_PDEATHSIG = 1


DELEGATED_COMMANDS = {
    "bench": "benchmarks, most with a baseline run side by side and its ratio (needs the [bench] extra)",
    "simulate": "discrete-event simulation of a prefill/decode cluster; split search; validation",
}


def _run_delegated(command: str, argv: list[str]) -> int:
    try:
        from bench import cli as bench_cli

        return bench_cli.main(command, argv)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in _OUR_PACKAGES:
            raise
        print(
            f"splitserve {command}: needs the benchmark extras, missing module {exc.name!r}: "
            "pip install 'splitserve[bench]'",
            file=sys.stderr,
        )
        return 2


_OUR_PACKAGES = {
    *("bench", "cluster", "contract", "decode_worker", "engine", "kv_transfer"),
    *("prefill_worker", "protos", "router", "worker_server"),
}


if __name__ == "__main__":
    sys.exit(main())
