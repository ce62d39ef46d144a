"""The router's view of the workers: channels, health, load, and which KV blocks each one caches.

Contract: everything here runs on the router's event loop. Membership changes through
``add`` / ``remove`` (static addresses at start-up, or the control plane's watch).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import common_pb2, decode_pb2_grpc, prefill_pb2_grpc

log = logging.getLogger(__name__)

UNHEALTHY_AFTER_FAILURES = 2


@dataclass
class KVIndex:
    """The block hashes one worker holds, kept current from its KV-event stream."""

    hashes: set[int] = field(default_factory=set)
    last_event_id: int = -1
    synced: bool = False

    def apply(self, batch: common_pb2.KVEventBatch) -> bool:
        """Applies a batch; False on an event-id gap (the caller resubscribes for a snapshot)."""
        if batch.snapshot:
            self.hashes = set(batch.cached_hashes)
            self.last_event_id = batch.last_event_id
            self.synced = True
            return True
        for event in batch.events:
            if event.event_id != self.last_event_id + 1:
                self.synced = False
                return False
            self.last_event_id = event.event_id
            if event.kind == common_pb2.KVEvent.STORED:
                self.hashes.update(event.block_hashes)
            elif event.kind == common_pb2.KVEvent.REMOVED:
                self.hashes.difference_update(event.block_hashes)
            else:
                self.hashes.clear()
        return True

    def prefix_blocks(self, block_hashes: list[int]) -> int:
        """How many leading blocks of a prompt this worker holds."""
        count = 0
        for block_hash in block_hashes:
            if block_hash not in self.hashes:
                break
            count += 1
        return count


@dataclass
class WorkerHandle:
    address: str
    role: str  # "prefill" | "decode"
    channel: grpc.aio.Channel
    stub: object
    healthy: bool = False
    draining: bool = False
    stats: common_pb2.WorkerStats = field(default_factory=common_pb2.WorkerStats)
    active: int = 0  # requests this router has in flight on the worker
    failures: int = 0
    kv: KVIndex = field(default_factory=KVIndex)
    last_seen: float = 0.0
    tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining

    @property
    def load(self) -> int:
        """Requests on the worker as far as we know: ours in flight, or its own count if higher."""
        return max(self.active, self.stats.running + self.stats.waiting + self.stats.waiting_for_kv)

    def mark_failed(self) -> None:
        self.failures += 1
        if self.failures >= UNHEALTHY_AFTER_FAILURES or self.healthy:
            if self.healthy:
                log.warning("%s worker %s marked unhealthy", self.role, self.address)
            self.healthy = False


class WorkerPool:
    def __init__(self, health_interval_s: float = 0.5) -> None:
        self.health_interval_s = health_interval_s
        self.workers: dict[str, WorkerHandle] = {}

    def add(self, address: str, role: str) -> WorkerHandle:
        if address in self.workers:
            return self.workers[address]
        channel = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        stub = (
            prefill_pb2_grpc.PrefillWorkerStub(channel)
            if role == "prefill"
            else decode_pb2_grpc.DecodeWorkerStub(channel)
        )
        worker = WorkerHandle(address, role, channel, stub)
        self.workers[address] = worker
        worker.tasks = [
            asyncio.create_task(self._watch_health(worker)),
            asyncio.create_task(self._follow_kv_events(worker)),
        ]
        return worker

    async def remove(self, address: str) -> None:
        worker = self.workers.pop(address, None)
        if worker is None:
            return
        for task in worker.tasks:
            task.cancel()
        await worker.channel.close()

    async def close(self) -> None:
        for address in list(self.workers):
            await self.remove(address)

    def of_role(self, role: str, available_only: bool = True) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.role == role and (w.available or not available_only)]

    def draining(self, address: str, value: bool = True) -> None:
        if address in self.workers:
            self.workers[address].draining = value

    # -- background -------------------------------------------------------------------------------

    async def _watch_health(self, worker: WorkerHandle) -> None:
        health_stub = health_pb2_grpc.HealthStub(worker.channel)
        while True:
            try:
                reply = await health_stub.Check(
                    health_pb2.HealthCheckRequest(), timeout=max(1.0, self.health_interval_s * 2)
                )
                worker.stats = await worker.stub.Stats(common_pb2.StatsRequest(), timeout=2.0)
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                if serving and not worker.healthy:
                    log.info("%s worker %s is healthy", worker.role, worker.address)
                worker.healthy, worker.failures, worker.last_seen = serving, 0, time.monotonic()
                worker.draining = worker.draining or worker.stats.draining
            except grpc.aio.AioRpcError:
                worker.mark_failed()
            except asyncio.CancelledError:
                return
            await asyncio.sleep(self.health_interval_s * (0.8 + 0.4 * random.random()))

    async def _follow_kv_events(self, worker: WorkerHandle) -> None:
        while True:
            call = worker.stub.SubscribeKVEvents(common_pb2.SubscribeKVEventsRequest())
            try:
                async for batch in call:
                    if not worker.kv.apply(batch):
                        log.info("KV event gap from %s; resyncing", worker.address)
                        call.cancel()
                        break
            except grpc.aio.AioRpcError:
                worker.kv.synced = False
            except asyncio.CancelledError:
                call.cancel()
                return
            await asyncio.sleep(self.health_interval_s)
