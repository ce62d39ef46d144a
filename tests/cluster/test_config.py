"""The router's settings have one owner, router.config.RouterConfig: `splitserve up`'s config file (its `router:`
section, and the few cluster-wide facts at the top level) and the flags of `splitserve up` and `splitserve router`
are derived from its fields, so every field can be set and a default changed there is the one `up` uses. No Ray:
run_cluster runs against a stand-in controller and router."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import textwrap
import types
import typing
from pathlib import Path

import pytest
import yaml

import cluster.up
from cluster.cli import _NOT_FLAGS, build_parser, cluster_config_from_args, main, router_config_from_args, router_flag
from cluster.config import CLUSTER_WIDE, ROUTER_KEYS, SET_BY_UP, ClusterConfig, from_dict, load_file
from router.config import CHOICES, FIELD_HELP, RouterConfig

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {f.name: f for f in dataclasses.fields(RouterConfig)}
HINTS = typing.get_type_hints(RouterConfig)


FORMATTED = {"cors_origins": "https://chat.example,http://localhost:3000"}  # strings RouterConfig checks the form of


def other_value(name: str):
    """A value of the field's type that is not its default (so that a dropped setting shows)."""
    default = FIELDS[name].default
    hint = HINTS[name]
    (kind,) = [t for t in typing.get_args(hint) if t is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    if name in CHOICES:
        return next(choice for choice in CHOICES[name] if choice != default)
    if kind is bool:
        return not default
    if kind is int:
        return (default or 0) + 7
    if kind is float:
        return (default or 0) * 2 + 0.25
    if kind is str:
        return FORMATTED.get(name, f"{name}-value")
    assert typing.get_origin(kind) is tuple, f"{name}: a RouterConfig field of a type this test does not know"
    return (f"{name}-1:7001", f"{name}-2:7001")  # worker addresses: host:port


def test_every_router_field_is_a_router_key_a_cluster_wide_key_or_set_by_up():
    groups = [set(ROUTER_KEYS), set(CLUSTER_WIDE), set(SET_BY_UP)]
    assert set().union(*groups) == set(FIELDS), "a RouterConfig field `splitserve up` cannot set"
    assert sum(map(len, groups)) == len(FIELDS), "a field in two groups"
    assert set(FIELD_HELP) == set(FIELDS), "FIELD_HELP is the help of every RouterConfig field, and only of those"


# -- through `splitserve up` to the running router ---------------------------------------------


class _Started(Exception):
    """Raised by the stand-in router's start: run_cluster has built everything it starts the router with."""


class _Remote:
    def __init__(self, result=None) -> None:
        self.result = result

    def remote(self, *args):
        async def call():
            return self.result

        return call()


class _Controller:
    start = shutdown = _Remote()


def router_started_by_up(config: ClusterConfig, monkeypatch) -> tuple[RouterConfig, ClusterConfig]:
    """The RouterConfig run_cluster starts its router with, and the ClusterConfig the controller is given."""
    seen = {}

    class ControllerClass:
        def options(self, **options):
            return self

        def remote(self, config_json: str, cluster_secret: str):
            seen["controller"] = ClusterConfig.from_json(config_json)
            return _Controller()

    class Router:
        def __init__(self, router_config: RouterConfig, control) -> None:
            seen["router"] = router_config

        async def start(self) -> None:
            raise _Started

    monkeypatch.setattr(cluster.up, "controller_class", ControllerClass)
    monkeypatch.setattr(cluster.up, "Router", Router)
    with pytest.raises(_Started):
        asyncio.run(cluster.up.run_cluster(config, asyncio.Event()))
    return seen["router"], seen["controller"]


def test_every_router_field_set_in_the_config_file_reaches_the_router_up_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITSERVE_CLUSTER_SECRET", "the-cluster-secret")
    for name in ("SPLITSERVE_ADMIN_TOKEN", "SPLITSERVE_ADMIN_TOKEN_FILE", "SPLITSERVE_CLUSTER_SECRET_FILE"):
        monkeypatch.delenv(name, raising=False)
    wanted = {name: other_value(name) for name in FIELDS}
    file = {name: wanted[name] for name in CLUSTER_WIDE}
    file["router"] = {name: list(v) if isinstance(v, tuple) else v for name, v in wanted.items() if name in ROUTER_KEYS}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(file))

    config = cluster_config_from_args(build_parser().parse_args(["up", "--config", str(path)]))
    running, controller = router_started_by_up(config, monkeypatch)

    expected = {name: wanted[name] for name in [*ROUTER_KEYS, *CLUSTER_WIDE]}
    assert {name: getattr(running, name) for name in expected} == expected
    assert running.cluster_secret == "the-cluster-secret"
    assert (running.prefill_addresses, running.decode_addresses) == ((), ()), "the controller's membership feeds it"
    # The controller gets the same config without the router's secrets.
    assert controller == config.without_secrets()
    assert (controller.router.api_keys, controller.router.admin_token) == ((), None)
    assert controller.router.max_running == wanted["max_running"]


