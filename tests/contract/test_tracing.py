"""Tracing is off unless OTEL_* asks for it, and what it cannot honour is refused by name.

Each check that configures tracing runs in a fresh interpreter: configuration is once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from contract.tracing import TracingConfigError, otlp_protocol, requested_exporters


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_off_by_default_nothing_is_created():
    result = run_python(
        """
        import threading
        from opentelemetry import trace
        from contract import tracing

        assert tracing.configure("splitserve-test") is False
        assert tracing.ENABLED is False
        assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"  # no SDK provider, no exporter
        assert tracing.start_span("x", kind="client", propagate=True) is tracing.NO_SPAN
        assert tracing.outgoing_metadata() is None and tracing.current_context() is None

        @tracing.server_span("splitserve.Test/Echo")
        def echo(request, context):
            return request

        assert echo("hi", None) == "hi"  # the handler runs as it is: no context is even read
        print(sorted(t.name for t in threading.enumerate()))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "Otel" not in result.stdout and "Batch" not in result.stdout  # no span processor thread


def test_an_endpoint_or_an_exporter_turns_tracing_on():
    assert requested_exporters({}) == ()
    assert requested_exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}) == ("otlp",)
    assert requested_exporters({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}) == ("otlp",)
    assert requested_exporters({"OTEL_TRACES_EXPORTER": "console,otlp"}) == ("console", "otlp")
    assert requested_exporters({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == ()
    assert requested_exporters({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}) == ()
    assert otlp_protocol({}) == "grpc"
    assert otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) == "http/protobuf"
    assert otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"})


def test_values_it_cannot_honour_are_refused_by_name():
    with pytest.raises(TracingConfigError, match="OTEL_TRACES_EXPORTER='zipkin'"):
        requested_exporters({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(TracingConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL='http/json'"):
        otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_configured_but_the_exporter_is_missing_says_so():
    result = run_python(
        """
        import sys
        sys.modules["opentelemetry.exporter.otlp.proto.grpc.trace_exporter"] = None  # as if not installed
        from contract import tracing
        try:
            tracing.configure("splitserve-test")
        except tracing.TracingConfigError as exc:
            print(exc)
        else:
            raise SystemExit("configured without its exporter")
        """,
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4317",
    )
    assert result.returncode == 0, result.stderr
    assert "opentelemetry.exporter.otlp.proto.grpc.trace_exporter is not installed" in result.stdout


def test_the_router_refuses_to_start_on_a_value_it_cannot_honour():
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "router", "--decode", "127.0.0.1:1", "--port", "0", "--grpc-port", "0"],
        env={**os.environ, "OTEL_TRACES_EXPORTER": "jaeger"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "OTEL_TRACES_EXPORTER='jaeger'" in result.stderr


def test_an_installed_sdk_exports_to_the_console():
    result = run_python(
        """
        from contract import tracing
        assert tracing.configure("splitserve-test")
        with tracing.start_span("hello", kind="client", propagate=True, answer=42) as span:
            assert [k for k, _ in span.metadata] == ["traceparent"]
        tracing.flush()
        """,
        OTEL_TRACES_EXPORTER="console",
    )
    assert result.returncode == 0, result.stderr
    assert '"name": "hello"' in result.stdout and '"splitserve.answer": 42' in result.stdout
    assert '"service.name": "splitserve-test"' in result.stdout
