"""One request's journey through the cluster, with its failure outcomes.

prefill on P ─┬─ ticket to P ──> first token to the client ──> decode stream from D
reserve on D ─┘   (P computes while D reserves; it pushes KV once the ticket came)
   │ D full: another D          │ P fails: abort reservation, retry another P (bounded,
   │                            │          jittered backoff), else prefill locally on D
   └─ short prompt / no P ──> D prefills locally
prompt logprobs asked for ──> D prefills locally (they are computed where the prompt is prefilled)
D dies mid-stream ──> continue on another D after the tokens so far (migration): a prefill worker
    recomputes only their KV, the prompt's being in its prefix cache (policy "prefill"), or the new D
    prefills prompt + tokens itself ("local"); either way the worker resumes the output where the client
    has it (text, stop strings, penalties, max_tokens), it does not take the tokens as prompt
lease expired ──> recompute locally on D (policy "recompute") or fail ("fail")
a worker leaves the pool under a call (its channel closed) ──> that worker is lost: retry / migrate
consumer goes away ──> every in-flight call is cancelled and reservations aborted
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import grpc

from contract.errors import REFUSED_FIELD, UNREACHABLE_PEER
from engine.block_manager import compute_block_hashes
from engine.tokenizer import IncrementalDetokenizer
from protos import common_pb2, decode_pb2, prefill_pb2
from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.prefill_clock import SentPrompt
from router.routing import (
    Decision,
    NoWorkerError,
    Route,
    paired_prefills,
    prefill_cost,
    prompt_holders,
    route,
    tokens_held,
    uncached_tokens,
)
from router.tracing import request_trace
from router.workers import WorkerHandle, WorkerPool, with_reasons

if TYPE_CHECKING:
    from router.served_model import ModelBinding, ServedModel

log = logging.getLogger(__name__)

_WORKER_LOST = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


def _refused(exc: grpc.aio.AioRpcError) -> GenerationError:
    """A worker's refusal of the request: the client's 400, naming the field the worker named (``REFUSED_FIELD``) as
    the record spells it (Frontend.stream spells it as the client's API does)."""
    return GenerationError(exc.details(), 400, "invalid_request_error", _trailing(exc, REFUSED_FIELD))


def _names_unreachable_peer(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a worker's failed call blames a peer it could not reach (``UNREACHABLE_PEER``), not itself."""
    return _trailing(exc, UNREACHABLE_PEER) is not None


def _trailing(exc: grpc.aio.AioRpcError, key: str) -> str | None:
    """What a worker's failed call says under ``key`` in its trailing metadata (worker_server.base.trailing_of)."""
    return next((value for name, value in exc.trailing_metadata() or () if name == key), None)


class GenerationError(Exception):
    """A request cannot complete; ``status`` is the HTTP status to report."""

    def __init__(
        self, message: str, status: int = 503, code: str = "service_unavailable", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


def failure(exc: GenerationError | TimeoutError) -> GenerationError:
    """What ended a generation, as a GenerationError: a request's timeout is a 504 every API reports alike."""
    return exc if isinstance(exc, GenerationError) else GenerationError("request timed out", 504, "timeout")


class _DecodeLost(Exception):
    """The decode worker went away mid-stream."""


class _LeaseExpired(Exception):
    """The reservation's KV did not land before its lease ran out."""


class _DecodeFull(Exception):
    """The decode worker had no free blocks to reserve for the prompt (or held as many reservations of this router
    as it takes): a moment's state, not a refusal of the request, which the engine refuses up front if it can
    never fit."""


def _retrieve(task: asyncio.Future) -> None:
    """A task left behind (its request failed meanwhile) logs no "exception never retrieved"."""
    if not task.cancelled():
        task.exception()


def _let_go_under_call(worker: WorkerHandle) -> bool:
    """Whether a CancelledError (or UsageError) from a call on ``worker`` means the pool let the worker go under it
    (its channel closed: it left the pool; or, for a call it tracks, ``WorkerHandle.track_call``, taken out of
    routing), not that this request was cancelled: that one still propagates."""
    task = asyncio.current_task()
    return (worker.closed or worker.taken_out) and (task is None or task.cancelling() == 0)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str  # the router's own, unique: the workers know the request by it
    prompt_token_ids: tuple[int, ...]
    params: common_pb2.SamplingParams
    public_id: str = ""  # the client's name for it (X-Request-Id, gRPC's request_id), if another
    # Under scheduling_policy "priority": its place in the router's queue and the workers' queues, lower first.
    priority: int = 0
    # The record's fields the client's API spells otherwise (prompt: messages, max_tokens: max_completion_tokens):
    # a worker's refusal names them so.
    spelled: tuple[tuple[str, str], ...] = ()

    @property
    def named(self) -> str:
        """The request as log lines name it: by both ids, so that either finds it."""
        return f"{self.public_id} ({self.request_id})" if self.public_id else self.request_id


@dataclass(frozen=True)
class Delta:
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[common_pb2.TokenLogprob, ...] = ()
    finish_reason: str | None = None
    usage: common_pb2.Usage | None = None
    prompt_logprobs: tuple[common_pb2.TokenLogprob, ...] = ()  # with the first delta, when asked for
    stop_reason: str | int | None = None  # with a "stop" finish: the stop string or token id (None for EOS)
    reasoning: str = ""  # thinking split out of the text (router/reasoning.py): a chat delta's reasoning_content


@dataclass
class _Progress:
    """What the client has received so far, across retries and migrations."""

    tokens: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the prompt, in the served model's blocks
    cached_tokens: int | None = None
    attempt: int = 0
    started: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None
    first_token_at: float | None = None
    trace: object = field(default_factory=request_trace)  # the request's spans (router/tracing.py)

    def next_worker_request_id(self, request_id: str) -> str:
        self.attempt += 1
        return f"{request_id}.{self.attempt}"


class Orchestrator:
    def __init__(self, config: RouterConfig, pool: WorkerPool, model: ModelBinding, metrics: RouterMetrics) -> None:
        self.config = config
        self.pool = pool
        self.model = model  # tokenizer and block size: the served model card's
        self.metrics = metrics
        self.on_route: Callable[[str, Route], None] | None = (
            None  # told each routing decision (the dashboard's activity log); must not block
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Deltas for one request; the last one carries finish_reason and usage."""
        progress = _Progress()
        served = self.model.require()
        hashes = progress.block_hashes = compute_block_hashes(request.prompt_token_ids, served.block_size)
        exclude: set[str] = set()
        local_because = ""  # set: prefill on the decode worker, for this reason
        migrating = False  # a decode worker was lost: the route that follows, if any, is a migration
        while True:
            chosen = self._route(request, progress, hashes, served.block_size, exclude, local_because)
            if migrating:  # counted once it has a worker to move to: a move with none is no migration
                self.metrics.migrations.inc()
                migrating = False
            try:
                if chosen.decision is Decision.REMOTE_PREFILL:
                    stream = self._remote(request, chosen, progress, served)
                else:
                    stream = self._local(request, chosen.decode, progress, chosen.uncached_tokens)
                async for delta in stream:
                    yield self._observe(delta, progress, request)
                return
            except _DecodeLost as exc:
                chosen.decode.mark_failed(f"lost under a request: {exc}")
                exclude.add(chosen.decode.address)
                if len(exclude) > self.config.migration_retries:
                    raise GenerationError(f"decode workers lost mid-request: {exc}") from exc
                migrating = True
                progress.trace.event("migration", lost_worker=chosen.decode.address, tokens_so_far=len(progress.tokens))
                log.warning(
                    "request %s: decode worker %s lost after %d tokens; migrating",
                    request.named,
                    chosen.decode.address,
                    len(progress.tokens),
                )
            except _LeaseExpired as exc:
                self.metrics.lease_expirations.inc()
                progress.trace.event("lease_expired", worker=chosen.decode.address, policy=self.config.lease_policy)
                if self.config.lease_policy == "fail":
                    raise GenerationError(f"KV transfer did not complete in time: {exc}", 503) from exc
                local_because = "recompute locally"
            except _DecodeFull as exc:
                # A reservation needs its blocks now; a request in the decode engine's own queue waits for them. So the
                # request is prefilled where it decodes, once blocks free, rather than refused while they are taken.
                progress.trace.event("decode_full", worker=chosen.decode.address)
                log.info("request %s: %s; prefilling on a decode worker", request.named, exc)
                local_because = "decode worker full"

    def _route(
        self, request, progress: _Progress, hashes, block_size: int, exclude: set[str], local_because: str
    ) -> Route:
        try:
            prompt_len = len(request.prompt_token_ids) + len(progress.tokens)
            params = request.params
            tokens = tokens_held(
                len(request.prompt_token_ids), len(progress.tokens), params.max_tokens, params.max_tokens_defaulted
            )
            decodes, prefills = self.pool.of_role("decode"), self.pool.of_role("prefill")
            chosen = route(decodes, prefills, prompt_len, hashes, block_size, self.config, exclude, tokens=tokens)
        except NoWorkerError as exc:
            raise GenerationError(with_reasons(str(exc), self.pool.unavailable("decode")), 503) from exc
        local_migration = progress.tokens and self.config.migration_policy == "local"
        if (local_because or local_migration) and chosen.decision is Decision.REMOTE_PREFILL:
            reason = local_because or "recompute locally"
            chosen = Route(Decision.FALLBACK, chosen.decode, None, chosen.uncached_tokens, reason)
        elif (
            request.params.HasField("prompt_logprobs")
            and not progress.tokens
            and chosen.decision is Decision.REMOTE_PREFILL
        ):
            # Prompt logprobs need the logits of every prompt position: the worker that prefills computes them.
            reason = "prompt logprobs are computed where the prompt is prefilled"
            chosen = Route(Decision.LOCAL_PREFILL, chosen.decode, None, chosen.uncached_tokens, reason)
        self.metrics.decisions_by(chosen.decision.value).inc()
        if self.on_route is not None:
            self.on_route(request.request_id, chosen)
        progress.trace.routed(chosen, hashes)
        return chosen

    # -- the two paths ----------------------------------------------------------------------------

    async def _local(
        self, request: GenerationRequest, decode: WorkerHandle, progress: _Progress, uncached: int
    ) -> AsyncIterator[Delta]:
        """D prefills (``uncached`` tokens of it not in D's prefix cache) and decodes; resumes the output after
        ``progress.tokens`` when migrating."""
        worker_request = decode_pb2.GenerateRequest(
            request_id=progress.next_worker_request_id(request.request_id),
            prompt_token_ids=request.prompt_token_ids,
            params=_worker_params(request, progress),
            resume_token_ids=progress.tokens,
            priority=request.priority,
        )
        decode.active += 1
        prefilled = decode.queue_prefill(uncached)
        call, finished = None, False
        try:
            call = self._open_generate(decode, worker_request, progress)
            async for delta in self._decode_stream(decode, call, skip_first=False):
                prefilled()
                yield delta
            finished = True
        finally:
            decode.active -= 1
            prefilled()
            # Closed before the stream finished (the client left: its stream closed, not cancelled mid-await): the
            # worker stops decoding for nobody. Dropped unfinished, the call would run on to max_tokens.
            if call is not None:
                _end_call(call, finished)

    async def _remote(
        self, request: GenerationRequest, chosen: Route, progress: _Progress, served: ServedModel
    ) -> AsyncIterator[Delta]:
        decode, prefill = chosen.decode, chosen.prefill
        resumed = tuple(progress.tokens)  # migrating: P computes these tokens' KV too and samples the next one
        tried: set[str] = set()
        for attempt in range(self.config.prefill_retries + 1):
            worker_id = progress.next_worker_request_id(request.request_id)
            # On P's clock from the routing decision (no await since) until P reports it computed (``_prefill``).
            pushed = len(resumed) + len(request.prompt_token_ids)
            uncached = uncached_tokens(prefill, progress.block_hashes, pushed, served.block_size)
            sent = prefill.prefill_clock.send(uncached, time.monotonic())
            # P computes while D reserves: the ticket follows the prefill (a Reserve waits for D's step to end).
            prefilling = asyncio.ensure_future(self._prefill(prefill, decode, worker_id, request, progress, sent))
            prefilling.add_done_callback(_retrieve)
            reserving = asyncio.ensure_future(self._reserve(decode, worker_id, request, progress))
            try:
                ticket = await asyncio.shield(reserving)  # a Reserve under way when the client leaves still ends
                reserved = decode_pb2.GenerateRequest(request_id=worker_id, reserved=True, token=ticket.token)
                decode_call = self._open_generate(decode, reserved, progress)
            except BaseException:
                prefilling.cancel()
                reserving.add_done_callback(lambda done: self._abort_reserved(decode, worker_id, done))
                raise
            decode.active += 1
            finished = False
            try:
                first = await self._send_ticket(prefill, worker_id, ticket, prefilling)
                if first is None:
                    decode_call.cancel()
                    asyncio.ensure_future(self._abort(decode, worker_id, ticket.token))
                    tried.add(prefill.address)
                    prefill = self._another_prefill(request, progress, decode, tried, pushed, served.block_size)
                    if prefill is None:
                        break
                    self.metrics.prefill_retries.inc()
                    progress.trace.event("prefill_retry", attempt=attempt + 1, worker=prefill.address)
                    await asyncio.sleep(self.config.retry_backoff_s * (2**attempt) * (0.5 + random.random()))
                    continue
                progress.cached_tokens = first.num_cached_tokens
                self.metrics.kv_transfer_seconds.labels(ticket.transport).observe(first.exposed_transfer_ms / 1000.0)
                first_delta = self._first_delta(first, request, served, resumed=bool(resumed))
                yield first_delta
                async for delta in self._decode_stream(
                    decode, decode_call, skip_first=True, first_text_sent=bool(first_delta.text)
                ):
                    yield delta
                finished = True
                return
            finally:
                decode.active -= 1
                if not _end_call(decode_call, finished):
                    asyncio.ensure_future(self._abort(decode, worker_id, ticket.token))
        # Taken out meanwhile (often why the prefill failed): routed again, without it, rather than prefilled there.
        if decode.taken_out or decode.closed:
            raise _DecodeLost(f"decode worker {decode.address} was taken out of routing: {decode.down_reason}")
        log.warning("request %s: prefill failed on every worker tried; prefilling on the decode worker", request.named)
        self.metrics.decisions_by(Decision.FALLBACK.value).inc()
        async for delta in self._local(request, decode, progress, chosen.uncached_tokens):
            yield delta

    def _open_generate(self, decode: WorkerHandle, worker_request: decode_pb2.GenerateRequest, progress: _Progress):
        span = progress.trace.call("decode", decode, worker_request.request_id)
        try:
            call = decode.generate(worker_request, self.config.request_timeout_s, span.metadata)
        except grpc.aio.UsageError as exc:  # the pool closed its channel since it was routed to
            span.end()
            raise _DecodeLost(f"decode worker {decode.address} left the pool") from exc
        progress.trace.end_when_done(span, call)
        decode.track_call(call)
        return call

    async def _reserve(
        self, decode: WorkerHandle, worker_id: str, request: GenerationRequest, progress: _Progress
    ) -> decode_pb2.Ticket:
        span = progress.trace.call("reserve", decode, worker_id)
        try:
            call = decode.call(
                "Reserve",
                decode_pb2.ReserveRequest(
                    request_id=worker_id,
                    prompt_token_ids=request.prompt_token_ids,
                    params=_worker_params(request, progress),
                    lease_ms=self.config.lease_ms,
                    resume_token_ids=progress.tokens,
                    priority=request.priority,
                ),
                timeout=10.0,
                metadata=span.metadata,
            )
            decode.track_call(call)
            return await call
        except grpc.aio.AioRpcError as exc:
            span.fail(f"{exc.code().name}: {exc.details()}")
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise _DecodeFull(f"decode worker {decode.address} is full: {exc.details()}") from exc
            raise self._worker_error(decode, exc) from exc
        except (asyncio.CancelledError, grpc.aio.UsageError) as exc:
            if not _let_go_under_call(decode):
                raise
            raise _DecodeLost(f"decode worker {decode.address} left routing during Reserve") from exc
        finally:
            span.end()

    async def _prefill(
        self,
        prefill: WorkerHandle,
        decode: WorkerHandle,
        worker_id: str,
        request: GenerationRequest,
        progress: _Progress,
        sent: SentPrompt,
    ) -> prefill_pb2.PrefillResponse | None:
        """The prefill's answer, or None if this prefill worker failed (the caller retries). Its ticket follows
        (``_send_ticket``), for ``decode``'s receiver. ``sent``: the prompt in the worker's PrefillClock, which its
        answer reports computed. A prefill worker that could not reach the receiver is not taken out: the link
        is marked down instead (``WorkerHandle.kv_link_failed``)."""
        prefill.active += 1
        span = progress.trace.call("prefill", prefill, worker_id)
        try:
            call = prefill.call(
                "Prefill",
                prefill_pb2.PrefillRequest(
                    request_id=worker_id,
                    prompt_token_ids=request.prompt_token_ids,
                    params=_worker_params(request, progress),
                    ticket_follows=True,
                    resume_token_ids=progress.tokens,
                    priority=request.priority,
                ),
                timeout=self.config.prefill_timeout_s,
                metadata=span.metadata,
            )
            prefill.track_call(call)  # a stalled worker taken out lets go of it at once: retried on another
            response = await call
            error = prefill.prefill_clock.computed(sent, response.prefill_ms / 1000.0)
            if error is not None:
                self.metrics.prefill_forecast_error.labels(prefill.label).observe(error)
            return response
        except (asyncio.CancelledError, grpc.aio.UsageError):
            if not _let_go_under_call(prefill):
                raise
            log.warning(
                "prefill of %s as %s on %s: the worker left the pool under the call",
                request.named,
                worker_id,
                prefill.address,
            )
            return None
        except grpc.aio.AioRpcError as exc:
            span.fail(f"{exc.code().name}: {exc.details()}")
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise _refused(exc) from exc
            if _names_unreachable_peer(exc):
                decode.kv_link_failed(prefill.address)
                self.metrics.kv_link_failures.labels(prefill.label, decode.label).inc()
                progress.trace.event("kv_link_down", prefill=prefill.address, decode=decode.address)
            elif exc.code() in _WORKER_LOST:
                prefill.mark_failed(f"Prefill failed: {exc.code().name}: {exc.details()}")
            log.warning(
                "prefill of %s as %s on %s failed: %s %s",
                request.named,
                worker_id,
                prefill.address,
                exc.code().name,
                exc.details(),
            )
            return None
        finally:
            prefill.prefill_clock.forget(sent)  # not reported computed: it will not be
            prefill.active -= 1
            span.end()

    def _abort_reserved(self, decode: WorkerHandle, worker_id: str, reserving: asyncio.Future) -> None:
        """A Reserve whose request ended while it was under way: its reservation, if it got one, goes now
        (not when its lease runs out)."""
        if reserving.cancelled() or reserving.exception() is not None:
            return
        asyncio.ensure_future(self._abort(decode, worker_id, reserving.result().token))

    async def _send_ticket(
        self, prefill: WorkerHandle, worker_id: str, ticket: decode_pb2.Ticket, prefilling: asyncio.Future
    ) -> prefill_pb2.PrefillResponse | None:
        """Hands P the ticket of the prefill it computes, then its answer (None: P failed; the caller retries)."""
        try:
            delivery = prefill_pb2.TicketDelivery(request_id=worker_id, ticket=ticket)
            call = prefill.call("SendTicket", delivery, timeout=10.0)
            prefill.track_call(call)
            await call
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and not _let_go_under_call(prefill):
                prefilling.cancel()
                raise
            if prefilling.done():  # P failed first: its own answer says how
                return prefilling.result()
            prefilling.cancel()
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _WORKER_LOST:
                prefill.mark_failed(f"SendTicket failed: {exc.code().name}: {exc.details()}")
            log.warning("ticket of %s for %s not delivered: %r", worker_id, prefill.address, exc)
            return None
        except BaseException:
            prefilling.cancel()
            raise
        return await prefilling

    def _another_prefill(
        self,
        request: GenerationRequest,
        progress: _Progress,
        decode: WorkerHandle,
        tried: set[str],
        pushed: int,
        block_size: int,
    ) -> WorkerHandle | None:
        """``pushed``: the tokens whose KV the prefill worker computes (the prompt and any output resumed)."""
        candidates = prompt_holders(paired_prefills(decode, self.pool.of_role("prefill"), tried), pushed)
        if not candidates:
            return None
        blocks = -(-len(request.prompt_token_ids) // block_size)
        hashes = progress.block_hashes
        return min(candidates, key=lambda p: (prefill_cost(p, hashes, blocks, self.config), random.random()))

    def _first_delta(
        self, first: prefill_pb2.PrefillResponse, request: GenerationRequest, served: ServedModel, resumed: bool
    ) -> Delta:
        # Without stop strings, at the start of the output and unless it is a stop token (whose text is cut, or kept
        # with include_stop_str_in_output), the decode worker's first text piece is exactly what an incremental
        # detokenizer makes of this one token, so the client gets it now rather than after decode. Special tokens are
        # skipped here whatever skip_special_tokens says: one (EOS, say) may end the request, which only the decode
        # worker knows, and an empty piece leaves the text to its first response, as does anything else.
        params = request.params
        fresh = not params.stop and not resumed and first.first_token_id not in params.stop_token_ids
        text = IncrementalDetokenizer(served.tokenizer).push(first.first_token_id) if fresh else ""
        logprobs = (first.first_logprob,) if first.HasField("first_logprob") else ()
        return Delta((first.first_token_id,), text, logprobs)

    async def _decode_stream(
        self, decode: WorkerHandle, call, skip_first: bool, first_text_sent: bool = False
    ) -> AsyncIterator[Delta]:
        """Deltas from a decode worker's Generate stream. With ``skip_first`` the first response (the
        token the prefill worker already returned) contributes only text the client has not had."""
        try:
            while (response := await call.read()) is not grpc.aio.EOF:  # read: no async iterator layer to go through
                tokens = tuple(response.token_ids)
                text, logprobs = response.text, tuple(response.logprobs)
                if skip_first and tokens:
                    skip_first = False
                    tokens, logprobs = tokens[1:], logprobs[1:]
                    if first_text_sent:
                        text = ""
                usage = response.usage if response.HasField("usage") else None
                prompt_logprobs = tuple(response.prompt_logprobs)
                stop_reason = getattr(response, response.WhichOneof("stop_reason") or "", None)
                if tokens or text or response.finish_reason or prompt_logprobs:
                    yield Delta(
                        tokens, text, logprobs, response.finish_reason or None, usage, prompt_logprobs, stop_reason
                    )
                if response.finish_reason:
                    return  # the worker's status is still to come: the call ends by itself (_end_call)
        except asyncio.CancelledError as exc:
            if not _let_go_under_call(decode):
                raise
            raise _DecodeLost(f"decode worker {decode.address} left routing mid-stream ({decode.down_reason})") from exc
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.ABORTED and "lease expired" in (exc.details() or ""):
                raise _LeaseExpired(exc.details()) from exc
            raise self._worker_error(decode, exc) from exc  # lost: _DecodeLost; a refusal: the client's 400
        raise _DecodeLost("decode stream ended without a finish")

    def _worker_error(self, worker: WorkerHandle, exc: grpc.aio.AioRpcError) -> Exception:
        code = exc.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return _refused(exc)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return GenerationError(f"decode worker {worker.address} is full: {exc.details()}", 503)
        if code in _WORKER_LOST or code == grpc.StatusCode.DEADLINE_EXCEEDED:  # a Reserve unanswered in 10 s: stalled
            worker.mark_failed(f"a call failed: {code.name}: {exc.details()}")
            return _DecodeLost(f"{code.name}: {exc.details()}")
        return GenerationError(f"{worker.role} worker error: {exc.details()}", 502, "upstream_error")

    async def _abort(self, worker: WorkerHandle, worker_request_id: str, token: str = "") -> None:
        """``token``: a reservation's ticket token (its abort needs it)."""
        try:
            await worker.abort(worker_request_id, token)
        except asyncio.CancelledError:
            if not _let_go_under_call(worker):
                raise

    def _observe(self, delta: Delta, progress: _Progress, request: GenerationRequest) -> Delta:
        """Bookkeeping per delta; completes usage on the last one. Its latency metrics are recorded when the event
        loop's turn ends: after the response this delta makes is written, not before it (``call_soon``)."""
        now = time.perf_counter()
        record = asyncio.get_running_loop().call_soon
        if delta.token_ids:
            if progress.first_token_at is None:
                progress.first_token_at = now
                record(self.metrics.first_token, now - progress.started)
            elif progress.last_token_at is not None:
                record(self.metrics.next_token, now - progress.last_token_at)
            progress.last_token_at = now
            progress.tokens.extend(delta.token_ids)
        if delta.finish_reason is None:
            return delta
        cached = (
            progress.cached_tokens
            if progress.cached_tokens is not None
            else (delta.usage.cached_tokens if delta.usage else 0)
        )
        usage = common_pb2.Usage(
            prompt_tokens=len(request.prompt_token_ids), completion_tokens=len(progress.tokens), cached_tokens=cached
        )
        progress.trace.finished(delta.finish_reason, usage.prompt_tokens, usage.completion_tokens, cached)
        tpot = None
        if len(progress.tokens) > 1 and progress.first_token_at is not None:
            tpot = (now - progress.first_token_at) / (len(progress.tokens) - 1)
        record(self.metrics.finished_request, now - progress.started, delta.finish_reason, usage, tpot)
        return replace(delta, usage=usage)


def _end_call(call, finished: bool) -> bool:
    """Leaves a Generate call that has given its finish to end by itself; cancels one that has not. True when the
    call ended or will: False when it was cancelled unfinished (a reserved one then still needs an Abort).

    The worker's status follows its finish by a moment. Cancelled meanwhile, or dropped (grpc cancels a call it
    collects unfinished), the call would cost both ends a cancellation, and a reserved one an Abort RPC, on every
    request; held until its status lands (a done-callback holds it; its deadline bounds the wait), it costs neither."""
    if call.done():
        return True
    if finished:
        call.add_done_callback(_nothing_to_do)  # its closure over the call is what holds it
        return True
    call.cancel()
    return False


def _nothing_to_do(call) -> None:
    pass


def _worker_params(request: GenerationRequest, progress: _Progress) -> common_pb2.SamplingParams:
    """The sampling params a worker gets. Resuming after a migration, the prompt logprobs went out already."""
    if not progress.tokens or not request.params.HasField("prompt_logprobs"):
        return request.params
    params = common_pb2.SamplingParams()
    params.CopyFrom(request.params)
    params.ClearField("prompt_logprobs")
    return params
