"""The prefill worker: computes a prompt's KV and pushes each layer to the decode worker as soon as
that layer is computed, then returns the first sampled token.

Which blocks leave after layer ``l`` of a chunk covering positions [start, end)::

    prompt blocks:  [ cached on D | ..... sent already ..... | sendable now | not computed yet ]
                    0             ^ticket.num_cached/bs      ^sent[l]       ^end//bs (or all, at the last chunk)
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc

from contract import tracing
from contract.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import EngineError, InvalidRequestError
from engine.loop import RequestFailed
from engine.output import RequestOutput
from kv_transfer.errors import TransferError
from kv_transfer.grpc_transport import GrpcKVSender
from kv_transfer.sender import KVSender, OutboundSession
from protos import common_pb2, prefill_pb2, prefill_pb2_grpc
from worker_server.base import WorkerBase, abort_on_error, logprob_to_wire
from worker_server.tracing import LayerPushes

log = logging.getLogger(__name__)

COMMIT_TIMEOUT_S = 30.0
RELEASE_TIMEOUT_S = 10.0
# layer: push each layer as soon as it is computed. request: push every layer once the whole prompt
# is computed (the baseline that `splitserve bench transfer` compares layer-by-layer against).
PUSH_MODES = ("layer", "request")


@dataclass
class Outbound:
    """Engine-thread bookkeeping of one request's push."""

    session: OutboundSession
    prompt_len: int
    sent: list[int]  # per layer: prompt blocks [0, sent[l]) are on their way or cached on D
    last_layer_done: float = 0.0
    pushes: LayerPushes | None = None  # while tracing: each layer push's timing, for its span


