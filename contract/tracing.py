"""OpenTelemetry tracing shared by the router and the workers: one trace per request, its context
carried in gRPC metadata (W3C ``traceparent``), spans exported as the standard ``OTEL_*``
variables say — and nothing at all unless they ask for it.

Contract:
- ``configure`` runs once per process, at start-up (``Router`` and ``WorkerBase`` call it). It
  turns tracing on only when ``OTEL_TRACES_EXPORTER`` names an exporter or an OTLP endpoint is set
  (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); ``OTEL_SDK_DISABLED``
  wins. A value it cannot honour, or a missing OpenTelemetry package, is a ``TracingConfigError``
  naming it: never a process that silently exports nothing.
- ``ENABLED`` is the module flag hot paths read before touching OpenTelemetry: off, no span,
  context or carrier object is made (``NO_SPAN`` stands in, its ``metadata`` is None, the gRPC
  default).
- Sampling (``OTEL_TRACES_SAMPLER``/``_ARG``), resource (``OTEL_SERVICE_NAME``,
  ``OTEL_RESOURCE_ATTRIBUTES``), batching (``OTEL_BSP_*``), exporter endpoint, headers, TLS and
  timeouts are read by the OpenTelemetry SDK itself; propagators by ``OTEL_PROPAGATORS``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
from collections.abc import Mapping

log = logging.getLogger(__name__)

ENABLED = False  # set once by configure(); read on every hot path
INSTRUMENTATION_NAME = "splitserve"
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_OTLP_PROTOCOL = "grpc"  # as the Python OpenTelemetry distro's default (port 4317)
EXPORTERS = ("otlp", "console", "none")

_lock = threading.Lock()
_configured = False
_tracer = None
_provider = None


class TracingConfigError(ValueError):
    """OTEL_* asks for traces this process cannot produce; the message names the variable or package."""


# -- configuration ----------------------------------------------------------------------------------


def requested_exporters(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The trace exporters the environment asks for; () means tracing stays off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if named:
        exporters = tuple(e.strip().lower() for e in named.split(",") if e.strip())
        unknown = [e for e in exporters if e not in EXPORTERS]
        if unknown:
            raise TracingConfigError(
                f"OTEL_TRACES_EXPORTER={named!r}: splitserve exports traces with {', '.join(EXPORTERS)}; "
                f"not {', '.join(unknown)}"
            )
        return tuple(e for e in exporters if e != "none")
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return ("otlp",) if endpoint else ()


def otlp_protocol(environ: Mapping[str, str] = os.environ) -> str:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(name, "").strip()
        if value:
            if value not in OTLP_PROTOCOLS:
                raise TracingConfigError(
                    f"{name}={value!r}: the OTLP trace exporter speaks {' or '.join(OTLP_PROTOCOLS)}"
                )
            return value
    return DEFAULT_OTLP_PROTOCOL


def configure(service_name: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Once per process: sets up the tracer provider the environment asks for. True if tracing is on.

    ``service_name`` is the default ``service.name`` (``OTEL_SERVICE_NAME`` wins). A tracer provider
    already installed by the OpenTelemetry SDK (``opentelemetry-instrument``) is used as it is."""
    global ENABLED, _configured, _tracer, _provider
    with _lock:
        if _configured:
            return ENABLED
        exporters = requested_exporters(environ)
        provider = _installed_provider()
        if provider is None and exporters:
            provider = _build_provider(service_name, exporters, environ)
        _configured = True
        if provider is None:
            return False
        _provider = provider
        _tracer = provider.get_tracer(INSTRUMENTATION_NAME)
        ENABLED = True
        log.info("tracing on: spans of %s exported by %s", service_name, ", ".join(exporters) or "the installed SDK")
        return True


def _installed_provider():
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    return provider if isinstance(provider, TracerProvider) else None


def _build_provider(service_name: str, exporters: tuple[str, ...], environ: Mapping[str, str]):
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise _missing(exc, exporters) from exc
    span_exporters = [_exporter(name, environ) for name in exporters]
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    for exporter in span_exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def _exporter(name: str, environ: Mapping[str, str]):
    try:
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            return ConsoleSpanExporter()
        if otlp_protocol(environ) == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise _missing(exc, (name,)) from exc
    return OTLPSpanExporter()  # endpoint, headers, TLS, compression and timeout: OTEL_EXPORTER_OTLP_*


def _missing(exc: ImportError, exporters: tuple[str, ...]) -> TracingConfigError:
    return TracingConfigError(
        f"OTEL_* asks for traces (exporter {', '.join(exporters)}) but {exc.name or exc} is not installed: "
        "reinstall splitserve (it depends on opentelemetry-sdk and both OTLP exporters), "
        "or unset OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT"
    )


