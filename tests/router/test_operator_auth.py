"""Who may read what on the public edge: with API keys set, /metrics and the API docs want a key unless opened,
/admin and the dashboard's data want the admin token, gRPC reflection wants a key; and the keys and the token come
from files or the environment, never a command line (where ``ps`` shows them).

Real routers (uvicorn and gRPC servers; no workers needed) and, for the command line, a real `splitserve router`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from router.config import RouterConfig
from tests.procfs import cmdlines
from tests.router.conftest import RouterThread, free_port

API_KEY = "sk-edge-key-7d1f"
ADMIN_TOKEN = "admin-edge-token-93ac"
DATA_PATHS = ("/admin/status", "/dashboard/api/snapshot", "/dashboard/api/history", "/dashboard/events")
REPO = Path(__file__).resolve().parents[2]


def start(**changes) -> RouterThread:
    config = RouterConfig(decode_addresses=("127.0.0.1:9",), port=0, grpc_port=0, **changes)
    return RouterThread(config, ready=False)


@pytest.fixture(scope="module")
def closed():
    router = start(api_keys=(API_KEY,), admin_token=ADMIN_TOKEN)
    yield router
    router.stop()


def get(router, path: str, **headers) -> httpx.Response:
    with httpx.stream("GET", f"{router.http}{path}", headers=headers, timeout=10) as response:
        return response  # the status and headers; an event stream is left unread


def test_metrics_and_docs_want_an_api_key_unless_opened(closed):
    for path in ("/metrics", "/docs", "/openapi.json", "/redoc"):
        assert get(closed, path).status_code == 401, path
        assert get(closed, path, Authorization=f"Bearer {API_KEY}").status_code == 200, path
    assert get(closed, "/health").status_code == 200  # probes stay open
    opened = start(api_keys=(API_KEY,), admin_token=ADMIN_TOKEN, open_metrics=True, open_docs=True)
    try:
        for path in ("/metrics", "/docs", "/openapi.json"):
            assert get(opened, path).status_code == 200, path
    finally:
        opened.stop()


def _requests_counted(router) -> dict[tuple[str, str], float]:
    text = get_text(router, "/metrics", Authorization=f"Bearer {API_KEY}")
    counted = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "splitserve_requests_total":
                counted[sample.labels["endpoint"], sample.labels["status"]] = sample.value
    return counted


def get_text(router, path: str, **headers) -> str:
    return httpx.get(f"{router.http}{path}", headers=headers, timeout=10).text


def test_requests_the_edge_refuses_are_counted_under_their_route(closed):
    """A 401 (a wrong or missing key), a 413 and a malformed X-Request-Id never reached a route: they went uncounted,
    and a credential rotation's failures were nowhere on the dashboards."""
    before = _requests_counted(closed)
    chat = f"{closed.http}/v1/chat/completions"
    with httpx.Client(timeout=10) as client:
        assert client.post(chat, json={}).status_code == 401
        assert client.post(chat, json={}, headers={"Authorization": "Bearer sk-wrong"}).status_code == 401
        url = urllib.parse.urlparse(closed.http)
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            too_large = closed.router.config.max_body_bytes + 1  # declared, and answered before any of it is read
            sock.sendall(
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                f"Content-Length: {too_large}\r\n\r\n".encode()
            )
            assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")
        assert client.post(chat, json={}, headers={"X-Request-Id": "a\tb"}).status_code == 400
        assert client.post(f"{closed.http}/no/such/path", json={}).status_code == 401
    after = _requests_counted(closed)

    def added(endpoint: str, status: str) -> float:
        return after.get((endpoint, status), 0) - before.get((endpoint, status), 0)

    assert added("/v1/chat/completions", "401") == 2
    assert added("/v1/chat/completions", "413") == 1
    assert added("/v1/chat/completions", "400") == 1
    assert added("other", "401") == 1  # no route: one bounded series


