"""What an operator gets for a mistake on the command line or in a config file: a one-line ``splitserve: ...``
naming the flag, variable, key or URL at fault and a non-zero exit, before anything starts (never a traceback, never
a setting silently dropped). And the admin commands send `up`'s local admin token to a router on this machine only.

The CLI runs as a real subprocess where the message and exit code are what is checked; `up`'s refusals are checked
through cluster_config_from_args (what `up` runs before Ray), so that a regression can not start a cluster here."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from cluster.admin_client import is_this_machine
from cluster.cli import build_parser, cluster_config_from_args, engine_config_from_args
from cluster.config import PlannerSpec, from_dict, load_file
from router.config import RouterConfig, api_keys_from_env, read_api_keys

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "local-admin-token"
STATUS = {"cluster": {"pools": {"decode": {"desired": 1, "min": 1, "max": 4}}, "workers": []}, "model": {}}


def cli(*argv: str, env: dict | None = None, home: Path) -> subprocess.CompletedProcess:
    """The real `splitserve`, with a bare environment: no secrets or URL but ``env``'s; `up`'s files under ``home``."""
    base = {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_RUNTIME_DIR": str(home)}
    command = [sys.executable, "-m", "cluster.cli", *argv]
    return subprocess.run(command, cwd=ROOT, env={**base, **(env or {})}, capture_output=True, text=True, timeout=90)


def assert_refused(result: subprocess.CompletedProcess, *named: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("splitserve"), result.stderr  # one line, no traceback
    for name in named:
        assert name in lines[0], (name, lines[0])


def up_config(*argv: str):
    """What `splitserve up ARGV` would run with; its refusals are ValueErrors, which `up` prints in one line."""
    return cluster_config_from_args(build_parser().parse_args(["up", *argv]))


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("SPLITSERVE_API_KEYS", "SPLITSERVE_API_KEYS_FILE", "SPLITSERVE_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SPLITSERVE_ADMIN_TOKEN_FILE", raising=False)


# -- an API-key file that holds no key turns authentication off: refused ---------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", " , ,\n"])
def test_a_key_file_with_no_key_is_refused_naming_it(tmp_path, clean_env, monkeypatch, text):
    path = tmp_path / "keys.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"--api-key-file {path} holds no API key"):
        read_api_keys(path)
    monkeypatch.setenv("SPLITSERVE_API_KEYS_FILE", str(path))
    with pytest.raises(ValueError, match=f"SPLITSERVE_API_KEYS_FILE {path} holds no API key"):
        api_keys_from_env()
    with pytest.raises(ValueError, match="SPLITSERVE_API_KEYS_FILE"):
        up_config()  # before Ray: the router reads the environment only when it starts


def test_a_key_file_gives_its_keys(tmp_path, clean_env):
    (path := tmp_path / "keys.txt").write_text("k1\nk2, k3\n")
    assert read_api_keys(path) == ("k1", "k2", "k3")
    assert up_config("--api-key-file", str(path)).router.api_keys == ("k1", "k2", "k3")


@pytest.mark.parametrize("value", ["", " , "])
def test_an_api_keys_variable_set_but_naming_no_key_is_refused(clean_env, monkeypatch, value):
    monkeypatch.setenv("SPLITSERVE_API_KEYS", value)
    with pytest.raises(ValueError, match="SPLITSERVE_API_KEYS is set but names no API key"):
        api_keys_from_env()
    monkeypatch.setenv("SPLITSERVE_API_KEYS", "a, b")
    assert api_keys_from_env(("c",)) == ("c", "a", "b")


def test_up_and_router_refuse_an_empty_key_file(tmp_path, clean_env):
    (empty := tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match=f"--api-key-file {empty} holds no API key"):
        up_config("--api-key-file", str(empty))
    argv = ["router", "--decode", "127.0.0.1:1", "--port", "0", "--grpc-port", "0", "--api-key-file", str(empty)]
    router = cli(*argv, home=tmp_path)
    assert_refused(router, f"--api-key-file {empty}", "holds no API key")
    assert router.returncode == 2


# -- `up`'s local admin token goes to a router on this machine only ----------------------------------------------


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("LocalHost.", True),
        ("10.0.0.9", False),
        ("192.0.2.1", False),
        ("2001:db8::1", False),
        ("other-cluster.invalid", False),  # does not resolve: not this machine
        ("", False),
    ],
)
def test_only_loopback_hosts_are_this_machine(host, local):
    assert is_this_machine(host) is local


class _Router(BaseHTTPRequestHandler):
    """Answers as a router's admin API would (403 without the token), or, by the URL's first path segment, as
    something that is not one. It also serves as an HTTP proxy: it records the request line's target."""

    seen: list[dict] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append({"target": self.path, "token": self.headers.get("X-Admin-Token")})
        mode = self.path.split("/admin/status")[0].rsplit("/", 1)[-1]
        if mode == "html":
            self._answer(404, b"<html>Not Found</html>", "text/html")
        elif mode == "list":
            self._answer(200, b"[1]")
        elif mode == "odd":
            self._answer(200, json.dumps({"cluster": {"pools": {"decode": {}}}}).encode())
        elif self.headers.get("X-Admin-Token") != TOKEN:
            self._answer(403, json.dumps({"error": {"message": "missing or incorrect admin token"}}).encode())
        else:
            self._answer(200, json.dumps(STATUS).encode())

    def _answer(self, code: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_router():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Router)
    _Router.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_the_local_token_file_goes_to_a_loopback_url_only(tmp_path, fake_router):
    port = fake_router
    (tmp_path / f"splitserve-{port}.admin-token").write_text(TOKEN)  # as `up` serving on that port wrote it
    local = cli("status", "--url", f"http://127.0.0.1:{port}", home=tmp_path)
    assert local.returncode == 0, local.stderr
    assert "decode   desired 1" in local.stdout
    assert _Router.seen[-1]["token"] == TOKEN

    # Another host on the same port: the request goes out (through the test's server, as an HTTP proxy, so that it
    # is seen) without the local token, and the 403 says where the CLI looked and why not the file.
    other = f"http://other-cluster.invalid:{port}"
    remote = cli("status", "--url", other, env={"http_proxy": f"http://127.0.0.1:{port}"}, home=tmp_path)
    assert _Router.seen[-1] == {"target": f"{other}/admin/status", "token": None}
    assert_refused(remote, "403", "no admin token sent", "--admin-token-file", "SPLITSERVE_ADMIN_TOKEN", other)
    assert "read only for a router on this machine" in remote.stderr

    # A token given explicitly goes where the URL says.
    env = {"http_proxy": f"http://127.0.0.1:{port}", "SPLITSERVE_ADMIN_TOKEN": TOKEN}
    given = cli("status", "--url", other, env=env, home=tmp_path)
    assert given.returncode == 0, given.stderr
    assert _Router.seen[-1] == {"target": f"{other}/admin/status", "token": TOKEN}