def flush(timeout_s: float = 5.0) -> None:
    """Exports what is batched (a process about to be stopped hard)."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


# -- spans --------------------------------------------------------------------------------------------


class TraceSpan:
    """One started span, not made current (it may end on another thread or task). ``metadata`` is
    what a gRPC call made on its behalf carries, so the callee's spans become its children."""

    __slots__ = ("span", "metadata")

    def __init__(self, span, propagate: bool = False) -> None:
        self.span = span
        self.metadata = inject(span) if propagate else None

    def set(self, **attributes) -> None:
        self.span.set_attributes(span_attributes(attributes))

    def event(self, name: str, **attributes) -> None:
        self.span.add_event(name, span_attributes(attributes))

    def fail(self, description: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.span.set_status(Status(StatusCode.ERROR, description))

    def end(self, end_ns: int | None = None, **attributes) -> None:
        if attributes:
            self.set(**attributes)
        self.span.end(end_time=end_ns)

    def __enter__(self) -> TraceSpan:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not isinstance(exc, GeneratorExit):
            self.span.record_exception(exc)
            self.fail(f"{type(exc).__name__}: {exc}")
        self.span.end()


class _NoSpan:
    """Stands in for every span while tracing is off: nothing is created, nothing is sent."""

    __slots__ = ()
    metadata = None

    def set(self, **attributes) -> None:
        pass

    def event(self, name: str, **attributes) -> None:
        pass

    def fail(self, description: str) -> None:
        pass

    def end(self, end_ns: int | None = None, **attributes) -> None:
        pass

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass


NO_SPAN = _NoSpan()


def start_span(
    name: str, kind: str = "internal", parent=None, propagate: bool = False, start_ns: int | None = None, **attributes
):
    """A child of ``parent`` (a Context; default: the current one), or NO_SPAN while tracing is off.
    ``kind``: internal, client, server. ``propagate``: fill ``metadata`` for a gRPC call.
    ``start_ns``: when it began (``time.time_ns()``), for a span made after the fact."""
    if not ENABLED:
        return NO_SPAN
    from opentelemetry.trace import SpanKind

    span = _tracer.start_span(
        name, context=parent, kind=SpanKind[kind.upper()], attributes=span_attributes(attributes), start_time=start_ns
    )
    return TraceSpan(span, propagate)


def current_context():
    """The current OpenTelemetry Context (None while tracing is off)."""
    if not ENABLED:
        return None
    from opentelemetry import context

    return context.get_current()


def annotate(**attributes) -> None:
    """Sets attributes on the current span (the RPC's server span inside a ``server_span`` handler)."""
    if ENABLED:
        from opentelemetry import trace

        trace.get_current_span().set_attributes(span_attributes(attributes))


def outgoing_metadata() -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata carrying the current span's context; None (no metadata) while tracing is off."""
    if not ENABLED:
        return None
    from opentelemetry import trace

    return inject(trace.get_current_span())


def inject(span) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying ``span``'s context (``traceparent``, ``tracestate``, baggage)."""
    from opentelemetry import propagate, trace

    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return tuple(carrier.items())


def extract(metadata) -> object:
    """The Context a caller's gRPC metadata carries (the current one, without a ``traceparent``)."""
    from opentelemetry import propagate

    return propagate.extract({key: value for key, value in metadata or () if isinstance(value, str)})


def span_attributes(attributes: Mapping[str, object]) -> dict:
    """Our attributes (keyword arguments) live under ``splitserve.``; None values are left out."""
    return {f"splitserve.{k}": v for k, v in attributes.items() if v is not None}


# -- gRPC servers -------------------------------------------------------------------------------------


def server_span(name: str):
    """Decorates a gRPC servicer method (``(self, request, context)``, or a bound one): while tracing
    is on, the call runs inside a SERVER span that continues the caller's ``traceparent``; its gRPC
    status becomes the span's. Unary handlers, generators and async generators alike; off, the
    handler is called as it is."""
    service, _, method = name.rpartition("/")
    rpc = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}

    def decorate(handler):
        if inspect.isasyncgenfunction(handler):

            @functools.wraps(handler)
            async def traced_async_stream(*args):
                if not ENABLED:
                    async for item in handler(*args):
                        yield item
                    return
                span, rpc_context = _server_span(name, rpc, args[-1]), args[-1]
                from opentelemetry import trace

                stream, error = handler(*args), None
                try:
                    while True:
                        with trace.use_span(span, end_on_exit=False, record_exception=False):
                            try:
                                item = await stream.__anext__()
                            except StopAsyncIteration:
                                return
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    _end_server_span(span, rpc_context, error)

            return traced_async_stream

        if inspect.isgeneratorfunction(handler):

            @functools.wraps(handler)
            def traced_stream(*args):
                if not ENABLED:
                    return handler(*args)
                return _traced_generator(handler(*args), _server_span(name, rpc, args[-1]), args[-1])

            return traced_stream

        @functools.wraps(handler)
        def traced_unary(*args):
            if not ENABLED:
                return handler(*args)
            span, rpc_context, error = _server_span(name, rpc, args[-1]), args[-1], None
            from opentelemetry import trace

            try:
                with trace.use_span(span, end_on_exit=False, record_exception=False):
                    return handler(*args)
            except BaseException as exc:
                error = exc
                raise
            finally:
                _end_server_span(span, rpc_context, error)

        return traced_unary

    return decorate


def _traced_generator(stream, span, rpc_context):
    """Each step of a streaming handler runs with its span current (steps may run on any thread)."""
    from opentelemetry import trace

    error = None
    try:
        while True:
            with trace.use_span(span, end_on_exit=False, record_exception=False):
                try:
                    item = next(stream)
                except StopIteration:
                    return
            yield item
    except BaseException as exc:
        error = exc
        raise
    finally:
        stream.close()
        _end_server_span(span, rpc_context, error)


def _server_span(name: str, rpc: dict, rpc_context):
    from opentelemetry.trace import SpanKind

    parent = extract(rpc_context.invocation_metadata())
    return _tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=rpc)


def _end_server_span(span, rpc_context, error: BaseException | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    code, details = _grpc_status(rpc_context)
    if code is None and error is None:
        span.set_attribute("rpc.grpc.status_code", 0)  # returned without setting a status: OK
    elif code is not None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code.name != "OK":
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}"))
    elif error is not None and not isinstance(error, GeneratorExit):
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


def _grpc_status(rpc_context):
    """(status code, details) the handler set or aborted with; (None, None) if none was set."""
    try:
        return rpc_context.code(), rpc_context.details()
    except (AttributeError, NotImplementedError):
        return None, None
