"""The engine: one readable step loop over scheduler → model runner → output processor.

Threading contract: an Engine is owned by one thread. Workers call every method from their
engine thread; other threads hand work over through the worker's own queue.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from contract.errors import check_request_id
from contract.sampling import FieldError, SamplingParams, check_token_ids, check_vocabulary
from engine.block_manager import BlockAllocator, KVEvent
from engine.config import EngineConfig, blocks_for_budget
from engine.errors import InvalidRequestError, NoFreeBlocksError
from engine.grammar import GrammarCompiler
from engine.kv_cache import KVLayout, PagedKVCache
from engine.model_runner import LayerHook, ModelRunner, StepResult
from engine.output import OutputProcessor, RequestOutput
from engine.request import Request, RequestState
from engine.sampler import Sampler, SamplingState, TokenLogprobs, bad_word_token_ids, held_back_by_min_tokens
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.thinking import ThinkTags, Thoughts
from engine.weights import load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reservation:
    """Blocks held for a prompt whose KV will be written from outside."""

    request_id: str
    block_ids: tuple[int, ...]  # one per prompt block, in order
    num_cached_tokens: int  # leading tokens already in this pool's prefix cache (a resumed request's output too)


@dataclass(frozen=True)
class EngineStats:
    num_blocks: int
    blocks_used: int
    blocks_free: int
    blocks_cached: int
    running: int
    waiting: int
    waiting_for_kv: int
    token_capacity: int  # Engine.token_capacity
    preemptions: int = 0  # running requests preempted for want of blocks since start (Scheduler.preemptions)


@dataclass(frozen=True)
class Completion:
    """The whole result of one prompt, for batch use."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    logprobs: tuple[TokenLogprobs, ...]
    num_cached_tokens: int
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()  # entry k scores prompt token k + 1
    stop_reason: str | int | None = None


