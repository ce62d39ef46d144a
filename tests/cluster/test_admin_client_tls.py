"""`splitserve status | scale` against a real router serving HTTPS: the CA from $SPLITSERVE_ROUTER_CA, the URL from
--url or $SPLITSERVE_URL, and in the environment the Helm chart gives the head pod (tls.existingSecret), where the
Service's name resolves to the pod itself."""

from __future__ import annotations

import asyncio
import datetime
import socket
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cluster.admin_client import run_admin
from cluster.cli import build_parser
from router.config import RouterConfig
from router.server import Router
from tests.deploy.conftest import chart_objects, head_container, one
from tests.worker_server.certs import TestCA

ADMIN_TOKEN = "admin-token-for-tests"
SERVICE_NAME = "splitserve.default.svc"  # the chart's release splitserve in namespace default
URL_ENV, ROUTER_CA_ENV = "SPLITSERVE_URL", "SPLITSERVE_ROUTER_CA"  # the names the chart and the README give


def _issue_for(ca: TestCA, name: str, directory: Path) -> tuple[str, str]:
    """A server certificate naming only ``name`` (as one for the chart's Service would), signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path = directory / "service.crt", directory / "service.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def _start_router(cert: str, key: str):
    # No worker answers: status still reports the router's view, which is all these tests ask of it.
    config = RouterConfig(
        decode_addresses=("127.0.0.1:1",),
        port=0,
        grpc_port=0,
        host="127.0.0.1",
        admin_token=ADMIN_TOKEN,
        tls_certfile=cert,
        tls_keyfile=key,
    )
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    router = Router(config)
    asyncio.run_coroutine_threadsafe(router.start(), loop).result(30)

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(router.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)

    return router, stop


@pytest.fixture
def tls_router(tmp_path):
    ca = TestCA(tmp_path)
    issued = ca.issue("router")  # names localhost and 127.0.0.1
    router, stop = _start_router(issued.cert, issued.key)
    yield router, ca
    stop()


def _status(env: dict, *args: str) -> subprocess.CompletedProcess:
    """The real CLI, with only ``env`` (and the PATH) for its environment."""
    command = [sys.executable, "-m", "cluster.cli", "status", *args]
    base = {"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": "/nonexistent", "SPLITSERVE_ADMIN_TOKEN": ADMIN_TOKEN}
    return subprocess.run(command, env={**base, **env}, capture_output=True, text=True, timeout=120)


def test_status_verifies_the_router_with_the_ca_from_the_environment(tls_router):
    router, ca = tls_router
    url = f"https://localhost:{router.http_port}"
    trusted = _status({ROUTER_CA_ENV: ca.path}, "--url", url)
    assert trusted.returncode == 0, trusted.stderr
    assert "WORKER" in trusted.stdout
    untrusted = _status({}, "--url", url)  # the system's CAs do not know the test CA
    assert untrusted.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr and ROUTER_CA_ENV in untrusted.stderr


def test_status_takes_the_url_from_the_environment(tls_router):
    router, ca = tls_router
    from_env = _status({ROUTER_CA_ENV: ca.path, URL_ENV: f"https://127.0.0.1:{router.http_port}"})
    assert from_env.returncode == 0, from_env.stderr
    assert "WORKER" in from_env.stdout


def test_status_names_what_is_wrong_with_the_tls_settings(tls_router, tmp_path):
    router, ca = tls_router
    plain = _status({}, "--url", f"http://127.0.0.1:{router.http_port}")
    assert plain.returncode != 0 and "does the router serve https?" in plain.stderr
    ca_for_http = _status({ROUTER_CA_ENV: ca.path}, "--url", f"http://127.0.0.1:{router.http_port}")
    assert ca_for_http.returncode != 0 and f"{ROUTER_CA_ENV} is set" in ca_for_http.stderr
    missing = _status({ROUTER_CA_ENV: str(tmp_path / "absent.pem")}, "--url", f"https://127.0.0.1:{router.http_port}")
    assert missing.returncode != 0 and "not a readable PEM CA file" in missing.stderr


def test_kubectl_exec_head_splitserve_status_with_the_charts_tls(tmp_path, monkeypatch, capsys):
    """`kubectl exec $HEAD -- splitserve status` (README, Scale): the head pod's environment from the chart, its
    hostAliases as /etc/hosts, and a router whose certificate names only the Service."""
    objects = chart_objects(values={"tls": {"existingSecret": "router-tls", "caKey": "ca.crt"}})
    raycluster = one(objects, "RayCluster")
    pod_spec = raycluster["spec"]["headGroupSpec"]["template"]["spec"]
    env = {item["name"]: item["value"] for item in head_container(raycluster)["env"] if "value" in item}
    aliases = {name: alias["ip"] for alias in pod_spec["hostAliases"] for name in alias["hostnames"]}
    url = urllib.parse.urlsplit(env[URL_ENV])
    assert url.scheme == "https" and url.hostname == SERVICE_NAME and aliases == {SERVICE_NAME: "127.0.0.1"}

    ca = TestCA(tmp_path)
    router, stop = _start_router(*_issue_for(ca, SERVICE_NAME, tmp_path))
    resolve = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *rest, **kw: resolve(aliases.get(host, host), *rest, **kw))
    # The Secret's ca.crt, where the chart mounts it; the router's port, where the test's router listens.
    assert env[ROUTER_CA_ENV] == "/etc/splitserve-tls/ca.crt"
    monkeypatch.setenv(ROUTER_CA_ENV, ca.path)
    monkeypatch.setenv(URL_ENV, url._replace(netloc=f"{SERVICE_NAME}:{router.http_port}").geturl())
    monkeypatch.setenv("SPLITSERVE_ADMIN_TOKEN", ADMIN_TOKEN)
    try:
        assert run_admin(build_parser().parse_args(["status"])) == 0
    finally:
        stop()
    assert "WORKER" in capsys.readouterr().out


# -- where the admin commands find the router: --url, else $SPLITSERVE_URL, else up's default ---------------


def test_a_url_flag_wins_over_the_environment_even_when_it_names_the_default(monkeypatch):
    from cluster.admin_client import router_url
    from cluster.cli import default_router_url

    default = f"http://{RouterConfig().host}:{RouterConfig().port}"  # where `up` serves by default
    assert default_router_url() == default
    monkeypatch.setenv(URL_ENV, "https://from-the-environment:8443")
    for given in (default, "http://10.0.0.9:8000"):
        assert router_url(build_parser().parse_args(["status", "--url", given])) == given
    assert router_url(build_parser().parse_args(["status"])) == "https://from-the-environment:8443"
    monkeypatch.delenv(URL_ENV)
    assert router_url(build_parser().parse_args(["scale", "decode", "2"])) == default


def test_the_url_help_states_the_precedence(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["status", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"default: ${URL_ENV}, else http://127.0.0.1:8000 (a --url given wins over ${URL_ENV})" in text


def test_status_goes_where_the_flag_says_though_the_environment_names_another_router(tls_router):
    router, ca = tls_router
    live = f"https://127.0.0.1:{router.http_port}"
    flag_wins = _status({ROUTER_CA_ENV: ca.path, URL_ENV: "https://127.0.0.1:1"}, "--url", live)
    assert flag_wins.returncode == 0, flag_wins.stderr
    assert "WORKER" in flag_wins.stdout
