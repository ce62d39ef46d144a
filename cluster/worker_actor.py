"""A Ray actor hosting one prefill or decode worker: the worker serves gRPC on its node; the actor is
only its control handle (start, register, drain, stop). Ray never restarts it (max_restarts=0): the
controller does, starting a new actor for a worker that died or hung (cluster.controller); the new
incarnation registers its new address with the controller."""

from __future__ import annotations

import logging
import os
import threading
import time

import ray

from cluster.config import MIB, ClusterConfig, PoolSpec
from contract.heap import freeze_startup_heap

log = logging.getLogger(__name__)

CONTROLLER_NAME = "splitserve-controller"
# How long a drained worker's in-flight work may take to finish; the controller stops it then, and kills it if the
# drain has not answered a while after (a hung worker).
DRAIN_TIMEOUT_S = 600.0


def engine_config_for(config: ClusterConfig, pool: PoolSpec):
    from engine.config import STEP_LIMITS, EngineConfig

    step_limits = {name: getattr(pool, name) for name in STEP_LIMITS if getattr(pool, name) is not None}
    return EngineConfig(
        model=config.model,
        served_model_name=config.served_model_name,
        dtype=config.dtype,
        device=_device(config.device),
        kv_cache_memory_bytes=pool.kv_cache_mb * MIB,
        num_threads=pool.threads,
        **step_limits,
    )


def _device(configured: str) -> str:
    """Ray sets CUDA_VISIBLE_DEVICES per actor: a GPU worker uses its first visible device."""
    if configured == "cuda" and os.environ.get("CUDA_VISIBLE_DEVICES"):
        return "cuda:0"
    return configured


class WorkerActor:
    """``cluster_secret``: from the controller (None: this node's environment); the worker requires it
    of every caller and presents it to the decode workers it pushes KV to."""

    def __init__(self, worker_id: str, role: str, config_json: str, cluster_secret: str | None = None) -> None:
        from protos.cluster_auth import ClusterAuth

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        config = ClusterConfig.from_json(config_json)
        pool = config.pool(role)
        host = ray.util.get_node_ip_address() if config.worker_host == "auto" else config.worker_host
        auth = ClusterAuth.from_env(cluster_secret)
        common = dict(transport=config.transport, host=host, port=0, worker_id=worker_id, auth=auth)
        if role == "prefill":
            from prefill_worker.worker import PrefillWorker

            self.worker = PrefillWorker(engine_config_for(config, pool), **common)
        else:
            from decode_worker.worker import DecodeWorker

            self.worker = DecodeWorker(engine_config_for(config, pool), default_lease_ms=config.lease_ms, **common)
        self.address = self.worker.start()
        freeze_startup_heap()
        self.worker_id = worker_id
        self.role = role
        self.node_id = ray.get_runtime_context().get_node_id()
        self.incarnation = self.worker.instance_id
        controller = ray.get_actor(CONTROLLER_NAME, namespace=config.namespace)
        ray.get(controller.register.remote(self.info()))

    def info(self) -> dict:
        return {
            "worker_id": self.worker_id,
            "role": self.role,
            "address": self.address,
            "node_id": self.node_id,
            "incarnation": self.incarnation,
            "pid": os.getpid(),
        }

    def ping(self) -> dict:
        return self.info()

    def drain(self, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Take no new work, finish what is in flight; True once idle (the controller then kills us)."""
        return self.worker.drain(timeout_s)

    def stop(self) -> None:
        self.worker.stop(grace=1.0)
        threading.Thread(target=lambda: (time.sleep(0.2), os._exit(0)), daemon=True).start()


def actor_class():
    """The Ray actor class (made lazily so importing this module does not need Ray initialised)."""
    return ray.remote(WorkerActor)