class Engine:
    def __init__(self, config: EngineConfig, on_layer_done: LayerHook | None = None) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        loaded = load_model(config.model, config.dtype, config.device)
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.fingerprint = loaded.fingerprint
        self.layout = self._layout(loaded.model.lm_head.weight.dtype)
        self.kv_cache = PagedKVCache(self.layout, config.device)
        self.allocator = BlockAllocator(self.layout.num_blocks, config.block_size, config.enable_prefix_cache)
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs,
                config.max_num_batched_tokens,
                config.block_size,
                config.prefill_chunk_beside_decodes,
            ),
            self.allocator,
        )
        self.runner = ModelRunner(
            loaded.model, self.kv_cache, Sampler(self.model_config.vocab_size, config.seed), config.device
        )
        self.max_model_len = min(config.max_model_len or self.model_config.max_context, self.model_config.max_context)
        self._num_scratch_blocks = self._enable_cuda_graphs(loaded.model)
        self.outputs = OutputProcessor(self.tokenizer, self._eos_ids(), self.max_model_len)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self._eos_ids())
        self._think_tags: ThinkTags | None = None  # the tokenizer's, found by the first request that thinks
        self.on_layer_done = on_layer_done
        self.requests: dict[str, Request] = {}
        self._pending: list[RequestOutput] = []
        self._ran_nothing = False  # the last step scheduled nothing and had nothing to report
        self._failures: dict[str, BaseException] = {}  # request id -> what failed it, until take_failures()
        # Bounded: an owner that never drains KV events must not grow memory; readers see the
        # gap in event ids and resynchronise from a snapshot.
        self._kv_events: deque[KVEvent] = deque(maxlen=65536)

    def _enable_cuda_graphs(self, model) -> int:
        """CUDA only: decode steps replay captured graphs (engine/cuda_graphs.py). Returns the blocks
        set aside for it: one scratch block that padded rows write into, never a live one."""
        cfg = self.config
        if torch.device(cfg.device).type != "cuda" or cfg.cuda_graph_max_batch == 0:
            return 0
        from engine.cuda_graphs import CudaGraphDecoder

        (scratch,) = self.allocator.allocate(1)
        max_batch = min(cfg.cuda_graph_max_batch, cfg.max_num_seqs)
        max_width = -(-self.max_model_len // cfg.block_size)
        self.runner.graphs = CudaGraphDecoder(model, self.kv_cache, max_batch, scratch, max_width)
        return 1

    def _layout(self, dtype: torch.dtype) -> KVLayout:
        cfg, model = self.config, self.model_config
        dtype_name = str(dtype).removeprefix("torch.")
        num_blocks = cfg.num_kv_blocks or blocks_for_budget(
            model, cfg.block_size, dtype.itemsize, cfg.kv_cache_memory_bytes
        )
        return KVLayout(model.num_layers, num_blocks, cfg.block_size, model.num_kv_heads, model.head_dim, dtype_name)

    def _eos_ids(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids)))

    # -- requests ---------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        resume_token_ids: Sequence[int] = (),
        priority: int = 0,
    ) -> None:
        """Queue a prompt to be prefilled here and decoded (``priority``: its place in the queue, lower first, and
        the order of preemption: ``Scheduler``).

        ``resume_token_ids``: output another worker generated for this request already (migration). The
        request continues after it exactly as if it had generated it here — text already emitted, stop
        strings across the boundary, penalties, seeds, grammar, ``min_tokens`` and ``max_tokens`` all count
        it — and its KV is computed with the prompt's. Its first output carries only new tokens."""
        request = self._new_request(request_id, prompt_token_ids, params, resume_token_ids, priority)
        self.scheduler.add(request)

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        resume_token_ids: Sequence[int] = (),
        priority: int = 0,
    ) -> Reservation:
        """Hold blocks for a prompt (and ``resume_token_ids`` and ``priority``, as in ``add_request``) whose KV
        another worker computes (state WAITING_FOR_KV).

        Raises NoFreeBlocksError, with nothing allocated, if the pool is too full."""
        request = self._new_request(request_id, prompt_token_ids, params, resume_token_ids, priority, register=False)
        try:
            self.scheduler.reserve(request)
        except NoFreeBlocksError:
            self.outputs.discard(request_id)
            raise
        self.requests[request_id] = request
        return Reservation(request_id, tuple(request.block_ids), request.num_published_blocks * self.config.block_size)

    def complete_reservation(self, request_id: str, first_token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        """Adopt the received KV (the caller has verified it) and the first token sampled remotely;
        the request then decodes here. Its first output comes with ``take_outputs()``, or the next step().
        InvalidRequestError, with nothing changed, if the token or its logprobs are not ones this model
        and request could have produced (``check_remote_token``)."""
        request = self.requests[request_id]
        if request.state is not RequestState.WAITING_FOR_KV:
            raise InvalidRequestError(f"request {request_id} is not waiting for KV (state {request.state.name})")
        self.check_remote_token(request_id, first_token_id, logprobs)
        self.scheduler.kv_landed(request)
        self._record_token(request, first_token_id, logprobs)

    def check_remote_token(self, request_id: str, token_id: int, logprobs: TokenLogprobs | None) -> None:
        """Raises InvalidRequestError unless a peer's first token for ``request_id`` is one this model can
        read (an id in the vocabulary) and the request allows (``allowed_token_ids``, ``min_tokens``, a one-token
        bad word), and its logprobs are what
        the request asked for: present exactly when it asked, about that token, at most the asked-for
        alternatives, ids in the vocabulary, finite values <= 0. Changes nothing. (An id outside the vocabulary
        would fail the next step's embedding lookup.)"""
        request = self.requests[request_id]
        params = request.params
        vocab = self.model_config.vocab_size
        _check_token_ids([token_id], vocab, "first_token_id")
        if params.allowed_token_ids and token_id not in params.allowed_token_ids:
            raise InvalidRequestError(f"first_token_id {token_id} is not one of the request's allowed_token_ids")
        if token_id in request.sampling.suppressed_token_ids:
            raise InvalidRequestError(f"first_token_id {token_id} may not be sampled first (min_tokens, bad_words)")
        forced = request.sampling.forced_token
        if forced is not None and token_id != forced:
            raise InvalidRequestError(f"first_token_id {token_id} is not {forced}, which thinking_token_budget forces")
        if (logprobs is None) != (params.logprobs is None):
            asked = "asked for" if params.logprobs is not None else "did not ask for"
            raise InvalidRequestError(f"first_logprob: the request {asked} logprobs")
        if logprobs is None:
            return
        if logprobs.token_id != token_id:
            raise InvalidRequestError(f"first_logprob is about token {logprobs.token_id}, not {token_id}")
        if len(logprobs.top) > params.logprobs:
            raise InvalidRequestError(f"first_logprob has {len(logprobs.top)} alternatives (at most {params.logprobs})")
        _check_token_ids([t for t, _ in logprobs.top], vocab, "first_logprob")
        if not all(math.isfinite(lp) and lp <= 0.0 for lp in (logprobs.logprob, *(lp for _, lp in logprobs.top))):
            raise InvalidRequestError("first_logprob values must be finite log-probabilities (<= 0)")

    def abort(self, request_id: str) -> bool:
        """Stop a request in any state and free its blocks. False if it is unknown or already done."""
        request = self.requests.get(request_id)
        if request is None or request.state.finished:
            return False
        self.scheduler.finish(request, RequestState.FINISHED_ABORTED)
        self._pending.append(self._finalize(request))
        return True

    def _new_request(
        self, request_id, prompt_token_ids, params, resume_token_ids=(), priority: int = 0, register: bool = True
    ) -> Request:
        """A request with its output stream started (and its resumed output replayed through it)."""
        prompt, resumed = list(prompt_token_ids), list(resume_token_ids)
        self._validate(request_id, prompt, params, resumed)
        params = self._fitted(prompt, params, resumed)
        grammar = self.grammars.matcher(params.grammar, prompt) if params.grammar is not None else None
        bad_words = bad_word_token_ids(self._word_ids, params.bad_words) if params.bad_words else ()
        if params.allowed_token_ids and {w[0] for w in bad_words if len(w) == 1}.issuperset(params.allowed_token_ids):
            raise InvalidRequestError("bad_words ban every one of allowed_token_ids: nothing could be generated")
        thoughts = self._thoughts(prompt, params)
        sampling = SamplingState(params, prompt, self.outputs.eos_token_ids, grammar, bad_words, thoughts)
        request = Request(request_id, prompt, params, sampling, self.config.block_size, priority=priority)
        self.outputs.start(request)
        try:
            self.outputs.resume(request, resumed)
        except InvalidRequestError:
            self.outputs.discard(request_id)
            raise
        if register:
            self.requests[request_id] = request
        return request

    def _thoughts(self, prompt: list[int], params: SamplingParams) -> Thoughts | None:
        """Where a reasoning model's output starts (``params.thinking``): inside its thinking if the prompt leaves it
        open. A grammar's accepted prompt tokens are output already, all of it answer."""
        if not params.thinking:
            return None
        if self._think_tags is None:
            try:
                self._think_tags = ThinkTags.of(self.tokenizer)
            except ValueError as exc:
                raise InvalidRequestError(f"thinking: {exc}") from exc
        accepted = params.grammar.accepted_prompt_tokens if params.grammar is not None else 0
        thoughts = Thoughts(self._think_tags.after(prompt[: len(prompt) - accepted]), params.thinking_token_budget)
        if not all([thoughts.record(token) for token in prompt[len(prompt) - accepted :]]):
            raise InvalidRequestError("grammar.accepted_prompt_tokens hold thinking, where they are the answer's")
        if params.thinking_token_budget is not None and params.allowed_token_ids:
            if thoughts.tags.close_id not in params.allowed_token_ids:
                raise InvalidRequestError(
                    "thinking_token_budget ends the thinking with </think>, not in allowed_token_ids"
                )
        return thoughts

    def _word_ids(self, word: str) -> list[int]:
        return self.tokenizer.encode(word, add_special_tokens=False)

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams, resumed: list[int]) -> None:
        if not request_id:
            raise InvalidRequestError("request_id must not be empty")
        try:
            check_request_id(request_id, "request_id")  # as the router's: a peer's megabytes would be kept
        except FieldError as exc:
            raise InvalidRequestError(str(exc)) from exc
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if not prompt:
            raise InvalidRequestError("prompt must not be empty")
        _check_token_ids(prompt, self.model_config.vocab_size, "prompt")
        _check_token_ids(resumed, self.model_config.vocab_size, "resume_token_ids")
        try:
            check_vocabulary(params, self.model_config.vocab_size)
        except FieldError as exc:
            raise InvalidRequestError(str(exc)) from exc
        held = held_back_by_min_tokens(params, self.outputs.eos_token_ids)
        if params.allowed_token_ids and held.issuperset(params.allowed_token_ids):
            raise InvalidRequestError(
                "allowed_token_ids holds only EOS and stop_token_ids, which min_tokens keeps from being sampled: "
                "nothing could be generated"
            )

    @property
    def _usable_blocks(self) -> int:
        """The KV pool's blocks that requests may hold (CUDA graphs keep some as scratch)."""
        return self.layout.num_blocks - self._num_scratch_blocks

    @property
    def token_capacity(self) -> int:
        """The most tokens (prompt and output) one request may hold here: the context, or the KV pool if smaller."""
        return min(self.max_model_len, self._usable_blocks * self.config.block_size)

    def _fitted(self, prompt: list[int], params: SamplingParams, resumed: list[int]) -> SamplingParams:
        """``params`` if prompt + max_tokens fits ``token_capacity``. A defaulted max_tokens (the client set
        none) is lowered to fit instead, so the request ends with "length" there; an explicit one that does not
        fit, a prompt (with resumed output) that leaves no room, or a min_tokens above the lowered limit is
        refused, naming the field."""
        capacity, used = self.token_capacity, len(prompt) + len(resumed)
        room = capacity - len(prompt)
        if params.max_tokens <= room:
            return params
        where = self._capacity_spelled()
        if used >= capacity:  # whatever max_tokens says: the prompt is what to shorten
            raise InvalidRequestError(
                f"prompt ({len(prompt)} tokens{f' + {len(resumed)} resumed' if resumed else ''}) leaves no room "
                f"for output in {where}",
                "prompt",
            )
        if not params.max_tokens_defaulted:
            raise InvalidRequestError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {len(prompt) + params.max_tokens} "
                f"tokens do not fit in {where}: at most {room} may follow this prompt",
                "max_tokens",
            )
        if params.min_tokens > room:
            raise InvalidRequestError(
                f"min_tokens ({params.min_tokens}) exceeds the {room} tokens that fit after the prompt in {where}",
                "min_tokens",
            )
        return replace(params, max_tokens=room)

    def _capacity_spelled(self) -> str:
        if self.token_capacity == self.max_model_len:
            return f"the maximum context length {self.max_model_len}"
        return f"this worker's KV pool ({self._usable_blocks} blocks of {self.config.block_size} tokens)"

    # -- the loop -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, execute, update. Returns each request's output delta for this step.

        A failure stays with the request it belongs to: that request ends aborted (its blocks freed, its
        reason kept for ``take_failures``) and the rest of the batch carries on. An error while recording
        one request's results is that request's; a failed model execution is narrowed down to one
        request by ``_execute``. Errors outside both (scheduling, bookkeeping bugs) propagate."""
        self._ran_nothing = False
        plan = self.scheduler.schedule()
        if not plan.is_empty:
            sampled, failed = self._execute(plan)
            ran = replace(plan, chunks=tuple(c for c in plan.chunks if c.request_id not in failed))
            self.scheduler.step_done(ran, self.requests)
            for request_id, error in failed.items():
                self._fail(request_id, error)
            for request_id, (scored_from, entries) in sampled.prompt_logprobs.items():
                self._for_request(request_id, lambda r: _record_prompt_logprobs(r, scored_from, entries))
            for request_id, (token_id, logprobs) in sampled.sampled.items():
                self._for_request(request_id, lambda r: self._record_token(r, token_id, logprobs))
        self._kv_events.extend(self.allocator.take_events())
        outputs, self._pending = self._pending, []
        self._ran_nothing = plan.is_empty and not outputs
        return outputs

    def _execute(self, plan: SchedulerOutput) -> tuple[StepResult, dict[str, BaseException]]:
        """Runs the plan; returns its results and the requests it failed, each with its error.

        A failed execution cannot say which request caused it (a bad input, or a batch too large for
        memory), so it is narrowed down by halving the batch until a part runs or one request alone
        fails; only that request fails. Re-running part of a step is safe: its chunks rewrite the same
        K/V positions with the same values, seeded sampling reseeds per step, and nothing is recorded
        until the results are in. Costs nothing unless a step fails; at most ``2n - 1`` runs if it does."""
        states = {c.request_id: self.requests[c.request_id].sampling for c in plan.chunks}
        try:
            return self.runner.execute(plan, states, self.on_layer_done), {}
        except Exception as exc:  # noqa: BLE001 - narrowed down to a request below
            if len(plan.chunks) == 1:
                log.exception("request %s failed its step alone", plan.chunks[0].request_id)
                return StepResult({}, {}), {plan.chunks[0].request_id: exc}
            log.warning("a step of %d requests failed (%s); running it in halves", len(plan.chunks), exc)
        half = len(plan.chunks) // 2
        results = [self._execute(replace(plan, chunks=part)) for part in (plan.chunks[:half], plan.chunks[half:])]
        merged = StepResult({}, {})
        failed: dict[str, BaseException] = {}
        for result, part_failed in results:
            merged.sampled.update(result.sampled)
            merged.prompt_logprobs.update(result.prompt_logprobs)
            failed.update(part_failed)
        return merged, failed

    def _for_request(self, request_id: str, update: Callable[[Request], None]) -> None:
        """Applies one request's step results; an error doing so fails that request only."""
        request = self.requests.get(request_id)
        if request is None or request.state.finished:
            return
        try:
            update(request)
        except Exception as exc:  # noqa: BLE001 - the request's own failure
            log.exception("request %s failed recording its step", request_id)
            self._fail(request_id, exc)

    def _fail(self, request_id: str, error: BaseException) -> None:
        """Ends a request that failed (aborted, blocks freed); ``take_failures`` reports why."""
        request = self.requests.get(request_id)
        if request is None:
            return
        self._failures[request_id] = error
        if not request.state.finished:
            self.scheduler.finish(request, RequestState.FINISHED_ABORTED)
        try:
            self._pending.append(self._finalize(request))
        except Exception:  # noqa: BLE001 - its output state may be what broke: drop it
            self.outputs.discard(request_id)
            self.requests.pop(request_id, None)
            self._pending.append(RequestOutput(request_id, (), "", (), "abort", request.num_prompt_tokens, 0, 0))

    def take_failures(self) -> dict[str, BaseException]:
        """Requests that failed since the last call, with what failed each (an InvalidRequestError: the request's
        own fields, which no retry changes). Each also had a last, aborted output."""
        failures, self._failures = self._failures, {}
        return failures

    def _record_token(self, request: Request, token_id: int, logprobs) -> None:
        finished = self.outputs.add_token(request, token_id, logprobs)
        if finished is not None:
            self.scheduler.finish(request, finished)
            self._pending.append(self._finalize(request))
        else:
            self._pending.append(self.outputs.emit(request))

    def _finalize(self, request: Request) -> RequestOutput:
        output = self.outputs.emit(request)
        del self.requests[request.request_id]
        return output

    def take_outputs(self) -> list[RequestOutput]:
        """The outputs recorded since the last step outside one (a remote first token on adoption, an abort's
        end), now rather than with the next step's: a loop that calls this between steps hands a disaggregated
        request's first token on before the step it then decodes in."""
        outputs, self._pending = self._pending, []
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._pending)

    @property
    def stalled(self) -> bool:
        """The last step had nothing to run (every unfinished request waits for its KV, or for blocks) and no
        output is pending since: only a call from outside (a commit, a new request, an abort) or freed blocks
        change that, so a loop may sleep until one comes instead of stepping again."""
        return self._ran_nothing and not self._pending

    # -- batch use --------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Completion]:
        """Runs prompts to completion; results in prompt order."""
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        ids = [f"gen-{uuid.uuid4().hex}" for _ in prompts]
        prompt_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for request_id, tokens, p in zip(ids, prompt_ids, per_prompt):
            self.add_request(request_id, tokens, p)
        collected: dict[str, list[RequestOutput]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for output in self.step():
                collected[output.request_id].append(output)
        return [_completion(rid, tuple(tokens), collected[rid]) for rid, tokens in zip(ids, prompt_ids)]

    def stats(self) -> EngineStats:
        return EngineStats(
            num_blocks=self.allocator.num_blocks,
            blocks_used=self.allocator.num_used_blocks,
            blocks_free=self.allocator.num_free_blocks,
            blocks_cached=self.allocator.num_cached_blocks,
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            waiting_for_kv=len(self.scheduler.awaiting_kv),
            token_capacity=self.token_capacity,
            preemptions=self.scheduler.preemptions,
        )

    def take_kv_events(self) -> list[KVEvent]:
        """KV events since the last call, oldest first (older ones may have been dropped)."""
        self._kv_events.extend(self.allocator.take_events())
        events = list(self._kv_events)
        self._kv_events.clear()
        return events


def _completion(request_id: str, prompt: tuple[int, ...], outputs: list[RequestOutput]) -> Completion:
    return Completion(
        request_id=request_id,
        prompt_token_ids=prompt,
        token_ids=tuple(t for o in outputs for t in o.token_ids),
        text="".join(o.text for o in outputs),
        finish_reason=outputs[-1].finish_reason or "abort",
        logprobs=tuple(lp for o in outputs for lp in o.logprobs),
        num_cached_tokens=outputs[-1].num_cached_tokens,
        prompt_logprobs=tuple(lp for o in outputs for lp in o.prompt_logprobs),
        stop_reason=outputs[-1].stop_reason,
    )


def _record_prompt_logprobs(request: Request, scored_from: int, entries: list[TokenLogprobs]) -> None:
    """Appends a chunk's prompt logprobs; a chunk recomputed after preemption scores nothing new."""
    assert scored_from == len(request.prompt_logprobs), "prompt positions are scored in order, once"
    request.prompt_logprobs.extend(entries)


def _check_token_ids(token_ids: Sequence[int], vocab_size: int, field: str) -> None:
    try:
        check_token_ids(token_ids, vocab_size, field)
    except FieldError as exc:
        raise InvalidRequestError(str(exc)) from exc
