"""The prefill worker: computes a prompt's KV and pushes each layer to the decode worker as soon as
that layer is computed, then returns the first sampled token.

The decode worker's ticket (its blocks for the prompt) comes with the Prefill call, or, with
``ticket_follows``, in a SendTicket call once the decode worker has reserved: the router then
reserves while this worker computes, rather than before. Until the ticket comes nothing is pushed;
when it does, every layer's blocks computed so far go at once, and a prompt computed before it came
keeps its blocks held meanwhile::

    router:   Prefill ─┬──────────────────── SendTicket ──────────── first token
                       └─ Reserve on D ─────┘
    this worker:  [chunk 0 ][chunk 1 ][chunk 2 ]    push layers 0..L of chunks 0-2 │ commit

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
from dataclasses import dataclass, field

import grpc

from contract import tracing
from contract.sampling import SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import EngineError, InvalidRequestError
from engine.layer_ready import LayerReady, record_layer_ready
from engine.loop import RequestFailed
from engine.output import RequestOutput
from kv_transfer.errors import TransferError
from kv_transfer.grpc_transport import GrpcKVSender
from kv_transfer.sender import KVSender, OutboundSession
from protos import common_pb2, decode_pb2, prefill_pb2, prefill_pb2_grpc
from worker_server.base import WorkerBase, abort_on_error, logprob_to_wire, status_of
from worker_server.calls import serve_calls
from worker_server.tracing import LayerPushes

log = logging.getLogger(__name__)

COMMIT_TIMEOUT_S = 30.0
RELEASE_TIMEOUT_S = 10.0
TICKET_WAIT_S = 30.0  # a prefill started with ticket_follows fails if its ticket has not come by then
_TICKET_POLL_S = 0.05
# layer: push each layer as soon as it is computed. request: push every layer once the whole prompt
# is computed (the baseline that `splitserve bench transfer` compares layer-by-layer against).
PUSH_MODES = ("layer", "request")


@dataclass
class Outbound:
    """Engine-thread bookkeeping of one request's push."""

    session: OutboundSession | None  # None until the ticket comes (ticket_follows)
    prompt_len: int
    sent: list[int]  # per layer: prompt blocks [0, sent[l]) are on their way or cached on D
    last_layer_done: float = 0.0
    pushes: LayerPushes | None = None  # while tracing: each layer push's timing, for its span
    # Before the ticket came: the prompt tokens computed in every layer, this worker's blocks for them, and
    # how often the request had been preempted then (a preemption since frees those blocks: nothing is computed).
    computed_tokens: int = 0
    computed_blocks: list[int] = field(default_factory=list)
    computed_preemptions: int = 0


