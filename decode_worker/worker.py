"""The decode worker: reserves blocks, receives KV, decodes with continuous batching.

A reserved request's life here::

    Reserve ──> WAITING_FOR_KV ──(all layers landed + commit)──> RUNNING ──> tokens ──> finished
                   │ lease runs out / sender aborts / client aborts
                   └──> stream fails at once; blocks return at once (gRPC) or at the lease
                        deadline (NIXL: the sender may still be writing into them)
"""

from __future__ import annotations

import logging
import queue
import time

import grpc

from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import EngineError
from engine.loop import RequestFailed, RequestStream
from engine.output import RequestOutput
from kv_transfer.errors import TransferError
from kv_transfer.inbox import InboundState, KVInbox
from kv_transfer.receiver_service import KVReceiverService
from protos import common_pb2, decode_pb2, decode_pb2_grpc, kv_transfer_pb2_grpc
from worker_server.base import WorkerBase, abort_on_error, logprob_from_wire, output_to_wire, sampling_params_from_wire

log = logging.getLogger(__name__)

DEFAULT_LEASE_MS = 30_000
MAX_LEASE_MS = 600_000
# A reservation's output stream waits this long for its client's Generate once the request ended.
UNCLAIMED_STREAM_TTL_S = 60.0


class DecodeWorker(WorkerBase, decode_pb2_grpc.DecodeWorkerServicer):
    role = "decode"
    service_names = ("splitserve.DecodeWorker", "splitserve.KVReceiver")

    def __init__(
        self,
        config: EngineConfig,
        transport: str = "grpc",
        verify_checksums: bool = True,
        default_lease_ms: int = DEFAULT_LEASE_MS,
        **kwargs,
    ) -> None:
        super().__init__(config, **kwargs)
        self.transport = transport
        self.default_lease_ms = default_lease_ms
        self.inbox = KVInbox(self.engine.kv_cache, self._on_commit, verify_checksums)
        self.nixl = None
        if transport == "nixl":
            from kv_transfer.nixl_transport import NixlReceiver

            self.nixl = NixlReceiver(self.unique_name, self.engine.kv_cache, self.inbox)
        self.receiver = KVReceiverService(self.inbox, self.layout, self.instance_id, self._abort_inbound, self.nixl)
        # Engine thread only. Outputs of a reservation may come (even all of them) before its client
        # calls Generate: the stream is kept here until claimed, or until the TTL after the request ended.
        self._unclaimed: dict[str, tuple[RequestStream, float | None]] = {}
        self._next_sweep = 0.0

    def add_services(self, server: grpc.Server) -> None:
        decode_pb2_grpc.add_DecodeWorkerServicer_to_server(self, server)
        kv_transfer_pb2_grpc.add_KVReceiverServicer_to_server(self.receiver, server)

    def stop(self, grace: float = 1.0) -> None:
        super().stop(grace)
        if self.nixl is not None:
            self.nixl.close()

    # -- RPCs -------------------------------------------------------------------------------------

    def Reserve(self, request, context):
        try:
            params = sampling_params_from_wire(request.params)
            lease_ms = min(request.lease_ms or self.default_lease_ms, MAX_LEASE_MS)
            reservation = self.loop.call(lambda engine: self._reserve(engine, request, params, lease_ms))
        except (EngineError, ValueError) as exc:
            abort_on_error(context, exc)
        return decode_pb2.Ticket(
            request_id=request.request_id,
            block_ids=reservation.block_ids,
            num_cached_tokens=reservation.num_cached_tokens,
            transport=self.transport,
            address=self.address,
            layout=self.layout,
            lease_deadline_unix_ms=int((time.time() + lease_ms / 1000.0) * 1000),
            worker_id=self.worker_id,
            instance_id=self.instance_id,
        )

    def _reserve(self, engine: Engine, request, params, lease_ms: int):
        """Engine thread: blocks, inbound record and output stream appear together."""
        reservation = engine.reserve(request.request_id, list(request.prompt_token_ids), params)
        first_missing = reservation.num_cached_tokens // self.config.block_size
        self.inbox.open(
            request.request_id, reservation.block_ids[first_missing:], lease_ms / 1000.0, self.nixl is not None
        )
        self._unclaimed[request.request_id] = (self.loop.watch(request.request_id), None)
        self.counters.add(prompt_tokens=len(request.prompt_token_ids), prefix_hit_tokens=reservation.num_cached_tokens)
        return reservation

    def Generate(self, request, context):
        try:
            stream = self._stream_for(request)
        except (EngineError, TransferError, ValueError) as exc:
            abort_on_error(context, exc)
        context.add_callback(lambda: self._cancel(request.request_id))
        try:
            while True:
                try:
                    output = stream.get(timeout=0.5)
                except queue.Empty:
                    if not context.is_active():
                        return
                    continue
                if output.finished:  # counted first: the client may close the stream on the last message
                    self.counters.add(
                        requests_finished=1,
                        generated_tokens=output.num_output_tokens,
                        prefix_hit_tokens=0 if request.reserved else output.num_cached_tokens,
                    )
                yield output_to_wire(output)
                if output.finished:
                    return
        except RequestFailed as exc:
            context.abort(grpc.StatusCode.ABORTED, str(exc))

    def _stream_for(self, request):
        if request.reserved:
            claimed = self.loop.call(lambda engine: self._unclaimed.pop(request.request_id, None))
            if claimed is None:
                raise TransferError(
                    f"no reservation {request.request_id!r} waiting for its client on this worker", "NOT_FOUND"
                )
            return claimed[0]
        params = sampling_params_from_wire(request.params)
        self.counters.add(prompt_tokens=len(request.prompt_token_ids))
        return self.loop.add_request(request.request_id, list(request.prompt_token_ids), params)

    def Abort(self, request, context):
        return common_pb2.AbortResponse(found=self._cancel(request.request_id))

    def transfer_state(self) -> tuple[int, int]:
        return self.inbox.in_flight, self.inbox.leases_expired

    # -- reservations ending ----------------------------------------------------------------------

    def _cancel(self, request_id: str) -> bool:
        if self._abort_inbound(request_id, "aborted by the client"):
            return True
        return self.loop.abort(request_id)

    def _abort_inbound(self, request_id: str, reason: str) -> bool:
        """Any thread: stop a reservation whose KV has not landed; the sweep frees its blocks."""
        inbound = self.inbox.abort(request_id, reason)
        return inbound is not None and inbound.state is InboundState.ABORTED

    def _on_commit(self, request_id: str, first_token_id: int, first_logprob) -> None:
        """Transport thread: all KV landed and verified; the engine adopts it."""
        logprob = logprob_from_wire(first_logprob)
        inbound = self.inbox.get(request_id)
        if inbound is not None:
            self.counters.add(
                kv_transfers_completed=1,
                kv_transfer_bytes=inbound.bytes_received,
                kv_transfer_seconds=time.monotonic() - inbound.opened_at,
            )

        def adopt(engine: Engine) -> None:
            self.inbox.forget(request_id)
            if request_id in engine.requests:
                engine.complete_reservation(request_id, first_token_id, logprob)

        self.loop.submit(adopt)

    def after_step(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        """Engine thread: expire leases, fail streams of stopped reservations, free their blocks when safe."""
        now = time.monotonic()
        self.inbox.expire(now)
        for inbound in self.inbox.stopped():
            if not inbound.client_told:
                inbound.client_told = True
                self.counters.add(kv_transfers_failed=1)
                stream = self.loop.detach(inbound.request_id)
                if stream is not None:
                    stream.put(RequestFailed(inbound.reason))
            if now >= inbound.release_time:
                engine.abort(inbound.request_id)
                self.inbox.forget(inbound.request_id)
        if now >= self._next_sweep:
            self._next_sweep = now + 1.0
            self._sweep_unclaimed(engine, now)

    def _sweep_unclaimed(self, engine: Engine, now: float) -> None:
        """Engine thread: drop streams of reservations that ended more than the TTL ago, unclaimed."""
        for request_id, (stream, ended_at) in list(self._unclaimed.items()):
            if request_id in engine.requests:
                continue
            if ended_at is None:
                self._unclaimed[request_id] = (stream, now)
            elif now - ended_at > UNCLAIMED_STREAM_TTL_S:
                del self._unclaimed[request_id]
