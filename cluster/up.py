"""``splitserve up``: Ray (embedded or joined), the controller, the router in this process, and the
worker pools; membership flows controller → router as it changes; Ctrl-C / SIGTERM tears it all down."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import sys
from pathlib import Path

import ray

from cluster.config import ClusterConfig
from cluster.controller import controller_class
from cluster.log_setup import ray_runtime_env
from cluster.worker_actor import CONTROLLER_NAME
from contract.heap import freeze_startup_heap
from engine.errors import ModelLoadError
from engine.presets import prepare_model, resolve_model_config
from protos.cluster_auth import ListenError, secret_from_env
from router.control import ControlPlaneUnavailable
from router.server import (
    Router,
    Stopped,
    check_ports,
    on_stop_signals,
    read_tls,
    run_event_loop,
    unless_stopped,
)

log = logging.getLogger(__name__)


class RayControlPlane:
    """The router's ControlPlane, backed by the controller actor. Its refusals (ValueError) come without Ray's
    wrapping (the actor's traceback, pid and address); a controller that cannot answer is ControlPlaneUnavailable."""

    def __init__(self, controller) -> None:
        self.controller = controller

    async def status(self) -> dict:
        return await self._call("status")

    async def scale(self, role: str, replicas: int) -> dict:
        return await self._call("scale", role, replicas)

    async def drain(self, worker_id: str) -> dict:
        return await self._call("drain", worker_id)

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.controller, method).remote(*args)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ValueError):
                raise ValueError(str(exc.cause)) from None
            raise ControlPlaneUnavailable(f"the controller's {method} failed: {exc.cause!r}") from None
        except ray.exceptions.RayError as exc:
            raise ControlPlaneUnavailable(f"the controller cannot answer: {type(exc).__name__}") from None


class ControlPlaneLost(RuntimeError):
    """The controller actor died: the workers it placed died with it (Ray ends the actors an actor owns), and
    nothing places new ones. `up` stops and says so, for its supervisor to start the cluster again."""


def token_file(port: int) -> Path:
    return Path(os.environ.get("XDG_RUNTIME_DIR", "/tmp")) / f"splitserve-{port}.admin-token"


def write_token_file(port: int, token: str) -> Path:
    """The admin token where `splitserve status` looks for it, readable by its owner only from its
    first byte (a file made by an earlier cluster is replaced, not reused with its mode)."""
    path = token_file(port)
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(token)
    return path


def check_ray_options(config: ClusterConfig) -> None:
    """Each pool's worker options as Ray reads them when the controller places a worker (CPU or GPU named as a
    custom resource, a fraction finer than 0.0001, an accelerator count it does not support): ValueError naming the
    pool's keys before Ray starts, where Ray's refusal was a traceback from inside the controller."""
    try:
        from ray._common.ray_option_utils import validate_actor_options
    except ImportError:  # Ray before 2.49
        from ray._private.ray_option_utils import validate_actor_options
    for role in ("prefill", "decode"):
        pool = config.pool(role)
        options = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "resources": dict(pool.resources) or None}
        try:
            validate_actor_options(options, in_options=True)
        except ValueError as exc:
            raise ValueError(f"{role}.num_cpus, {role}.num_gpus or {role}.resources: {exc}") from None


def start_ray(config: ClusterConfig) -> None:
    if config.address:
        ray.init(address=config.address, namespace=config.namespace, log_to_driver=True, runtime_env=ray_runtime_env())
        return
    # Token auth for this embedded cluster is chosen in cluster.cli, before `import ray` reads RAY_AUTH_MODE.
    pools = (config.prefill, config.decode)
    needed = sum(p.num_cpus * p.max_replicas for p in pools)
    # Logical CPUs: enough to place every pool at its maximum; the OS shares the real cores.
    num_cpus = config.ray_num_cpus or max(os.cpu_count() or 1, math.ceil(needed))
    ray.init(
        address="local",  # embedded: a Ray of its own, never one found on the machine (ray_current_cluster)
        num_cpus=num_cpus,
        namespace=config.namespace,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
        runtime_env=ray_runtime_env(),
    )


async def follow_membership(controller, router: Router) -> None:
    """Applies the controller's membership to the router's pool as it changes."""
    version = -1
    while True:
        try:
            membership = await controller.watch.remote(version)
        except ray.exceptions.ActorDiedError as exc:
            raise ControlPlaneLost(f"the controller died ({str(exc).splitlines()[0]})") from None
        except ray.exceptions.RayError as exc:
            log.warning("membership watch failed: %s", exc)
            await asyncio.sleep(1.0)
            continue
        version = membership["version"]
        current = {w["address"]: w for w in membership["workers"]}
        for address in list(router.pool.workers):
            if address not in current:
                await router.pool.remove(address)
        for address, worker in current.items():
            router.pool.add(address, worker["role"])
            router.pool.draining(address, worker["state"] == "draining")


async def exchange_with_planner(controller, router: Router, config: ClusterConfig) -> None:
    """Sends the router's latency window to the planner; counts the planner's decisions in /metrics."""
    metrics = router.frontend.metrics
    seen = 0.0
    while True:
        await asyncio.sleep(config.planner.interval_s / 2)
        summary = metrics.window.summary(config.planner.window_s, router.frontend.admission.waiting)
        try:
            await controller.report.remote(summary)
            decisions = (await controller.status.remote())["planner"]["decisions"]
        except ray.exceptions.RayError as exc:
            log.warning("planner exchange failed: %s", exc)
            continue
        for decision in decisions:
            if decision["at"] > seen:
                direction = "up" if decision["target"] > decision["current"] else "down"
                metrics.planner_decisions.labels(decision["role"], direction).inc()
                seen = decision["at"]


