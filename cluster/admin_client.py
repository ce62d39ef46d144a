"""``splitserve status | scale | drain``: talk to a running cluster through its router's admin API."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

from cluster.cli import ROUTER_URL_ENV as URL_ENV
from cluster.cli import default_router_url
from cluster.up import token_file
from router.config import admin_token_from_env, api_keys_from_env, read_api_keys, read_secret

# How to trust the router, from the environment (the Helm chart sets it, and $SPLITSERVE_URL, in the head pod). A CA
# path is no secret, but the admin commands take it here, beside --url's fallback, not as a flag of their own.
ROUTER_CA_ENV = "SPLITSERVE_ROUTER_CA"  # PEM: the CA of the router's HTTPS certificate (not SPLITSERVE_TLS_CA's)


def router_url(args) -> str:
    """--url if given (whatever its value), else $SPLITSERVE_URL, else where `up` serves by default."""
    if args.url is not None:
        return args.url
    return os.environ.get(URL_ENV) or default_router_url()


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


def _admin_token(args, url: str) -> str | None:
    """--admin-token-file, else $SPLITSERVE_ADMIN_TOKEN[_FILE], else the token file `up` wrote for this port."""
    if args.admin_token_file:
        return read_secret(args.admin_token_file, "admin token")
    if token := admin_token_from_env():
        return token
    parsed = urllib.parse.urlparse(url)
    path = token_file(parsed.port or (443 if parsed.scheme == "https" else 80))
    return path.read_text().strip() if path.is_file() else None


def _api_key(args) -> str | None:
    keys = read_api_keys(args.api_key_file) if args.api_key_file else api_keys_from_env()
    return keys[0] if keys else None


def _request(args, method: str, path: str, body: dict | None = None) -> dict:
    url = router_url(args)
    context = tls_context(url)
    headers = {"Content-Type": "application/json"}
    if api_key := _api_key(args):
        headers["Authorization"] = f"Bearer {api_key}"
    token = _admin_token(args, url)  # status too: it shows addresses, nodes and load
    if token:
        headers["X-Admin-Token"] = token
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}").get("error", {}).get("message", exc.reason)
        raise SystemExit(f"splitserve: {exc.code}: {detail}") from exc
    except urllib.error.URLError as exc:
        hint = ""
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            hint = f" (set {ROUTER_CA_ENV} to the PEM file of the CA that signed the router's certificate)"
        raise SystemExit(f"splitserve: cannot reach {url}: {exc.reason}{hint}") from exc
    except (http.client.HTTPException, ConnectionError) as exc:  # e.g. plain http to a router serving TLS
        raise SystemExit(f"splitserve: {url} answered no HTTP ({exc!r}): does the router serve https?") from exc


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
    if args.command == "status":
        status = _request(args, "GET", "/admin/status")
        print(format_status(status))
    elif args.command == "scale":
        print(json.dumps(_request(args, "POST", "/admin/scale", {"role": args.role, "replicas": args.replicas})))
    else:
        print(json.dumps(_request(args, "POST", "/admin/drain", {"worker_id": args.worker_id})))
    sys.stdout.flush()
    return 0