def test_up_without_a_file_runs_the_router_with_routerconfigs_defaults(monkeypatch, tmp_path):
    for name in ("SPLITSERVE_ADMIN_TOKEN", "SPLITSERVE_ADMIN_TOKEN_FILE", "SPLITSERVE_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    config = cluster_config_from_args(build_parser().parse_args(["up"]))
    running, _ = router_started_by_up(config, monkeypatch)
    made_by_up = {"model", "cluster_secret", "admin_token"}  # the cluster's model; secrets `up` makes
    assert {n: getattr(running, n) for n in FIELDS if n not in made_by_up} == {
        n: f.default for n, f in FIELDS.items() if n not in made_by_up
    }
    assert running.model == ClusterConfig.model and running.cluster_secret and running.admin_token


_CHANGED_DEFAULTS = """
import dataclasses, json, sys
import router.config as rc

changed = {"max_running": 7, "port": 9099, "lease_ms": 1234, "health_interval_s": 0.125, "open_metrics": True}
fields = [
    (f.name, f.type, dataclasses.field(default=changed.get(f.name, f.default), repr=f.repr))
    for f in dataclasses.fields(rc.RouterConfig)
]
namespace = {"__post_init__": rc.RouterConfig.__post_init__}
rc.RouterConfig = dataclasses.make_dataclass("RouterConfig", fields, frozen=True, namespace=namespace)
rc.RouterConfig.__module__ = "router.config"

from cluster.cli import build_parser, cluster_config_from_args, router_config_from_args

up = cluster_config_from_args(build_parser().parse_args(["up"])).router_config(cluster_secret="s", admin_token="t")
router = router_config_from_args(build_parser().parse_args(["router", "--decode", "127.0.0.1:1"]))
print(json.dumps({"up": {k: getattr(up, k) for k in changed}, "router": {k: getattr(router, k) for k in changed}}))
"""


def test_a_default_changed_in_routerconfig_is_the_one_up_and_router_use():
    result = subprocess.run(
        [sys.executable, "-c", _CHANGED_DEFAULTS], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    changed = {"max_running": 7, "port": 9099, "lease_ms": 1234, "health_interval_s": 0.125, "open_metrics": True}
    assert json.loads(result.stdout) == {"up": changed, "router": changed}


def test_cluster_wide_defaults_are_routerconfigs():
    config = ClusterConfig()
    for name in CLUSTER_WIDE.keys() - {"model"}:  # the cluster serves demo by default; a bare router adopts
        assert getattr(config, name) == FIELDS[name].default, name


# -- refusals, naming the key ----------------------------------------------------------------------


def test_an_unknown_router_key_is_refused_naming_it(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown router keys: max_runing"):
        from_dict({"router": {"max_runing": 3}})
    path = tmp_path / "cluster.yaml"
    path.write_text("router:\n  max_runing: 3\n")
    assert main(["up", "--config", str(path)]) == 2
    assert "max_runing" in capsys.readouterr().err


@pytest.mark.parametrize(
    "pool, message",
    [
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be >= 1, got 0"),
        ({"prefill_chunk_beside_decodes": -4}, "prefill_chunk_beside_decodes must be >= 1, got -4"),
        ({"max_num_seqs": "many"}, "decode.max_num_seqs"),
        ({"chunk_size": 64}, "unknown decode keys: chunk_size"),
    ],
)
def test_bad_engine_step_limits_of_a_pool_are_refused_naming_them(pool, message):
    with pytest.raises(ValueError, match=message):
        from_dict({"decode": pool})


@pytest.mark.parametrize("name", ROUTER_KEYS)
def test_a_router_setting_at_the_top_level_is_refused_with_its_new_spelling(name):
    with pytest.raises(ValueError, match=rf"use router\.{name}\b"):
        from_dict({name: FIELDS[name].default})


@pytest.mark.parametrize("name", sorted(CLUSTER_WIDE | SET_BY_UP))
def test_a_router_section_may_not_set_what_the_cluster_owns(name):
    hint = f"set the top-level {name}" if name in CLUSTER_WIDE else SET_BY_UP.get(name, "")
    with pytest.raises(ValueError, match=rf"router\.{name} is not a router section setting") as refused:
        from_dict({"router": {name: other_value(name)}})
    assert hint in str(refused.value)
    with pytest.raises(ValueError, match=rf"router\.{name}"):
        ClusterConfig(router=RouterConfig(**{name: other_value(name)}))


@pytest.mark.parametrize(
    "router, message",
    [
        ({"port": "8000"}, "router.port must be an integer, got '8000'"),
        ({"kv_weight": "heavy"}, "router.kv_weight must be a number"),
        ({"open_metrics": "yes"}, "router.open_metrics must be true/false"),
        ({"api_keys": "one-key"}, "router.api_keys must be a list of strings"),
        ({"max_model_len": 1.5}, "router.max_model_len must be an integer or null"),
        ({"routing_policy": "random"}, "routing_policy must be kv_aware or load, got 'random'"),
        ([1, 2], "router: expected a mapping"),
    ],
)
def test_router_values_of_the_wrong_type_are_refused_naming_the_key(router, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        from_dict({"router": router})


# -- flags ---------------------------------------------------------------------------------------


def _flag_argv(names) -> tuple[list[str], dict]:
    argv, wanted = [], {}
    for name in names:
        value = wanted[name] = other_value(name)
        argv += [router_flag(name)] if value is True else [f"--no-{router_flag(name)[2:]}"] if value is False else []
        argv += [] if isinstance(value, bool) else [router_flag(name), str(value)]
    return argv, wanted


def test_every_router_field_but_secrets_and_addresses_is_a_flag_of_splitserve_router():
    names = [n for n in FIELDS if n not in _NOT_FLAGS]
    argv, wanted = _flag_argv(names)
    config = router_config_from_args(build_parser().parse_args(["router", "--decode", "127.0.0.1:1", *argv]))
    assert {n: getattr(config, n) for n in names} == wanted
    assert config.decode_addresses == ("127.0.0.1:1",)


def test_every_router_setting_is_a_flag_of_splitserve_up_over_the_file(tmp_path):
    names = [
        n for n in [*CLUSTER_WIDE, *ROUTER_KEYS] if n not in _NOT_FLAGS and n not in ("model", "served_model_name")
    ]
    argv, wanted = _flag_argv(names)
    path = tmp_path / "cluster.toml"
    path.write_text(
        textwrap.dedent(
            """
            lease_ms = 5
            [router]
            port = 1234
            max_running = 3
            open_metrics = true
            """
        )
    )
    from_file = cluster_config_from_args(build_parser().parse_args(["up", "--config", str(path)]))
    assert (from_file.lease_ms, from_file.router.port, from_file.router.max_running) == (5, 1234, 3)
    assert from_file == load_file(path), "no flag given: the file's config"
    config = cluster_config_from_args(build_parser().parse_args(["up", "--config", str(path), *argv]))
    running = config.router_config(cluster_secret=None, admin_token=None)
    assert {n: getattr(running, n) for n in names} == wanted
    closed = cluster_config_from_args(build_parser().parse_args(["up", "--config", str(path), "--no-open-metrics"]))
    assert closed.router.open_metrics is False


def test_a_router_started_by_hand_reads_the_cluster_file_under_its_flags(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "served_model_name: chat\nlease_ms: 7\nprefill:\n  replicas: 2\n"
        "router:\n  max_running: 3\n  port: 1234\n  open_metrics: true\n"
    )
    argv = ["router", "--decode", "d:1", "--config", str(path)]
    from_file = router_config_from_args(build_parser().parse_args(argv))
    up = cluster_config_from_args(build_parser().parse_args(["up", "--config", str(path)]))
    running = up.router_config(cluster_secret=None, admin_token=None)
    for name in ("served_model_name", "lease_ms", "max_running", "port", "open_metrics"):
        assert getattr(from_file, name) == getattr(running, name), name  # one file, the same router settings
    assert (from_file.max_running, from_file.lease_ms, from_file.served_model_name) == (3, 7, "chat")
    assert from_file.model is None, "no model in the file: the router adopts its workers' (up would serve the demo)"
    assert from_file.decode_addresses == ("d:1",)
    flagged = router_config_from_args(build_parser().parse_args([*argv, "--max-running", "9", "--no-open-metrics"]))
    assert (flagged.max_running, flagged.open_metrics, flagged.port) == (9, False, 1234)


@pytest.mark.parametrize("command", [["up"], ["router", "--decode", "d:1"]])
@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "router: [unclosed\n", "bad.yaml: not valid YAML"),
        ("bad.toml", "lease_ms = [\n", "bad.toml: not valid TOML"),
        ("typo.yaml", "prefill:\n  replica: 2\n", "replica"),
        ("list.yaml", "- 1\n", "config: expected a mapping"),
    ],
)
def test_a_config_file_that_does_not_parse_or_check_is_refused(tmp_path, capsys, command, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    assert main([*command, "--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_old_flag_spellings_still_work():
    args = ["--host", "0.0.0.0", "--port", "0", "--grpc-port", "0", "--open-metrics", "--header-timeout", "2"]
    args += ["--body-timeout", "3", "--tls-cert", "c.pem", "--tls-key", "k.pem"]
    up = cluster_config_from_args(build_parser().parse_args(["up", *args])).router
    router = router_config_from_args(
        build_parser().parse_args(["router", "--decode", "d:1", "--request-timeout", "5", "--max-running", "2", *args])
    )
    for config in (up, router):
        assert (config.host, config.port, config.grpc_port, config.open_metrics) == ("0.0.0.0", 0, 0, True)
        assert (config.header_timeout_s, config.body_timeout_s, config.tls_certfile, config.tls_keyfile) == (
            2.0,
            3.0,
            "c.pem",
            "k.pem",
        )
    assert (router.request_timeout_s, router.max_running) == (5.0, 2)


def test_router_flag_help_shows_routerconfigs_default():
    text = build_parser()._subparsers._group_actions[0].choices["up"].format_help()
    assert f"(default: {FIELDS['max_running'].default})" in " ".join(text.split())


# -- serialised for the controller ---------------------------------------------------------------


def test_the_config_survives_json_and_the_controller_never_sees_the_routers_secrets():
    config = ClusterConfig(lease_ms=9, router=RouterConfig(api_keys=("k",), admin_token="t", max_running=3))
    assert ClusterConfig.from_json(config.to_json()) == config
    assert from_dict(config.to_dict()) == config
    hidden = ClusterConfig.from_json(config.without_secrets().to_json())
    assert (hidden.router.api_keys, hidden.router.admin_token, hidden.router.max_running) == ((), None, 3)


def test_the_decode_workers_fallback_lease_is_the_routers_default():
    from decode_worker.worker import DEFAULT_LEASE_MS

    assert DEFAULT_LEASE_MS == FIELDS["lease_ms"].default, "a reservation without lease_ms would wait another time"


def test_the_readmes_example_config_loads(tmp_path):
    text = (ROOT / "README.md").read_text().split("`splitserve up --config` reads", 1)[1]
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (path := tmp_path / "cluster.yaml").write_text(example)
    config = load_file(path)
    assert (config.router.max_running, config.lease_ms, config.prefill.replicas) == (128, 30000, 2)


def test_an_address_given_as_both_roles_is_refused(capsys):
    """A worker has one role: listed under both, the router would have served it as whichever came first."""
    assert main(["router", "--prefill", "h:1", "p:2", "--decode", "h:1"]) == 2
    assert "h:1 given as both --prefill and --decode" in capsys.readouterr().err
