"""The operator dashboard: one page at /dashboard, fed by server-sent events.

    GET  /dashboard                 the page (router/dashboard_web/)
    GET  /dashboard/lib/chart.js    the chart library, from router/dashboard_web/node_modules (npm ci)
    GET  /dashboard/events          SSE: one JSON snapshot a second (topology, series, activity)
    GET  /dashboard/api/snapshot    the same snapshot, once
    GET  /dashboard/api/history     the series of the last HISTORY_POINTS snapshots, oldest first
    actions go to the operator API: POST /admin/scale, /admin/drain (router/admin.py), admin token in X-Admin-Token

``/dashboard*`` is exempt from API keys (openai_api's guard). The page and its files load without
credentials; its data (events, snapshot, history) needs the admin token, as /admin does
(router.admin.admin_refusal), so the page asks for the token before it shows anything.

Contract: everything here runs on the router's event loop. A snapshot is taken once a second whether
or not a page watches (``start``), so a page opens on recent history; rates are differences between
consecutive snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse

from router.admin import admin_refusal
from router.control import ControlPlane
from router.frontend import Frontend
from router.openai_api import GENERATING_PATHS, error_response
from router.routing import Route
from router.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "dashboard_web"
CHART_LIBRARY = Path("node_modules/chart.js/dist/chart.umd.js")  # relative to the web dir
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
SNAPSHOT_INTERVAL_S = 1.0
LATENCY_WINDOW_S = 10.0  # quantiles and SLO attainment are over this sliding window
CONTROL_TIMEOUT_S = 2.0
ACTIVITY_SHOWN = 20
HISTORY_POINTS = 120  # two minutes of snapshots: what a page's charts hold


@dataclass(frozen=True)
class SLOTargets:
    """The latency targets set; None: that one is not (the planner then leaves its pool alone)."""

    ttft_s: float | None
    tpot_s: float | None

    def by_name(self) -> dict[str, float]:
        """The targets set, under the ``slo`` label values of ``splitserve_slo_target_seconds``."""
        return {
            name: seconds for name, seconds in (("ttft", self.ttft_s), ("tpot", self.tpot_s)) if seconds is not None
        }


# -- recent activity ----------------------------------------------------------------------------------


class ActivityLog:
    """The last routing decisions and request errors (ring buffers)."""

    def __init__(self, capacity: int = 100) -> None:
        self.routes: deque[dict] = deque(maxlen=capacity)
        self.errors: deque[dict] = deque(maxlen=capacity)

    def record_route(self, request_id: str, chosen: Route) -> None:
        """The orchestrator's ``on_route`` hook: called once per routing decision."""
        self.routes.append(
            {
                "at": time.time(),
                "request_id": request_id,
                "decision": chosen.decision.value,
                "decode": chosen.decode.address,
                "prefill": chosen.prefill.address if chosen.prefill else None,
                "uncached_tokens": chosen.uncached_tokens,
                "reason": chosen.reason,
            }
        )

    def record_error(self, path: str, status: int, message: str) -> None:
        self.errors.append({"at": time.time(), "path": path, "status": status, "message": message})

    def recent(self) -> dict:
        return {
            "routes": list(self.routes)[-ACTIVITY_SHOWN:][::-1],
            "errors": list(self.errors)[-ACTIVITY_SHOWN:][::-1],
        }


class ErrorTap:
    """ASGI middleware: records every /v1/ response with an error status, with its OpenAI error message."""

    def __init__(self, app, activity: ActivityLog) -> None:
        self.app = app
        self.activity = activity

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 0
        body = bytearray()

        async def tapped_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400:
                body.extend(message.get("body", b"")[:4096])
                if not message.get("more_body"):
                    self.activity.record_error(scope["path"], status, _error_message(bytes(body)))
            await send(message)

        await self.app(scope, receive, tapped_send)


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:300]


# -- latency series from the router's Prometheus histograms -------------------------------------------