def test_operator_data_wants_the_admin_token(closed):
    for path in DATA_PATHS:
        assert get(closed, path).status_code == 403, path
        assert get(closed, path, Authorization=f"Bearer {API_KEY}").status_code == 403, path  # an API key is not it
        assert get(closed, path, **{"X-Admin-Token": "wrong"}).status_code == 403, path
        assert get(closed, path, **{"X-Admin-Token": ADMIN_TOKEN}).status_code == 200, path
    status = httpx.get(f"{closed.http}/admin/status", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert status.status_code == 200 and status.json()["router_view"][0]["address"] == "127.0.0.1:9"
    page = get(closed, "/dashboard")  # the page loads; it asks for the token before it shows anything
    assert page.status_code == 200


def test_without_an_admin_token_a_keyed_router_shows_no_operator_data():
    router = start(api_keys=(API_KEY,))
    try:
        for path in DATA_PATHS:
            reply = httpx.get(f"{router.http}{path}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
            assert reply.status_code == 403 and "no admin token is configured" in reply.json()["error"]["message"]
    finally:
        router.stop()


def _list_services(router, metadata=()) -> list[str]:
    with grpc.insecure_channel(router.grpc) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=10
        )
        return [s.name for reply in replies for s in reply.list_services_response.service]


def test_grpc_reflection_wants_an_api_key(closed):
    with pytest.raises(grpc.RpcError) as refused:
        _list_services(closed)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "splitserve.Generate" in _list_services(closed, (("authorization", f"Bearer {API_KEY}"),))
    with grpc.insecure_channel(closed.grpc) as channel:  # health stays open for probes, and says what /ready does
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        ready = httpx.get(f"{closed.http}/ready", timeout=10).status_code == 200
        serving = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        assert health.status == serving


# -- secrets from files and the environment, never argv -----------------------------------------------------------


def _cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_router_takes_its_secrets_from_files_and_no_command_line_shows_them(tmp_path):
    keys, token = tmp_path / "api-keys", tmp_path / "admin-token"
    keys.write_text(f"{API_KEY}\nsk-second-key-55e0\n")
    token.write_text(ADMIN_TOKEN + "\n")
    port = free_port()
    router = _cli(
        "router",
        *("--decode", "127.0.0.1:9", "--port", str(port), "--grpc-port", str(free_port())),
        *("--api-key-file", str(keys), "--log-level", "WARNING"),
        env={"SPLITSERVE_ADMIN_TOKEN_FILE": str(token)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert router.poll() is None, router.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the router did not start"
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        for key in (API_KEY, "sk-second-key-55e0"):
            assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code != 401
        assert httpx.get(f"{url}/admin/status", headers={"X-Admin-Token": ADMIN_TOKEN}).status_code == 200
        showing = {
            pid: line for pid, line in cmdlines().items() if API_KEY.encode() in line or ADMIN_TOKEN.encode() in line
        }
        assert showing == {}, f"secrets on a command line: {showing}"
        assert router.pid in cmdlines()  # the scan saw the router itself
    finally:
        router.terminate()
        router.wait(15)


@pytest.mark.parametrize(
    ("command", "flag", "alternative"),
    [
        (["router", "--decode", "127.0.0.1:9"], "--api-key", "--api-key-file"),
        (["router", "--decode", "127.0.0.1:9"], "--admin-token", "--admin-token-file"),
        (["up"], "--api-key", "SPLITSERVE_API_KEYS_FILE"),
        (["up"], "--admin-token", "SPLITSERVE_ADMIN_TOKEN"),
        (["status"], "--api-key", "--api-key-file"),
        (["scale", "decode", "2"], "--admin-token", "--admin-token-file"),
    ],
)
def test_a_secret_on_the_command_line_is_refused_naming_the_alternatives(command, flag, alternative):
    process = _cli(*command, flag, "a-secret-value")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert flag in output and alternative in output and "ps" in output
