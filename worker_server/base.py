"""What the prefill and decode workers share: an engine on its loop thread behind a gRPC server
(with health checking and reflection), stats, KV-event streaming, and engine ↔ wire conversions."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from abc import ABC, abstractmethod
from concurrent import futures
from dataclasses import dataclass, field, fields

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from contract import tracing
from contract.errors import REFUSED_FIELD, UNREACHABLE_PEER
from contract.sampling import FieldError
from engine.block_manager import KVEventKind
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import InvalidRequestError, NoFreeBlocksError
from engine.loop import EngineLoop, RequestFailed
from engine.output import RequestOutput
from engine.presets import build_model_card
from engine.sampler import TokenLogprobs
from engine.threads import engine_thread_name
from kv_transfer.errors import TransferError
from kv_transfer.layout import layout_message
from kv_transfer.sender import channel_options
from protos import common_pb2, decode_pb2
from protos.cluster_auth import ClusterAuth, cannot_listen, server_options
from protos.worker_metrics import worker_metrics
from worker_server.security import (
    PeerLimit,
    advertised_host,
    bind,
    confine_listeners,
    peer_of,
    server_interceptors,
)

log = logging.getLogger(__name__)
IDLE_BEFORE_STOP_S = 1.0  # a draining worker stops once idle this long: past routers' next health check (0.5 s)
DRAIN_POLL_S = 0.1

# KV-event subscriptions hold an RPC thread each for as long as they last: bounded per peer and in
# all, so the threads that health checks, Stats and the data path need are never all taken.
SUBSCRIPTIONS_PER_PEER = 4
SUBSCRIPTIONS_SHARE = 4  # at most max_rpc_threads // SUBSCRIPTIONS_SHARE subscriptions in all

_EVENT_KINDS = {
    KVEventKind.STORED: common_pb2.KVEvent.STORED,
    KVEventKind.REMOVED: common_pb2.KVEvent.REMOVED,
    KVEventKind.CLEARED: common_pb2.KVEvent.CLEARED,
}


@dataclass
class WorkerCounters:
    """Cumulative counters of one worker: any thread adds, Stats (and so /metrics) reads."""

    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0
    generated_tokens: int = 0
    requests_finished: int = 0
    kv_transfer_bytes: int = 0
    kv_transfers_completed: int = 0
    kv_transfers_failed: int = 0
    kv_transfers_cancelled: int = 0  # the client left before its first token: no failure of the transfer's
    kv_transfer_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


class WorkerBase(ABC):
    role = "worker"
    service_names: tuple[str, ...] = ()

    def __init__(
        self,
        config: EngineConfig,
        host: str = "127.0.0.1",
        port: int = 0,
        worker_id: str | None = None,
        advertise_host: str | None = None,
        max_rpc_threads: int = 256,
        auth: ClusterAuth | None = None,
        subscriptions_per_peer: int = SUBSCRIPTIONS_PER_PEER,
    ) -> None:
        self.config = config
        tracing.configure(f"splitserve-{self.role}")  # OTEL_*; before the engine loads, so a bad value fails fast
        self.auth = auth if auth is not None else ClusterAuth.from_env()
        confine_listeners(host)
        self.bind_host = host  # where this worker listens; its address names advertised_host (the one peers dial)
        advertised = advertised_host(host, advertise_host)
        self.instance_id = uuid.uuid4().hex[:12]
        self.worker_id = worker_id or f"{self.role}-{self.instance_id}"
        self.engine = Engine(config, on_layer_done=self.on_layer_done)
        if self.engine.token_capacity < self.engine.max_model_len:  # served, but say so once: the router routes by it
            log.warning(
                "this %s worker's KV pool holds %d tokens, fewer than the model's context (%d): it refuses longer "
                "requests (the router sends them to a worker that holds them); raise kv_cache_mb (--kv-cache-mb) "
                "to hold a whole one",
                self.role,
                self.engine.token_capacity,
                self.engine.max_model_len,
            )
        self.layout = layout_message(self.engine.layout, self.engine.fingerprint)
        self.model_card = build_model_card(
            config.model,
            self.engine.model_config,
            self.engine.tokenizer,
            weights=self.engine.fingerprint,
            max_model_len=self.engine.max_model_len,
            served_model_name=config.served_model_name,
            dtype=self.engine.layout.dtype,
            block_size=self.engine.layout.block_size,
        ).to_wire()
        # Stats and /metrics read what the engine thread published after its last step, never wait for a step.
        self.engine_snapshot = self.engine.stats()
        self.loop = EngineLoop(
            self.engine, name=engine_thread_name(self.role), after_step=self._after_step, after_call=self._snapshot
        )
        self.rpc_threads = futures.ThreadPoolExecutor(max_workers=max_rpc_threads)  # calls, and calls on a stream
        self.server = grpc.server(
            self.rpc_threads,
            interceptors=server_interceptors(self.auth),
            options=[*channel_options(), *server_options()],
        )
        self.subscriptions = PeerLimit(subscriptions_per_peer, max(1, max_rpc_threads // SUBSCRIPTIONS_SHARE))
        self.health = health.HealthServicer()
        self.port = bind(self.server, f"{host}:{port}", self.auth, "the worker's gRPC API, --port")
        self.address = f"[{advertised}]:{self.port}" if ":" in advertised else f"{advertised}:{self.port}"
        self.counters = WorkerCounters()
        self.transport = "grpc"
        self.draining = False  # set by the control plane: routers stop sending new work here

    @property
    def unique_name(self) -> str:
        """worker id + instance id: unique even when a restarted worker keeps its id (NIXL agent names)."""
        return self.worker_id if self.worker_id.endswith(self.instance_id) else f"{self.worker_id}-{self.instance_id}"

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> str:
        self.add_services(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.loop.start()
        self.server.start()
        for name in ("", *self.service_names):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.address

    def stop(self, grace: float = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 1)
        self.loop.stop()

    @abstractmethod
    def add_services(self, server: grpc.Server) -> None:
        """Registers the worker's own gRPC services (health and reflection are added here)."""

    # -- engine-thread hooks (overridden by the workers) ------------------------------------------

    def on_layer_done(self, plan, layer: int, ready) -> None:
        """Called on the engine thread after each layer of each step; ``ready`` is the layer's
        ``engine.layer_ready.LayerReady`` (see the contract on ``engine.model_runner.LayerHook``)."""

    def after_step(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        """Called on the engine thread after every loop iteration."""

    def _after_step(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        self.after_step(engine, outputs)
        self._snapshot(engine)

    def _snapshot(self, engine: Engine) -> None:
        """After every step and every call (a Reserve's blocks show in Stats once it answered)."""
        self.engine_snapshot = engine.stats()  # one reference swap: readers see a whole snapshot

    # -- shared RPCs ------------------------------------------------------------------------------

    def transfer_state(self) -> tuple[int, int]:
        """(transfers in flight, leases expired); each worker knows its own."""
        return 0, 0

    def Stats(self, request, context):
        return self.stats()

    def SubscribeKVEvents(self, request, context):
        peer = peer_of(context)
        if not self.subscriptions.acquire(peer):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many KV-event subscriptions (at most {self.subscriptions.per_peer} per peer, "
                f"{self.subscriptions.total} in all)",
            )
        try:
            yield from self.kv_event_batches(context)
        finally:
            self.subscriptions.release(peer)

    def stats(self) -> common_pb2.WorkerStats:
        """From the snapshot of the engine's last step: answers in microseconds while a step runs."""
        snapshot = self.engine_snapshot
        transfers_in_flight, leases_expired = self.transfer_state()
        return common_pb2.WorkerStats(
            worker_id=self.worker_id,
            role=self.role,
            kv_blocks_total=snapshot.num_blocks,
            kv_blocks_used=snapshot.blocks_used,
            kv_blocks_free=snapshot.blocks_free,
            kv_blocks_cached=snapshot.blocks_cached,
            token_capacity=snapshot.token_capacity,
            running=snapshot.running,
            waiting=snapshot.waiting,
            waiting_for_kv=snapshot.waiting_for_kv,
            preemptions=snapshot.preemptions,
            transfers_in_flight=transfers_in_flight,
            leases_expired=leases_expired,
            block_size=self.config.block_size,
            draining=self.draining,
            transport=self.transport,
            model_card=self.model_card,
            **self.counters.snapshot(),
        )

    def serve_metrics(self, port: int) -> int:
        """Serves this worker's Prometheus metrics over HTTP on ``port`` (0: any); returns the port. ListenError (an
        OSError) naming the address and ``--metrics-port`` where it cannot listen."""
        registry = CollectorRegistry()
        registry.register(_StatsCollector(self))
        try:
            server, _ = start_http_server(port, addr=self.bind_host, registry=registry)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise cannot_listen(f"{self.bind_host}:{port}", reason, "metrics, --metrics-port") from None
        return server.server_port

    def busy(self) -> bool:
        """Any request still in this worker's engine (queued, running or waiting for KV)."""
        return self.loop.call(lambda engine: engine.has_unfinished())

    def drain(self, timeout_s: float, stop_early: threading.Event | None = None) -> bool:
        """Takes no new work (routers read ``draining`` in Stats) and waits for what is in flight to finish: True
        once idle for IDLE_BEFORE_STOP_S (a request that was routed here just before routers saw the drain has
        come by then); False at ``timeout_s``, or as soon as ``stop_early`` is set."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        idle_since = None
        while time.monotonic() < deadline and not (stop_early is not None and stop_early.is_set()):
            if self.busy():
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= IDLE_BEFORE_STOP_S:
                return True
            time.sleep(DRAIN_POLL_S)
        return False

    def kv_event_batches(self, context: grpc.ServicerContext):
        """Snapshot first, then events as they happen, until the client leaves or falls behind."""
        subscription = self.loop.subscribe_kv_events()
        if not context.add_callback(lambda: self.loop.unsubscribe(subscription)):
            self.loop.unsubscribe(subscription)  # the call ended while the engine's step ran: nobody will read it
            return
        yield common_pb2.KVEventBatch(
            worker_id=self.worker_id,
            snapshot=True,
            last_event_id=subscription.last_event_id,
            cached_hashes=subscription.cached_hashes,
        )
        while context.is_active():
            try:
                first = subscription.events.get(timeout=0.5)
            except queue.Empty:
                continue
            batch = [first] + _drain(subscription.events)
            events = [e for e in batch if e is not None]
            if events:
                yield common_pb2.KVEventBatch(
                    worker_id=self.worker_id,
                    last_event_id=events[-1].event_id,
                    events=[_event_message(e) for e in events],
                )
            if None in batch:
                return  # fell behind: the client resubscribes and gets a fresh snapshot


class _StatsCollector:
    """Reads the worker's Stats at scrape time: one source for gRPC Stats and /metrics."""

    def __init__(self, worker: WorkerBase) -> None:
        self.worker = worker

    def collect(self):
        yield from worker_metrics([self.worker.stats()])


def _drain(events: queue.Queue) -> list:
    drained = []
    while True:
        try:
            drained.append(events.get_nowait())
        except queue.Empty:
            return drained


def _event_message(event) -> common_pb2.KVEvent:
    return common_pb2.KVEvent(event_id=event.event_id, kind=_EVENT_KINDS[event.kind], block_hashes=event.block_hashes)


# -- conversions ------------------------------------------------------------------------------------


def logprob_to_wire(logprobs: TokenLogprobs) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=logprobs.token_id,
        logprob=logprobs.logprob,
        top=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in logprobs.top],
        rank=logprobs.rank,
    )


def logprob_from_wire(message: common_pb2.TokenLogprob | None) -> TokenLogprobs | None:
    if message is None:
        return None
    return TokenLogprobs(
        message.token_id, message.logprob, tuple((t.token_id, t.logprob) for t in message.top), message.rank
    )


def output_to_wire(output: RequestOutput) -> decode_pb2.GenerateResponse:
    response = decode_pb2.GenerateResponse(
        token_ids=output.token_ids,
        text=output.text,
        logprobs=[logprob_to_wire(lp) for lp in output.logprobs],
        finish_reason=output.finish_reason or "",
        prompt_logprobs=[logprob_to_wire(lp) for lp in output.prompt_logprobs],
    )
    if isinstance(output.stop_reason, str):
        response.stop_string = output.stop_reason
    elif output.stop_reason is not None:
        response.stop_token_id = output.stop_reason
    if output.finished:
        response.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=output.num_prompt_tokens,
                completion_tokens=output.num_output_tokens,
                cached_tokens=output.num_cached_tokens,
            )
        )
    return response


def abort_on_error(context: grpc.ServicerContext, exc: Exception) -> None:
    """Maps engine and transfer errors to gRPC statuses with their message; a transfer that failed because its
    peer could not be reached names that peer in the trailing metadata (``UNREACHABLE_PEER``), a request refused
    for one of its fields that field (``REFUSED_FIELD``)."""
    if trailing := trailing_of(exc):
        context.set_trailing_metadata(trailing)
    context.abort(*status_of(exc))


def trailing_of(exc: Exception) -> tuple[tuple[str, str], ...]:
    """What a call ended by ``exc`` says in its trailing metadata: the peer it could not reach, or the request field
    it refused (an engine's InvalidRequestError, or a RequestFailed that was one)."""
    if isinstance(exc, TransferError) and exc.unreachable:
        return ((UNREACHABLE_PEER, exc.unreachable),)
    if isinstance(exc, (InvalidRequestError, RequestFailed)) and exc.field:
        return ((REFUSED_FIELD, exc.field),)
    return ()


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status and message a call ends with when ``exc`` ends it (an unexpected one, logged, is INTERNAL)."""
    if isinstance(exc, (InvalidRequestError, FieldError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, RequestFailed):  # the engine ended it: the request's own fault, or not
        return grpc.StatusCode.INVALID_ARGUMENT if exc.invalid else grpc.StatusCode.ABORTED, str(exc)
    if isinstance(exc, NoFreeBlocksError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, TransferError):
        return getattr(grpc.StatusCode, exc.code), str(exc)
    log.error("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
