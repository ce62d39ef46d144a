"""``splitserve status | scale | drain``: talk to a running cluster through its router's admin API."""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

from cluster.cli import ROUTER_URL_ENV as URL_ENV
from cluster.cli import default_router_url
from cluster.up import token_file
from router.config import (
    ADMIN_TOKEN_ENV,
    ADMIN_TOKEN_FILE_ENV,
    admin_token_from_env,
    api_keys_from_env,
    read_api_keys,
    read_secret,
)

# How to trust the router, from the environment (the Helm chart sets it, and $SPLITSERVE_URL, in the head pod). A CA
# path is no secret, but the admin commands take it here, beside --url's fallback, not as a flag of their own.
ROUTER_CA_ENV = "SPLITSERVE_ROUTER_CA"  # PEM: the CA of the router's HTTPS certificate (not SPLITSERVE_TLS_CA's)
REQUEST_TIMEOUT_S = 30


def router_url(args) -> str:
    """--url if given (whatever its value), else $SPLITSERVE_URL, else where `up` serves by default."""
    if args.url is not None:
        return args.url
    return os.environ.get(URL_ENV) or default_router_url()


def _url_source(args) -> str:
    """Where router_url found the URL: the flag or variable an error about it names."""
    if args.url is not None:
        return "--url"
    return f"${URL_ENV}" if os.environ.get(URL_ENV) else "the default URL"