def test_a_403_without_a_token_says_where_the_cli_looked(tmp_path, fake_router):
    result = cli("status", "--url", f"http://localhost:{fake_router}", home=tmp_path)
    assert _Router.seen[-1]["token"] is None
    assert_refused(result, "403", "no admin token sent", f"{tmp_path}/splitserve-{fake_router}.admin-token")


# -- status, scale, drain: bad secrets and URLs, odd answers -------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--admin-token-file", "{tmp}/absent"], {}, "--admin-token-file {tmp}/absent: cannot read it"),
        (["--admin-token-file", "{tmp}/empty"], {}, "--admin-token-file {tmp}/empty is empty"),
        (["--admin-token-file", "{tmp}"], {}, "--admin-token-file {tmp}: cannot read it"),
        ([], {"SPLITSERVE_ADMIN_TOKEN_FILE": "{tmp}/absent"}, "SPLITSERVE_ADMIN_TOKEN_FILE {tmp}/absent"),
        ([], {"SPLITSERVE_ADMIN_TOKEN_FILE": "{tmp}/empty"}, "SPLITSERVE_ADMIN_TOKEN_FILE {tmp}/empty is empty"),
        (["--api-key-file", "{tmp}/absent"], {}, "--api-key-file {tmp}/absent: cannot read it"),
        (["--api-key-file", "{tmp}/empty"], {}, "--api-key-file {tmp}/empty holds no API key"),
        ([], {"SPLITSERVE_API_KEYS_FILE": "{tmp}"}, "SPLITSERVE_API_KEYS_FILE {tmp}: cannot read it"),
        ([], {"SPLITSERVE_API_KEYS": ""}, "SPLITSERVE_API_KEYS is set but names no API key"),
    ],
)
def test_admin_commands_name_a_bad_secret_source_in_one_line(tmp_path, argv, env, named):
    (tmp_path / "empty").write_text("\n")
    fill = {"tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in argv]
    env = {name: value.format(**fill) for name, value in env.items()}
    # Port 1: were the secret taken instead of refused, the CLI would fail to connect, with another message.
    assert_refused(cli("status", "--url", "http://127.0.0.1:1", *argv, env=env, home=tmp_path), named.format(**fill))


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--url", ""], {}, "--url ''"),
        (["--url", "notaurl"], {}, "--url 'notaurl'"),
        (["--url", "ftp://127.0.0.1:8000"], {}, "--url 'ftp://127.0.0.1:8000'"),  # at once, not after a timeout
        (["--url", "http://127.0.0.1:99999"], {}, "--url 'http://127.0.0.1:99999': the port"),
        (["--url", "http://[::1:8000"], {}, "--url 'http://[::1:8000'"),
        ([], {"SPLITSERVE_URL": "garbage"}, "$SPLITSERVE_URL 'garbage'"),
    ],
)
@pytest.mark.parametrize("command", [["status"], ["scale", "decode", "2"], ["drain", "w1"]])
def test_admin_commands_refuse_a_bad_url_in_one_line(tmp_path, command, argv, env, named):
    assert_refused(cli(*command, *argv, env=env, home=tmp_path), named)


