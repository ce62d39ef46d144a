"""What both public APIs share: tokenization, validation, admission, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.presets import load_model_tokenizer, resolve_model_config
from engine.sampling_params import MAX_TOP_LOGPROBS
from engine.tokenizer import Tokenizer
from protos import common_pb2
from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.orchestrator import Delta, GenerationError, GenerationRequest, Orchestrator
from router.workers import WorkerPool


class Overloaded(GenerationError):
    def __init__(self, message: str, status: int, retry_after: int) -> None:
        super().__init__(message, status, "rate_limit_exceeded" if status == 429 else "service_unavailable")
        self.retry_after = retry_after


class Admission:
    """At most ``max_running`` requests in flight; up to ``max_queued`` wait; the rest are refused at once."""

    def __init__(self, max_running: int, max_queued: int, queue_timeout_s: float, metrics: RouterMetrics) -> None:
        self._slots = asyncio.Semaphore(max_running)
        self._max_queued = max_queued
        self._queue_timeout_s = queue_timeout_s
        self._metrics = metrics
        self.waiting = 0
        self.running = 0

    @contextlib.asynccontextmanager
    async def slot(self):
        if self._slots.locked() and self.waiting >= self._max_queued:
            raise Overloaded("too many requests in flight; retry shortly", 429, retry_after=1)
        self.waiting += 1
        self._metrics.queue_depth.set(self.waiting)
        try:
            await asyncio.wait_for(self._slots.acquire(), self._queue_timeout_s)
        except TimeoutError as exc:
            raise Overloaded("the request waited too long for a slot", 503, retry_after=2) from exc
        finally:
            self.waiting -= 1
            self._metrics.queue_depth.set(self.waiting)
        self.running += 1
        self._metrics.running.set(self.running)
        try:
            yield
        finally:
            self.running -= 1
            self._metrics.running.set(self.running)
            self._slots.release()


@dataclass(frozen=True)
class SamplingInput:
    """Sampling fields as the public APIs take them, before validation."""

    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None


class Frontend:
    def __init__(self, config: RouterConfig, pool: WorkerPool) -> None:
        self.config = config
        self.pool = pool
        model_config = resolve_model_config(config.model)
        self.tokenizer: Tokenizer = load_model_tokenizer(config.model, model_config)
        self.vocab_size = model_config.vocab_size
        self.max_model_len = min(config.max_model_len or model_config.max_context, model_config.max_context)
        self.model_name = config.served_model_name or config.model
        self.metrics = RouterMetrics()
        self.metrics.watch_pool(pool)
        self.orchestrator = Orchestrator(config, pool, self.tokenizer, self.metrics)
        self.admission = Admission(config.max_running, config.max_queued, config.queue_timeout_s, self.metrics)

    # -- input ------------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise GenerationError(
                f"The model `{model}` does not exist. Available: {self.model_name}", 404, "model_not_found"
            )

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        try:
            rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except InvalidRequestError as exc:
            raise GenerationError(str(exc), 400, "invalid_request_error") from exc
        # Chat templates write their own BOS where the model wants one.
        return self.tokenizer.encode(rendered, add_special_tokens=False)

    def build(
        self, prompt_ids: list[int], sampling: SamplingInput, default_max_tokens: int | None
    ) -> GenerationRequest:
        """Validates a prompt and its sampling fields; GenerationError(400) names the first problem."""
        if not prompt_ids:
            raise _bad("prompt must not be empty", "prompt")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise _bad(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        room = self.max_model_len - len(prompt_ids)
        if room < 1:  # checked first: otherwise the default max_tokens (room) reads as a max_tokens error
            raise GenerationError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{len(prompt_ids)} tokens, which leaves no room for the completion.",
                400,
                "context_length_exceeded",
            )
        max_tokens = sampling.max_tokens if sampling.max_tokens is not None else (default_max_tokens or room)
        if max_tokens < 1:
            raise _bad("max_tokens must be at least 1", "max_tokens")
        if max_tokens > room:
            raise GenerationError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, {max_tokens} for "
                "the completion).",
                400,
                "context_length_exceeded",
            )
        _check_range(sampling)
        params = common_pb2.SamplingParams(
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=max(sampling.top_k, 0),
            min_p=sampling.min_p,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty,
            stop=sampling.stop,
            stop_token_ids=sampling.stop_token_ids,
            ignore_eos=sampling.ignore_eos,
        )
        if sampling.seed is not None:
            params.seed = sampling.seed
        if sampling.logprobs is not None:
            params.logprobs = sampling.logprobs
        return GenerationRequest(uuid.uuid4().hex, tuple(prompt_ids), params)

    # -- output -----------------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Admission, then the orchestrated deltas, under the per-request timeout."""
        async with self.admission.slot():
            if not self.pool.of_role("decode"):
                raise Overloaded("no decode worker is ready", 503, retry_after=2)
            deadline = asyncio.get_running_loop().time() + self.config.request_timeout_s
            async with asyncio.timeout_at(deadline):
                async for delta in self.orchestrator.generate(request):
                    yield delta

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _bad(message: str, param: str | None = None) -> GenerationError:
    return GenerationError(message, 400, "invalid_request_error", param)


def _check_range(s: SamplingInput) -> None:
    checks = [
        (0.0 <= s.temperature <= 2.0, "temperature must be between 0 and 2", "temperature"),
        (0.0 < s.top_p <= 1.0, "top_p must be in (0, 1]", "top_p"),
        (s.top_k >= -1, "top_k must be -1 (off) or a positive integer", "top_k"),
        (0.0 <= s.min_p <= 1.0, "min_p must be between 0 and 1", "min_p"),
        (-2.0 <= s.presence_penalty <= 2.0, "presence_penalty must be between -2 and 2", "presence_penalty"),
        (-2.0 <= s.frequency_penalty <= 2.0, "frequency_penalty must be between -2 and 2", "frequency_penalty"),
        (0.0 < s.repetition_penalty <= 2.0, "repetition_penalty must be in (0, 2]", "repetition_penalty"),
        (
            s.logprobs is None or 0 <= s.logprobs <= MAX_TOP_LOGPROBS,
            f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}",
            "logprobs",
        ),
        (len(s.stop) <= 16 and all(s.stop), "stop must be at most 16 non-empty strings", "stop"),
    ]
    for ok, message, param in checks:
        if not ok:
            raise _bad(message, param)
