"""The public gRPC API: ``splitserve.Generate/Generate`` streams a completion; plus standard health
checking and server reflection."""

from __future__ import annotations

import hmac

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import generate_pb2, generate_pb2_grpc
from router.frontend import Frontend, SamplingInput
from router.orchestrator import GenerationError

_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class GenerateService(generate_pb2_grpc.GenerateServicer):
    def __init__(self, frontend: Frontend, api_keys: tuple[str, ...] = ()) -> None:
        self.frontend = frontend
        self.api_keys = api_keys

    async def Generate(self, request: generate_pb2.CompletionRequest, context: grpc.aio.ServicerContext):
        frontend = self.frontend
        if self.api_keys and not self._authorized(context):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing or incorrect API key (metadata authorization: Bearer KEY)"
            )
        try:
            frontend.check_model(request.model)
            job = frontend.build(self._prompt(request), _sampling(request), 16)
            async for delta in frontend.stream(job):
                chunk = generate_pb2.CompletionChunk(
                    request_id=request.request_id or job.request_id,
                    token_ids=delta.token_ids,
                    text=delta.text,
                    logprobs=delta.logprobs,
                    finish_reason=delta.finish_reason or "",
                )
                if delta.usage is not None:
                    chunk.usage.CopyFrom(delta.usage)
                yield chunk
        except GenerationError as exc:
            await context.abort(_STATUS.get(exc.status, grpc.StatusCode.UNAVAILABLE), str(exc))
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "request timed out")

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        metadata = dict(context.invocation_metadata() or ())
        supplied = str(metadata.get("authorization", "")).removeprefix("Bearer ").strip()
        return any(hmac.compare_digest(supplied, key) for key in self.api_keys)

    def _prompt(self, request: generate_pb2.CompletionRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "text":
            return self.frontend.encode_text(request.text)
        if kind == "token_ids":
            return list(request.token_ids.ids)
        if kind == "chat":
            return self.frontend.encode_chat([{"role": m.role, "content": m.content} for m in request.chat.messages])
        raise GenerationError("the request needs text, token_ids or chat", 400, "invalid_request_error")


def _sampling(request: generate_pb2.CompletionRequest) -> SamplingInput:
    p = request.params
    return SamplingInput(
        max_tokens=p.max_tokens or None,
        temperature=p.temperature,
        top_p=p.top_p or 1.0,
        top_k=p.top_k or -1,
        min_p=p.min_p,
        seed=p.seed if p.HasField("seed") else None,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty or 1.0,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
    )


def create_grpc_server(frontend: Frontend, address: str, api_keys: tuple[str, ...] = ()) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    generate_pb2_grpc.add_GenerateServicer_to_server(GenerateService(frontend, api_keys), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_name = generate_pb2.DESCRIPTOR.services_by_name["Generate"].full_name
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    server.health_servicer = health_servicer
    server.health_service_name = service_name
    return server, port


async def mark_serving(server: grpc.aio.Server) -> None:
    for name in ("", server.health_service_name):
        await server.health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
