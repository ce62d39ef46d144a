"""What both public APIs share: tokenization, validation, admission, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from contract import tracing
from contract.errors import renamed
from contract.sampling import FieldError, SamplingParams, check_text, check_token_ids, check_vocabulary
from engine.errors import InvalidRequestError
from engine.thinking import Thinking
from engine.tokenizer import Tokenizer
from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.orchestrator import Delta, GenerationError, GenerationRequest, Orchestrator
from router.reasoning import NOT_THINKING
from router.served_model import ModelBinding
from router.stored_responses import ResponseStore
from router.workers import WorkerPool, with_reasons

# With the router's access_log on, one INFO line per request of either API, at any --log-level: client, request,
# status, time to the answer's end, request id.
ACCESS_LOG = logging.getLogger("splitserve.access")


def log_access(client: str, request: str, status: int | str, started: float, request_id: str) -> None:
    """One access log line: who asked, what (an HTTP request line, a gRPC method), how it ended, the time to its
    end since ``started`` (``time.monotonic``) and its request id."""
    took_ms = (time.monotonic() - started) * 1000
    ACCESS_LOG.info('%s "%s" %s %.1f ms request_id=%s', client, request, status, took_ms, request_id)


MAX_PRIORITY = (1 << 31) - 1  # a request's priority is gRPC's int32 (lower goes first)

# The id the client knows the request being served by (X-Request-Id, gRPC's request_id); "" where it gave none
# and knows the router's own. The router's log lines about a request name it (``GenerationRequest.named``).
_PUBLIC_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("splitserve_public_request_id", default="")


# How the API serving this task ends its call when the request's time runs out while the client does not take a
# delta (it stopped reading; its send waits on flow control): the gRPC API's call ends DEADLINE_EXCEEDED. Unset (the
# HTTP APIs, whose deltas are read ahead of the client's send): the request's time waits for the caller's send.
STALLED_SEND: contextvars.ContextVar[Callable[[], Awaitable[None]] | None] = contextvars.ContextVar(
    "splitserve_stalled_send", default=None
)


def served_id() -> str:
    """The id this task's request is known to its client by (``serving``); "" where none was given yet."""
    return _PUBLIC_REQUEST_ID.get()


def serving(request_id: str) -> None:
    """The request this task serves is known to its client as ``request_id``: its trace span and the router's log
    lines about it carry that id."""
    _PUBLIC_REQUEST_ID.set(request_id)
    tracing.annotate(request_id=request_id or None)


class Overloaded(GenerationError):
    def __init__(self, message: str, status: int, retry_after: int) -> None:
        super().__init__(message, status, "rate_limit_exceeded" if status == 429 else "service_unavailable")
        self.retry_after = retry_after


