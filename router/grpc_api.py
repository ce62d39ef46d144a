"""The public gRPC API: ``splitserve.Generate/Generate`` streams a completion; plus standard health
checking (SERVING exactly while the router is ready, as ``/ready`` answers) and server reflection. With API keys
set, Generate and reflection (it describes the services) want a key in the ``authorization`` metadata; health stays
open for probes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import inspect
import re
import time

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from contract import tracing
from contract.errors import check_request_id, fields_named
from contract.sampling import DEFAULT_MAX_TOKENS, FieldError, SamplingParams
from contract.sampling import FIELDS as SAMPLING_FIELDS
from protos import generate_pb2, generate_pb2_grpc
from protos.cluster_auth import add_port, server_options
from router.frontend import STALLED_SEND, Frontend, log_access, served_id, serving
from router.orchestrator import GenerationError
from router.structured import tool_turns

_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # Both retryable: a request that can never succeed is a 400 wherever it is refused (a worker's refusal included).
    # 502: a worker failed this request (a KV transfer that failed, its engine's error): the next try may not.
    502: grpc.StatusCode.UNAVAILABLE,
    # 503: no worker can take it now (none healthy, all full, the queue waited too long).
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# Every field of every request message, honoured (tests/router/test_request_fields.py walks the protos and fails on a
# field missing here). Nothing is refused: the messages carry only what the router implements.
HONOURED: dict[str, frozenset[str]] = {
    "CompletionRequest": frozenset({"model", "text", "token_ids", "chat", "params", "request_id", "priority"}),
    "ChatMessages": frozenset({"messages"}),
    "ChatMessage": frozenset({"role", "content"}),
    "TokenIds": frozenset({"ids"}),
    "SamplingParams": frozenset(SAMPLING_FIELDS),
    "Grammar": frozenset({"kind", "text", "accepted_prompt_tokens"}),
}
# A sampling field's errors name it as the proto spells it (params.temperature), on every input kind. An unset
# params.max_tokens (0) is DEFAULT_MAX_TOKENS, a chat's too (common.proto says what each zero value means).
_PARAMS_NAMED = {name: f"params.{name}" for name in SAMPLING_FIELDS}
GENERATE_METHOD = "splitserve.Generate/Generate"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


class GenerateService(generate_pb2_grpc.GenerateServicer):
    def __init__(self, frontend: Frontend, api_keys: tuple[str, ...] = ()) -> None:
        self.frontend = frontend
        self.api_keys = api_keys

    @tracing.server_span(GENERATE_METHOD)  # the request's trace: continues a client's traceparent
    async def Generate(self, request: generate_pb2.CompletionRequest, context: grpc.aio.ServicerContext):
        started, code = time.monotonic(), "OK"
        try:
            async for chunk in self._generate(request, context):
                yield chunk
        except asyncio.CancelledError:
            code = getattr(context.code(), "name", "CANCELLED")  # the client left, the server stopped, or timed out
            raise
        except BaseException:
            code = getattr(context.code(), "name", "UNKNOWN")
            raise
        finally:
            self.frontend.metrics.grpc_requests_by(GENERATE_METHOD, code).inc()
            if self.frontend.config.access_log:
                log_access(context.peer(), f"gRPC {GENERATE_METHOD}", code, started, served_id() or "-")

    async def _generate(self, request: generate_pb2.CompletionRequest, context: grpc.aio.ServicerContext):
        frontend = self.frontend
        if self.api_keys and not self._authorized(context):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing or incorrect API key (metadata authorization: Bearer KEY)"
            )
        try:
            STALLED_SEND.set(functools.partial(_end_stalled, context, asyncio.current_task()))
            check_known_fields(request)
            frontend.check_model(request.model)
            check_request_id(request.request_id, "request_id")
            serving(request.request_id)
            prompt, prompt_field = self._prompt(request)
            with fields_named(_PARAMS_NAMED):
                params = SamplingParams.from_wire(request.params, DEFAULT_MAX_TOKENS)
                job = frontend.build(prompt, params, prompt_field, "params.max_tokens", request.priority)
            if not request.request_id:  # the client knows it by the id its chunks carry: its log line's, its span's
                serving(job.request_id)
            async for delta in frontend.stream(job):
                chunk = generate_pb2.CompletionChunk(
                    request_id=request.request_id or job.request_id,
                    token_ids=delta.token_ids,
                    text=delta.text,
                    logprobs=delta.logprobs,
                    finish_reason=delta.finish_reason or "",
                    prompt_logprobs=delta.prompt_logprobs,
                )
                if delta.usage is not None:
                    chunk.usage.CopyFrom(delta.usage)
                yield chunk
        except GenerationError as exc:
            await context.abort(_STATUS.get(exc.status, grpc.StatusCode.INTERNAL), _naming(str(exc), exc.param))
        except FieldError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _naming(str(exc), exc.field))
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "request timed out")

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        return _has_key(context.invocation_metadata(), self.api_keys)

    def _prompt(self, request: generate_pb2.CompletionRequest) -> tuple[list[int], str]:
        """The prompt, and the field it came from (errors about it name that field)."""
        kind = request.WhichOneof("input")
        if kind == "text":
            return self.frontend.encode_text(request.text, "text"), "text"
        if kind == "token_ids":
            return list(request.token_ids.ids), "token_ids.ids"
        if kind == "chat":
            # Checked as HTTP's are (router/structured.py), an unknown role refused by name. A ChatMessage carries
            # no tool calls and no tool_call_id, so it cannot be a tool's result.
            said = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            for index, message in enumerate(said):
                if message["role"] == "tool":
                    where = f"chat.messages.{index}.role"
                    raise FieldError(where, f"{where}: a tool message needs a tool_call_id, which ChatMessage lacks")
            with fields_named({"messages": "chat.messages"}):
                turns = tool_turns(said, self.frontend.tokenizer)
                return self.frontend.encode_chat(turns), "chat.messages"
        raise GenerationError("the request needs text, token_ids or chat", 400, "invalid_request_error")


def _naming(message: str, field: str | None) -> str:
    """A status's message names the request's field it is about, as HTTP's error does in its param (a word of the
    message that merely contains the field's name, "context" for text, does not)."""
    if not field or re.search(rf"(?<![\w.]){re.escape(field)}\b", message):
        return message
    return f"{field}: {message}"