class HistogramWindow:
    """A cumulative Prometheus histogram seen over a sliding window: the difference between its
    buckets now and ``window_s`` ago, with quantiles interpolated within a bucket (as PromQL's
    ``histogram_quantile``) and the share of observations at or under a threshold."""

    def __init__(self, histogram, window_s: float = LATENCY_WINDOW_S) -> None:
        self.histogram = histogram
        self.window_s = window_s
        self._snapshots: deque[tuple[float, list[float]]] = deque()
        self._bounds: list[float] = []
        self._counts: list[float] = []  # per-bucket (not cumulative) counts within the window

    def sample(self, now: float) -> None:
        bounds, cumulative = _buckets(self.histogram)
        if self._snapshots and self._snapshots[-1][0] < now - self.window_s:
            self._snapshots.clear()  # nobody watched for a while: start a fresh window
        self._snapshots.append((now, cumulative))
        while len(self._snapshots) > 2 and self._snapshots[1][0] <= now - self.window_s:
            self._snapshots.popleft()
        base = self._snapshots[0][1]  # the first sample: an empty window
        window = [c - b for c, b in zip(cumulative, base)]
        self._bounds = bounds
        self._counts = [window[0]] + [window[i] - window[i - 1] for i in range(1, len(window))]

    @property
    def count(self) -> float:
        return sum(self._counts)

    def quantile(self, q: float) -> float | None:
        total = self.count
        if total <= 0:
            return None
        rank, seen, lower = q * total, 0.0, 0.0
        for upper, in_bucket in zip(self._bounds, self._counts):
            if in_bucket > 0 and seen + in_bucket >= rank:
                if math.isinf(upper):
                    return lower  # beyond the last finite bound: the best we know
                return lower + (upper - lower) * (rank - seen) / in_bucket
            seen += in_bucket
            lower = upper if not math.isinf(upper) else lower
        return lower

    def share_within(self, threshold: float) -> float | None:
        """Fraction of the window's observations ≤ threshold (interpolated inside its bucket)."""
        total = self.count
        if total <= 0:
            return None
        within, lower = 0.0, 0.0
        for upper, in_bucket in zip(self._bounds, self._counts):
            if threshold >= upper:
                within += in_bucket
            else:
                if not math.isinf(upper) and upper > lower:
                    within += in_bucket * (threshold - lower) / (upper - lower)
                break
            lower = upper
        return min(1.0, within / total)


def _buckets(histogram) -> tuple[list[float], list[float]]:
    """(upper bounds, cumulative counts) of an unlabelled prometheus_client Histogram."""
    pairs = [
        (float(s.labels["le"]), s.value)
        for family in histogram.collect()
        for s in family.samples
        if s.name.endswith("_bucket")
    ]
    pairs.sort()
    return [b for b, _ in pairs], [c for _, c in pairs]


def _attainment(window: HistogramWindow, target_s: float | None) -> float | None:
    """The window's share within the target; None while that target is not set."""
    return window.share_within(target_s) if target_s is not None else None


def _counter_total(counter, where: Callable[[dict], bool] = lambda labels: True) -> float:
    """Sum of a prometheus_client Counter's samples whose labels satisfy ``where``."""
    return sum(
        s.value for family in counter.collect() for s in family.samples if s.name.endswith("_total") and where(s.labels)
    )


def _generate_request(labels: dict) -> bool:
    return labels.get("endpoint") in GENERATING_PATHS


def _failed_generate_request(labels: dict) -> bool:
    return _generate_request(labels) and labels.get("status", "").isdigit() and int(labels["status"]) >= 400


def _failed_grpc_call(labels: dict) -> bool:
    """A public gRPC call that failed (a client that left, CANCELLED, did not)."""
    return labels.get("code") not in ("OK", "CANCELLED")


