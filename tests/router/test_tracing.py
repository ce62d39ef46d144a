"""One trace per request across router, prefill and decode workers, exported over OTLP.

A real OTLP/gRPC TraceService (opentelemetry-proto's generated service) runs in this process; the
router and both workers are real processes pointed at it with nothing but the standard OTEL_*
variables. One disaggregated completion, sent with a client's ``traceparent``, must come back as
one trace whose spans nest router → workers → each layer's KV push.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.router.conftest import MODEL_SHAPE, SERVED_MODEL, RouterProcess, random_prompt
from tests.workers.harness import WorkerProcess, launch_worker, stop_workers, wait_ready

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
NUM_LAYERS = MODEL_SHAPE["num_hidden_layers"]
MAX_TOKENS = 5


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict
    events: tuple[str, ...]
    status_code: int
    start_ns: int = 0
    end_ns: int = 0


class OTLPReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                service = _attributes(resource_spans.resource.attributes).get("service.name", "")
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(_span(service, s) for s in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, predicate, timeout: float = 30.0) -> list[Span]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = list(self.spans)
            if predicate(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)


def _attributes(key_values) -> dict:
    values = {}
    for kv in key_values:
        which = kv.value.WhichOneof("value")
        values[kv.key] = getattr(kv.value, which) if which else None
    return values


def _span(service: str, span) -> Span:
    return Span(
        service,
        span.name,
        span.trace_id.hex(),
        span.span_id.hex(),
        span.parent_span_id.hex(),
        span.kind,
        _attributes(span.attributes),
        tuple(e.name for e in span.events),
        span.status.code,
        span.start_time_unix_nano,
        span.end_time_unix_nano,
    )


def span_tree(spans: list[Span]) -> str:
    children: dict[str, list[Span]] = {}
    for span in spans:
        children.setdefault(span.parent_id, []).append(span)
    known = {s.span_id for s in spans}
    lines: list[str] = []

    def show(span: Span, depth: int) -> None:
        attributes = {k.removeprefix("splitserve."): v for k, v in sorted(span.attributes.items())}
        lines.append(f"{'  ' * depth}{span.service}: {span.name} {attributes} {list(span.events) or ''}")
        for child in children.get(span.span_id, []):
            show(child, depth + 1)

    for root in [s for s in spans if s.parent_id not in known]:
        show(root, 0)
    return "\n".join(lines)


@pytest.fixture(scope="module")
def receiver():
    receiver = OTLPReceiver()
    yield receiver
    receiver.server.stop(1)


@pytest.fixture(scope="module")
def traced_cluster(checkpoint, receiver):
    """P + D + router, processes of their own, exporting to the receiver by OTEL_* alone."""
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s rather than 5 s
    }
    model = str(checkpoint.path)
    with pytest.MonkeyPatch.context() as env:  # the worker harness passes this process's environment on
        for name, value in otel.items():
            env.setenv(name, value)
        workers = [launch_worker("prefill", model), launch_worker("decode", model)]
    try:
        prefill, decode = (wait_ready(w) for w in workers)
        router = start_router(model, prefill, decode, otel)
    except BaseException:
        stop_workers(workers)
        raise
    yield router
    router.stop()
    stop_workers(workers)


def start_router(model: str, prefill: WorkerProcess, decode: WorkerProcess, otel: dict) -> RouterProcess:
    return RouterProcess(
        *("--model", model, "--served-model-name", SERVED_MODEL),
        *("--prefill", prefill.address, "--decode", decode.address),
        *("--port", "0", "--grpc-port", "0", "--local-prefill-threshold", "16"),
        env=otel,
        timeout=120,
    )


def test_one_trace_across_router_and_workers(traced_cluster, receiver):
    import random

    prompt = random_prompt(random.Random(7), 64)  # 64 uncached tokens > the threshold: prefilled remotely
    response = httpx.post(
        f"{traced_cluster.http}/v1/completions",
        json={"model": SERVED_MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True},
        headers={"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01", "x-request-id": "traced-1"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "traced-1"
    assert response.json()["usage"]["completion_tokens"] == MAX_TOKENS

    wanted = {
        ("splitserve-router", "POST /v1/completions"),
        ("splitserve-router", "decode"),
        ("splitserve-prefill", "splitserve.PrefillWorker/Prefill"),
        ("splitserve-decode", "splitserve.DecodeWorker/Generate"),
        ("splitserve-decode", "kv.reservation"),
        ("splitserve-decode", "splitserve.KVReceiver/Commit"),  # the bulk path (grpc's default) commits here
    }

    def complete(spans: list[Span]) -> bool:
        ours = [s for s in spans if s.trace_id == CLIENT_TRACE_ID]
        pushes = [s for s in ours if s.name == "kv.push_layer"]
        return wanted <= {(s.service, s.name) for s in ours} and len(pushes) >= NUM_LAYERS

    spans = [s for s in receiver.wait_for(complete) if s.trace_id == CLIENT_TRACE_ID]
    print(span_tree(spans))  # shown with -s, and on failure
    assert complete(spans), sorted({(s.service, s.name) for s in spans})

    def one(service: str, name: str) -> Span:
        found = [s for s in spans if s.service == service and s.name == name]
        assert len(found) == 1, (service, name, found)
        return found[0]

    # The router: the HTTP request continues the client's trace; each step is its child.
    http = one("splitserve-router", "POST /v1/completions")
    assert http.parent_id == CLIENT_SPAN_ID
    assert http.attributes["http.route"] == "/v1/completions", http.attributes
    assert http.attributes["http.response.status_code"] == 200
    assert http.attributes["splitserve.completion_tokens"] == MAX_TOKENS
    assert http.attributes["splitserve.request_id"] == "traced-1"  # the client's X-Request-Id, on its span
    route = one("splitserve-router", "route")
    assert route.attributes["splitserve.decision"] == "remote_prefill"
    assert route.attributes["splitserve.prefill_worker"] and route.attributes["splitserve.decode_worker"]
    assert route.attributes["splitserve.prompt_blocks"] > 0
    reserve, prefill, decode = (one("splitserve-router", n) for n in ("reserve", "prefill", "decode"))
    for child in (route, reserve, prefill, decode):
        assert child.parent_id == http.span_id, child
    # P computes while D reserves: the prefill call starts before the Reserve (its ticket follows).
    assert prefill.start_ns <= reserve.start_ns < reserve.end_ns, (prefill, reserve)

    # The decode worker: Reserve under the router's reserve, the reservation under it; Generate under decode.
    d_reserve = one("splitserve-decode", "splitserve.DecodeWorker/Reserve")
    assert d_reserve.parent_id == reserve.span_id
    reservation = one("splitserve-decode", "kv.reservation")
    assert reservation.parent_id == d_reserve.span_id
    assert reservation.attributes["splitserve.state"] == "committed"
    assert reservation.attributes["splitserve.bytes_received"] > 0
    generate = one("splitserve-decode", "splitserve.DecodeWorker/Generate")
    assert generate.parent_id == decode.span_id
    assert generate.attributes["splitserve.tokens_generated"] == MAX_TOKENS

    # The prefill worker: Prefill under the router's prefill; one push span per layer under it.
    p_prefill = one("splitserve-prefill", "splitserve.PrefillWorker/Prefill")
    assert p_prefill.parent_id == prefill.span_id
    assert one("splitserve-prefill", "kv.commit").parent_id == p_prefill.span_id
    pushes = [s for s in spans if s.name == "kv.push_layer"]
    assert sorted(s.attributes["splitserve.layer"] for s in pushes) == list(range(NUM_LAYERS))
    for push in pushes:
        assert push.service == "splitserve-prefill" and push.parent_id == p_prefill.span_id
        assert push.attributes["splitserve.bytes"] > 0 and push.attributes["splitserve.blocks"] > 0
        assert push.attributes["splitserve.transport"] == "grpc"
    pushed = sum(s.attributes["splitserve.bytes"] for s in pushes)
    assert (
        pushed
        == p_prefill.attributes["splitserve.kv_bytes_sent"]
        == reservation.attributes["splitserve.bytes_received"]
    )

    # The KV channel carries the prefill's context to the decode worker: its one commit (no abort after it).
    commit = one("splitserve-decode", "splitserve.KVReceiver/Commit")
    assert commit.parent_id == p_prefill.span_id or commit.parent_id == one("splitserve-prefill", "kv.commit").span_id
    assert commit.status_code != 2, commit  # not an error

    # Health checks, Stats and KV-event polling make no traces of their own.
    assert not [s for s in receiver.spans if s.name.startswith("grpc.health") or "Stats" in s.name]