@dataclass
class _TicketSlot:
    """Where a SendTicket call leaves the ticket of a prefill started with ``ticket_follows``."""

    arrived: threading.Event = field(default_factory=threading.Event)
    ticket: decode_pb2.Ticket | None = None
    created: float = field(default_factory=time.monotonic)


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
        self._num_layers = self.engine.model_config.num_layers
        self._tickets: dict[str, _TicketSlot] = {}  # request id -> its ticket, once sent (self._tickets_lock)
        self._tickets_lock = threading.Lock()

    def _make_sender(self, transport: str, verify: bool) -> KVSender:
        if transport == "grpc":
            staged = self.engine.kv_cache.data.is_cuda  # stage VRAM through pinned host buffers
            if self.kv_bulk:  # KV bytes over plain TCP where the decode worker offers it
                from kv_transfer.bulk_transport import BulkKVSender

                return BulkKVSender(self.layout, self.worker_id, verify=verify, auth=self.auth, staged=staged)
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
        session = outbound = None
        follows = request.ticket_follows
        try:
            if follows == request.HasField("ticket"):
                raise InvalidRequestError(
                    "ticket and ticket_follows exclude each other"
                    if follows
                    else "a prefill needs the decode worker's ticket (or ticket_follows)"
                )
            # Resumed output (migration) is replayed as this request's own: the token sampled is the one after it.
            # min_tokens capped alike: it holds back that token's EOS exactly when the request's would.
            resumed = len(request.resume_token_ids)
            params = SamplingParams.from_wire(request.params)
            params = dataclasses.replace(
                params,
                max_tokens=resumed + 1,
                min_tokens=min(params.min_tokens, resumed + 1),
                max_tokens_defaulted=False,
            )
            pushed_tokens = len(request.prompt_token_ids) + resumed
            if not follows:
                session = self._open_session(request.request_id, request.ticket, pushed_tokens)
            outbound = Outbound(
                session,
                pushed_tokens,
                self._first_unsent(session) if session is not None else [],
                pushes=LayerPushes.if_tracing(self.transport, self.engine.kv_cache.layout.region_bytes),
            )
            stream = self.loop.call(lambda engine: self._start(engine, request, params, outbound, context))
            # Runs when the RPC ends, however it ends: only a request that did not commit has anything to abort. gRPC
            # runs it on the one thread that takes every call's events, which must not wait there for the engine's
            # step or the decode worker's answer to the abort: a thread of its own does.
            committed = threading.Event()
            cancel = lambda: committed.is_set() or self._cancel_apart(request.request_id, outbound)  # noqa: E731
            if not context.add_callback(cancel):  # the call ended while its start waited for a step: none will run
                cancel()
            if follows:
                session = self._open_session(
                    request.request_id, self._await_ticket(request.request_id, context), pushed_tokens
                )
                self.loop.call(lambda engine: self._attach(engine, request.request_id, outbound, session))
            output = self._await_first_token(stream, session, context)
            first_logprob = logprob_to_wire(output.logprobs[0]) if output.logprobs else None
            with tracing.start_span("kv.commit", kind="client"):  # until D accepted the KV: the exposed transfer
                session.commit(output.token_ids[0], first_logprob, COMMIT_TIMEOUT_S)
            committed.set()
        except (EngineError, TransferError, ValueError) as exc:
            if outbound is not None:  # a caller gone (its client left) failed no transfer
                self.counters.add(**{"kv_transfers_failed" if context.is_active() else "kv_transfers_cancelled": 1})
                self._cancel(request.request_id, session, str(exc))
            abort_on_error(context, exc)
        finally:
            if follows:  # the slot goes with the call (a ticket sent again meanwhile is refused, not orphaned)
                with self._tickets_lock:
                    self._tickets.pop(request.request_id, None)
            if outbound is not None:
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

    def SendTicket(self, request, context):
        """The ticket of a prefill started with ``ticket_follows``; it may come before that Prefill call."""
        if not request.request_id or not request.HasField("ticket"):
            abort_on_error(context, InvalidRequestError("SendTicket needs a request_id and a ticket"))
        slot = self._ticket_slot(request.request_id)
        with self._tickets_lock:
            if slot.ticket is not None:
                abort_on_error(
                    context, TransferError(f"request {request.request_id} has its ticket already", "ALREADY_EXISTS")
                )
            slot.ticket = request.ticket
        slot.arrived.set()
        return prefill_pb2.TicketAccepted()

    def Calls(self, requests, context):
        """Prefill and SendTicket calls over one stream (worker_server/calls.py)."""
        handlers = {"prefill": (self.Prefill, "prefill"), "ticket": (self.SendTicket, "accepted")}
        return serve_calls(requests, context, handlers, prefill_pb2.PrefillAnswer, self.rpc_threads)

    def _ticket_slot(self, request_id: str) -> _TicketSlot:
        """The request's slot, made by whichever of Prefill and SendTicket comes first. Slots older than
        twice the wait (a ticket whose Prefill never came) go."""
        with self._tickets_lock:
            now = time.monotonic()
            for stale in [r for r, slot in self._tickets.items() if now - slot.created > 2 * TICKET_WAIT_S]:
                del self._tickets[stale]
            return self._tickets.setdefault(request_id, _TicketSlot())

    def _await_ticket(self, request_id: str, context) -> decode_pb2.Ticket:
        slot = self._ticket_slot(request_id)
        deadline = time.monotonic() + TICKET_WAIT_S
        while not slot.arrived.wait(_TICKET_POLL_S):
            if not context.is_active():
                raise TransferError("client cancelled", "CANCELLED")
            if time.monotonic() > deadline:
                raise TransferError(f"no ticket for {request_id} came within {TICKET_WAIT_S:g} s", "DEADLINE_EXCEEDED")
        return slot.ticket

    def _open_session(self, request_id: str, ticket: decode_pb2.Ticket, pushed_tokens: int) -> OutboundSession:
        self.sender.peer(ticket, request_id)  # handshake first: a layout mismatch explains a block-count mismatch
        expected_blocks = -(-pushed_tokens // self.config.block_size)
        if len(ticket.block_ids) != expected_blocks:
            raise InvalidRequestError(f"ticket has {len(ticket.block_ids)} blocks for a prompt of {expected_blocks}")
        return self.sender.open(request_id, ticket, tracing.outgoing_metadata())

    def _first_unsent(self, session: OutboundSession) -> list[int]:
        """Per layer, the first block to push: the ones before it are cached on D."""
        return [session.ticket.num_cached_tokens // self.config.block_size] * self._num_layers

    def _start(self, engine: Engine, request, params, outbound: Outbound, context):
        """Adds the request, unless its call ended while this waited for the engine's step (its client left: a long
        prompt's step takes seconds), when nothing is computed for nobody."""
        if not context.is_active():
            raise TransferError("the call ended before its prefill started", "CANCELLED")
        engine.add_request(
            request.request_id,
            list(request.prompt_token_ids),
            params,
            list(request.resume_token_ids),
            request.priority,
        )
        self._outbound[request.request_id] = outbound
        self.counters.add(prompt_tokens=outbound.prompt_len)
        return self.loop.watch(request.request_id)

    def _await_first_token(self, stream, session: OutboundSession, context) -> RequestOutput:
        while True:
            if session.failed is not None:
                raise session.failure()  # a lost link stays UNAVAILABLE naming the receiver, whenever it is noticed
            if not context.is_active():
                raise TransferError("client cancelled", "CANCELLED")
            try:
                output = stream.get(timeout=0.05)
            except queue.Empty:
                continue
            except RequestFailed as exc:  # the engine failed this request (engine/loop.py)
                raise TransferError(str(exc), status_of(exc)[0].name) from exc
            if output.finish_reason == "abort":
                raise session.failure() if session.failed else TransferError("prefill aborted", "ABORTED")
            if output.token_ids:
                self.counters.add(prefix_hit_tokens=output.num_cached_tokens)
                return output

    def _cancel_apart(self, request_id: str, outbound: Outbound) -> None:
        """``_cancel`` on a thread of its own (it waits for the engine and for the decode worker)."""
        threading.Thread(
            target=lambda: self._cancel(request_id, outbound.session), name=f"cancel-{request_id}", daemon=True
        ).start()

    def _cancel(self, request_id: str, session: OutboundSession | None, reason: str = "aborted by the client") -> bool:
        found = self.loop.abort(request_id)
        if session is not None and session.failed is None:
            session.abort(reason)
        return found

    def Abort(self, request, context):
        outbound = self.loop.call(lambda engine: self._outbound.get(request.request_id))
        if outbound is None:
            return common_pb2.AbortResponse(found=self.loop.abort(request.request_id))
        return common_pb2.AbortResponse(found=self._cancel(request.request_id, outbound.session))

    def transfer_state(self) -> tuple[int, int]:
        return len(self._outbound), 0  # a dict's length, read without waiting for the engine's step

    def _transfer_done(self, request_id: str, session: OutboundSession | None) -> None:
        """RPC thread, once the request's transfer ended either way: wait (here, never on the engine
        thread) until the transport reads none of our blocks, then let the engine thread drop the
        references that kept them (a transport's that reads after the push, or a prompt's computed
        before its ticket came)."""
        if session is not None:
            session.close(RELEASE_TIMEOUT_S)
        self.loop.post(
            lambda engine: self._drop_source_refs(engine, request_id), f"releasing {request_id}'s source blocks"
        )

    def _drop_source_refs(self, engine: Engine, request_id: str) -> None:
        self._outbound.pop(request_id, None)  # nothing more is pushed for it, so nothing more is held
        held = self._source_refs.pop(request_id, [])
        if held:
            engine.allocator.free(held)

    # -- engine-thread hooks ----------------------------------------------------------------------

    def on_layer_done(self, plan, layer: int, ready) -> None:
        """``ready`` completes behind this layer's K/V writes, so behind every earlier layer's too."""
        for chunk in plan.chunks:
            outbound = self._outbound.get(chunk.request_id)
            if outbound is None or (outbound.session is not None and outbound.session.failed is not None):
                continue
            end = chunk.start + len(chunk.token_ids)
            last = self._sendable_blocks(outbound, end)
            prompt_computed = layer == self._num_layers - 1 and end >= outbound.prompt_len
            if prompt_computed:
                outbound.last_layer_done = time.perf_counter()  # stamped before the push: pushing is transfer time
            if outbound.session is None:  # no ticket yet: what to push once it comes
                if layer == self._num_layers - 1:
                    outbound.computed_tokens, outbound.computed_blocks = end, list(chunk.block_ids[:last])
                    outbound.computed_preemptions = self.engine.requests[chunk.request_id].num_preemptions
                if prompt_computed:  # the request ends with this step: its blocks wait for the ticket
                    self._hold(chunk.request_id, outbound.computed_blocks)
                continue
            if self.push_mode == "layer":
                layers = [layer]
            else:
                layers = range(self._num_layers) if prompt_computed else []
            for pushed in layers:
                self._push(chunk.request_id, outbound, chunk.block_ids, pushed, last, ready)

    def _attach(self, engine: Engine, request_id: str, outbound: Outbound, session: OutboundSession) -> None:
        """Engine thread, between steps: the ticket came. Every layer's blocks computed so far go now (in
        request push mode only once the whole prompt is computed); later layers as they are computed."""
        if self._outbound.get(request_id) is not outbound:
            return  # aborted meanwhile
        outbound.sent, outbound.session = self._first_unsent(session), session
        request = engine.requests.get(request_id)  # None: finished, its blocks held since its prompt was computed
        preempted = request is not None and request.num_preemptions != outbound.computed_preemptions
        end = 0 if preempted else outbound.computed_tokens  # recomputed blocks go as they are computed again
        if not end or (self.push_mode == "request" and end < outbound.prompt_len):
            return
        ready = record_layer_ready(engine.kv_cache.data.device)  # behind every step computed so far
        last = self._sendable_blocks(outbound, end)
        for layer in range(self._num_layers):
            self._push(request_id, outbound, outbound.computed_blocks, layer, last, ready)

    def _sendable_blocks(self, outbound: Outbound, computed_tokens: int) -> int:
        """Prompt blocks whose KV is complete once ``computed_tokens`` are: all of them at the prompt's end."""
        bs = self.config.block_size
        return -(-outbound.prompt_len // bs) if computed_tokens >= outbound.prompt_len else computed_tokens // bs

    def _push(
        self, request_id: str, outbound: Outbound, blocks: list[int], layer: int, last: int, ready: LayerReady
    ) -> None:
        """Engine thread: pushes ``layer``'s regions of prompt blocks [sent, last) (this worker's ``blocks``)."""
        first = outbound.sent[layer]
        if last <= first:
            return
        src = blocks[first:last]
        if outbound.session.reads_after_push:  # the request may end before the transport read them
            self._hold(request_id, src)
        dst = outbound.session.ticket.block_ids[first:last]
        pushing = time.time_ns() if outbound.pushes is not None else 0
        outbound.session.push_layer(self.engine.kv_cache, layer, src, dst, ready)
        if outbound.pushes is not None:
            outbound.pushes.record(layer, len(src), pushing)
        outbound.sent[layer] = last

    def _hold(self, request_id: str, blocks: list[int]) -> None:
        """Engine thread: one more reference on ``blocks``, dropped by ``_drop_source_refs``."""
        self.engine.allocator.acquire(blocks)
        self._source_refs.setdefault(request_id, []).extend(blocks)

    def after_step(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        """A finished request's blocks may be reused at once: those a transport still reads carry an
        extra reference (``_source_refs``) until the transport is done with them."""
        for output in outputs:
            outbound = self._outbound.get(output.request_id)
            if output.finished and outbound is not None and outbound.session is not None:
                del self._outbound[output.request_id]  # one still waiting for its ticket stays, to push