@pytest.mark.parametrize(
    ("mode", "named"),
    [
        ("html", "404: Not Found (not a splitserve router's error answer"),
        ("list", "answered, but not with a JSON object"),
        ("odd", "answered a status this CLI cannot read"),
    ],
)
def test_an_answer_that_is_not_a_routers_is_named(tmp_path, fake_router, mode, named):
    url = f"http://127.0.0.1:{fake_router}/{mode}"
    assert_refused(cli("status", "--url", url, env={"SPLITSERVE_ADMIN_TOKEN": TOKEN}, home=tmp_path), named)


def test_status_into_a_closed_pipe_ends_without_a_traceback(tmp_path, fake_router):
    """`splitserve status | head -1`: the reader is gone before the status is written."""
    command = [sys.executable, "-m", "cluster.cli", "status", "--url", f"http://127.0.0.1:{fake_router}"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path)}
    env["SPLITSERVE_ADMIN_TOKEN"] = TOKEN
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        process.stdout.close()  # long before the CLI has imported and asked the server
        _, stderr = process.communicate(timeout=90)
    assert _Router.seen, "the CLI asked the server (so it did write into the closed pipe)"
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr
    assert process.returncode != 0


# -- the same port for HTTP and gRPC ---------------------------------------------------------------------------


def test_the_same_port_for_http_and_grpc_is_refused_naming_both(tmp_path, clean_env):
    with pytest.raises(ValueError, match=r"port \(--port\) and grpc_port \(--grpc-port\) are both 18555"):
        RouterConfig(port=18555, grpc_port=18555)
    assert RouterConfig(port=0, grpc_port=0).port == 0  # any free port, each its own
    with pytest.raises(ValueError, match="--port.*--grpc-port"):
        up_config("--port", "18555", "--grpc-port", "18555")
    (path := tmp_path / "c.yaml").write_text("router: {port: 18555, grpc_port: 18555}\n")
    with pytest.raises(ValueError, match="^router: port .* are both 18555"):
        load_file(path)
    router = cli("router", "--decode", "127.0.0.1:1", "--port", "18555", "--grpc-port", "18555", home=tmp_path)
    assert_refused(router, "--port", "--grpc-port", "18555")


# -- generate and worker: bad engine values and devices ---------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--block-size", "3"], "--block-size 3: block_size must be a power of two"),
        (["--block-size", "0"], "--block-size 0"),
        (["--block-size", "-16"], "--block-size -16"),
        (["--max-num-seqs", "0"], "--max-num-seqs 0"),
        (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens 0"),
        (["--prefill-chunk-beside-decodes", "0"], "--prefill-chunk-beside-decodes 0"),
        (["--device", "foo"], "--device 'foo'"),
        (["--device", "meta"], "--device 'meta'"),
    ],
)
@pytest.mark.parametrize("command", [["generate"], ["worker", "decode"]])
def test_bad_engine_flags_are_refused_naming_the_flag(command, argv, named):
    with pytest.raises(ValueError) as refused:
        engine_config_from_args(build_parser().parse_args([*command, *argv]))
    assert str(refused.value).startswith(named), str(refused.value)