class Admission:
    """At most ``max_running`` requests in flight; up to ``max_queued`` wait; the rest are refused at once.
    Each choice of a request is admitted on its own. A slot that frees goes to the first in the queue: by arrival,
    or (``by_priority``) by the request's priority, lower first, then by arrival."""

    def __init__(
        self,
        max_running: int,
        max_queued: int,
        queue_timeout_s: float,
        metrics: RouterMetrics,
        by_priority: bool = False,
    ) -> None:
        self._free = max_running  # slots no request holds; while any is free, nobody waits
        self._max_running = max_running
        self._max_queued = max_queued
        self._queue_timeout_s = queue_timeout_s
        self._metrics = metrics
        self.by_priority = by_priority
        # The queue: (priority, arrival, future), the first in a heap; a future resolved is a slot handed over. One
        # that left (timed out, its client gone) is cancelled and skipped when it comes up.
        self._queue: list[tuple[int, int, asyncio.Future]] = []
        self._arrivals = itertools.count()
        self.waiting = 0
        self.running = 0

    def check_fits(self, prompts: int, per_prompt: int, per_prompt_field: str) -> None:
        """FieldError for a request of more choices (``prompts`` × ``per_prompt``) than may ever be in flight at once,
        which would be refused a 429 on an idle server and again on every retry. It names ``prompt`` when the
        prompts alone are too many, else ``per_prompt_field`` (n or best_of)."""
        limit = self._max_running + self._max_queued
        if prompts * per_prompt > limit:
            raise FieldError(
                "prompt" if prompts > limit else per_prompt_field,
                f"this request asks for {prompts * per_prompt} choices ({prompts} prompts × {per_prompt} each); at "
                f"most {limit} may be in flight at once (max_running {self._max_running} + max_queued "
                f"{self._max_queued})",
            )

    @contextlib.asynccontextmanager
    async def slot(self, priority: int = 0):
        if self._free:
            self._free -= 1  # free: at once (a timeout would cost a timer)
        else:
            await self._wait(priority)  # 0 under fcfs: build refused any other
        self.running += 1
        self._metrics.running.set(self.running)
        try:
            yield
        finally:
            self.running -= 1
            self._metrics.running.set(self.running)
            self._release()

    def _release(self) -> None:
        """A slot frees: the first in the queue that still waits takes it, or it is free."""
        while self._queue:
            _, _, future = heapq.heappop(self._queue)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1

    async def _wait(self, priority: int) -> None:
        """Waits in the queue for a slot, or refuses: 429 when the queue is full, 503 after queue_timeout_s."""
        if self.waiting >= self._max_queued:
            raise Overloaded("too many requests in flight; retry shortly", 429, retry_after=1)
        handed = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, (priority, next(self._arrivals), handed))
        self.waiting += 1
        self._metrics.queue_depth.set(self.waiting)
        admitted = False
        try:
            # In this task, not wait_for's: a request cancelled (its client gone) in the turn its slot came would see
            # wait_for return the slot and swallow the cancellation, then run to its end for nobody.
            async with asyncio.timeout(self._queue_timeout_s):
                await handed
            admitted = True
        except TimeoutError as exc:
            raise Overloaded("the request waited too long for a slot", 503, retry_after=2) from exc
        finally:
            self.waiting -= 1
            self._metrics.queue_depth.set(self.waiting)
            if not admitted:
                if handed.done() and not handed.cancelled():
                    self._release()  # the slot came in the turn it left: the next one takes it
                else:
                    handed.cancel()


