"""The router's view of the workers: channels, health, load, and which KV blocks each one caches.

Contract: everything here runs on the router's event loop. Membership changes through
``add`` / ``remove`` (static addresses at start-up, or the control plane's watch).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from contract.model_card import MISMATCH_FIELDS, ModelCard, card_of_stats
from protos import common_pb2, decode_pb2_grpc, prefill_pb2_grpc
from protos.cluster_auth import ClusterAuth
from router.prefill_clock import PrefillClock
from router.worker_streams import CallLink, GenerateLink, decode_calls, prefill_calls

log = logging.getLogger(__name__)

# Health checks that time out in a row before a worker is taken out of routing: a busy machine can stall one
# check past its deadline (a worker that refuses or drops the connection is out at once).
UNHEALTHY_AFTER_FAILURES = 2
SOURCE_UNREADABLE = "source_unreadable"  # the router could not adopt the workers' card (no --model)
INCOMPATIBLE_FIELDS = (*MISMATCH_FIELDS, SOURCE_UNREADABLE)
# A prefill worker that could not reach a decode worker's KV receiver is not paired with it again for this long
# (neither worker is taken out: each may serve every other pairing, and the decode worker can prefill itself).
KV_LINK_RETRY_S = 10.0


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


@dataclass(frozen=True)
class Incompatible:
    """Why a worker is not routed to although it is healthy: its model card disagrees with the router's."""

    reason: str
    fields: tuple[str, ...]  # which card fields disagree: a bounded set, used as metric labels