class NotReady(RuntimeError):
    """The workers did not start: `up` tears the cluster down and says why."""


class AlreadyRunning(RuntimeError):
    """The Ray cluster joined already runs a splitserve cluster in this namespace: `up` starts nothing."""


async def run_cluster(
    config: ClusterConfig, stop: asyncio.Event, on_ready=None, cut: asyncio.Event | None = None
) -> None:
    # Workers accept calls from cluster members only: the secret is $SPLITSERVE_CLUSTER_SECRET[_FILE]
    # or one made here, handed to the controller and through it to each worker actor's constructor
    # (never a command line), and to the router in this process.
    cluster_secret = secret_from_env() or secrets.token_urlsafe(32)
    # On the head node: the autoscaler may remove an idle worker node, never the head.
    try:
        controller = (
            controller_class()
            .options(
                name=CONTROLLER_NAME,
                namespace=config.namespace,
                num_cpus=0,
                max_concurrency=1000,
                resources={"node:__internal_head__": 0.001},
            )
            .remote(config.without_secrets().to_json(), cluster_secret)
        )
    except ray.exceptions.ActorAlreadyExistsError:
        raise AlreadyRunning(
            f"this Ray cluster already runs a splitserve cluster in namespace {config.namespace!r}: stop it, or give "
            "this one a namespace of its own (namespace in the config file)"
        ) from None
    await controller.start.remote()
    admin_token = config.router.admin_token or secrets.token_urlsafe(24)
    router_config = config.router_config(cluster_secret=cluster_secret, admin_token=admin_token)
    router = Router(router_config, RayControlPlane(controller))
    await router.start()
    # From the moment the admin API answers: a file left by a killed earlier cluster on this port
    # would otherwise make `splitserve status` fail with 403 while the workers come up.
    path = write_token_file(router.http_port, admin_token)
    tasks = [
        asyncio.create_task(follow_membership(controller, router)),
        asyncio.create_task(exchange_with_planner(controller, router, config)),
    ]
    try:
        print(
            f"splitserve: router on {router.urls['http']}; starting {config.prefill.replicas} prefill and "
            f"{config.decode.replicas} decode workers (Ctrl-C stops)",
            flush=True,
        )
        if not await unless_stopped(controller.wait_ready.remote(config.start_timeout_s), stop):
            reason = await controller.not_ready_reason.remote()
            raise NotReady(
                f"the workers did not become ready (waited at most {config.start_timeout_s:g} s, start_timeout_s / "
                f"--start-timeout-s): {reason}"
            )
        urls = router.urls
        where = f"OpenAI API {urls['http']}/v1 | gRPC {urls['grpc']} | dashboard {urls['dashboard']}"
        if await unless_stopped(router.wait_ready(), stop):
            print(f"splitserve is up: {where}", flush=True)
        else:  # as `splitserve router` does: say why, and serve (/ready says no) for the operator to look
            print(f"splitserve: not ready — {router.not_ready_reason()}", file=sys.stderr, flush=True)
            print(f"splitserve serving, not ready: {where}", flush=True)
        print(f"admin token in {path}", flush=True)
        if on_ready is not None:
            on_ready(router)
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopping, tasks[0]], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if tasks[0].done():
            tasks[0].result()  # ControlPlaneLost: the workers are gone and nothing starts new ones
    finally:
        for task in tasks:
            task.cancel()
        try:
            await router.stop(cut)
        finally:  # a stop forced by signals (on_stop_signals) still stops the workers, unless forced again
            path.unlink(missing_ok=True)
            try:
                await controller.shutdown.remote()
            except ray.exceptions.RayActorError:
                pass  # died already, and its workers with it


def up(config: ClusterConfig) -> int:
    if not config.address and os.environ.get("RAY_ADDRESS"):
        # Ray's own variable names a cluster to join (a Ray job sets it); embedded Ray would not use it.
        print(
            f"splitserve: RAY_ADDRESS is set ({os.environ['RAY_ADDRESS']}) but --address is not: pass --address "
            "to join that Ray cluster, or unset RAY_ADDRESS to start an embedded one",
            file=sys.stderr,
            flush=True,
        )
        return 2
    try:
        check_ports(config.router)  # in a second, not after Ray and the workers started
        read_tls(config.router)
        prepare_model(config.model)  # a GGUF preset is built once, before the router and the workers read it
        resolve_model_config(config.model)  # a model that is none (a typo) is said now, not once Ray started
        check_ray_options(config)
    except (ListenError, ModelLoadError, ValueError) as exc:
        print(f"splitserve: {exc}", file=sys.stderr, flush=True)
        return 2
    start_ray(config)

    async def main() -> None:
        stop, cut = on_stop_signals()
        await run_cluster(config, stop, on_ready=lambda router: freeze_startup_heap(), cut=cut)  # this process serves

    try:
        run_event_loop(main())
    except Stopped as exc:
        print(f"splitserve: {exc}; stopped", flush=True)
        return 0
    except NotReady as exc:
        print(f"splitserve: not ready — {exc}; stopped", file=sys.stderr, flush=True)
        return 1
    except AlreadyRunning as exc:
        print(f"splitserve: {exc}", file=sys.stderr, flush=True)
        return 2
    except ControlPlaneLost as exc:
        print(f"splitserve: {exc}; its workers died with it: stopped", file=sys.stderr, flush=True)
        return 1
    except ListenError as exc:  # taken since check_ports
        print(f"splitserve: {exc}; stopped", file=sys.stderr, flush=True)
        return 2
    except asyncio.CancelledError:  # a stop forced by signals (on_stop_signals said why); Ray still goes below
        return 1
    finally:
        ray.shutdown()
    print("splitserve stopped", flush=True)
    return 0
