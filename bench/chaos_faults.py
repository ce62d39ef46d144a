"""The faults of ``splitserve bench chaos`` and what it watches of the cluster: its workers (``/admin/status``),
its routing counters (``/metrics``), each fault's recovery, and the KV blocks left in use once it is quiet.

A fault reaches a worker by signal (the PID ``/admin/status`` reports, when that process is on this host) or
through an operator's hook: a shell command template, e.g. ``kubectl delete pod {worker_id}``, with the
placeholders {worker_id} {role} {address} {host} {port} {pid} {seconds}. The router and the controller are
never touched.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shlex
import signal
import time
from dataclasses import dataclass, field

import httpx

FAULT_KINDS = ("kill-prefill", "kill-decode", "kill-both", "stall", "lease")
HOOK_TIMEOUT_S = 60.0
_WORKER_GAUGE = re.compile(r"^splitserve_worker_(kv_blocks|sequences)\{([^}]*)\} ([0-9.eE+-]+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')
_COUNTER = re.compile(r"^(splitserve_\w+?)_total(?:\{([^}]*)\})? ([0-9.eE+-]+)$")


# -- the cluster as the router shows it ---------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    worker_id: str
    role: str
    address: str
    pid: int  # 0: unknown (a router without a control plane)
    state: str
    stats: dict

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> str:
        return self.address.rsplit(":", 1)[-1]


class ClusterView:
    """Reads the router's ``/admin/status`` (with the admin token: it shows PIDs and addresses) and ``/metrics``."""

    def __init__(self, client: httpx.AsyncClient, base_url: str, admin_token: str | None) -> None:
        self.client = client
        self.base_url = base_url
        self.headers = {"X-Admin-Token": admin_token} if admin_token else {}

    async def status(self) -> dict:
        response = await self.client.get(self.base_url + "/admin/status", headers=self.headers, timeout=10.0)
        response.raise_for_status()
        return response.json()

    async def workers(self) -> list[Worker]:
        """Every worker: the controller's records when there is a control plane, else the router's own view."""
        status = await self.status()
        cluster = status.get("cluster")
        if cluster:
            return [
                Worker(
                    w["worker_id"], w["role"], w.get("address") or "", int(w.get("pid") or 0), w["state"], w["stats"]
                )
                for w in cluster.get("workers", [])
            ]
        # No control plane: the router's view, and each worker's last Stats as the router's /metrics shows them
        # (labelled by worker id, which the router's view does not give: stats are matched by role only).
        return [
            Worker(v["address"], v["role"], v["address"], 0, "ready" if v["healthy"] else "unhealthy", {})
            for v in status.get("router_view", [])
        ] + await self._metric_workers()

    async def _metric_workers(self) -> list[Worker]:
        response = await self.client.get(self.base_url + "/metrics", timeout=10.0)
        response.raise_for_status()
        stats: dict[tuple[str, str], dict] = {}
        for line in response.text.splitlines():
            if match := _WORKER_GAUGE.match(line):
                family, labels, value = match.groups()
                label = dict(_LABEL.findall(labels))
                key = f"kv_blocks_{label['state']}" if family == "kv_blocks" else label["state"]
                stats.setdefault((label["worker"], label["role"]), {})[key] = int(float(value))
        return [Worker(worker, role, "", 0, "stats", s) for (worker, role), s in stats.items()]

    async def serving(self) -> dict[str, int]:
        """Workers per role that are ready and that the router sees healthy (routes to)."""
        status = await self.status()
        healthy = {v["address"] for v in status.get("router_view", []) if v["healthy"] and not v["incompatible"]}
        cluster = status.get("cluster")
        counts = {"prefill": 0, "decode": 0}
        if cluster:
            for w in cluster.get("workers", []):
                counts[w["role"]] += w["state"] == "ready" and w.get("address") in healthy
        else:
            for v in status.get("router_view", []):
                counts[v["role"]] += v["address"] in healthy
        return counts

    async def counters(self) -> dict[str, float]:
        """The router's counters, as ``name{labels}`` -> value (``_total`` dropped)."""
        response = await self.client.get(self.base_url + "/metrics", timeout=10.0)
        response.raise_for_status()
        found = {}
        for line in response.text.splitlines():
            if match := _COUNTER.match(line):
                name, labels, value = match.groups()
                found[f"{name}{{{labels}}}" if labels else name] = float(value)
        return found