@dataclass
class WorkerHandle:
    address: str
    role: str  # "prefill" | "decode"
    channel: grpc.aio.Channel
    stub: object
    healthy: bool = False
    drain_ordered: bool = False  # by the control plane (`splitserve up`'s controller, in its membership)
    stats: common_pb2.WorkerStats = field(default_factory=common_pb2.WorkerStats)
    active: int = 0  # requests this router has in flight on the worker
    # A decode worker's: uncached prompt tokens this router has sent it to prefill itself and has no first token for.
    prefill_backlog: int = 0
    # A prefill worker's queue as its answers report it: the prompts not reported computed, its measured speed and a
    # prompt's expected wait.
    prefill_clock: PrefillClock = field(default_factory=PrefillClock)
    failures: int = 0
    down_reason: str | None = None  # why it was taken out of routing (None: it was not, or a check passed since)
    kv: KVIndex = field(default_factory=KVIndex)
    last_seen: float = 0.0
    tasks: list[asyncio.Task] = field(default_factory=list)
    incompatible: Incompatible | None = None
    # A decode worker's: the prefill workers (addresses) that could not reach its KV receiver, each with the
    # time (monotonic) from which routing pairs them again.
    kv_links_down: dict[str, float] = field(default_factory=dict)
    # Removed from the pool, its channel closed: calls in flight on it end in CancelledError, which the
    # orchestrator then reads as this worker lost (not the request cancelled).
    closed: bool = False
    # A decode worker's Reserve and Generate calls in flight: cancelled when it is taken out of routing, so that the
    # orchestrator migrates their requests at once rather than when keepalive or a deadline ends them.
    calls: set = field(default_factory=set)
    link: GenerateLink | None = None  # a decode worker's Generate calls, on one stream (router/worker_streams.py)
    unary: CallLink | None = None  # its Reserve, or Prefill and SendTicket, calls, on one stream (the same)

    @property
    def draining(self) -> bool:
        """Taking no new work: ordered so, or saying so itself (its last Stats: a worker stopping on SIGTERM, or
        drained by the control plane). A worker that came back after it stopped says so no more."""
        return self.drain_ordered or self.stats.draining

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining and self.incompatible is None and not self.closed

    @property
    def taken_out(self) -> bool:
        """Out of routing for failing (``mark_failed``, ``missed_check``), no check passed since; not a worker that
        says NOT_SERVING, or one not checked yet."""
        return not self.healthy and self.failures > 0

    @property
    def label(self) -> str:
        """How metrics and the dashboard name this worker: its id once its Stats came, its address before."""
        return self.stats.worker_id or self.address

    @property
    def queued_prefill_tokens(self) -> int:
        """Uncached prompt tokens sent here to prefill and not done as far as this router knows (each role keeps
        one of the two: a decode worker its backlog, a prefill worker its clock)."""
        return self.prefill_backlog + self.prefill_clock.queued_tokens

    @property
    def prefill_s_per_token(self) -> float | None:
        return self.prefill_clock.s_per_token

    def prefill_wait_s(self) -> float | None:
        """A prompt sent now: its expected wait on this prefill worker (None until a speed was measured)."""
        return self.prefill_clock.wait_s(time.monotonic())

    @property
    def load(self) -> int:
        """Requests on the worker as far as we know: ours in flight, or its own count if higher."""
        return max(self.active, self.stats.running + self.stats.waiting + self.stats.waiting_for_kv)

    def queue_prefill(self, tokens: int) -> Callable[[], None]:
        """Counts ``tokens`` into the backlog until the function returned is called (once or more)."""
        self.prefill_backlog += tokens

        def prefilled() -> None:
            nonlocal tokens
            self.prefill_backlog -= tokens
            tokens = 0

        return prefilled

    def kv_link_failed(self, prefill: str) -> None:
        """``prefill`` (an address) could not reach this decode worker's KV receiver: not paired for a while."""
        self.kv_links_down[prefill] = time.monotonic() + KV_LINK_RETRY_S

    def reached_by(self, prefill: str) -> bool:
        """Whether ``prefill`` may push KV here: no failure to reach this worker within KV_LINK_RETRY_S."""
        return self.kv_links_down.get(prefill, 0.0) <= time.monotonic()

    @property
    def kv_unreachable_from(self) -> list[str]:
        """A decode worker's: the prefill workers (addresses) routing does not pair with it now."""
        return [prefill for prefill in sorted(self.kv_links_down) if not self.reached_by(prefill)]

    def mark_failed(self, reason: str) -> None:
        """A call failed in a way only a lost worker fails (refused, dropped, internal error): out at once. Its
        other calls go on: a lost worker's fail by themselves, and one call's internal error spares the rest."""
        self.failures += 1
        self._take_out(reason, cancel_calls=False)

    def missed_check(self, reason: str) -> None:
        """A health check timed out: out once UNHEALTHY_AFTER_FAILURES did in a row (a stalled worker, not a
        busy one)."""
        self.failures += 1
        if self.failures >= UNHEALTHY_AFTER_FAILURES:
            self._take_out(reason, cancel_calls=True)

    def call(self, method: str, request, timeout: float, metadata=None):
        """A unary call to this worker (``method``: "Reserve", "Prefill", "SendTicket"): on its ``Calls`` stream,
        or, carrying ``metadata`` (a span's context), as a call of its own. Awaited: the response."""
        if metadata is None:
            return self.unary.call(method, request, timeout)
        return getattr(self.stub, method)(request, timeout=timeout, metadata=metadata)

    def generate(self, request, timeout: float, metadata=None):
        """A decode worker's Generate call, as ``call`` places the unary ones: on its stream, or, carrying
        ``metadata`` (a span's context), as a call of its own, with ``timeout``. Iterated: the worker's outputs."""
        if metadata is None:
            return self.link.generate(request)
        return self.stub.Generate(request, timeout=timeout, metadata=metadata)

    async def abort(self, request_id: str, token: str = "") -> None:
        """Stops a request here (a reservation's abort needs its ticket's ``token``); a worker gone, or that left the
        pool, has nothing to stop."""
        try:
            await self.stub.Abort(common_pb2.AbortRequest(request_id=request_id, token=token), timeout=5.0)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError):
            pass

    def late_answer(self, answer) -> None:
        """An answer to a call on the ``Calls`` stream that this router gave up on (cancelled, or past its deadline):
        a Reserve's ticket is released now, not when its lease runs out (nobody will claim it)."""
        if answer.WhichOneof("kind") == "ticket":
            asyncio.ensure_future(self.abort(answer.ticket.request_id, answer.ticket.token))

    def track_call(self, call) -> None:
        """A call on this worker, cancelled if the worker is (or is already) taken out before the call ends."""
        if self.taken_out:
            call.cancel()
            return
        self.calls.add(call)
        call.add_done_callback(self.calls.discard)

    def _take_out(self, reason: str, cancel_calls: bool) -> None:
        """Out of routing. ``cancel_calls`` (a stalled worker: its health checks went unanswered): its tracked
        calls are cancelled too, which the orchestrator reads as the worker lost, and migrates their requests at
        once; they would otherwise wait for keepalive to end them, ~PEER_SILENCE_S."""
        if self.healthy:
            log.warning("%s worker %s marked unhealthy: %s", self.role, self.address, reason)
        self.healthy, self.down_reason = False, reason
        for call in list(self.calls) if cancel_calls else ():
            call.cancel()