async def _end_stalled(context: grpc.aio.ServicerContext, handler: asyncio.Task) -> None:
    """Ends a call whose time ran out while its client read nothing (the write waits on HTTP/2 flow control): its
    status, DEADLINE_EXCEEDED, is queued behind the messages the client has yet to read, then the handler is
    cancelled, which frees its slot and stops its workers. (A handler cancelled alone leaves the call no status.)"""
    with contextlib.suppress(Exception):  # the abort's AbortError, or its wait for a client that reads nothing
        await asyncio.wait_for(context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "request timed out"), 0.1)
    handler.cancel()


def check_known_fields(message: Message, where: str = "") -> None:
    """FieldError naming a field this router's protos do not have, anywhere in ``message`` (a client built from a
    newer .proto sent it): refused, where protobuf would keep it aside and the request would run without it."""
    unknown = UnknownFieldSet(message)
    if len(unknown):
        numbers = ", ".join(str(field.field_number) for field in unknown)
        place = where or message.DESCRIPTOR.name
        raise FieldError(where, f"{place} has field number(s) {numbers}, unknown to this router's protos")
    for field, value in message.ListFields():
        name = f"{where}.{field.name}" if where else field.name
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:  # logit_bias: scalar values, nothing of its own to check
            if field.message_type.fields_by_name["value"].message_type is not None:
                for key, item in value.items():
                    check_known_fields(item, f"{name}.{key}")
        elif field.is_repeated:
            for index, item in enumerate(value):
                check_known_fields(item, f"{name}.{index}")
        else:
            check_known_fields(value, name)


def _has_key(metadata, api_keys: tuple[str, ...]) -> bool:
    supplied = str(dict(metadata or ()).get("authorization", "")).removeprefix("Bearer ").strip()
    return any(hmac.compare_digest(supplied.encode(), key.encode()) for key in api_keys)


class _Malformed:
    """A request whose bytes did not parse as its message."""

    def __init__(self, error: str) -> None:
        self.error = error