def test_a_cuda_device_this_torch_cannot_see_is_refused_in_one_line(tmp_path):
    """Without CUDA, any cuda device; with it, the one past the last device torch sees (the same check both ways)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        assert_refused(cli("generate", "--device", "cuda", home=tmp_path), "--device cuda", "no CUDA device")
    beyond = f"cuda:{count}"
    worker = cli("worker", "decode", "--insecure", "--device", beyond, home=tmp_path)
    assert_refused(worker, f"--device {beyond}")


def test_generate_and_worker_refuse_in_one_line(tmp_path):
    generate = cli("generate", "--block-size", "3", home=tmp_path)
    assert_refused(generate, "--block-size 3")
    assert generate.returncode == 2
    worker = cli("worker", "decode", "--insecure", "--port", "0", "--device", "foo", home=tmp_path)
    assert_refused(worker, "--device 'foo'")
    host = cli("worker", "decode", "--insecure", "--host", "", home=tmp_path)
    assert_refused(host, "--host ''")


# -- config files: keys and values refused before Ray --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("1: 2\n", "config: 1 is not a setting's name"),
        ("router: {1: 2}\n", "router: 1 is not a setting's name"),
        ('prefill: {resources: {x: "a"}}\n', "prefill: resources.x must be a number >= 0, got 'a'"),
        ("decode: {resources: {x: -1}}\n", "decode: resources.x must be a number >= 0"),
        ('worker_host: ""\n', "worker_host (--worker-host) must name an address"),
        ('router: {host: ""}\n', "router: host (--host) must name an address"),
        ("model: demo\nmodel: other\n", "the key 'model' is given twice"),
        ("router:\n  port: 1\n  port: 2\n", "the key 'port' is given twice"),
        ("planner: {enabled: false, ttft_target_s: 0.5}\n", "enabled is false, but ttft_target_s (--ttft-slo) is set"),
    ],
)
def test_a_bad_config_file_is_refused_naming_the_key(tmp_path, text, named):
    (path := tmp_path / "cluster.yaml").write_text(text)
    with pytest.raises(ValueError) as refused:
        up_config("--config", str(path))
    assert named in str(refused.value) and "\n" not in str(refused.value), str(refused.value)


def test_a_yaml_merge_key_may_be_overridden(tmp_path):
    """`<<: *defaults` then a key of its own is YAML's override, not a key given twice."""
    (path := tmp_path / "cluster.yaml").write_text("prefill: &pool {replicas: 2, max_replicas: 4}\n")
    (merged := tmp_path / "merged.yaml").write_text(
        "prefill: &pool {replicas: 2, max_replicas: 4}\ndecode:\n  <<: *pool\n  replicas: 3\n"
    )
    assert load_file(path).prefill.replicas == 2
    assert (load_file(merged).decode.replicas, load_file(merged).decode.max_replicas) == (3, 4)


def test_the_router_refuses_a_bad_config_file_in_one_line(tmp_path):
    (path := tmp_path / "cluster.yaml").write_text("1: 2\n")
    argv = ["router", "--decode", "127.0.0.1:1", "--port", "0", "--grpc-port", "0", "--config"]
    assert_refused(cli(*argv, str(path), home=tmp_path), "config: 1 is not a setting's name")
    assert_refused(cli(*argv, str(tmp_path / "absent.yaml"), home=tmp_path), "--config", "absent.yaml")
    (path := tmp_path / "dup.toml").write_text("lease_ms = 1\nlease_ms = 2\n")
    assert_refused(cli(*argv, str(path), home=tmp_path), "dup.toml: not valid TOML")


def test_empty_hosts_are_refused_by_flag(clean_env):
    with pytest.raises(ValueError, match=r"worker_host \(--worker-host\) must name an address"):
        up_config("--worker-host", "")
    with pytest.raises(ValueError, match=r"host \(--host\) must name an address"):
        up_config("--host", "")
    assert up_config("--worker-host", "0.0.0.0", "--host", "0.0.0.0").worker_host == "0.0.0.0"  # a wildcard, said


def test_the_router_names_its_missing_files_by_flag(tmp_path):
    argv = ["router", "--decode", "127.0.0.1:1", "--port", "0", "--grpc-port", "0"]
    assert_refused(cli(*argv, "--api-key-file", "/nonexistent/keys", home=tmp_path), "--api-key-file /nonexistent")
    assert_refused(cli(*argv, "--admin-token-file", "/nonexistent/t", home=tmp_path), "--admin-token-file")


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "http://127.0.0.1:7001", "127.0.0.1", "", "h:0"])
def test_a_worker_address_grpc_would_misread_is_refused_naming_its_flag(tmp_path, address):
    """gRPC dials port 99999 as 34463 and no port as 443: such an address is refused before the router starts."""
    argv = ["router", "--port", "0", "--grpc-port", "0", "--prefill", "127.0.0.1:7002", "--decode", address]
    assert_refused(cli(*argv, home=tmp_path), "decode_addresses (--decode)", repr(address))


