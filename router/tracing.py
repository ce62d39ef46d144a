"""The router's part of a request's trace.

    client traceparent ─> POST /v1/completions (SERVER, FastAPI instrumentation)
                            ├─ route      decision, chosen workers, cached blocks
                            ├─ reserve    (CLIENT) ─ traceparent ─> decode worker's Reserve
                            ├─ prefill    (CLIENT) ─ traceparent ─> prefill worker's Prefill
                            ├─ decode     (CLIENT) ─ traceparent ─> decode worker's Generate
                            └─ events: prefill_retry, migration, lease_expired; usage when finished

The request's spans hang off the span current when the orchestrator began the request (the HTTP
or public gRPC server span): they are started with that parent, never made current, so they may
end in any task. Off (``contract.tracing.ENABLED`` false), every request shares ``OFF``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from contract import tracing

if TYPE_CHECKING:
    from router.routing import Route
    from router.workers import WorkerHandle

SERVICE_NAME = "splitserve-router"
# Probes, scrapes and the dashboard's polling would each be a trace; OTEL_PYTHON_FASTAPI_EXCLUDED_URLS overrides.
DEFAULT_EXCLUDED_URLS = "/health,/ready,/metrics,/dashboard"


def configure() -> bool:
    return tracing.configure(SERVICE_NAME)


def instrument_http(app) -> None:
    """A SERVER span per HTTP request (route template, status), continuing a client's ``traceparent``."""
    if not tracing.ENABLED:
        return
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    except ImportError as exc:
        raise tracing.TracingConfigError(
            f"OTEL_* asks for traces but {exc.name} is not installed: reinstall splitserve, "
            "or unset OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT"
        ) from exc
    # The stable HTTP conventions (http.request.method, http.route, http.response.status_code), unless
    # the operator chose otherwise; the instrumentation reads this once, when it first instruments.
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    FastAPIInstrumentor.instrument_app(
        app,
        excluded_urls=os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", DEFAULT_EXCLUDED_URLS),
        exclude_spans=["receive", "send"],  # not a span per streamed chunk
    )


class RequestTrace:
    """One request's spans on the router. Made where the request starts; used on the router's loop."""

    def __init__(self) -> None:
        from opentelemetry import trace

        self.parent = tracing.current_context()
        self.request_span = trace.get_current_span(self.parent)

    def routed(self, chosen: Route, block_hashes) -> None:
        prefill = chosen.prefill
        tracing.start_span(
            "route",
            parent=self.parent,
            decision=chosen.decision.value,
            reason=chosen.reason or None,
            decode_worker=chosen.decode.address,
            prefill_worker=prefill.address if prefill is not None else None,
            uncached_tokens=chosen.uncached_tokens,
            decode_cached_blocks=chosen.decode.kv.prefix_blocks(block_hashes),
            prefill_cached_blocks=prefill.kv.prefix_blocks(block_hashes) if prefill is not None else None,
            prompt_blocks=len(block_hashes),
        ).end()

    def call(self, name: str, worker: WorkerHandle, worker_request_id: str):
        """A CLIENT span for one call to a worker; pass its ``metadata`` to the call."""
        return tracing.start_span(
            name,
            kind="client",
            parent=self.parent,
            propagate=True,
            worker=worker.address,
            worker_request_id=worker_request_id,
        )

    def end_when_done(self, span, call) -> None:
        """Ends ``span`` when the gRPC ``call`` ends (a stream the request reads across many tasks' turns)."""
        call.add_done_callback(lambda _call: span.end())

    def event(self, name: str, **attributes) -> None:
        self.request_span.add_event(name, tracing.span_attributes(attributes))

    def finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> None:
        self.request_span.set_attributes(
            tracing.span_attributes(
                dict(
                    finish_reason=finish_reason,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    cached_tokens=cached_tokens,
                )
            )
        )


class _Off:
    """Every request's trace while tracing is off: nothing is made."""

    def routed(self, chosen, block_hashes) -> None:
        pass

    def call(self, name: str, worker, worker_request_id: str):
        return tracing.NO_SPAN

    def end_when_done(self, span, call) -> None:
        pass

    def event(self, name: str, **attributes) -> None:
        pass

    def finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> None:
        pass


OFF = _Off()


def request_trace() -> RequestTrace | _Off:
    return RequestTrace() if tracing.ENABLED else OFF