class RateMeter:
    """Per-second rates of cumulative values between consecutive samples; a value that went down
    (a worker restarted and its counter with it) counts from zero."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}

    def delta(self, key: str, value: float, now: float) -> tuple[float, float]:
        """(increase, seconds) since the previous sample of ``key``; (0, 0) the first time."""
        previous = self._last.get(key)
        self._last[key] = (now, value)
        if previous is None:
            return 0.0, 0.0
        then, before = previous
        return (value - before if value >= before else value), now - then

    def rate(self, key: str, value: float, now: float) -> float:
        increase, seconds = self.delta(key, value, now)
        return increase / seconds if seconds > 0 else 0.0

    def forget_except(self, keys: set[str]) -> None:
        for key in list(self._last):
            if key not in keys:
                del self._last[key]


# -- the dashboard ------------------------------------------------------------------------------------


class Dashboard:
    """Builds the snapshots: topology from the control plane (else this router's pool), series from
    this router's metrics, and recent activity."""

    def __init__(
        self,
        frontend: Frontend,
        control: ControlPlane | None,
        slo: SLOTargets | None,
        web_dir: Path,
        admin_token: str | None = None,
    ) -> None:
        self.frontend = frontend
        self.control = control
        self.slo_override = slo
        self.slo = slo  # the SLO in force, as of the last snapshot; /metrics exports it for the alerting rules
        frontend.metrics.watch_slo(lambda: self.slo.by_name() if self.slo is not None else None)
        self.desired: dict[str, int] | None = None  # each pool's size the control plane aims at, as last learnt
        frontend.metrics.watch_desired(lambda: self.desired)
        self.web_dir = web_dir
        self.admin_token = admin_token
        self.history: deque[dict] = deque(maxlen=HISTORY_POINTS)
        self._sampler: asyncio.Task | None = None
        self.stopped = asyncio.Event()  # the router is stopping: the feeds end
        self.activity = ActivityLog()
        self.ttft = HistogramWindow(frontend.metrics.ttft)
        self.tpot = HistogramWindow(frontend.metrics.tpot)
        self.rates = RateMeter()
        self._snapshot: dict | None = None
        self._taken_at = float("-inf")
        self._lock = asyncio.Lock()

    @property
    def chart_library(self) -> Path:
        return self.web_dir / CHART_LIBRARY

    async def snapshot(self) -> dict:
        """The latest snapshot, taken anew if the last is older than ~one interval."""
        async with self._lock:
            if time.monotonic() - self._taken_at >= SNAPSHOT_INTERVAL_S * 0.8:
                self._snapshot = await self._take()
                self._taken_at = time.monotonic()
                self.history.append({key: self._snapshot[key] for key in ("at", "series", "slo")})
            return self._snapshot

    def start(self) -> None:
        """Takes a snapshot every interval from now on (on the running loop), so that history builds unwatched."""
        if self._sampler is None:
            self._sampler = asyncio.create_task(self._sample_forever())

    async def stop(self) -> None:
        """The sampler stops, and every open feed ends: a page is no request in flight, for the router to wait on."""
        self.stopped.set()
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self._sampler = None

    async def _sample_forever(self) -> None:
        while True:
            try:
                await self.snapshot()
            except Exception:  # noqa: BLE001 - a failed sample leaves a gap, not a dead sampler
                log.exception("dashboard: snapshot failed")
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)

    async def _take(self) -> dict:
        now = time.monotonic()
        cluster, control_error = await self._cluster_status()
        topology = cluster_topology(cluster, self.frontend.pool) if cluster else pool_topology(self.frontend.pool)
        if control_error is None:  # a control plane out of reach leaves the SLO as last learnt, not unset
            self.slo = self._slo(cluster)
            desired = {role: pool["desired"] for role, pool in topology["pools"].items() if pool["desired"] is not None}
            self.desired = desired or None
        slo = self.slo
        return {
            "at": time.time(),
            "model": self.frontend.model.describe()["name"],  # None until the router knows the model
            "model_refusal": self.frontend.model.refusal,
            "transport": (cluster or {}).get("transport"),
            "control": self.control is not None,
            "control_error": control_error,
            "actions_enabled": self.control is not None and bool(self.admin_token),
            "chart_library": self.chart_library.is_file(),
            "slo": asdict(slo) if slo is not None else None,  # None: no SLO set, no SLO lines or attainment
            "window_s": LATENCY_WINDOW_S,
            "router": {"running": self.frontend.admission.running, "queued": self.frontend.admission.waiting},
            **topology,
            "series": self._series(now, slo),
            "planner": _planner(cluster),
            **self.activity.recent(),
        }

    async def _cluster_status(self) -> tuple[dict | None, str | None]:
        if self.control is None:
            return None, None
        try:
            return await asyncio.wait_for(self.control.status(), CONTROL_TIMEOUT_S), None
        except Exception as exc:  # noqa: BLE001 - shown on the page; the pool view stands in
            log.warning("dashboard: control plane status failed: %s", exc)
            return None, f"control plane status failed: {exc}"

    def _slo(self, cluster: dict | None) -> SLOTargets | None:
        """The targets given to the dashboard, else the planner's while it runs (its targets are set then:
        ``up --ttft-slo/--tpot-slo``), else None: no SLO is set."""
        if self.slo_override is not None:
            return self.slo_override
        planner = (cluster or {}).get("planner") or {}
        if not planner.get("enabled"):
            return None
        return SLOTargets(ttft_s=planner.get("ttft_target_s"), tpot_s=planner.get("tpot_target_s"))

    def _series(self, now: float, slo: SLOTargets | None) -> dict:
        metrics = self.frontend.metrics
        self.ttft.sample(now)
        self.tpot.sample(now)
        return {
            "ttft_p50_s": self.ttft.quantile(0.5),
            "ttft_p99_s": self.ttft.quantile(0.99),
            "tpot_p50_s": self.tpot.quantile(0.5),
            "tpot_p99_s": self.tpot.quantile(0.99),
            "ttft_attainment": _attainment(self.ttft, slo and slo.ttft_s),
            "tpot_attainment": _attainment(self.tpot, slo and slo.tpot_s),
            "tokens_per_s": self.rates.rate("tokens", _counter_total(metrics.generation_tokens), now),
            "requests_per_s": self.rates.rate(
                "requests",
                _counter_total(metrics.requests, _generate_request) + _counter_total(metrics.grpc_requests),
                now,
            ),
            "errors_per_s": self.rates.rate(
                "errors",
                _counter_total(metrics.requests, _failed_generate_request)
                + _counter_total(metrics.grpc_requests, _failed_grpc_call),
                now,
            ),
            "kv_transfer_gbps": self._kv_transfer_gbps(now),
        }

    def _kv_transfer_gbps(self, now: float) -> float | None:
        """Bytes moved per second from the workers' cumulative ``kv_transfer_bytes``; None when no worker
        reports it (workers older than the field). Prefill workers count bytes sent, decode workers
        bytes received: the larger side counts each byte once."""
        moved = {"prefill": 0.0, "decode": 0.0}
        seconds = 0.0
        reporting = set()
        for worker in self.frontend.pool.workers.values():
            value = _kv_transfer_bytes(worker)
            if value is None:
                continue
            key = f"kv:{worker.address}"
            reporting.add(key)
            increase, elapsed = self.rates.delta(key, value, now)
            moved[worker.role] = moved.get(worker.role, 0.0) + increase
            seconds = max(seconds, elapsed)
        if not reporting:
            return None
        self.rates.forget_except(reporting | {"tokens", "requests", "errors"})
        return max(moved.values()) / seconds / 1e9 if seconds > 0 else 0.0


