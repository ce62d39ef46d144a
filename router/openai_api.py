"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, health.

Every error leaves in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator
from pydantic_core import PydanticCustomError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract.sampling import FIELDS as SAMPLING_FIELDS
from contract.sampling import FieldError, SamplingParams, wrap_seed
from router.frontend import Frontend, Overloaded
from router.orchestrator import Delta, GenerationError, GenerationRequest

# -- request bodies -----------------------------------------------------------------------------------
#
# Every field of every request model is honoured or refused (tests/router/test_request_fields.py walks the models
# and fails on a field missing from these tables). Unknown fields are refused too (extra="forbid"), each with a
# 400 naming it. Metadata fields are honoured as metadata: accepted, and they change nothing generated.

_SAMPLING_HONOURED = frozenset(
    {
        "model",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "n",
        "stream",
        "stream_options",
        "ignore_eos",
        "return_tokens_as_token_ids",
        "user",
    }
)
METADATA = frozenset({"user", "safety_identifier", "prompt_cache_key"})
COMPLETION_HONOURED = _SAMPLING_HONOURED | {"prompt", "max_tokens", "logprobs"}
CHAT_HONOURED = _SAMPLING_HONOURED | {
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "safety_identifier",
    "prompt_cache_key",
}
MESSAGE_HONOURED = frozenset({"role", "content"})
STREAM_OPTIONS_HONOURED = frozenset({"include_usage"})


@dataclass(frozen=True)
class Refusal:
    """A known field this server does not implement. Values in ``neutral`` ask for nothing and are accepted
    (clients often send a field's default); any other value is a 400 naming the field."""

    detail: str = ""
    neutral: tuple = (None,)

    def refuses(self, value: Any) -> bool:
        return not any(type(value) is type(n) and value == n for n in self.neutral)


_NOT_STRUCTURED = Refusal("structured output (guided decoding) is not implemented")
_SAMPLING_REFUSED: dict[str, Refusal] = {
    "logit_bias": Refusal(neutral=(None, {})),
    "response_format": Refusal("structured output is not implemented", neutral=(None, {"type": "text"})),
    "guided_json": _NOT_STRUCTURED,
    "guided_regex": _NOT_STRUCTURED,
    "guided_choice": _NOT_STRUCTURED,
    "guided_grammar": _NOT_STRUCTURED,
    "guided_decoding_backend": _NOT_STRUCTURED,
    "guided_whitespace_pattern": _NOT_STRUCTURED,
    "structural_tag": _NOT_STRUCTURED,
    "use_beam_search": Refusal(neutral=(None, False)),
    "length_penalty": Refusal(neutral=(None, 1, 1.0)),
    "min_tokens": Refusal(neutral=(None, 0)),
    "include_stop_str_in_output": Refusal(neutral=(None, False)),
    "skip_special_tokens": Refusal(),
    "spaces_between_special_tokens": Refusal(),
    "truncate_prompt_tokens": Refusal(),
    "prompt_logprobs": Refusal(),
    "allowed_token_ids": Refusal(),
    "bad_words": Refusal(neutral=(None, [])),
    "logits_processors": Refusal(),
    "add_special_tokens": Refusal(),
    "priority": Refusal(neutral=(None, 0)),
    "request_id": Refusal(),
    "echo": Refusal(neutral=(None, False)),
}
COMPLETION_REFUSED: dict[str, Refusal] = {
    **_SAMPLING_REFUSED,
    "best_of": Refusal(neutral=(None, 1)),
    "suffix": Refusal(neutral=(None, "")),
}
_NO_TOOLS = "tool and function calling is not implemented"
CHAT_REFUSED: dict[str, Refusal] = {
    **_SAMPLING_REFUSED,
    "tools": Refusal(_NO_TOOLS, neutral=(None, [])),
    "tool_choice": Refusal(_NO_TOOLS, neutral=(None, "none")),
    "parallel_tool_calls": Refusal(_NO_TOOLS),
    "functions": Refusal(_NO_TOOLS, neutral=(None, [])),
    "function_call": Refusal(_NO_TOOLS, neutral=(None, "none")),
    "audio": Refusal(),
    "modalities": Refusal(neutral=(None, ["text"])),
    "prediction": Refusal(),
    "reasoning_effort": Refusal(),
    "verbosity": Refusal(),
    "web_search_options": Refusal(),
    "store": Refusal("completions are not stored", neutral=(None, False)),
    "metadata": Refusal("completions are not stored", neutral=(None, {})),
    "service_tier": Refusal(neutral=(None, "auto", "default")),
    "add_generation_prompt": Refusal("the assistant's turn is always opened", neutral=(None, True)),
    "continue_final_message": Refusal(neutral=(None, False)),
    "chat_template": Refusal("the model's own chat template is used"),
    "chat_template_kwargs": Refusal(neutral=(None, {})),
    "documents": Refusal(),
    "mm_processor_kwargs": Refusal(),
}
MESSAGE_REFUSED: dict[str, Refusal] = {
    "name": Refusal(),
    "tool_calls": Refusal(_NO_TOOLS, neutral=(None, [])),
    "tool_call_id": Refusal(_NO_TOOLS),
    "function_call": Refusal(_NO_TOOLS),
    "refusal": Refusal(),
    "audio": Refusal(),
    "reasoning_content": Refusal(),
}
STREAM_OPTIONS_REFUSED: dict[str, Refusal] = {"continuous_usage_stats": Refusal(neutral=(None, False))}