class PrefillWorker(WorkerBase, prefill_pb2_grpc.PrefillWorkerServicer):
    role = "prefill"
    service_names = ("splitserve.PrefillWorker",)

    def __init__(
        self,
        config: EngineConfig,
        transport: str = "grpc",
        verify_checksums: bool = True,
        push_mode: str = "layer",
        kv_bulk: bool = True,
        **kwargs,
    ) -> None:
        if push_mode not in PUSH_MODES:
            raise ValueError(f"unknown push mode {push_mode!r}; use {' or '.join(PUSH_MODES)}")
        super().__init__(config, **kwargs)
        self.transport = transport
        self.push_mode = push_mode
        self.kv_bulk = kv_bulk
        self.sender = self._make_sender(transport, verify_checksums)
        self._outbound: dict[str, Outbound] = {}  # engine thread only
        # Engine thread only: per request, source blocks a transport may still read (one reference
        # each push), dropped when the Prefill RPC learnt the transport stopped reading (_transfer_done).
        self._source_refs: dict[str, list[int]] = {}

    def _make_sender(self, transport: str, verify: bool) -> KVSender:
        if transport == "grpc":
            staged = self.engine.kv_cache.data.is_cuda  # stage VRAM through pinned host buffers
            if self.kv_bulk and not staged:  # KV bytes over plain TCP where the decode worker offers it
                from kv_transfer.bulk_transport import BulkKVSender

                return BulkKVSender(self.layout, self.worker_id, verify=verify, auth=self.auth)
            return GrpcKVSender(self.layout, self.worker_id, verify=verify, staged=staged, auth=self.auth)
        if transport == "nixl":
            from kv_transfer.nixl_transport import NixlKVSender

            return NixlKVSender(
                self.layout, self.worker_id, self.engine.kv_cache, self.unique_name, verify=verify, auth=self.auth
            )
        raise ValueError(f"unknown transport {transport!r}; use grpc or nixl")

    def add_services(self, server: grpc.Server) -> None:
        prefill_pb2_grpc.add_PrefillWorkerServicer_to_server(self, server)

    def stop(self, grace: float = 1.0) -> None:
        super().stop(grace)
        self.sender.close()

    # -- RPCs -------------------------------------------------------------------------------------

    @tracing.server_span("splitserve.PrefillWorker/Prefill")
    def Prefill(self, request, context):
        started = time.perf_counter()
        session = None
        try:
            if not request.HasField("ticket"):
                raise InvalidRequestError("a prefill needs the decode worker's ticket")
            # Resumed output (migration) is replayed as this request's own: the token sampled is the one after it.
            resumed = len(request.resume_token_ids)
            params = dataclasses.replace(SamplingParams.from_wire(request.params), max_tokens=resumed + 1)
            self.sender.peer(request.ticket)  # handshake first: a layout mismatch explains a block-count mismatch
            pushed_tokens = len(request.prompt_token_ids) + resumed
            expected_blocks = -(-pushed_tokens // self.config.block_size)
            if len(request.ticket.block_ids) != expected_blocks:
                raise InvalidRequestError(
                    f"ticket has {len(request.ticket.block_ids)} blocks for a prompt of {expected_blocks}"
                )
            session = self.sender.open(request.request_id, request.ticket, tracing.outgoing_metadata())
            outbound = Outbound(
                session,
                pushed_tokens,
                [request.ticket.num_cached_tokens // self.config.block_size] * self.engine.model_config.num_layers,
                pushes=LayerPushes.if_tracing(self.transport, self.engine.kv_cache.layout.region_bytes),
            )
            stream = self.loop.call(lambda engine: self._start(engine, request, params, outbound))
            # Runs when the RPC ends, however it ends: only a request that did not commit has anything to abort.
            committed = threading.Event()
            context.add_callback(lambda: committed.is_set() or self._cancel(request.request_id, session))
            output = self._await_first_token(stream, session, context)
            first_logprob = logprob_to_wire(output.logprobs[0]) if output.logprobs else None
            with tracing.start_span("kv.commit", kind="client"):  # until D accepted the KV: the exposed transfer
                session.commit(output.token_ids[0], first_logprob, COMMIT_TIMEOUT_S)
            committed.set()
        except (EngineError, TransferError, ValueError) as exc:
            if session is not None:
                self.counters.add(kv_transfers_failed=1)
                self._cancel(request.request_id, session, str(exc))
            abort_on_error(context, exc)
        finally:
            if session is not None:
                self._transfer_done(request.request_id, session)
                if outbound.pushes is not None:
                    outbound.pushes.emit_after(context)
        done = time.perf_counter()
        self.counters.add(
            kv_transfers_completed=1,
            kv_transfer_bytes=session.bytes_sent,
            kv_transfer_seconds=done - outbound.last_layer_done,
            requests_finished=1,
            generated_tokens=1,
        )
        response = prefill_pb2.PrefillResponse(
            first_token_id=output.token_ids[0],
            num_cached_tokens=output.num_cached_tokens,
            kv_bytes_sent=session.bytes_sent,
            prefill_ms=(outbound.last_layer_done - started) * 1000.0,
            exposed_transfer_ms=(done - outbound.last_layer_done) * 1000.0,
        )
        if first_logprob is not None:
            response.first_logprob.CopyFrom(first_logprob)
        tracing.annotate(
            request_id=request.request_id,
            prompt_tokens=outbound.prompt_len,
            cached_tokens=output.num_cached_tokens,
            kv_bytes_sent=session.bytes_sent,
            transport=self.transport,
        )
        return response

    def _start(self, engine: Engine, request, params, outbound: Outbound):
        engine.add_request(request.request_id, list(request.prompt_token_ids), params, list(request.resume_token_ids))
        self._outbound[request.request_id] = outbound
        self.counters.add(prompt_tokens=outbound.prompt_len)
        return self.loop.watch(request.request_id)

    def _await_first_token(self, stream, session: OutboundSession, context) -> RequestOutput:
        while True:
            if session.failed is not None:
                raise TransferError(session.failed, "ABORTED")
            if not context.is_active():
                raise TransferError("client cancelled", "CANCELLED")
            try:
                output = stream.get(timeout=0.05)
            except queue.Empty:
                continue
            except RequestFailed as exc:  # the engine failed this request (engine/loop.py)
                raise TransferError(str(exc), "ABORTED") from exc
            if output.finish_reason == "abort":
                raise TransferError(session.failed or "prefill aborted", "ABORTED")
            if output.token_ids:
                self.counters.add(prefix_hit_tokens=output.num_cached_tokens)
                return output

    def _cancel(self, request_id: str, session: OutboundSession, reason: str = "aborted by the client") -> bool:
        found = self.loop.abort(request_id)
        if session.failed is None:
            session.abort(reason)
        return found

    def Abort(self, request, context):
        outbound = self.loop.call(lambda engine: self._outbound.get(request.request_id))
        if outbound is None:
            return common_pb2.AbortResponse(found=self.loop.abort(request.request_id))
        return common_pb2.AbortResponse(found=self._cancel(request.request_id, outbound.session))

    def transfer_state(self) -> tuple[int, int]:
        return len(self._outbound), 0  # a dict's length, read without waiting for the engine's step

    def _transfer_done(self, request_id: str, session: OutboundSession) -> None:
        """RPC thread, once the request's transfer ended either way: wait (here, never on the engine
        thread) until the transport reads none of our blocks, then let the engine thread drop the
        references that kept them."""
        session.close(RELEASE_TIMEOUT_S)
        if session.reads_after_push:
            self.loop.submit(lambda engine: self._drop_source_refs(engine, request_id))

    def _drop_source_refs(self, engine: Engine, request_id: str) -> None:
        self._outbound.pop(request_id, None)  # nothing more is pushed for it, so nothing more is held
        held = self._source_refs.pop(request_id, [])
        if held:
            engine.allocator.free(held)

    # -- engine-thread hooks ----------------------------------------------------------------------

    def on_layer_done(self, plan, layer: int, ready) -> None:
        """``ready`` completes behind this layer's K/V writes, so behind every earlier layer's too."""
        bs = self.config.block_size
        for chunk in plan.chunks:
            outbound = self._outbound.get(chunk.request_id)
            if outbound is None or outbound.session.failed is not None:
                continue
            end = chunk.start + len(chunk.token_ids)
            last = -(-outbound.prompt_len // bs) if end >= outbound.prompt_len else end // bs
            prompt_computed = layer == len(outbound.sent) - 1 and end >= outbound.prompt_len
            if prompt_computed:
                outbound.last_layer_done = time.perf_counter()  # stamped before the push: pushing is transfer time
            if self.push_mode == "layer":
                layers = [layer]
            else:
                layers = range(len(outbound.sent)) if prompt_computed else []
            for pushed in layers:
                first = outbound.sent[pushed]
                if last > first:
                    src = chunk.block_ids[first:last]
                    if outbound.session.reads_after_push:  # the request may end before the transport read them
                        self.engine.allocator.acquire(src)
                        self._source_refs.setdefault(chunk.request_id, []).extend(src)
                    dst = outbound.session.ticket.block_ids[first:last]
                    pushing = time.time_ns() if outbound.pushes is not None else 0
                    outbound.session.push_layer(self.engine.kv_cache, pushed, src, dst, ready)
                    if outbound.pushes is not None:
                        outbound.pushes.record(pushed, len(src), pushing)
                    outbound.sent[pushed] = last

    def after_step(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        """A finished request's blocks may be reused at once: those a transport still reads carry an
        extra reference (``_source_refs``) until the transport is done with them."""
        for output in outputs:
            if output.finished:
                self._outbound.pop(output.request_id, None)