def _kv_transfer_bytes(worker: WorkerHandle) -> float | None:
    if "kv_transfer_bytes" not in worker.stats.DESCRIPTOR.fields_by_name or not worker.last_seen:
        return None
    return float(worker.stats.kv_transfer_bytes)


def _planner(cluster: dict | None) -> dict | None:
    planner = (cluster or {}).get("planner")
    if not planner:
        return None
    return {"enabled": planner.get("enabled", False), "decisions": list(planner.get("decisions", []))[-5:][::-1]}


# -- topology -----------------------------------------------------------------------------------------


def cluster_topology(cluster: dict, pool: WorkerPool) -> dict:
    """Pools, nodes and workers from the control plane's status; load and KV from this router's
    view of a worker when it has one (fresher), else from the controller's health check."""
    workers = []
    for record in cluster.get("workers", []):
        handle = pool.workers.get(record.get("address") or "")
        stats = _stats_of(handle) if handle is not None and handle.last_seen else dict(record.get("stats") or {})
        workers.append(
            {
                "id": record["worker_id"],
                "role": record["role"],
                "state": record["state"],
                "address": record.get("address") or "",
                "node": record.get("node_id") or "",
                "restarts": record.get("restarts", 0),
                "active": handle.active if handle is not None else 0,
                "incompatible": _incompatible(handle),
                "kv_unreachable_from": handle.kv_unreachable_from if handle is not None else [],
                # why it is out: this router's view, else the controller's (a worker that died: its last error)
                "down_reason": handle.down_reason if handle is not None else record.get("last_error") or None,
                **_load_and_kv(stats),
            }
        )
    pools = {}
    for role, spec in (cluster.get("pools") or {}).items():
        of_role = [w for w in workers if w["role"] == role]
        pools[role] = {
            "desired": spec.get("desired"),
            "min": spec.get("min"),
            "max": spec.get("max"),
            "ready": sum(1 for w in of_role if w["state"] == "ready"),
            "total": sum(1 for w in of_role if w["state"] != "failed"),  # failed ones stay listed for their reason
        }
    return {"pools": pools, "nodes": _nodes(workers), "workers": workers}