def routing_share(before: dict[str, float], after: dict[str, float]) -> dict:
    """Routing decisions between two counter snapshots, and the share that went prefill → decode."""
    decisions = {}
    for key, value in after.items():
        if key.startswith("splitserve_routing_decisions{"):
            decision = key.split('decision="', 1)[1].split('"', 1)[0]
            decisions[decision] = value - before.get(key, 0.0)
    total = sum(decisions.values())
    return {"decisions": decisions, "p_to_d_share": decisions.get("remote_prefill", 0.0) / total if total else None}


def counter_deltas(before: dict[str, float], after: dict[str, float], names: tuple[str, ...]) -> dict[str, float]:
    return {name: after.get(f"splitserve_{name}", 0.0) - before.get(f"splitserve_{name}", 0.0) for name in names}


# -- faults ------------------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    at_s: float  # since the fault phase began
    victims: list[dict] = field(default_factory=list)  # worker_id, role, address, pid
    how: str = ""  # "signal" | "hook" | "skipped: why"
    recovery_s: list[float | None] = field(default_factory=list)  # per victim; None: not back in time
    error: str = ""


@dataclass(frozen=True)
class Hooks:
    kill: str | None = None
    restart: str | None = None
    stall: str | None = None


class Injector:
    """Kills and stalls workers by signal or hook. Contract: every process it stops it also continues, by
    ``release_all`` at the latest (the command calls it in a ``finally``)."""

    def __init__(self, hooks: Hooks, signals_allowed: bool, rng: random.Random) -> None:
        self.hooks = hooks
        self.signals_allowed = signals_allowed
        self.rng = rng
        self.stopped: set[int] = set()

    def can_signal(self, worker: Worker) -> bool:
        return self.signals_allowed and worker.pid > 0 and os.path.exists(f"/proc/{worker.pid}")

    async def kill(self, worker: Worker) -> str:
        if self.hooks.kill:
            await run_hook(self.hooks.kill, worker, 0.0)
            how = "hook"
        elif self.can_signal(worker):
            os.kill(worker.pid, signal.SIGKILL)
            how = "signal"
        else:
            raise FaultUnavailable(f"cannot kill {worker.worker_id}: no --kill-hook and no local PID")
        if self.hooks.restart:
            await run_hook(self.hooks.restart, worker, 0.0)
        return how

    async def stall(self, worker: Worker, seconds: float) -> str:
        """Freezes the worker for ``seconds`` (a network stall's local stand-in) and resumes it."""
        if self.hooks.stall:
            await run_hook(self.hooks.stall, worker, seconds)
            return "hook"
        if not self.can_signal(worker):
            raise FaultUnavailable(f"cannot stall {worker.worker_id}: no --stall-hook and no local PID")
        os.kill(worker.pid, signal.SIGSTOP)
        self.stopped.add(worker.pid)
        try:
            await asyncio.sleep(seconds)
        finally:
            self._resume(worker.pid)
        return "signal"

    def _resume(self, pid: int) -> None:
        self.stopped.discard(pid)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def release_all(self) -> None:
        for pid in list(self.stopped):
            self._resume(pid)


class FaultUnavailable(Exception):
    """This deployment offers no way to inject the fault (no hook, no local PID)."""


async def run_hook(template: str, worker: Worker, seconds: float) -> None:
    values = {
        "worker_id": worker.worker_id,
        "role": worker.role,
        "address": worker.address,
        "host": worker.host,
        "port": worker.port,
        "pid": str(worker.pid),
        "seconds": f"{seconds:g}",
    }
    command = template.format(**{k: shlex.quote(v) for k, v in values.items()})
    process = await asyncio.create_subprocess_shell(
        command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), HOOK_TIMEOUT_S + seconds)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise FaultUnavailable(f"hook timed out after {HOOK_TIMEOUT_S + seconds:g}s: {command}") from None
    if process.returncode != 0:
        raise FaultUnavailable(f"hook exited {process.returncode}: {command}: {output.decode(errors='replace')[-300:]}")