class _Strict(BaseModel):
    """Unknown fields are a 400; every string must be valid UTF-8 (JSON escapes can carry lone surrogates)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _utf8(cls, value: Any, info: ValidationInfo) -> Any:
        if not _valid_utf8(value):
            raise PydanticCustomError("invalid_utf8", "{field} is not valid UTF-8", {"field": info.field_name})
        return value


def _valid_utf8(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_valid_utf8(k) and _valid_utf8(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_valid_utf8(v) for v in value)
    return True


def _refusing(name: str, base: type[BaseModel], refused: dict[str, Refusal]) -> type[BaseModel]:
    """``base`` with the ``refused`` fields added: typed Any, so that any value reaches the refusal."""

    def refuse(cls, value: Any, info: ValidationInfo) -> Any:
        refusal = refused[info.field_name]
        if refusal.refuses(value):
            detail = f": {refusal.detail}" if refusal.detail else ""
            raise PydanticCustomError(
                "unsupported_field", "{field} is not supported{detail}", {"field": info.field_name, "detail": detail}
            )
        return value

    return create_model(
        name,
        __base__=base,
        __validators__={"_refuse": field_validator(*refused)(refuse)},
        **{field: (Any, None) for field in refused},
    )


class StreamOptions(_refusing("_StreamOptionsRefused", _Strict, STREAM_OPTIONS_REFUSED)):
    include_usage: bool = False


class _SamplingFields(_Strict):
    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    return_tokens_as_token_ids: bool = False  # vLLM's extension: logprob tokens as "token_id:N"

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The sampling record; fields named as in the record pass through. FieldError names a bad one."""
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed when stream is true")
        same = {name: getattr(self, name) for name in SAMPLING_FIELDS if name in type(self).model_fields}
        same.update(stop=self.stop or (), stop_token_ids=tuple(self.stop_token_ids or ()))
        return SamplingParams(**{**same, "max_tokens": max_tokens, "logprobs": logprobs})


class CompletionBody(_refusing("_CompletionRefused", _SamplingFields, COMPLETION_REFUSED)):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None


class ChatMessageBody(_refusing("_ChatMessageRefused", _Strict, MESSAGE_REFUSED)):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatBody(_refusing("_ChatRefused", _SamplingFields, CHAT_REFUSED)):
    messages: list[ChatMessageBody] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # a hint: prefixes are cached whether or not it is given


# -- the app ------------------------------------------------------------------------------------------