def pool_topology(pool: WorkerPool) -> dict:
    """Without a control plane: the workers this router was given, as it sees them."""
    workers = []
    for handle in pool.workers.values():
        state = "draining" if handle.draining else "ready" if handle.healthy else "unhealthy"
        workers.append(
            {
                "id": handle.label,
                "role": handle.role,
                "state": state,
                "address": handle.address,
                "node": handle.address.rsplit(":", 1)[0],
                "restarts": 0,
                "active": handle.active,
                "incompatible": _incompatible(handle),
                "kv_unreachable_from": handle.kv_unreachable_from,
                "down_reason": handle.down_reason,
                **_load_and_kv(_stats_of(handle)),
            }
        )
    pools = {
        role: {
            "desired": None,
            "min": None,
            "max": None,
            "ready": sum(1 for w in workers if w["role"] == role and w["state"] == "ready"),
            "total": sum(1 for w in workers if w["role"] == role),
        }
        for role in ("prefill", "decode")
    }
    return {"pools": pools, "nodes": _nodes(workers), "workers": workers}


def _incompatible(handle: WorkerHandle | None) -> str | None:
    """Why this router does not route to the worker although it may be healthy (its model card disagrees)."""
    return handle.incompatible.reason if handle is not None and handle.incompatible else None


def _stats_of(handle: WorkerHandle) -> dict:
    return {f.name: v for f, v in handle.stats.ListFields()}


def _load_and_kv(stats: dict) -> dict:
    # Protobuf leaves zero fields out of ListFields: absent means 0.
    get = lambda name: int(stats.get(name, 0))  # noqa: E731
    return {
        "load": {
            "running": get("running"),
            "waiting": get("waiting"),
            "waiting_for_kv": get("waiting_for_kv"),
            "transfers_in_flight": get("transfers_in_flight"),
        },
        "kv": {
            "total": get("kv_blocks_total"),
            "used": get("kv_blocks_used"),
            "free": get("kv_blocks_free"),
            "cached": get("kv_blocks_cached"),
        },
    }