def pick_victims(kind: str, workers: list[Worker], rng: random.Random) -> list[Worker]:
    """The workers a fault hits: ready ones only, one per role named (``stall`` and ``lease``: see ``inject``)."""
    ready = {role: [w for w in workers if w.role == role and w.state == "ready"] for role in ("prefill", "decode")}
    roles = {
        "kill-prefill": ["prefill"],
        "kill-decode": ["decode"],
        "kill-both": ["prefill", "decode"],
        "stall": [rng.choice(["prefill", "decode"])],
        "lease": ["prefill"],  # a frozen prefill worker leaves its reservations on D to expire
    }[kind]
    return [rng.choice(ready[role]) for role in roles if ready[role]]


async def inject(fault: Fault, victims: list[Worker], injector: Injector, stall_s: float, lease_s: float) -> None:
    """Applies ``fault`` to ``victims``; returns once the kills are sent or the stall is over."""
    fault.victims = [{"worker_id": w.worker_id, "role": w.role, "address": w.address, "pid": w.pid} for w in victims]
    try:
        if fault.kind.startswith("kill-"):
            hows = await asyncio.gather(*(injector.kill(w) for w in victims))
            fault.how = ",".join(sorted(set(hows)))
        else:
            seconds = stall_s if fault.kind == "stall" else lease_s + 2.0
            fault.how = await injector.stall(victims[0], seconds)
    except (FaultUnavailable, OSError) as exc:
        fault.how, fault.error = "failed", str(exc)


async def wait_recovered(view: ClusterView, victim: dict, wanted: dict[str, int], since: float, timeout_s: float):
    """Seconds from ``since`` until the victim's pool serves again at its size before the fault (the killed
    process gone, the router routing to every ready worker), or None after ``timeout_s``."""
    deadline = since + timeout_s
    while time.monotonic() < deadline:
        try:
            workers = await view.workers()
            serving = await view.serving()
        except httpx.HTTPError:
            workers, serving = [], {}
        pid_gone = not victim["pid"] or all(w.pid != victim["pid"] or w.state != "ready" for w in workers)
        if pid_gone and serving.get(victim["role"], 0) >= wanted[victim["role"]]:
            return time.monotonic() - since
        await asyncio.sleep(0.25)
    return None


# -- leaks ---------------------------------------------------------------------------------------------


_BUSY = ("kv_blocks_used", "running", "waiting", "waiting_for_kv", "transfers_in_flight")


async def settle(view: ClusterView, timeout_s: float) -> dict:
    """Waits until the cluster is quiet: every ready worker holds no KV block and no sequence, and the router
    has no request in flight. What is still held after ``timeout_s`` is a leak."""
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    held: dict = {}
    while True:
        try:
            status = await view.status()
            workers = await view.workers()
            held = _held(status, workers)
        except httpx.HTTPError as exc:
            held = {"error": str(exc)}
        if not held or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.5)
    leaked_blocks = sum(w.get("kv_blocks_used", 0) for w in held.get("workers", {}).values())
    return {
        "quiet_after_s": time.monotonic() - started if not held else None,
        "leaked_blocks": leaked_blocks,
        "router_in_flight": held.get("router", 0),
        "held": held,
    }


def _held(status: dict, workers: list[Worker]) -> dict:
    held: dict = {}
    busy = {
        w.worker_id: {k: w.stats.get(k, 0) for k in _BUSY if w.stats.get(k, 0)}
        for w in workers
        if w.state in ("ready", "stats") and w.stats
    }
    if busy := {k: v for k, v in busy.items() if v}:
        held["workers"] = busy
    router = status.get("router") or {}
    if in_flight := router.get("running", 0) + router.get("queued", 0):
        held["router"] = in_flight
    return held