class SecretStub:
    """A worker's stub whose every call carries ``secret`` (the cluster secret's metadata) before the call's own
    metadata; the methods are the stub's."""

    def __init__(self, stub, secret: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        self._secret = secret

    def __getattr__(self, name: str):
        method, secret = getattr(self._stub, name), self._secret

        def call(request, *, metadata=None, **kwargs):
            return method(request, metadata=(*secret, *metadata) if metadata else secret, **kwargs)

        setattr(self, name, call)  # made once per method
        return call


CardCheck = Callable[[ModelCard | None], Incompatible | None]


class WorkerPool:
    """``check_card`` judges each worker's model card at every health check (the router's ModelBinding);
    without one, every card is accepted. Every call to a worker carries ``auth`` (the cluster secret,
    and mutual TLS when configured; default: the environment's)."""

    def __init__(
        self, health_interval_s: float = 0.5, check_card: CardCheck | None = None, auth: ClusterAuth | None = None
    ) -> None:
        self.health_interval_s = health_interval_s
        self.check_card = check_card
        self.auth = auth if auth is not None else ClusterAuth.from_env()
        self.workers: dict[str, WorkerHandle] = {}

    def add(self, address: str, role: str) -> WorkerHandle:
        if address in self.workers:
            return self.workers[address]
        # The channel's TLS is the auth's; its secret goes on each call (SecretStub), not through grpc.aio's client
        # interceptors, which cost every call an extra task and a loop turn before it starts.
        channel = replace(self.auth, secret=None).aio_channel(
            address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        stub_class = prefill_pb2_grpc.PrefillWorkerStub if role == "prefill" else decode_pb2_grpc.DecodeWorkerStub
        worker = WorkerHandle(address, role, channel, SecretStub(stub_class(channel), self.auth.metadata()))
        if role == "decode":
            worker.link = GenerateLink(worker.stub)
            worker.unary = decode_calls(worker.stub, worker.late_answer)
        else:
            worker.unary = prefill_calls(worker.stub)
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
        worker.closed, worker.healthy = True, False
        for task in worker.tasks:
            task.cancel()
        await worker.channel.close()

    async def close(self) -> None:
        for address in list(self.workers):
            await self.remove(address)

    def unavailable(self, role: str | None = None) -> list[str]:
        """Each worker (of ``role``) not routed to, with why: "ROLE worker ADDRESS: REASON", decode workers first."""
        reasons = []
        for w in sorted(self.workers.values(), key=lambda w: w.role != "decode"):
            if w.available or role not in (None, w.role):
                continue
            if w.incompatible is not None:
                why = w.incompatible.reason
            elif w.draining:
                why = "draining"
            else:
                why = w.down_reason or "its health check has not passed yet"
            reasons.append(f"{w.role} worker {w.address}: {why}")
        return reasons

    def of_role(self, role: str, available_only: bool = True) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.role == role and (w.available or not available_only)]

    def incompatible(self, role: str | None = None) -> list[WorkerHandle]:
        """Workers (of ``role``) not routed to because their model card disagrees."""
        return [w for w in self.workers.values() if w.incompatible and role in (None, w.role)]

    def draining(self, address: str, value: bool = True) -> None:
        if address in self.workers:
            self.workers[address].drain_ordered = value

    # -- background -------------------------------------------------------------------------------

    async def _watch_health(self, worker: WorkerHandle) -> None:
        health_stub = health_pb2_grpc.HealthStub(worker.channel)
        while True:
            try:
                reply = await health_stub.Check(
                    health_pb2.HealthCheckRequest(), timeout=max(1.0, self.health_interval_s * 2)
                )
                worker.stats = await worker.stub.Stats(common_pb2.StatsRequest(), timeout=2.0)
                self._judge_card(worker)
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                if serving and not worker.healthy:
                    log.info("%s worker %s is healthy", worker.role, worker.address)
                worker.healthy, worker.failures, worker.last_seen = serving, 0, time.monotonic()
                worker.down_reason = None if serving else "its health check says NOT_SERVING"
            except grpc.aio.AioRpcError as exc:
                why = _health_failure(worker.role, exc)
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    worker.missed_check(why)
                else:
                    worker.mark_failed(why)
            except asyncio.CancelledError:
                return
            await asyncio.sleep(self.health_interval_s * (0.8 + 0.4 * random.random()))

    def _judge_card(self, worker: WorkerHandle) -> None:
        if self.check_card is None:
            return
        verdict = self.check_card(card_of_stats(worker.stats))
        if verdict != worker.incompatible:
            if verdict is None:
                log.info("%s worker %s: model card compatible", worker.role, worker.address)
            else:
                log.warning("%s worker %s is not routed to: %s", worker.role, worker.address, verdict.reason)
        worker.incompatible = verdict

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


def with_reasons(message: str, reasons: list[str]) -> str:
    """``message``, followed by the reasons (``WorkerPool.unavailable``) in parentheses when there are any."""
    return f"{message} ({'; '.join(reasons)})" if reasons else message


def _health_failure(role: str, exc: grpc.aio.AioRpcError) -> str:
    """Why a health check failed, for an operator: a worker that answers without this role's service
    is most likely the other role's, given in the wrong list."""
    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
        other = "prefill" if role == "decode" else "decode"
        return (
            f"it answers but does not serve the {role} worker's API: a {other} worker given as a {role} worker "
            f"(--{role})?"
        )
    return f"{exc.code().name}: {exc.details()}"
