"""The engine: one readable step loop over scheduler → model runner → output processor.

Threading contract: an Engine is owned by one thread. Workers call every method from their
engine thread; other threads hand work over through the worker's own queue.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from contract.sampling import FieldError, SamplingParams, check_token_ids, check_vocabulary
from engine.block_manager import BlockAllocator, KVEvent
from engine.config import EngineConfig, blocks_for_budget
from engine.errors import InvalidRequestError, NoFreeBlocksError
from engine.grammar import GrammarCompiler
from engine.kv_cache import KVLayout, PagedKVCache
from engine.model_runner import LayerHook, ModelRunner
from engine.output import OutputProcessor, RequestOutput
from engine.request import Request, RequestState
from engine.sampler import Sampler, SamplingState, TokenLogprobs
from engine.scheduler import Scheduler, SchedulerConfig
from engine.weights import load_model


@dataclass(frozen=True)
class Reservation:
    """Blocks held for a prompt whose KV will be written from outside."""

    request_id: str
    block_ids: tuple[int, ...]  # one per prompt block, in order
    num_cached_tokens: int  # leading prompt tokens already in this pool's prefix cache


@dataclass(frozen=True)
class EngineStats:
    num_blocks: int
    blocks_used: int
    blocks_free: int
    blocks_cached: int
    running: int
    waiting: int
    waiting_for_kv: int


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
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.block_size), self.allocator
        )
        self.runner = ModelRunner(
            loaded.model, self.kv_cache, Sampler(self.model_config.vocab_size, config.seed), config.device
        )
        self.max_model_len = min(config.max_model_len or self.model_config.max_context, self.model_config.max_context)
        self._num_scratch_blocks = self._enable_cuda_graphs(loaded.model)
        self.outputs = OutputProcessor(self.tokenizer, self._eos_ids(), self.max_model_len)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self._eos_ids())
        self.on_layer_done = on_layer_done
        self.requests: dict[str, Request] = {}
        self._pending: list[RequestOutput] = []
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
    ) -> None:
        """Queue a prompt to be prefilled here and decoded.

        ``resume_token_ids``: output another worker generated for this request already (migration). The
        request continues after it exactly as if it had generated it here — text already emitted, stop
        strings across the boundary, penalties, seeds, grammar, ``min_tokens`` and ``max_tokens`` all count
        it — and its KV is computed with the prompt's. Its first output carries only new tokens."""
        request = self._new_request(request_id, prompt_token_ids, params, resume_token_ids)
        self.scheduler.add(request)

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        resume_token_ids: Sequence[int] = (),
    ) -> Reservation:
        """Hold blocks for a prompt (and ``resume_token_ids``, as in ``add_request``) whose KV another worker
        computes (state WAITING_FOR_KV).

        Raises NoFreeBlocksError, with nothing allocated, if the pool is too full."""
        request = self._new_request(request_id, prompt_token_ids, params, resume_token_ids, register=False)
        try:
            self.scheduler.reserve(request)
        except NoFreeBlocksError:
            self.outputs.discard(request_id)
            raise
        self.requests[request_id] = request
        return Reservation(request_id, tuple(request.block_ids), request.num_published_blocks * self.config.block_size)

    def complete_reservation(self, request_id: str, first_token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        """Adopt the received KV (the caller has verified it) and the first token sampled remotely;
        the request then decodes here. Its first output comes with the next step()."""
        request = self.requests[request_id]
        if request.state is not RequestState.WAITING_FOR_KV:
            raise InvalidRequestError(f"request {request_id} is not waiting for KV (state {request.state.name})")
        self.scheduler.kv_landed(request)
        self._record_token(request, first_token_id, logprobs)

    def abort(self, request_id: str) -> bool:
        """Stop a request in any state and free its blocks. False if it is unknown or already done."""
        request = self.requests.get(request_id)
        if request is None or request.state.finished:
            return False
        self.scheduler.finish(request, RequestState.FINISHED_ABORTED)
        self._pending.append(self._finalize(request))
        return True

    def _new_request(self, request_id, prompt_token_ids, params, resume_token_ids=(), register: bool = True) -> Request:
        """A request with its output stream started (and its resumed output replayed through it)."""
        prompt, resumed = list(prompt_token_ids), list(resume_token_ids)
        self._validate(request_id, prompt, params, resumed)
        grammar = self.grammars.matcher(params.grammar, prompt) if params.grammar is not None else None
        sampling = SamplingState(params, prompt, self.outputs.eos_token_ids, grammar=grammar)
        request = Request(request_id, prompt, params, sampling, self.config.block_size)
        self.outputs.start(request)
        try:
            self.outputs.resume(request, resumed)
        except InvalidRequestError:
            self.outputs.discard(request_id)
            raise
        if register:
            self.requests[request_id] = request
        return request

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams, resumed: list[int]) -> None:
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
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"the maximum context length {self.max_model_len}"
            )
        usable = self.layout.num_blocks - self._num_scratch_blocks
        if -(-total // self.config.block_size) > usable:
            raise InvalidRequestError(f"{total} tokens do not fit in this worker's KV pool ({usable} blocks)")

    # -- the loop -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, execute, update. Returns each request's output delta for this step."""
        plan = self.scheduler.schedule()
        if not plan.is_empty:
            sampled = self.runner.execute(
                plan, {c.request_id: self.requests[c.request_id].sampling for c in plan.chunks}, self.on_layer_done
            )
            self.scheduler.step_done(plan, self.requests)
            for request_id, (scored_from, entries) in sampled.prompt_logprobs.items():
                _record_prompt_logprobs(self.requests[request_id], scored_from, entries)
            for request_id, (token_id, logprobs) in sampled.sampled.items():
                self._record_token(self.requests[request_id], token_id, logprobs)
        self._kv_events.extend(self.allocator.take_events())
        outputs, self._pending = self._pending, []
        return outputs

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

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self._pending)

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