def check_url(url: str, source: str) -> None:
    """ValueError naming ``source`` unless ``url`` is http(s)://host[:port] with a port in 1-65535: anything else
    would fail later with urllib's words, or (ftp://) wait for a timeout."""
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unclosed [IPv6 address
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{source} {url!r} is not the router's http:// or https:// URL (e.g. {default_router_url()})")
    try:
        port = parsed.port
    except ValueError:
        port = 0
    if port == 0:  # urllib's None (no port: the scheme's) passes
        raise ValueError(f"{source} {url!r}: the port must be a number between 1 and 65535")


def tls_context(url: str) -> ssl.SSLContext | None:
    """For an https URL, a context verifying the router's certificate: against $SPLITSERVE_ROUTER_CA alone when
    set, else the system's CAs. The CA with an http URL is refused: it would verify nothing."""
    ca_file = os.environ.get(ROUTER_CA_ENV)
    if urllib.parse.urlparse(url).scheme != "https":
        if ca_file:
            raise SystemExit(f"splitserve: {ROUTER_CA_ENV} is set, but {url} is not https: use an https:// URL")
        return None
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(f"splitserve: {ROUTER_CA_ENV}={ca_file}: not a readable PEM CA file ({exc})") from exc


def is_this_machine(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1), localhost, or a name every address of which is one
    (the Helm chart maps the router's Service name to 127.0.0.1 in the head pod): a router there is one on this
    machine, whose admin token `up` may have written here. A name that does not resolve is not."""
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass  # a name
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def _admin_token(args, url: str) -> tuple[str | None, str]:
    """The admin token to send, and where it came from (where the CLI looked, when None): --admin-token-file, else
    $SPLITSERVE_ADMIN_TOKEN[_FILE], else, for a router on this machine only, the token file `up` wrote for its
    port. A router elsewhere never gets the local cluster's token: only a token given for it."""
    if args.admin_token_file:
        return read_secret(args.admin_token_file, "--admin-token-file"), f"--admin-token-file {args.admin_token_file}"
    if token := admin_token_from_env():
        return token, f"${ADMIN_TOKEN_ENV}[_FILE]"
    looked = f"none in --admin-token-file, ${ADMIN_TOKEN_ENV} or ${ADMIN_TOKEN_FILE_ENV}"
    parsed = urllib.parse.urlsplit(url)
    if not is_this_machine(parsed.hostname or ""):
        return None, f"{looked} (`up`'s token file is read only for a router on this machine; {url} is not one)"
    path = token_file(parsed.port or (443 if parsed.scheme == "https" else 80))
    if path.is_file():
        return read_secret(path, "`up`'s admin token file"), f"`up`'s token file {path}"
    return None, f"{looked}, and `up`'s token file {path} does not exist"


def _api_key(args) -> str | None:
    keys = read_api_keys(args.api_key_file, "--api-key-file") if args.api_key_file else api_keys_from_env()
    return keys[0] if keys else None


def _request(args, method: str, path: str, body: dict | None = None) -> dict:
    url = router_url(args)
    check_url(url, _url_source(args))
    context = tls_context(url)
    headers = {"Content-Type": "application/json"}
    if api_key := _api_key(args):
        headers["Authorization"] = f"Bearer {api_key}"
    token, token_source = _admin_token(args, url)  # status too: it shows addresses, nodes and load
    if token:
        headers["X-Admin-Token"] = token
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S, context=context) as response:
            return _json_object(response.read(), url)
    except urllib.error.HTTPError as exc:
        detail = _error_message(exc)
        if exc.code == 403:
            sent = f"the admin token sent came from {token_source}" if token else f"no admin token sent: {token_source}"
            detail += f" ({sent})"
        raise SystemExit(f"splitserve: {exc.code}: {detail}") from exc
    except urllib.error.URLError as exc:
        hint = ""
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            hint = f" (set {ROUTER_CA_ENV} to the PEM file of the CA that signed the router's certificate)"
        raise SystemExit(f"splitserve: cannot reach {url}: {exc.reason}{hint}") from exc
    except (http.client.HTTPException, ConnectionError) as exc:  # e.g. plain http to a router serving TLS
        raise SystemExit(f"splitserve: {url} answered no HTTP ({exc!r}): does the router serve https?") from exc
    except TimeoutError as exc:
        raise SystemExit(f"splitserve: {url} did not answer within {REQUEST_TIMEOUT_S} s") from exc


def _json_object(body: bytes, url: str) -> dict:
    """A router's answer: a JSON object, else SystemExit saying the URL is no splitserve router's."""
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        answer = None
    if not isinstance(answer, dict):
        raise SystemExit(f"splitserve: {url} answered, but not with a JSON object: is it a splitserve router?")
    return answer


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The message of a router's error answer ({"error": {"message": ...}}), else the HTTP reason."""
    try:
        error = json.loads(exc.read() or b"{}").get("error")
    except (ValueError, UnicodeDecodeError, AttributeError, OSError):
        error = None
    message = error.get("message") if isinstance(error, dict) else None
    if isinstance(message, str) and message:
        return message
    return f"{exc.reason} (not a splitserve router's error answer: is the URL a splitserve router?)"


def format_status(status: dict) -> str:
    cluster = status.get("cluster") or {}
    lines = []
    for role, pool in (cluster.get("pools") or {}).items():
        lines.append(f"{role:8} desired {pool['desired']} (min {pool['min']}, max {pool['max']})")
    lines.append("")
    lines.append(
        f"{'WORKER':18} {'ROLE':8} {'STATE':10} {'ADDRESS':22} {'NODE':10} {'RUN':>4} {'WAIT':>4} "
        f"{'KV USED/TOTAL':>14} {'HOLDS':>6}"  # HOLDS: the most tokens one request may hold there (context or pool)
    )
    for worker in cluster.get("workers", []):
        stats = worker.get("stats") or {}
        kv = f"{stats.get('kv_blocks_used', 0)}/{stats.get('kv_blocks_total', 0)}"
        lines.append(
            f"{worker['worker_id']:18} {worker['role']:8} {worker['state']:10} {worker['address'] or '-':22} "
            f"{worker['node_id'][:8] or '-':10} "
            f"{stats.get('running', 0):>4} {stats.get('waiting', 0):>4} {kv:>14} {stats.get('token_capacity', 0):>6}"
        )
    errors = [w for w in cluster.get("workers", []) if w.get("last_error")]
    if errors:
        lines.append("")
        lines.append("worker deaths (latest each):")
        lines += [f"  {w['worker_id']} ({w['state']}): {w['last_error']}" for w in errors]
    lines += _model_lines(status)
    decisions = (cluster.get("planner") or {}).get("decisions") or []
    if decisions:
        lines.append("")
        lines.append("planner decisions (latest last):")
        lines += [f"  {d['role']} {d['current']} -> {d['target']}: {d['reason']}" for d in decisions[-5:]]
    return "\n".join(lines)


def _model_lines(status: dict) -> list[str]:
    """The served model, and the workers not routed to because their model card disagrees or they are down."""
    model = status.get("model") or {}
    lines = [""]
    if model.get("name"):
        how = "adopted from the workers" if model.get("adopted") else "given to the router"
        lines.append(
            f"model {model['name']} ({how}; source {model.get('source')}, block size {model.get('block_size')})"
        )
    else:
        lines.append(f"model: none served yet — {model.get('refusal') or 'no worker has reported its model card'}")
    incompatible = [w for w in status.get("router_view") or [] if w.get("incompatible")]
    if incompatible:
        lines.append("incompatible workers (not routed to):")
        lines += [f"  {w['role']} {w['address']}: {w['incompatible']}" for w in incompatible]
    down = [w for w in status.get("router_view") or [] if w.get("down_reason")]
    if down:
        lines.append("workers down (taken out of routing, with why):")
        lines += [f"  {w['role']} {w['address']}: {w['down_reason']}" for w in down]
    return lines


def run_admin(args) -> int:
    try:
        text = _run(args)
    except ValueError as exc:  # a secret file or the URL, named by its flag or variable
        raise SystemExit(f"splitserve: {exc}") from None
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `splitserve status | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else Python's exit flush complains
        return 1
    return 0


def _run(args) -> str:
    if args.command == "status":
        status = _request(args, "GET", "/admin/status")
        try:
            return format_status(status)
        except (KeyError, TypeError, AttributeError) as exc:
            raise SystemExit(
                f"splitserve: {router_url(args)} answered a status this CLI cannot read ({exc!r}): "
                "is it a splitserve router of this version?"
            ) from None
    if args.command == "scale":
        return json.dumps(_request(args, "POST", "/admin/scale", {"role": args.role, "replicas": args.replicas}))
    return json.dumps(_request(args, "POST", "/admin/drain", {"worker_id": args.worker_id}))