class _RefuseMalformed(grpc.aio.ServerInterceptor):
    """A unary request that is no valid message (corrupt wire format, a string that is not UTF-8) gets
    INVALID_ARGUMENT saying so, where grpcio would answer UNKNOWN and log the parser's traceback as the server's own
    error."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def parse_or_name(data: bytes):
            try:
                return parse(data)
            except DecodeError as exc:
                return _Malformed(str(exc))

        async def refuse(malformed: _Malformed, context) -> None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message: {malformed.error}"
            )

        behaviour = handler.unary_stream if handler.response_streaming else handler.unary_unary
        if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
            return handler  # a synchronous handler: grpcio runs it in a thread, as it is

        async def answer(request, context):  # a unary answer, or a stream written with context.write
            if isinstance(request, _Malformed):
                await refuse(request, context)
            return await behaviour(request, context)

        async def stream(request, context):  # a stream yielded
            if isinstance(request, _Malformed):
                await refuse(request, context)
            async for response in behaviour(request, context):
                yield response

        checked = stream if inspect.isasyncgenfunction(behaviour) else answer
        if handler.response_streaming:
            return handler._replace(request_deserializer=parse_or_name, unary_stream=checked)
        return handler._replace(request_deserializer=parse_or_name, unary_unary=checked)


class _ReflectionNeedsKey(grpc.aio.ServerInterceptor):
    """Refuses server reflection (UNAUTHENTICATED) to a caller without an API key."""

    def __init__(self, api_keys: tuple[str, ...]) -> None:
        self.api_keys = api_keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(REFLECTION_PREFIXES):
            return handler
        if _has_key(handler_call_details.invocation_metadata, self.api_keys):
            return handler

        async def refuse(request_iterator, context):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing or incorrect API key (metadata authorization: Bearer KEY)"
            )

        return grpc.stream_stream_rpc_method_handler(refuse)


def create_grpc_server(
    frontend: Frontend,
    address: str,
    api_keys: tuple[str, ...] = (),
    tls: tuple[bytes, bytes] | None = None,
    listener: str = "",
) -> tuple[grpc.aio.Server, int]:
    """``tls``: (certificate chain, key) PEM: the endpoint then serves TLS only. ListenError (naming ``listener``)
    where it cannot listen."""
    server = grpc.aio.server(
        interceptors=[_RefuseMalformed(), *([_ReflectionNeedsKey(api_keys)] if api_keys else [])],
        # A request past max_body_bytes is refused (RESOURCE_EXHAUSTED) before it is read, as HTTP's 413
        options=[*server_options(), ("grpc.max_receive_message_length", frontend.config.max_body_bytes)],
    )
    generate_pb2_grpc.add_GenerateServicer_to_server(GenerateService(frontend, api_keys), server)
    service_name = generate_pb2.DESCRIPTOR.services_by_name["Generate"].full_name
    health_servicer = ReadinessHealth(frontend, ("", service_name))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    credentials = None
    if tls is not None:
        cert, key = tls
        credentials = grpc.ssl_server_credentials([(key, cert)])
    port = add_port(server, address, credentials, listener)
    server.health_servicer = health_servicer
    return server, port


class ReadinessHealth(health.aio.HealthServicer):
    """grpc.health.v1 for the router's ``services`` (the server's, "", and the API's): SERVING while the router is
    ready (``Frontend.ready``: a model bound, a decode worker routable, no stop begun), NOT_SERVING otherwise. A
    Check reads it then; ``follow`` tells Watch streams each change."""

    def __init__(self, frontend: Frontend, services: tuple[str, ...]) -> None:
        super().__init__()
        self.frontend = frontend
        self.services = services

    async def refresh(self) -> None:
        serving = (
            health_pb2.HealthCheckResponse.SERVING
            if self.frontend.ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.services:
            if self._server_status.get(name) != serving:
                await self.set(name, serving)  # nothing once a stop began (enter_graceful_shutdown)

    async def Check(self, request: health_pb2.HealthCheckRequest, context):
        await self.refresh()
        return await super().Check(request, context)

    async def follow(self, interval_s: float) -> None:
        """Until cancelled: readiness looked at every ``interval_s`` (the workers' health checks' pace)."""
        while True:
            await self.refresh()
            await asyncio.sleep(interval_s)


async def mark_stopping(server: grpc.aio.Server) -> None:
    """Health says NOT_SERVING from now on (a stop began), while the server still serves through its delay."""
    await server.health_servicer.enter_graceful_shutdown()
