"""The controller: one named Ray actor holding the cluster's desired state.

It starts worker actors with the resources their pool asks for, learns their gRPC addresses as they
register, checks their health, restarts crashed ones (bounded) and replaces ones that are gone — a
worker that dies while still starting included, its reason shown in ``status`` — kills and restarts
the same way one that hangs (answers no health check for HUNG_AFTER_S, nor Ray's ping), drains workers it scales
away (killing one that hangs while draining), runs the SLO planner, and tells routers about membership
changes through ``watch`` (a long poll: it answers as soon as the membership version moves).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field

import grpc
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.config import ClusterConfig
from cluster.planner import Observation, Planner
from cluster.worker_actor import DRAIN_TIMEOUT_S, actor_class
from protos import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from protos.cluster_auth import PEER_SILENCE_S, ClusterAuth

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
UNHEALTHY_AFTER = 2
FAILED_KEPT = 10  # failed workers kept in the status, for their reasons (the latest ones)
REPLACE_BACKOFF_MAX_S = 60.0  # a pool whose workers keep failing gets a replacement at most this often
GONE = ("dead", "failed")  # dead: retired; failed: died once too often (last_error says why), replaced
# A worker that has answered no health check for this long, and its actor no Ray ping either, is hung (a stopped
# process, a wedged host): it is killed, and restarted or replaced as a dead one is. Three times the cluster's bound
# on a silent member (by then keepalive has ended the routers' calls to it and its streams have moved): a worker
# starting on a starved CPU missed its checks for 11 s, and one that answers Ray is alive, however slow.
HUNG_AFTER_S = 3 * PEER_SILENCE_S


@dataclass
class WorkerRecord:
    worker_id: str
    role: str
    state: str = "starting"  # starting | ready | unhealthy | draining | failed | dead
    address: str = ""
    node_id: str = ""
    incarnation: str = ""
    pid: int = 0
    registrations: int = 0
    restarts: int = 0
    failures: int = 0
    started_at: float = field(default_factory=time.time)
    stats: dict = field(default_factory=dict)
    last_error: str = ""  # why its last incarnation died (e.g. its constructor's exception), for `status`
    silent_since: float | None = None  # time.monotonic() of its first failed health check in a row; None: answering

    def public(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "silent_since"}


class Controller:
    """``cluster_secret``: what every worker it starts requires of callers (handed to each worker
    actor's constructor, never put on a command line); its own health checks present it too."""

    def __init__(self, config_json: str, cluster_secret: str | None = None) -> None:
        self.config = ClusterConfig.from_json(config_json)
        self._cluster_secret = cluster_secret
        self.auth = ClusterAuth.from_env(cluster_secret)
        self.desired = {role: self.config.pool(role).replicas for role in ROLES}
        self.records: dict[str, WorkerRecord] = {}
        self.actors: dict[str, object] = {}
        self.version = 0
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task] = []
        self._observation: Observation | None = None
        self.planner = Planner(
            self.config.planner,
            {r: (self.config.pool(r).min_replicas, self.config.pool(r).max_replicas) for r in ROLES},
        )
        self.decisions: deque = deque(maxlen=100)
        self._actor_class = actor_class()
        self._start_watches: dict[str, tuple[object, asyncio.Task]] = {}  # worker id -> (its actor, the watch)
        self._stopping = False
        # Per pool: workers failed since one last registered, and when the next replacement may start. A worker
        # that always fails (a bad model) is replaced 1, 2, 4 ... 60 s apart, not on every reconcile tick.
        self._failed_in_a_row = dict.fromkeys(ROLES, 0)
        self._replace_after = dict.fromkeys(ROLES, 0.0)

    async def start(self) -> None:
        self._reconcile()
        self._tasks = [
            asyncio.create_task(self._loop(self._reconcile_tick, 0.5)),
            asyncio.create_task(self._loop(self._health_tick, self.config.health_interval_s)),
        ]
        if self.config.planner.enabled:
            self._tasks.append(asyncio.create_task(self._loop(self._planner_tick, self.config.planner.interval_s)))

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once every pool has its desired ready workers; False after ``timeout_s``, or as soon as a worker
        has failed (died more often than max_restarts allows: not_ready_reason says why)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = {role: sum(1 for r in self._live(role) if r.state == "ready") for role in ROLES}
            if all(ready[role] >= self.desired[role] for role in ROLES):
                return True
            if self._failed():
                return False
            await asyncio.sleep(0.1)
        return False

    async def not_ready_reason(self) -> str:
        """Why the pools are short: each failed worker's last error, else the workers still starting."""
        failed = self._failed()
        if failed:
            return "; ".join(
                f"{r.role} worker {r.worker_id} failed ({r.restarts} restarts): {r.last_error}" for r in failed
            )
        starting = [r for r in self.records.values() if r.state == "starting"]
        why = "; ".join(f"{r.worker_id}: {r.last_error}" for r in starting if r.last_error)
        return f"{len(starting)} workers still starting" + (f" ({why})" if why else "")

    def _failed(self) -> list[WorkerRecord]:
        return [r for r in self.records.values() if r.state == "failed"]

    # -- membership -------------------------------------------------------------------------------

    async def register(self, info: dict) -> None:
        """Called by a worker actor once its gRPC server runs (again after a restart)."""
        record = self.records.get(info["worker_id"])
        if record is None or record.state in GONE or record.incarnation == info["incarnation"]:
            return
        record.address, record.node_id, record.incarnation, record.pid = (
            info["address"],
            info["node_id"],
            info["incarnation"],
            info["pid"],
        )
        record.registrations += 1
        record.failures, record.silent_since = 0, None
        self._failed_in_a_row[record.role] = 0
        if record.state != "draining":
            record.state = "ready"
        log.info(
            "worker %s (%s) registered at %s on node %s",
            record.worker_id,
            record.role,
            record.address,
            record.node_id[:8],
        )
        await self._bump()

    async def watch(self, since_version: int, timeout_s: float = 10.0) -> dict:
        """Membership once its version differs from ``since_version`` (or after timeout_s)."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.version != since_version), timeout_s)
            except TimeoutError:
                pass
        return self.membership()

    def membership(self) -> dict:
        workers = [
            {"worker_id": r.worker_id, "role": r.role, "address": r.address, "state": r.state}
            for r in self.records.values()
            if r.address and r.state in ("ready", "draining")
        ]
        return {"version": self.version, "workers": workers}

    async def _bump(self) -> None:
        async with self._changed:
            self.version += 1
            self._changed.notify_all()

    # -- status and actions -----------------------------------------------------------------------

    async def status(self) -> dict:
        pools = {
            role: {
                "desired": self.desired[role],
                "min": self.config.pool(role).min_replicas,
                "max": self.config.pool(role).max_replicas,
                "resources": self.config.pool(role).ray_resources,
            }
            for role in ROLES
        }
        return {
            "pools": pools,
            "workers": [r.public() for r in self.records.values() if r.state != "dead"],  # failed ones: why
            "planner": {
                "enabled": self.config.planner.enabled,
                "decisions": list(self.decisions),
                "ttft_target_s": self.config.planner.ttft_target_s,
                "tpot_target_s": self.config.planner.tpot_target_s,
                "observation": asdict(self._observation) if self._observation else None,
            },
            "version": self.version,
            "model": self.config.model,
            "transport": self.config.transport,
        }

    async def scale(self, role: str, replicas: int) -> dict:
        if role not in ROLES:
            raise ValueError(f"role must be prefill or decode, got {role!r}")
        pool = self.config.pool(role)
        if not pool.min_replicas <= replicas <= pool.max_replicas:
            raise ValueError(
                f"{role} replicas must be between the pool's min_replicas {pool.min_replicas} and max_replicas "
                f"{pool.max_replicas}, got {replicas}"
            )
        self._check_fits({**self.desired, role: replicas})
        self.desired[role] = replicas
        self._request_resources()
        self._reconcile()
        reply = {"role": role, "desired": replicas}
        if self.config.planner.enabled and role in self.config.planner.planned_roles:
            # Else the planner undid it at its next tick (2 s), under a success banner.
            self.planner.operator_set(role, time.time())
            spec = self.config.planner
            reply["planner"] = (
                f"the planner sizes the {role} pool to its SLO target: it leaves this size for "
                f"{spec.scale_up_cooldown_s:g} s before growing it and {spec.scale_down_cooldown_s:g} s before "
                "shrinking it"
            )
        return reply

    def _check_fits(self, desired: dict[str, int]) -> None:
        """On the embedded Ray, which no autoscaler grows, ValueError where pools of ``desired`` sizes ask for more
        than it has: the workers Ray cannot place would say "starting" for good. (A Ray joined by address may add
        nodes: what it lacks is asked for, _request_resources.)"""
        if self.config.address:
            return
        total = self._cluster_resources()
        needed: dict[str, float] = {}
        for role, count in desired.items():
            pool = self.config.pool(role)
            for name, amount in (("CPU", pool.num_cpus), ("GPU", pool.num_gpus), *pool.resources.items()):
                needed[name] = needed.get(name, 0.0) + amount * count
        short = {name: amount for name, amount in needed.items() if amount > total.get(name, 0.0) + 1e-9}
        if short:
            asked = ", ".join(f"{name} {amount:g} (it has {total.get(name, 0.0):g})" for name, amount in short.items())
            sizes = ", ".join(f"{role} {count}" for role, count in desired.items())
            hint = "; ray_num_cpus sets its CPUs" if "CPU" in short else ""
            raise ValueError(f"pools of {sizes} need more than this cluster's Ray has: {asked}{hint}")

    @staticmethod
    def _cluster_resources() -> dict[str, float]:
        return ray.cluster_resources()

    async def drain(self, worker_id: str) -> dict:
        record = self.records.get(worker_id)
        if record is None or record.state in (*GONE, "draining"):
            raise ValueError(f"no running worker {worker_id!r}")
        # At the pool's min_replicas the pool keeps its size: the drained worker is replaced, never left out.
        floor = self.config.pool(record.role).min_replicas
        replaced = self.desired[record.role] <= floor
        self.desired[record.role] = max(self.desired[record.role] - 1, floor)
        record.state = "draining"  # at once, so reconciliation does not pick another victim meanwhile
        await self._bump()
        asyncio.ensure_future(self._finish_drain(record))
        reply = {"worker_id": worker_id, "state": "draining"}
        if replaced:
            reply["replaced"] = f"the {record.role} pool is at its min_replicas {floor}: a new worker takes its place"
        return reply

    async def report(self, observation: dict) -> None:
        """The router's latest latency window, for the planner."""
        self._observation = Observation(**observation)

    async def shutdown(self) -> None:
        self._stopping = True  # the actors stopped below are not deaths to restart
        for task in [*self._tasks, *(watch for _, watch in self._start_watches.values())]:
            task.cancel()
        # All at once: a worker still starting (or never placed) answers no stop, and each waits out its timeout.
        await asyncio.gather(*(self._stop_actor(actor) for actor in self.actors.values()))

    # -- reconciliation ---------------------------------------------------------------------------

    def _live(self, role: str) -> list[WorkerRecord]:
        return [r for r in self.records.values() if r.role == role and r.state in ("starting", "ready", "unhealthy")]

    def _reconcile(self) -> None:
        for role in ROLES:
            live = self._live(role)
            backing_off = time.monotonic() < self._replace_after[role]  # after failures: a later tick replaces them
            for _ in range(0 if backing_off else self.desired[role] - len(live)):
                self._spawn(role)
            surplus = len(live) - self.desired[role]
            if surplus > 0:
                victims = sorted(live, key=lambda r: (r.state == "ready", _load(r), -r.started_at))[:surplus]
                for record in victims:
                    asyncio.ensure_future(self._start_drain(record))

    async def _reconcile_tick(self) -> None:
        self._reconcile()
        self._watch_starting()

    def _watch_starting(self) -> None:
        """A watch (_watch_start) on each actor still starting, one per incarnation."""
        for record in self.records.values():
            actor = self.actors.get(record.worker_id)
            watched = self._start_watches.get(record.worker_id)
            if record.state == "starting" and actor is not None and (watched is None or watched[0] is not actor):
                self._start_watches[record.worker_id] = (actor, asyncio.ensure_future(self._watch_start(record, actor)))

    def _spawn(self, role: str, record: WorkerRecord | None = None) -> None:
        """Starts a worker actor: a new worker, or a new incarnation of ``record`` (a restart)."""
        pool = self.config.pool(role)
        worker_id = record.worker_id if record else f"{role}-{uuid.uuid4().hex[:8]}"
        # Restarts are the controller's, not Ray's: it knows when a worker is gone and counts them.
        options = dict(
            name=f"splitserve-{worker_id}-{(record.restarts if record else 0)}",
            namespace=self.config.namespace,
            num_cpus=pool.num_cpus,
            resources=dict(pool.resources) or None,
            max_restarts=0,
            max_concurrency=4,
            num_gpus=pool.num_gpus,  # at most 1 (PoolSpec): a worker runs on one device
        )
        self.records.setdefault(worker_id, record or WorkerRecord(worker_id, role))
        self.actors[worker_id] = self._actor_class.options(**options).remote(
            worker_id, role, self.config.to_json(), self._cluster_secret
        )
        log.info("starting %s worker %s with %s", role, worker_id, pool.ray_resources)

    async def _watch_start(self, record: WorkerRecord, actor) -> None:
        """Until a starting actor's constructor returns, no health check sees it (it has no address yet): an actor
        that dies meanwhile — its constructor raised, its process was killed, its node lost — would stay
        "starting" for ever. Ray answers an actor's first call once its constructor is done, or fails the call
        when the actor died: awaiting one tells which. (An actor Ray cannot place yet keeps waiting: not a death.)
        Watches start from the reconcile loop, within half a second of the spawn."""
        try:
            await actor.ping.remote()
            return
        except ray.exceptions.RayError as exc:
            reason = _death_reason(exc)
        finally:
            if self._start_watches.get(record.worker_id, (None,))[0] is actor:
                del self._start_watches[record.worker_id]
        if self._stopping or self.actors.get(record.worker_id) is not actor:
            return  # stopped by us (retired, drained, shut down), or a later incarnation runs
        await self._actor_died(record, f"died while starting: {reason}")

    async def _start_drain(self, record: WorkerRecord) -> None:
        if record.state in ("draining", *GONE):
            return
        record.state = "draining"
        await self._bump()
        await self._finish_drain(record)

    async def _finish_drain(self, record: WorkerRecord) -> None:
        """Waits until the worker's in-flight work is done, at most DRAIN_TIMEOUT_S, then retires it. A worker that
        hangs meanwhile is killed by the health checks (_check_actor), which ends the wait; the bound here is for
        one that answers its health checks but not the drain."""
        actor = self.actors.get(record.worker_id)
        try:
            if actor is not None and record.address:
                idle = await asyncio.wait_for(actor.drain.remote(DRAIN_TIMEOUT_S), DRAIN_TIMEOUT_S + HUNG_AFTER_S)
                if not idle:
                    log.warning(
                        "worker %s still had work after draining %g s; stopping it", record.worker_id, DRAIN_TIMEOUT_S
                    )
        except TimeoutError:
            log.warning(
                "worker %s did not answer its drain within %g s; killing it",
                record.worker_id,
                DRAIN_TIMEOUT_S + HUNG_AFTER_S,
            )
        except Exception as exc:  # noqa: BLE001 - the worker died (or was killed) while draining: nothing to wait for
            log.warning("drain of %s ended early: %s", record.worker_id, exc)
        await self._retire(record)

    async def _retire(self, record: WorkerRecord) -> None:
        """Out of the membership first, then stopped: routers let a retired worker go before its server closes,
        rather than see it refuse their health checks as a failed one would."""
        actor = self.actors.pop(record.worker_id, None)
        record.state = "dead"
        await self._bump()
        if actor is not None:
            await self._stop_actor(actor)
        log.info("worker %s retired", record.worker_id)

    @staticmethod
    async def _stop_actor(actor) -> None:
        try:
            await asyncio.wait_for(actor.stop.remote(), 3.0)
        except Exception:  # noqa: BLE001 - it may be gone already, or not started
            pass
        ray.kill(actor, no_restart=True)

    def _request_resources(self) -> None:
        """On an autoscaling cluster, ask for the nodes the desired pools need (KubeRay adds them)."""
        if not self.config.address:
            return
        from ray.autoscaler.sdk import request_resources

        bundles = []
        for role in ROLES:
            pool = self.config.pool(role)
            bundle = {"CPU": pool.num_cpus, **({"GPU": pool.num_gpus} if pool.num_gpus else {}), **pool.resources}
            bundles += [bundle] * self.desired[role]
        try:
            request_resources(bundles=bundles)
        except Exception as exc:  # noqa: BLE001 - no autoscaler on this cluster
            log.debug("request_resources: %s", exc)

    # -- health -----------------------------------------------------------------------------------

    async def _health_tick(self) -> None:
        records = [r for r in self.records.values() if r.address and r.state in ("ready", "unhealthy", "draining")]
        await asyncio.gather(*(self._check(r) for r in records))

    async def _check(self, record: WorkerRecord) -> None:
        address = record.address
        try:
            async with self.auth.aio_channel(address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                stub = (
                    prefill_pb2_grpc.PrefillWorkerStub(channel)
                    if record.role == "prefill"
                    else decode_pb2_grpc.DecodeWorkerStub(channel)
                )
                stats = await stub.Stats(common_pb2.StatsRequest(), timeout=1.0)
            healthy = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            healthy, stats = False, None
        if record.address != address:
            return  # re-registered meanwhile
        if healthy:
            record.failures, record.silent_since = 0, None
            # Scalars only: the status goes out as JSON (the model card is the routers' to judge).
            record.stats = {f.name: v for f, v in stats.ListFields() if f.message_type is None} if stats else {}
            if record.state == "unhealthy":
                record.state = "ready"
                await self._bump()
            return
        if record.failures == 0:
            record.silent_since = time.monotonic()
        record.failures += 1
        if record.failures >= UNHEALTHY_AFTER and record.state == "ready":
            record.state = "unhealthy"
            log.warning("worker %s at %s is unhealthy", record.worker_id, address)
            await self._bump()
        if record.failures >= UNHEALTHY_AFTER:
            await self._check_actor(record)

    async def _check_actor(self, record: WorkerRecord) -> None:
        """An unreachable worker whose actor died is restarted (up to max_restarts), then replaced; one that has
        answered no health check for HUNG_AFTER_S and whose actor answers no Ray ping is hung: killed, then the
        same. A draining worker is retired instead, by its drain's end (_finish_drain): a dead one's drain call
        fails, a hung one's fails once it is killed here."""
        actor = self.actors.get(record.worker_id)
        if actor is None:
            return  # retired meanwhile
        try:
            await asyncio.wait_for(actor.ping.remote(), 2.0)
            return  # alive, not answering gRPC for now (a stalled machine): unhealthy, out of routing, until it does
        except TimeoutError:
            pass
        except ray.exceptions.RayError as exc:
            if self.actors.get(record.worker_id) is actor and record.state != "draining":
                await self._actor_died(record, f"died: {_death_reason(exc)}")
            return
        silent_s = time.monotonic() - (record.silent_since or time.monotonic())
        if silent_s < HUNG_AFTER_S or self.actors.get(record.worker_id) is not actor:
            return
        reason = f"hung: answered no health check for {silent_s:.0f} s, nor Ray's ping; killed"
        if record.state == "draining":
            log.warning("draining worker %s %s", record.worker_id, reason)
            ray.kill(actor, no_restart=True)
            return
        await self._actor_died(record, reason)

    async def _actor_died(self, record: WorkerRecord, reason: str) -> None:
        """Restarts the worker of a dead (or hung, killed here) actor (up to max_restarts), then marks it failed and
        replaces it."""
        actor = self.actors.pop(record.worker_id, None)
        if actor is not None:
            ray.kill(actor, no_restart=True)
        record.address, record.state, record.last_error = "", "starting", reason
        await self._bump()
        if record.restarts < self.config.max_restarts:
            record.restarts += 1
            log.warning(
                "worker %s %s; restart %d of %d", record.worker_id, reason, record.restarts, self.config.max_restarts
            )
            self._spawn(record.role, record)
            return
        log.warning("worker %s %s, and used up its restarts; replacing it", record.worker_id, reason)
        record.state = "failed"
        for old in self._failed()[:-FAILED_KEPT]:
            old.state = "dead"
        self._failed_in_a_row[record.role] += 1
        backoff = min(REPLACE_BACKOFF_MAX_S, 2.0 ** (self._failed_in_a_row[record.role] - 1))
        self._replace_after[record.role] = time.monotonic() + backoff
        self._reconcile()

    # -- planner ----------------------------------------------------------------------------------

    async def _planner_tick(self) -> None:
        if self._observation is None:
            return
        for decision in self.planner.decide(time.time(), self._observation, dict(self.desired)):
            self.decisions.append(decision.to_dict())
            await self.scale(decision.role, decision.target)

    async def _loop(self, tick, interval: float) -> None:
        while True:
            try:
                await tick()
            except Exception:  # noqa: BLE001 - one bad tick must not stop the control loop
                log.exception("controller %s failed", tick.__name__)
            await asyncio.sleep(interval)


def _death_reason(exc: Exception) -> str:
    """The line of a Ray actor error that says why: the constructor's exception, else Ray's account of the death."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    raised = [line for line in lines if _names_an_exception(line)]
    return (raised[-1] if raised else lines[0] if lines else type(exc).__name__)[:500]


def _names_an_exception(line: str) -> bool:
    name = line.split(":", 1)[0].rsplit(".", 1)[-1]  # engine.errors.ModelLoadError: ...
    return ":" in line and name.isidentifier() and name.endswith(("Error", "Exception"))


def _load(record: WorkerRecord) -> int:
    stats = record.stats
    return stats.get("running", 0) + stats.get("waiting", 0) + stats.get("waiting_for_kv", 0)


def controller_class():
    return ray.remote(Controller)