# -- a planner target in a config file turns the planner on, as its flag does ---------------------------------------


@pytest.mark.parametrize(
    ("planner", "planned"),
    [({"ttft_target_s": 0.5}, ("prefill",)), ({"tpot_target_s": 0.05}, ("decode",)), ({}, ())],
)
def test_a_planner_target_in_the_file_turns_the_planner_on_for_its_pool(tmp_path, planner, planned):
    from_file = from_dict({"planner": planner}).planner
    assert (from_file.enabled, from_file.planned_roles) == (bool(planned), planned)
    assert from_dict(json.loads(json.dumps({"planner": {**planner, "enabled": bool(planned)}}))).planner == from_file
    flags = {"ttft_target_s": "--ttft-slo", "tpot_target_s": "--tpot-slo"}
    by_flag = up_config(*[arg for name, value in planner.items() for arg in (flags[name], str(value))]).planner
    assert by_flag == from_file  # one rule for the flag and the key
    (path := tmp_path / "off.yaml").write_text("planner: {enabled: false}\n")
    overridden = up_config("--config", str(path), "--ttft-slo", "0.5").planner  # a flag over the file's false
    assert (overridden.enabled, overridden.planned_roles) == (True, ("prefill",))
    assert PlannerSpec().enabled is False


# -- pool bounds named by their flags ---------------------------------------------------------------------------


def test_a_minimum_above_a_maximum_names_the_pool_and_both_settings(tmp_path):
    with pytest.raises(ValueError, match="^prefill pool: --min-prefill 3 is above --max-prefill 1$"):
        up_config("--min-prefill", "3", "--max-prefill", "1")
    (path := tmp_path / "c.yaml").write_text("decode: {min_replicas: 3, replicas: 3}\n")
    with pytest.raises(ValueError, match="^decode pool: decode.min_replicas 3 is above --max-decode 2$"):
        up_config("--config", str(path), "--max-decode", "2")
    grown = up_config("--min-prefill", "6").prefill  # an unset maximum still follows the minimum up
    assert (grown.min_replicas, grown.replicas, grown.max_replicas) == (6, 6, 6)


def test_max_decode_zero_is_refused_by_its_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--max-decode", "0"])
    assert "--max-decode: must be >= 1, got 0" in capsys.readouterr().err


def test_an_empty_served_model_name_is_refused_by_every_command(tmp_path):
    """--served-model-name '' (or served_model_name: '' in a config file) was taken as unset: the model was served
    under its default name. The Helm chart's schema refused it; every command now does, before it starts anything."""
    for argv in (
        ("up", "--model", "demo", "--served-model-name", ""),
        ("router", "--decode", "127.0.0.1:1", "--served-model-name", ""),
        ("worker", "decode", "--model", "demo", "--insecure", "--served-model-name", ""),
    ):
        assert_refused(cli(*argv, home=tmp_path), "served_model_name (--served-model-name) must not be empty")
    with pytest.raises(ValueError, match="served_model_name"):
        from_dict({"served_model_name": ""})


def test_ray_options_ray_would_refuse_are_refused_before_ray_starts(tmp_path):
    """A pool's resources Ray refuses at placement (CPU or GPU as a custom resource, a fraction finer than Ray's
    0.0001, an accelerator count it does not support) crashed `up` with a traceback from inside the controller; an
    empty namespace, inside ray.init. Each is now one line naming the keys, before Ray starts."""
    for pool, said in (
        ("resources: {GPU: 1}", "Use the 'num_cpus' and 'num_gpus'"),
        ("num_cpus: 0.00001", "cannot go beyond 0.0001"),
        ("resources: {TPU: 3}", "not a supported chip configuration"),
    ):
        config = tmp_path / "cluster.yaml"
        config.write_text(f"model: demo\ndecode:\n  {pool}\n")
        result = cli("up", "--config", str(config), home=tmp_path)
        assert_refused(result, "decode.num_cpus, decode.num_gpus or decode.resources", said)
        assert "Ray" not in result.stdout  # refused before Ray started
    (tmp_path / "cluster.yaml").write_text("model: demo\nnamespace: ''\n")
    assert_refused(cli("up", "--config", str(tmp_path / "cluster.yaml"), home=tmp_path), "namespace must not be empty")