class Frontend:
    def __init__(self, config: RouterConfig, pool: WorkerPool) -> None:
        self.config = config
        self.pool = pool
        self.model = ModelBinding(config)  # which model is served: tokenizer, limits, block size
        pool.check_card = self.model.check
        self.model.workers_down = pool.unavailable
        self.metrics = RouterMetrics(model_name=lambda: getattr(self.model.served, "name", None))
        self.metrics.watch_pool(pool)
        self.orchestrator = Orchestrator(config, pool, self.model, self.metrics)
        self.admission = Admission(
            config.max_running,
            config.max_queued,
            config.queue_timeout_s,
            self.metrics,
            by_priority=config.scheduling_policy == "priority",
        )
        self.responses = ResponseStore(config.responses_store_mb)  # the Responses API's stored responses
        self.metrics.stored_responses.set_function(lambda: len(self.responses))
        self.metrics.stored_responses_bytes.set_function(lambda: self.responses.bytes)
        if config.access_log:
            ACCESS_LOG.setLevel(logging.INFO)  # on at any --log-level: asked for by name
        self.stopping = False  # a stop began: /ready says so (Router.stop), new requests are still served
        self._cut_reason: str | None = None  # set by cut: every request in flight ends with it
        # Each request's deadline, which cut brings forward, and whether the request waits inside this frontend for
        # its next delta (else its caller holds one: a cut landing there would cancel the caller's send instead)
        self._in_flight: dict[asyncio.Timeout, bool] = {}
        self._ending: set[asyncio.Future] = set()  # stalled sends being ended (Frontend._end)

    # Each of these is the served model card's; until there is one, GenerationError(503).

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.require().tokenizer

    @property
    def vocab_size(self) -> int:
        return self.model.require().vocab_size

    @property
    def max_model_len(self) -> int:
        return self.model.require().max_model_len

    @property
    def model_name(self) -> str:
        return self.model.require().name

    @property
    def ready(self) -> bool:
        """Ready to serve: a model is bound and some decode worker serves it (``/ready``, ``splitserve up``)."""
        return not self.stopping and self.model.served is not None and bool(self.pool.of_role("decode"))

    def not_ready_reason(self) -> str:
        """Why not ready: the stop, the model's refusal and every worker not routed to, with why."""
        stopping = "the router is stopping" if self.stopping else None
        problems = [stopping, self.model.refusal, *self.pool.unavailable()]
        return "; ".join(p for p in problems if p) or "no healthy decode worker yet"

    # -- input ------------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        """The first check of every request: 503 while no model is served, 404 for another model's name."""
        self._check_decode_workers()
        if model and model != self.model_name:
            raise GenerationError(
                f"The model `{model}` does not exist. Available: {self.model_name}", 404, "model_not_found", "model"
            )

    def encode_text(self, text: str, field: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(check_text(text, field), add_special_tokens=add_special_tokens)

    def encode_chat(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool | None = None,
        add_special_tokens: bool = False,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
        documents: list[dict] | None = None,
    ) -> list[int]:
        """The prompt of a conversation. ``add_generation_prompt`` None: opens the assistant's turn unless
        ``continue_final_message`` continues the last one (``Tokenizer.apply_chat_template``)."""
        if not messages:  # the template would render only the assistant's header: nothing was asked
            raise FieldError("messages", "messages must not be empty")
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt, tools, continue_final_message, template_kwargs, documents
            )
        except InvalidRequestError as exc:
            raise GenerationError(str(exc), 400, "invalid_request_error", "messages") from exc
        # Chat templates write their own BOS where the model wants one.
        return self.tokenizer.encode(rendered, add_special_tokens=add_special_tokens)

    def thinking(self, prompt_ids: list[int]) -> Thinking | None:
        """With a reasoning parser, the thinking of the output after ``prompt_ids`` (engine/thinking.py), which a
        grammar (structured output, a required tool call) does not hold: it holds the answer that follows; None
        without one."""
        tags = self.model.require().think_tags
        return None if tags is None else tags.after(prompt_ids)

    @property
    def thinks(self) -> bool:
        """Whether the served model's output is thinking, then an answer (the server's --reasoning-parser)."""
        return self.model.require().think_tags is not None

    def room(self, prompt_ids: list[int], prompt_field: str = "prompt") -> int:
        """How many tokens may follow ``prompt_ids``; GenerationError(400) or FieldError naming ``prompt_field``
        (the request's field the prompt came from) if it is bad or too long."""
        if not prompt_ids:
            raise _bad(f"{prompt_field} must not be empty", prompt_field)
        check_token_ids(prompt_ids, self.vocab_size, prompt_field)
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise GenerationError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{len(prompt_ids)} tokens, which leaves no room for the completion.",
                400,
                "context_length_exceeded",
                prompt_field,
            )
        return room

    def build(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        prompt_field: str = "prompt",
        max_tokens_field: str = "max_tokens",
        priority: int = 0,
    ) -> GenerationRequest:
        """Checks what the record cannot alone (the prompt, the context, the vocabulary, a priority the queue does
        not order by); GenerationError(400) or FieldError names the first problem, by the request's names for the
        prompt and max_tokens."""
        if priority and not self.admission.by_priority:
            raise FieldError(
                "priority",
                "priority orders the queue only under the router's --scheduling-policy priority (it is fcfs)",
            )
        if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
            raise FieldError("priority", f"priority must lie in [{-MAX_PRIORITY}, {MAX_PRIORITY}]")
        room = self.room(prompt_ids, prompt_field)
        if params.max_tokens > room:
            raise GenerationError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt_ids) + params.max_tokens} tokens ({len(prompt_ids)} in the prompt, {params.max_tokens} "
                "for the completion).",
                400,
                "context_length_exceeded",
                max_tokens_field,
            )
        check_vocabulary(params, self.vocab_size)
        if params.grammar is not None and params.grammar.accepted_prompt_tokens > len(prompt_ids):
            raise _bad("grammar.accepted_prompt_tokens exceeds the prompt", "grammar")
        if params.thinking != self.thinks:  # every request's output is the served model's: thinking, or not
            if params.thinking:
                field = "thinking" if params.thinking_token_budget is None else "thinking_token_budget"
                raise _bad(f"{field}: {NOT_THINKING}", field)
            params = replace(params, thinking=True)
        spelled = tuple((k, v) for k, v in (("prompt", prompt_field), ("max_tokens", max_tokens_field)) if k != v)
        return GenerationRequest(
            secrets.token_hex(16), tuple(prompt_ids), params.to_wire(), _PUBLIC_REQUEST_ID.get(), priority, spelled
        )

    # -- output -----------------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Admission, then the orchestrated deltas, under the per-request timeout; GenerationError(503) naming the
        stop once ``cut`` is called."""
        if self._cut_reason is not None:
            raise GenerationError(self._cut_reason, 503)
        try:
            async with asyncio.timeout(None) as deadline:
                self._in_flight[deadline] = True
                try:
                    async with self.admission.slot(request.priority):
                        if not self.pool.of_role("decode"):
                            self._check_decode_workers()  # names the incompatible workers, if that is why
                            message = with_reasons("no decode worker is ready", self.pool.unavailable("decode"))
                            raise Overloaded(message, 503, retry_after=2)
                        loop = asyncio.get_running_loop()
                        if self._cut_reason is None:
                            deadline.reschedule(loop.time() + self.config.request_timeout_s)
                        async with contextlib.aclosing(self.orchestrator.generate(request)) as deltas:
                            async for delta in deltas:
                                # The deadline's cancel must land here, never in the caller's send of a delta: a
                                # gRPC write cancelled so is left with no status at all. So a cut that came with
                                # this delta (its timeout fires a loop turn later) ends the request now, and the
                                # deadline waits while the caller holds the delta; its time is checked after. A
                                # send still waiting then (a client that stopped reading) is ended by its API.
                                if self._cut_reason is not None:
                                    raise GenerationError(self._cut_reason, 503)
                                due = deadline.when()
                                deadline.reschedule(None)
                                self._in_flight[deadline] = False
                                stalled = STALLED_SEND.get()
                                overdue = (
                                    None if due is None or stalled is None else loop.call_at(due, self._end, stalled)
                                )
                                try:
                                    yield delta
                                finally:
                                    if overdue is not None:
                                        overdue.cancel()
                                if self._cut_reason is not None:  # cut while the caller sent this delta
                                    raise GenerationError(self._cut_reason, 503)
                                if due is not None and loop.time() >= due:
                                    raise TimeoutError  # the request's time ran out while the caller sent it
                                deadline.reschedule(due)
                                self._in_flight[deadline] = True
                finally:
                    del self._in_flight[deadline]
        except TimeoutError:
            if self._cut_reason is not None:
                raise GenerationError(self._cut_reason, 503) from None
            raise
        except GenerationError as exc:  # a worker's refusal names the record's field: the client's name for it
            name = dict(request.spelled).get(exc.param)
            if name is None:
                raise
            raise GenerationError(renamed(str(exc), exc.param, name), exc.status, exc.code, name) from exc

    def _end(self, stalled: Callable[[], Awaitable[None]]) -> None:
        """A request's time ran out while its client did not take a delta: its API ends the call."""
        ending = asyncio.ensure_future(stalled())
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)

    def cut(self, reason: str) -> None:
        """Ends every request in flight, queued ones too, with GenerationError(503, ``reason``): as at its timeout,
        its workers stop and its KV returns to the pool; its client gets the error (an SSE error event, a gRPC
        status). Requests that come after get it at once."""
        self._cut_reason = reason
        now = asyncio.get_running_loop().time()
        for deadline, waiting in list(self._in_flight.items()):
            if waiting and not deadline.expired():  # one expiring already ends with its own timeout
                deadline.reschedule(now)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's raw bytes: part of a UTF-8 character where ``token_text`` shows U+FFFD."""
        return self.tokenizer.token_bytes(token_id, skip_special_tokens=False)

    def _check_decode_workers(self) -> None:
        """GenerationError(503) while no model is served, or when every decode worker serves another."""
        mismatched = self.pool.incompatible("decode")
        if mismatched and not self.pool.of_role("decode"):
            reasons = "; ".join(f"{w.address}: {w.incompatible.reason}" for w in mismatched)
            raise GenerationError(f"no decode worker serves this router's model — {reasons}", 503)
        self.model.require()


def _bad(message: str, param: str | None = None) -> GenerationError:
    return GenerationError(message, 400, "invalid_request_error", param)
