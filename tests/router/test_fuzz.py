"""Bad input never reaches a 500: the router's own OpenAPI document fuzzed by schemathesis, and its public gRPC
API fuzzed with generated protobuf messages, against a real router in front of a real decode worker.

Every answer must be one the document lists for its route (no undocumented status) and none a 5xx; over
gRPC only the documented status codes, never UNKNOWN or INTERNAL. Bounded: a few examples per operation."""

from __future__ import annotations

import grpc
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error, status_code_conformance

from protos import generate_pb2, generate_pb2_grpc
from tests.protobuf_strategies import messages
from tests.router.conftest import SERVED_MODEL, RouterThread, router_config
from tests.workers.harness import start_workers, stop_workers, wait_idle

PUBLIC_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


@pytest.fixture(scope="module")
def fuzz_router(checkpoint):
    (decode,) = start_workers(("decode", str(checkpoint.path)))
    router = RouterThread(router_config(checkpoint, [], [decode], max_body_bytes=256 * 1024, open_docs=True))
    yield router, decode
    router.stop()
    stop_workers([decode])


def _operations(router: RouterThread):
    """Every operation of the router's served document but the operator API (router/admin.py: its own tests)."""
    schema = schemathesis.openapi.from_url(f"{router.http}/openapi.json")
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith("/admin"):
            yield operation


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_openapi_no_server_errors_and_only_documented_statuses(fuzz_router, mode):
    router, _ = fuzz_router
    operations = list(_operations(router))
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize"} <= {op.path for op in operations}
    for operation in operations:

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            response = case.call(timeout=60)
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance])

        try:
            fuzz()
        except Unsatisfiable:
            assert mode is schemathesis.GenerationMode.NEGATIVE  # an operation without input has no invalid one


PROMPT_IDS = st.lists(st.integers(0, 400), max_size=12).map(lambda ids: generate_pb2.TokenIds(ids=ids))
COMPLETION_REQUESTS = st.one_of(
    messages(generate_pb2.CompletionRequest),
    messages(  # near-valid: the served model and a short prompt, so fuzzing reaches past the first checks
        generate_pb2.CompletionRequest,
        {"model": st.sampled_from(["", SERVED_MODEL]), "token_ids": PROMPT_IDS, "max_tokens": st.integers(0, 8)},
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(request=COMPLETION_REQUESTS)
def test_public_grpc_generate_answers_only_documented_codes(fuzz_router, request):
    router, _ = fuzz_router
    with grpc.insecure_channel(router.grpc) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        try:
            for _ in stub.Generate(request, timeout=30):
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            assert code in PUBLIC_CODES, f"{code.name}: {details} for {request}"


def test_after_the_fuzz_every_block_returns(fuzz_router):
    _, decode = fuzz_router
    wait_idle(decode, timeout=30)