def _nodes(workers: list[dict]) -> list[dict]:
    nodes: dict[str, dict] = {}
    for worker in sorted(workers, key=lambda w: (w["role"] != "prefill", w["id"])):
        node = nodes.setdefault(worker["node"], {"id": worker["node"], "hosts": set(), "workers": []})
        if worker["address"]:
            node["hosts"].add(worker["address"].rsplit(":", 1)[0])
        node["workers"].append(worker["id"])
    return [{"id": n["id"], "hosts": sorted(n["hosts"]), "workers": n["workers"]} for n in nodes.values()]


# -- HTTP ---------------------------------------------------------------------------------------------


def install_dashboard(
    app: FastAPI,
    frontend: Frontend,
    control: ControlPlane | None,
    slo: SLOTargets | None = None,
    web_dir: Path = WEB_DIR,
    *,
    admin_token: str | None = None,
    api_keys: tuple[str, ...] = (),
) -> Dashboard:
    """Adds the dashboard's routes to ``app`` and hooks its activity log into the orchestrator.

    ``slo``: the TTFT/TPOT targets drawn on the charts; default: the planner's targets while the
    planner runs, else none (no SLO lines). ``admin_token``, ``api_keys``: who may read the data
    (router.admin.admin_refusal)."""
    dashboard = Dashboard(frontend, control, slo, web_dir, admin_token)
    frontend.orchestrator.on_route = dashboard.activity.record_route
    app.add_middleware(ErrorTap, activity=dashboard.activity)
    _install_page(app, dashboard)
    _install_feed(app, dashboard, api_keys)
    return dashboard


def _install_page(app: FastAPI, dashboard: Dashboard) -> None:
    no_cache = {"Cache-Control": "no-cache"}

    @app.get("/dashboard", include_in_schema=False)
    @app.get("/dashboard/", include_in_schema=False)
    async def page():
        return FileResponse(dashboard.web_dir / "index.html", media_type="text/html", headers=no_cache)

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in PAGE_FILES:
            return error_response(f"no dashboard file {name!r}", 404, "not_found")
        return FileResponse(dashboard.web_dir / name, media_type=PAGE_FILES[name], headers=no_cache)

    @app.get("/dashboard/lib/chart.js", include_in_schema=False)
    async def chart_library():
        if not dashboard.chart_library.is_file():
            return PlainTextResponse(
                "chart library not installed: run `npm ci --prefix router/dashboard_web` (make setup)", 404
            )
        return FileResponse(
            dashboard.chart_library, media_type="text/javascript", headers={"Cache-Control": "max-age=3600"}
        )


def _install_feed(app: FastAPI, dashboard: Dashboard, api_keys: tuple[str, ...]) -> None:
    def refused(request: Request):
        return admin_refusal(request.headers, dashboard.admin_token, api_keys, action=False)

    @app.get("/dashboard/api/snapshot", include_in_schema=False)
    async def snapshot(request: Request):
        if (problem := refused(request)) is not None:
            return problem
        return await dashboard.snapshot()

    @app.get("/dashboard/api/history", include_in_schema=False)
    async def history(request: Request):
        if (problem := refused(request)) is not None:
            return problem
        return {"points": list(dashboard.history), "interval_s": SNAPSHOT_INTERVAL_S}

    @app.get("/dashboard/events", include_in_schema=False)
    async def events(request: Request):
        if (problem := refused(request)) is not None:
            return problem

        async def stream():
            while not dashboard.stopped.is_set() and not await request.is_disconnected():
                yield f"data: {json.dumps(await dashboard.snapshot())}\n\n"
                with contextlib.suppress(TimeoutError):  # the router stopping ends the feed at once
                    await asyncio.wait_for(dashboard.stopped.wait(), SNAPSHOT_INTERVAL_S)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