def create_app(frontend: Frontend, api_keys: tuple[str, ...] = ()) -> FastAPI:
    app = FastAPI(
        title="splitserve", version="0.1.0", description="OpenAI-compatible API of a disaggregated LLM serving cluster"
    )
    app.state.frontend = frontend
    _install_errors(app)
    _install_guards(app, frontend, api_keys)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        decodes = frontend.pool.of_role("decode")
        ready = bool(decodes) and frontend.model.served is not None
        body = {
            "ready": ready,
            "decode_workers": len(decodes),
            "prefill_workers": len(frontend.pool.of_role("prefill")),
            "model": frontend.model.describe(),
            "incompatible_workers": [
                {"address": w.address, "role": w.role, "reason": w.incompatible.reason, "fields": w.incompatible.fields}
                for w in frontend.pool.incompatible()
            ],
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(frontend.metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": frontend.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "splitserve",
                    "max_model_len": frontend.max_model_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        frontend.check_model(body.model)
        prompts = _completion_prompts(frontend, body.prompt)
        if body.stream and len(prompts) > 1:
            raise GenerationError("streaming supports a single prompt", 400, "invalid_request_error", "prompt")
        params = body.sampling(16 if body.max_tokens is None else body.max_tokens, body.logprobs)
        choices = [p for p in prompts for _ in range(body.n)]
        jobs = [frontend.build(p, choice) for p, choice in zip(choices, _seeded(params, len(choices)))]
        return await _respond(request, frontend, body, jobs, "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        frontend.check_model(body.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as exc:
            raise GenerationError(str(exc), 400, "invalid_request_error", "messages") from exc
        prompt = frontend.encode_chat(messages)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise GenerationError(
                "top_logprobs requires logprobs to be true", 400, "invalid_request_error", "top_logprobs"
            )
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = body.sampling(frontend.room(prompt) if max_tokens is None else max_tokens, logprobs)
        jobs = [frontend.build(prompt, choice) for choice in _seeded(params, body.n)]
        return await _respond(request, frontend, body, jobs, "chat.completion", "chatcmpl")

    return app


def _completion_prompts(frontend: Frontend, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [frontend.encode_text(prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if prompt and all(isinstance(p, str) for p in prompt):
        return [frontend.encode_text(p) for p in prompt]
    if prompt and all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise GenerationError(
        "prompt must be a string, a list of strings, or token ids", 400, "invalid_request_error", "prompt"
    )


def _seeded(params: SamplingParams, choices: int) -> list[SamplingParams]:
    """n > 1 with a seed: each choice gets its own seed, so the choices differ yet reproduce."""
    if params.seed is None or choices < 2:
        return [params] * choices
    return [replace(params, seed=wrap_seed(params.seed + index)) for index in range(choices)]


# -- responses ----------------------------------------------------------------------------------------


async def _respond(request: Request, frontend: Frontend, body, jobs: list[GenerationRequest], kind: str, prefix: str):
    response_id = f"{prefix}-{uuid.uuid4().hex}"
    token_text = (lambda t: f"token_id:{t}") if body.return_tokens_as_token_ids else frontend.token_text
    created = int(time.time())
    chat = kind == "chat.completion"
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        deltas = _merge([frontend.stream(job) for job in jobs])
        # Admission, routing and prefill run before the headers go out: their errors keep their status (429, 503).
        first = await _first_or_cancel(request, deltas)
        return StreamingResponse(
            _sse(frontend, _chained(first, deltas), len(jobs), response_id, created, chat, include_usage, token_text),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    results = await _collect_or_cancel(request, [_collect(frontend, job) for job in jobs])
    return _full_response(frontend, results, response_id, created, chat, token_text)


async def _first_or_cancel(request: Request, deltas: AsyncIterator[tuple[int, Delta]]) -> tuple[int, Delta]:
    """The first delta of a stream; if the client disconnects first, closes the stream (and so the workers' work)."""
    try:
        return await _unless_disconnected(request, asyncio.ensure_future(anext(deltas)))
    except BaseException:
        await deltas.aclose()
        raise


async def _unless_disconnected(request: Request, future: asyncio.Future):
    """``future``'s result; if the client disconnects first, cancels it and answers 499 (to nobody)."""
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.5)
            if done:
                return future.result()
            if await request.is_disconnected():
                raise GenerationError("client disconnected", 499, "client_closed_request")
    finally:
        if not future.done():
            future.cancel()
            await asyncio.wait({future})
            if not future.cancelled():
                future.exception()  # a cancelled gather ends with CancelledError as its exception: mark it seen


async def _chained(
    first: tuple[int, Delta], rest: AsyncIterator[tuple[int, Delta]]
) -> AsyncIterator[tuple[int, Delta]]:
    yield first
    async for item in rest:
        yield item


async def _collect(frontend: Frontend, job: GenerationRequest) -> list[Delta]:
    return [delta async for delta in frontend.stream(job)]


async def _collect_or_cancel(request: Request, coroutines) -> list[list[Delta]]:
    """Runs the generations; if the client disconnects first, cancels them (and so the workers' work)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await _unless_disconnected(request, asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def _full_response(
    frontend: Frontend, results: list[list[Delta]], response_id: str, created: int, chat: bool, token_text
) -> dict:
    choices = []
    prompt_tokens = completion_tokens = cached = 0
    for index, deltas in enumerate(results):
        text = "".join(d.text for d in deltas)
        last = deltas[-1]
        logprobs = [lp for d in deltas for lp in d.logprobs]
        choice: dict[str, Any] = {"index": index, "finish_reason": last.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = _chat_logprobs(token_text, logprobs) if logprobs else None
        else:
            choice["text"] = text
            choice["logprobs"] = _completion_logprobs(token_text, logprobs) if logprobs else None
        choices.append(choice)
        if last.usage is not None:
            prompt_tokens = last.usage.prompt_tokens
            completion_tokens += last.usage.completion_tokens
            cached = max(cached, last.usage.cached_tokens)
    return {
        "id": response_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": frontend.model_name,
        "choices": choices,
        "usage": _usage(prompt_tokens, completion_tokens, cached),
    }


def _usage(prompt: int, completion: int, cached: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def _sse(
    frontend: Frontend,
    deltas: AsyncIterator[tuple[int, Delta]],
    choices: int,
    response_id: str,
    created: int,
    chat: bool,
    include_usage: bool,
    token_text,
) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        payload = {
            "id": response_id,
            "object": kind,
            "created": created,
            "model": frontend.model_name,
            "choices": choices,
        }
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    totals = [0, 0, 0]
    try:
        if chat:
            for index in range(choices):
                yield chunk(
                    [
                        {
                            "index": index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
        async for index, delta in deltas:
            yield chunk([_stream_choice(token_text, index, delta, chat)])
            if delta.usage is not None:
                totals[0] = delta.usage.prompt_tokens
                totals[1] += delta.usage.completion_tokens
                totals[2] = max(totals[2], delta.usage.cached_tokens)
        if include_usage:
            yield chunk([], _usage(*totals))
    except GenerationError as exc:
        yield f"data: {json.dumps(_error_body(exc))}\n\n"
    except TimeoutError:
        yield f"data: {json.dumps(_error_body(GenerationError('request timed out', 504, 'timeout')))}\n\n"
    yield "data: [DONE]\n\n"


def _stream_choice(token_text, index: int, delta: Delta, chat: bool) -> dict:
    choice: dict[str, Any] = {"index": index, "finish_reason": delta.finish_reason}
    if chat:
        choice["delta"] = {"content": delta.text} if delta.text or not delta.finish_reason else {}
        choice["logprobs"] = _chat_logprobs(token_text, delta.logprobs) if delta.logprobs else None
    else:
        choice["text"] = delta.text
        choice["logprobs"] = _completion_logprobs(token_text, delta.logprobs) if delta.logprobs else None
    return choice


async def _merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """Interleaves several generations' deltas as they come; cancels all if the consumer leaves.

    Each generation runs in a task of its own: the consumer may move between tasks (the request
    handler takes the first delta, the response streams the rest), a generation's timeout may not."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async for delta in stream:
                await queue.put((index, delta))
            await queue.put((index, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _completion_logprobs(token_text, logprobs) -> dict:
    return {
        "tokens": [token_text(lp.token_id) for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{token_text(t.token_id): t.logprob for t in lp.top} for lp in logprobs],
        "text_offset": [],
    }


def _chat_logprobs(token_text, logprobs) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t.token_id, t.logprob) for t in lp.top])
            for lp in logprobs
        ]
    }


# -- errors and guards ----------------------------------------------------------------------------------


def _error_body(exc: GenerationError) -> dict:
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    param = _printable(exc.param) if exc.param is not None else None
    return {"error": {"message": _printable(str(exc)), "type": kind, "param": param, "code": exc.code}}


def _printable(text: str) -> str:
    """``text`` as valid UTF-8: a lone surrogate from the request (say, in an unknown field's name) is escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(
    message: str, status: int, code: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(_error_body(GenerationError(message, status, code, param)), status_code=status, headers=headers)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(GenerationError)
    async def generation_error(request: Request, exc: GenerationError):
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
        return JSONResponse(_error_body(exc), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return error_response("We could not parse the JSON body of your request.", 400, "invalid_json")
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        if first.get("type") == "extra_forbidden":
            return error_response(
                f"Unrecognized request argument supplied: {param}", 400, "invalid_request_error", param
            )
        if first.get("type") in ("unsupported_field", "invalid_utf8"):
            return error_response(first["msg"], 400, "invalid_request_error", param)
        return error_response(f"{param + ': ' if param else ''}{first.get('msg')}", 400, "invalid_request_error", param)

    @app.exception_handler(FieldError)
    async def field_error(request: Request, exc: FieldError):
        return error_response(str(exc), 400, "invalid_request_error", exc.field)

    @app.exception_handler(ValidationError)
    async def pydantic_error(request: Request, exc: ValidationError):
        return error_response(str(exc), 400, "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(str(exc.detail), exc.status_code, "not_found" if exc.status_code == 404 else "http_error")

    @app.exception_handler(TimeoutError)
    async def timeout_error(request: Request, exc: TimeoutError):
        return error_response("request timed out", 504, "timeout")


_OPEN_PATHS = {"/health", "/ready", "/metrics", "/docs", "/openapi.json", "/redoc"}


def _install_guards(app: FastAPI, frontend: Frontend, api_keys: tuple[str, ...]) -> None:
    app.add_middleware(_Guard, frontend=frontend, api_keys=api_keys)


class _Guard:
    """API keys, body size and request counts, as plain ASGI middleware: Starlette's BaseHTTPMiddleware
    (``@app.middleware``) would hide the client's disconnect from ``request.is_disconnected()``, and with it
    the cancellation of a non-streaming request whose client left."""

    def __init__(self, app, frontend: Frontend, api_keys: tuple[str, ...]) -> None:
        self.app = app
        self.frontend = frontend
        self.api_keys = api_keys
        self.limit = frontend.config.max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, headers = scope["path"], Headers(scope=scope)
        # The dashboard and operator API are read-only without the admin token, which guards their actions.
        if self.api_keys and path not in _OPEN_PATHS and not path.startswith(("/dashboard", "/admin")):
            supplied = headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not any(hmac.compare_digest(supplied, key) for key in self.api_keys):
                await error_response("Incorrect API key provided.", 401, "invalid_api_key")(scope, receive, send)
                return
        declared = headers.get("content-length")
        too_large = error_response(f"request body larger than {self.limit} bytes", 413, "request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_large(scope, receive, send)
            return
        if scope["method"] == "POST" and declared is None:
            body = await self._read_body(receive)
            if body is None:
                await too_large(scope, receive, send)
                return
            receive = _replaying(body, receive)
        status = 0

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if path.startswith("/v1/") and status:
                self.frontend.metrics.requests.labels(path, str(status)).inc()

    async def _read_body(self, receive) -> bytes | None:
        """A body sent without content-length, or None once it passes the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return None
            if not message.get("more_body"):
                return b"".join(chunks)


def _replaying(body: bytes, receive):
    """``receive`` that hands out an already-read body first, then the client's later messages (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay
