"""The decode worker: reserves blocks, receives KV, decodes with continuous batching.

A reserved request's life here is decode_worker/reservations.py's state machine: OPEN until the
KV is committed (then the engine's request decodes it) or stopped (client, sender, lease), and its
blocks freed once, when safe. RPC and transport threads enqueue events to the engine thread; a good
commit alone is accepted on the transport thread at once (its KV adopted between steps).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import grpc

from contract import tracing
from contract.bounds import LEASE_MS, MAX_LEASE_MS
from contract.sampling import SamplingParams
from decode_worker.reservations import Reservations
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import EngineError
from engine.loop import RequestFailed, RequestStream
from engine.output import RequestOutput
from kv_transfer.errors import TransferError
from kv_transfer.inbox import KVInbox
from kv_transfer.receiver_service import KVReceiverService
from protos import common_pb2, decode_pb2, decode_pb2_grpc, kv_transfer_pb2_grpc
from worker_server.base import (
    WorkerBase,
    abort_on_error,
    logprob_from_wire,
    output_to_wire,
    status_of,
    trailing_of,
)
from worker_server.calls import call_status, serve_calls
from worker_server.security import peer_of
from worker_server.tracing import trace_kv_receiver

log = logging.getLogger(__name__)

DEFAULT_LEASE_MS = 30_000
# Open reservations one peer (a router's address) may hold: enough for a router's concurrency, not
# enough for one peer to hold every block until the leases expire.
DEFAULT_RESERVATIONS_PER_PEER = 256
# A refused commit waits this long for the engine thread's verdict (at most a step, normally).
COMMIT_VERDICT_TIMEOUT_S = 30.0


class DecodeWorker(WorkerBase, decode_pb2_grpc.DecodeWorkerServicer):
    role = "decode"
    service_names = ("splitserve.DecodeWorker", "splitserve.KVReceiver")

    def __init__(
        self,
        config: EngineConfig,
        transport: str = "grpc",
        verify_checksums: bool = True,
        default_lease_ms: int = DEFAULT_LEASE_MS,
        reservations_per_peer: int = DEFAULT_RESERVATIONS_PER_PEER,
        kv_bulk: bool = True,
        **kwargs,
    ) -> None:
        if not LEASE_MS.admits(default_lease_ms):  # the router's bound too: a longer default would be capped
            raise ValueError(f"default_lease_ms must be {LEASE_MS}, got {default_lease_ms!r}")
        super().__init__(config, **kwargs)
        self.transport = transport
        self.default_lease_ms = default_lease_ms
        self.inbox = KVInbox(
            self.engine.kv_cache,
            self._on_commit,
            self._on_sender_abort,
            verify_checksums,
            sanitize_in_place=self.engine.runner.attention.reads_masked_slots,
        )
        self.nixl = None
        if transport == "nixl":
            from kv_transfer.nixl_transport import NixlReceiver

            self.nixl = NixlReceiver(self.unique_name, self.engine.kv_cache, self.inbox)
        self.bulk = self._bulk_receiver() if kv_bulk and transport == "grpc" else None
        self.receiver = KVReceiverService(self.inbox, self.layout, self.instance_id, self.nixl, self.bulk)
        trace_kv_receiver(self.receiver)  # while tracing: a span per push stream / commit, the sender's child
        self.reservations = Reservations(
            self.inbox,
            self.loop,
            self.counters,
            remote_writes=self.nixl is not None,
            max_per_peer=reservations_per_peer,
        )

    def _bulk_receiver(self):
        """gRPC transport, no TLS: KV bytes may come over plain TCP (offered in the handshake; control
        stays on gRPC; a pool in GPU memory lands them through a pinned buffer). Otherwise they come in
        PushKV messages."""
        if self.auth.tls is not None:
            return None
        from kv_transfer.bulk_transport import BulkReceiver

        return BulkReceiver(self.inbox, self.bind_host, 0, self.auth.secret)

    def add_services(self, server: grpc.Server) -> None:
        decode_pb2_grpc.add_DecodeWorkerServicer_to_server(self, server)
        kv_transfer_pb2_grpc.add_KVReceiverServicer_to_server(self.receiver, server)

    def stop(self, grace: float = 1.0) -> None:
        super().stop(grace)
        if self.nixl is not None:
            self.nixl.close()
        if self.bulk is not None:
            self.bulk.close()

    # -- RPCs -------------------------------------------------------------------------------------

    @tracing.server_span("splitserve.DecodeWorker/Reserve")
    def Reserve(self, request, context):
        try:
            params = SamplingParams.from_wire(request.params)
            lease_ms = min(request.lease_ms or self.default_lease_ms, MAX_LEASE_MS)
            peer, trace_parent = peer_of(context), tracing.current_context()
            reservation, token = self.loop.call(
                lambda engine: self._reserve(engine, request, params, lease_ms, peer, trace_parent)
            )
        except (EngineError, TransferError, ValueError) as exc:
            abort_on_error(context, exc)
        if not context.is_active():  # its caller left meanwhile: nobody will claim or abort the reservation
            reason = "the Reserve call ended before its ticket went"
            self._cancel(request.request_id, reason)
            context.abort(grpc.StatusCode.CANCELLED, reason)
        return decode_pb2.Ticket(
            request_id=request.request_id,
            block_ids=reservation.block_ids,
            num_cached_tokens=reservation.num_cached_tokens,
            transport=self.transport,
            address=self.address,
            layout=self.layout,
            lease_ms=lease_ms,
            worker_id=self.worker_id,
            instance_id=self.instance_id,
            token=token,
        )

    def Calls(self, requests, context):
        """Reserve calls over one stream (worker_server/calls.py)."""
        handlers = {"reserve": (self.Reserve, "ticket")}
        return serve_calls(requests, context, handlers, decode_pb2.DecodeAnswer, self.rpc_threads)

    def _reserve(self, engine: Engine, request, params, lease_ms: int, peer: str, trace_parent=None):
        reservation = self.reservations.reserve(
            engine,
            request.request_id,
            request.prompt_token_ids,
            params,
            lease_ms / 1000.0,
            request.resume_token_ids,
            peer=peer,
            priority=request.priority,
        )
        prompt_hits = min(reservation.num_cached_tokens, len(request.prompt_token_ids))  # not a resumed output's
        self.counters.add(prompt_tokens=len(request.prompt_token_ids), prefix_hit_tokens=prompt_hits)
        record = self.reservations.get(request.request_id)
        if tracing.ENABLED:  # ends when the reservation leaves OPEN: how long the KV took to land
            record.trace = tracing.start_span(
                "kv.reservation",
                parent=trace_parent,
                request_id=request.request_id,
                blocks=len(reservation.block_ids),
                cached_tokens=reservation.num_cached_tokens,
            )
        return reservation, record.token

    @tracing.server_span("splitserve.DecodeWorker/Generate")
    def Generate(self, request, context):
        try:
            stream = self._stream_for(request)
        except (EngineError, TransferError, ValueError) as exc:
            abort_on_error(context, exc)
        # gRPC runs this when the call ends, however it ends, on the one thread that takes every call's events: it
        # waits for no engine step there (that would hold every other stream's sends), and has nothing to stop once
        # the request finished.
        finished = threading.Event()
        left = self._canceller(request.request_id, "the client went away")
        stop = lambda: finished.is_set() or self.loop.post(left, f"stopping {request.request_id}")
        if not context.add_callback(stop):  # ended already (a step held up adding its request): no callback will run
            stop()
        try:
            while True:
                try:
                    output = stream.get(timeout=0.5)
                except queue.Empty:
                    if not context.is_active():
                        return
                    continue
                if output.finished:
                    finished.set()
                    self._finished(request, output)
                    tracing.annotate(
                        request_id=request.request_id,
                        reserved=request.reserved,
                        tokens_generated=output.num_output_tokens,
                        finish_reason=output.finish_reason,
                    )
                yield output_to_wire(output)
                if output.finished:
                    return
        except RequestFailed as exc:
            abort_on_error(context, exc)

    def _stream_for(self, request):
        return self.loop.call(self._starter(request))

    def _starter(self, request) -> Callable[[Engine], RequestStream]:
        """What starts a Generate request on the engine thread (a reserved one: claims its reservation), returning
        the request's stream. Not reserved, its sampling record is read here (a FieldError is the caller's)."""
        if request.reserved:

            def claim(engine: Engine) -> RequestStream:
                self.reservations.authorize(request.request_id, request.token)
                return self.reservations.claim(request.request_id)

            return claim
        params = SamplingParams.from_wire(request.params)
        self.counters.add(prompt_tokens=len(request.prompt_token_ids))
        prompt, resumed = list(request.prompt_token_ids), list(request.resume_token_ids)

        def add(engine: Engine) -> RequestStream:
            engine.add_request(request.request_id, prompt, params, resumed, request.priority)
            return self.loop.watch(request.request_id)

        return add

    def _finished(self, request, output: RequestOutput) -> None:
        """Counts a request that finished (first: its client may close the stream on the last message)."""
        self.counters.add(
            requests_finished=1,
            generated_tokens=output.num_output_tokens,
            prefix_hit_tokens=0 if request.reserved else output.num_cached_tokens,
        )

    def GenerateStream(self, requests, context):
        """Generate calls over one stream (decode.proto): each request starts as the engine thread takes it (the
        stream's reader never waits on a step), its outputs join the one stream of responses, and a request the
        client cancels, or every request still running when the stream ends, is stopped."""
        responses: queue.SimpleQueue = queue.SimpleQueue()  # (request, output | exception), from any thread
        running: dict[str, decode_pb2.GenerateRequest] = {}
        lock = threading.Lock()

        def stop(request_id: str, reason: str) -> None:
            with lock:
                found = running.pop(request_id, None) is not None
            if found:
                self.loop.post(self._canceller(request_id, reason), f"stopping {request_id}")

        def start(request: decode_pb2.GenerateRequest) -> None:
            with lock:
                if request.request_id in running:  # its answers could not be told from the running one's
                    log.warning("generate stream: request id %r sent again while it runs; ignored", request.request_id)
                    return
                running[request.request_id] = request

            def deliver(_request_id: str, item) -> None:
                responses.put((request, item))

            def started(future) -> None:
                if future.exception() is not None:
                    deliver(request.request_id, future.exception())
                else:
                    future.result().forward(deliver)

            try:
                self.loop.submit(self._starter(request)).add_done_callback(started)
            except (EngineError, TransferError, ValueError) as exc:
                deliver(request.request_id, exc)

        def read() -> None:
            try:
                for message in requests:
                    if message.HasField("generate"):
                        start(message.generate)
                    else:
                        stop(message.cancel, "the client went away")
            except grpc.RpcError:
                pass  # the stream ended: what runs on it is stopped below
            finally:
                responses.put(None)

        threading.Thread(target=read, name="generate-stream", daemon=True).start()
        try:
            while True:
                try:
                    item = responses.get(timeout=0.5)
                except queue.Empty:
                    if not context.is_active():
                        return
                    continue
                if item is None:
                    if not running:
                        return
                    continue  # the client wrote its last request: what runs still streams
                request, output = item
                request_id = request.request_id
                with lock:
                    if running.get(request_id) is not request:
                        continue  # cancelled: its client reads no more
                if isinstance(output, BaseException):
                    with lock:
                        running.pop(request_id, None)
                    yield decode_pb2.GenerateStreamResponse(
                        request_id=request_id, error=call_status(*status_of(output), trailing_of(output))
                    )
                    continue
                if output.finished:
                    with lock:
                        running.pop(request_id, None)
                    self._finished(request, output)
                yield decode_pb2.GenerateStreamResponse(request_id=request_id, response=output_to_wire(output))
        finally:
            for request_id in list(running):
                stop(request_id, "the client's stream ended")

    def Abort(self, request, context):
        """A reservation's abort must present its ticket's token; a wrong one changes nothing."""
        try:
            return common_pb2.AbortResponse(found=self._cancel(request.request_id, token=request.token))
        except TransferError as exc:
            abort_on_error(context, exc)

    def transfer_state(self) -> tuple[int, int]:
        return self.reservations.in_flight, self.reservations.leases_expired

    # -- events for the reservations (any thread; decided on the engine thread) ------------------

    def _cancel(self, request_id: str, reason: str = "aborted by the client", token: str | None = None) -> bool:
        """The client aborted: stop its reservation, or abort its request once committed; whether one was found."""
        return self.loop.call(self._canceller(request_id, reason, token))

    def _canceller(self, request_id: str, reason: str, token: str | None = None) -> Callable[[Engine], bool]:
        """What stops a request on the engine thread. ``token``: an Abort RPC's, checked against the reservation's
        (None: our own Generate's client left)."""

        def cancel(engine: Engine) -> bool:
            if token is not None:
                self.reservations.authorize(request_id, token)
            stopped = self.reservations.client_aborted(engine, request_id, reason)
            return engine.abort(request_id) if stopped is None else stopped

        return cancel

    def _on_sender_abort(self, request_id: str, reason: str, sender_stopped: bool) -> None:
        """Transport thread: the sender aborted, its stream broke, or its data was bad."""
        self.loop.post(
            lambda engine: self.reservations.sender_aborted(engine, request_id, reason, sender_stopped),
            f"the sender's abort of {request_id}",
        )

    def _on_commit(self, request_id: str, first_token_id: int, first_logprob) -> None:
        """Transport thread: every layer landed. A good commit is accepted at once, its KV adopted between
        steps; one to refuse waits for the engine thread's verdict (it stops or releases the reservation)."""
        logprob = logprob_from_wire(first_logprob)
        if self.reservations.commit_at_once(self.engine, request_id, first_token_id, logprob):
            return
        self.loop.call(
            lambda engine: self.reservations.commit(engine, request_id, first_token_id, logprob),
            timeout=COMMIT_VERDICT_TIMEOUT_S,
        )

    def after_step(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        self.reservations.tick(engine)
