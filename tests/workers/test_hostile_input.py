"""Bad input from a peer or a client stays local: the request it belongs to fails with a clean status,
every other stream on the worker goes on with the right tokens, and every block returns.

Real worker processes (a tiny prefill + decode pair per transport), a hostile sender speaking the
KVReceiver protocol with a valid ticket, and clients that give up after 10 ms."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.errors import MAX_REQUEST_ID_CHARS
from kv_transfer.integrity import checksum
from protos import common_pb2, decode_pb2, kv_transfer_pb2, kv_transfer_pb2_grpc, prefill_pb2
from tests.protobuf_strategies import messages
from tests.workers.conftest import SLOW_CHUNK, random_prompt
from tests.workers.harness import (
    WorkerProcess,
    aggregated,
    disaggregated,
    new_id,
    prefill_future,
    reserve,
    rpc_error,
    start_workers,
    stop_workers,
    wait_idle,
    wait_until,
    wire_params,
)

VOCAB = 320
LEASE_MS = 60_000  # far longer than any wait below: only the failure itself can free the blocks
STREAM_PARAMS = dict(max_tokens=150, ignore_eos=True)  # neighbours still streaming when the commit is refused


@dataclass
class Workers:
    prefill: WorkerProcess  # tiny
    decode: WorkerProcess  # tiny
    slow_prefill: WorkerProcess  # a 300-token prompt takes far longer than 10 ms
    slow_decode: WorkerProcess


@pytest.fixture(scope="module", params=("grpc", "nixl"))
def workers(request, checkpoints) -> Workers:
    tiny, slow, transport = str(checkpoints.tiny), str(checkpoints.slow), request.param
    started = Workers(
        *start_workers(
            ("prefill", tiny, transport),
            ("decode", tiny, transport),
            ("prefill", slow, transport, *SLOW_CHUNK),
            ("decode", slow, transport),
        )
    )
    yield started
    stop_workers([started.prefill, started.decode, started.slow_prefill, started.slow_decode])


def _region_bytes(layout: common_pb2.KVLayout) -> int:
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[layout.dtype]
    return 2 * layout.block_size * layout.num_kv_heads * layout.head_dim * itemsize


def _every_layer(ticket: decode_pb2.Ticket) -> list[kv_transfer_pb2.KVChunk]:
    """A sender's data messages: every reserved block of every layer (zeros, with a good checksum)."""
    blocks = list(ticket.block_ids)[ticket.num_cached_tokens // ticket.layout.block_size :]
    data = bytes(_region_bytes(ticket.layout) * len(blocks))
    return [
        kv_transfer_pb2.KVChunk(
            request_id=ticket.request_id, layer=layer, block_ids=blocks, data=data, checksum=checksum(data)
        )
        for layer in range(ticket.layout.num_layers)
    ]


def _opening(ticket: decode_pb2.Ticket) -> kv_transfer_pb2.KVChunk:
    return kv_transfer_pb2.KVChunk(request_id=ticket.request_id, instance_id=ticket.instance_id, token=ticket.token)


def _commit_over_push(decode: WorkerProcess, ticket, first_token_id: int, first_logprob=None) -> grpc.RpcError:
    commit = kv_transfer_pb2.KVChunk(request_id=ticket.request_id, commit=True, first_token_id=first_token_id)
    if first_logprob is not None:
        commit.first_logprob.CopyFrom(first_logprob)
    receiver = kv_transfer_pb2_grpc.KVReceiverStub(decode.channel)
    return rpc_error(receiver.PushKV, iter([_opening(ticket), *_every_layer(ticket), commit]), timeout=30)


def _commit_over_rpc(decode: WorkerProcess, ticket, first_token_id: int, first_logprob=None) -> grpc.RpcError:
    """The Commit RPC (NIXL's way), after the data landed over a push stream held open until it is answered."""
    receiver = kv_transfer_pb2_grpc.KVReceiverStub(decode.channel)
    sent, release = threading.Event(), threading.Event()

    def messages():
        yield _opening(ticket)
        yield from _every_layer(ticket)
        sent.set()
        release.wait(30)
        yield kv_transfer_pb2.KVChunk(request_id=ticket.request_id, abort=True, abort_reason="done")

    push = receiver.PushKV.future(messages(), timeout=60)
    assert sent.wait(30)
    request = kv_transfer_pb2.CommitRequest(
        request_id=ticket.request_id, instance_id=ticket.instance_id, first_token_id=first_token_id, token=ticket.token
    )
    if first_logprob is not None:
        request.first_logprob.CopyFrom(first_logprob)
    try:
        return rpc_error(receiver.Commit, request, timeout=30)  # it waits for the last layers to land
    finally:
        release.set()
        try:
            push.result(30)
        except grpc.RpcError:
            pass


class Streams:
    """Concurrent aggregated streams on one decode worker, each collecting its tokens or its error."""

    def __init__(self, decode: WorkerProcess, prompts: list[list[int]]) -> None:
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.errors: list[grpc.RpcError | None] = [None] * len(prompts)
        self.threads = [
            threading.Thread(target=self._run, args=(decode, index, prompt), daemon=True)
            for index, prompt in enumerate(prompts)
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, decode: WorkerProcess, index: int, prompt: list[int]) -> None:
        request = decode_pb2.GenerateRequest(
            request_id=new_id(f"neighbour{index}"), prompt_token_ids=prompt, params=wire_params(**STREAM_PARAMS)
        )
        try:
            for response in decode.stub.Generate(request, timeout=120):
                self.tokens[index].extend(response.token_ids)
        except grpc.RpcError as exc:
            self.errors[index] = exc

    def join(self) -> None:
        for thread in self.threads:
            thread.join(150)


HOSTILE_COMMITS = {
    "token outside the vocabulary": (VOCAB, None, None),
    "largest token id": (2**32 - 1, None, None),
    "logprob NaN": (5, common_pb2.TokenLogprob(token_id=5, logprob=math.nan), 0),
    "logprob of another token": (5, common_pb2.TokenLogprob(token_id=6, logprob=-1.0), 0),
    "alternative outside the vocabulary": (
        5,
        common_pb2.TokenLogprob(token_id=5, logprob=-1.0, top=[common_pb2.TopLogprob(token_id=VOCAB, logprob=-1.0)]),
        1,
    ),
    "logprob nobody asked for": (5, common_pb2.TokenLogprob(token_id=5, logprob=-1.0), None),
}


@pytest.mark.parametrize(
    ("case", "how"), [(case, "push") for case in HOSTILE_COMMITS] + [("token outside the vocabulary", "commit rpc")]
)
def test_hostile_commit_fails_its_reservation_only(workers, rng, case, how):
    prefill, decode = workers.prefill, workers.decode
    first_token_id, first_logprob, logprobs = HOSTILE_COMMITS[case]
    prompts = [random_prompt(rng, 20) for _ in range(3)]
    reference = [aggregated(decode, new_id("ref"), p, wire_params(**STREAM_PARAMS), timeout=120) for p in prompts]
    streams = Streams(decode, prompts)
    wait_until(lambda: decode.stats().running == 3, 30, interval=0.01, what="three streams running")

    request_id = new_id("hostile")
    params = wire_params(8) if logprobs is None else wire_params(8, logprobs=logprobs)
    ticket = reserve(decode, request_id, random_prompt(rng, 40), params, lease_ms=LEASE_MS)
    victim = decode.stub.Generate(
        decode_pb2.GenerateRequest(request_id=request_id, reserved=True, token=ticket.token), timeout=60
    )
    commit = _commit_over_push if how == "push" else _commit_over_rpc
    error = commit(decode, ticket, first_token_id, first_logprob)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "first_" in error.details()
    refused = rpc_error(lambda: victim)
    received = [len(tokens) for tokens in streams.tokens]
    assert refused.code() == grpc.StatusCode.ABORTED and "refused commit" in refused.details()
    assert all(count < STREAM_PARAMS["max_tokens"] for count in received), f"neighbours ended first: {received}"

    streams.join()
    assert streams.errors == [None, None, None], [e.details() for e in streams.errors if e]
    assert streams.tokens == reference
    wait_idle(decode, timeout=5)
    tokens, _ = disaggregated(prefill, decode, new_id("after"), prompts[0], wire_params(**STREAM_PARAMS), timeout=120)
    assert tokens == reference[0]
    wait_idle(decode, timeout=5)


DEADLINE_S = 0.1


@pytest.mark.parametrize("side", ["prefill", "both"])
def test_client_deadline_mid_prefill_on_the_remote_path_frees_blocks_at_once(workers, rng, side):
    """The router's calls on the remote path given up mid-prefill: the prefill's, or the prefill's and the decode
    stream's. The reservation stops before any KV is adopted, the prefill stops, and every block returns at once,
    without waiting for the lease. The deadline (100 ms) is far shorter than the prefill but long enough for the
    worker's handler to start: a call that expires before its handler runs never reaches the worker's code (grpc
    drops it; seen with 10 ms on a loaded machine), and neither does a decode stream given up alone — the router's
    Abort with the ticket's token stops the reservation then (tests/router/test_hostile_input.py)."""
    prefill, decode = workers.slow_prefill, workers.slow_decode
    expired_before = decode.stats().leases_expired
    for attempt in range(3):
        request_id = new_id(f"deadline{attempt}")
        prompt = random_prompt(rng, 900)  # 8 chunks of 128 tokens: many times the deadline
        params = wire_params(100, ignore_eos=True)
        ticket = reserve(decode, request_id, prompt, params, lease_ms=LEASE_MS)
        claim = decode_pb2.GenerateRequest(request_id=request_id, reserved=True, token=ticket.token)
        stream = decode.stub.Generate(claim, timeout=DEADLINE_S if side == "both" else 60)
        future = prefill_future(prefill, request_id, prompt, ticket, params, timeout=DEADLINE_S)
        prefill_error = rpc_error(future.result)
        stream_error = rpc_error(lambda: stream)
        if side == "prefill":
            assert prefill_error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, prefill_error.details()
            assert stream_error.code() == grpc.StatusCode.ABORTED, "the reservation outlived its sender"
        else:
            assert {prefill_error.code(), stream_error.code()} == {grpc.StatusCode.DEADLINE_EXCEEDED}
        wait_idle(decode, timeout=3)
        wait_idle(prefill, timeout=10)
    assert decode.stats().leases_expired == expired_before
    tokens, _ = disaggregated(prefill, decode, new_id("after"), random_prompt(rng, 30), wire_params(5), timeout=60)
    assert len(tokens) == 5


# -- fuzzing the internal services ------------------------------------------------------------------

WORKER_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.DATA_LOSS,  # a KV chunk whose checksum does not match
}
SMALL_IDS = st.lists(st.integers(0, 400), max_size=40)
NEAR_VALID = {  # pinned so that fuzzing reaches past the first checks (and never dials a stranger)
    "prompt_token_ids": SMALL_IDS,
    "resume_token_ids": st.lists(st.integers(0, 400), max_size=3),
    "max_tokens": st.integers(0, 6),
    "lease_ms": st.integers(0, 3000),
    "address": st.just("127.0.0.1:1"),
    "stop": st.lists(st.text(max_size=4), max_size=2),
}


def _call(method, request, streaming: bool) -> grpc.StatusCode:
    try:
        result = method(request, timeout=20)
        if streaming:
            for _ in result:
                pass
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        # The one stranger a fuzzed ticket names (NEAR_VALID's address) is down: a prefill worker that
        # must push to it says so as documented (tests/workers/test_failures.py), UNAVAILABLE.
        unreachable = exc.code() == grpc.StatusCode.UNAVAILABLE and "handshake with 127.0.0.1:1 " in exc.details()
        assert exc.code() in WORKER_CODES or unreachable, f"{exc.code().name}: {exc.details()} for {request}"
        return exc.code()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_worker_services_answer_only_documented_codes(workers, data):
    prefill, decode = workers.prefill, workers.decode
    receiver = kv_transfer_pb2_grpc.KVReceiverStub(decode.channel)
    near = data.draw(st.booleans())
    overrides = NEAR_VALID if near else {"address": st.just("127.0.0.1:1")}
    reserve_request = data.draw(messages(decode_pb2.ReserveRequest, overrides))
    reserve_request.request_id = new_id("fuzz")
    try:
        ticket = decode.stub.Reserve(reserve_request, timeout=20)
    except grpc.RpcError as exc:
        assert exc.code() in WORKER_CODES, f"{exc.code().name}: {exc.details()}"
        ticket = data.draw(messages(decode_pb2.Ticket, overrides))
    chunks = data.draw(st.lists(messages(kv_transfer_pb2.KVChunk, overrides), max_size=4))
    if near and chunks:
        chunks[0].request_id, chunks[0].token = ticket.request_id, ticket.token
    _call(receiver.PushKV, iter(chunks), streaming=False)
    commit = data.draw(messages(kv_transfer_pb2.CommitRequest, overrides))
    if near:
        commit.request_id, commit.token = ticket.request_id, ticket.token
    _call(receiver.Commit, commit, streaming=False)
    _call(receiver.Handshake, data.draw(messages(kv_transfer_pb2.HandshakeRequest, overrides)), streaming=False)
    prefill_request = data.draw(messages(prefill_pb2.PrefillRequest, overrides))
    _call(prefill.stub.Prefill, prefill_request, streaming=False)
    generate = data.draw(messages(decode_pb2.GenerateRequest, overrides))
    if near and data.draw(st.booleans()):
        generate.request_id, generate.token, generate.reserved = ticket.request_id, ticket.token, True
    _call(decode.stub.Generate, generate, streaming=True)
    for worker in (decode, prefill):
        abort = data.draw(messages(common_pb2.AbortRequest, overrides))
        _call(worker.stub.Abort, abort, streaming=False)
    # What a router does once it is done with a reservation: abort it with its token (a no-op if it ended).
    _call(decode.stub.Abort, common_pb2.AbortRequest(request_id=ticket.request_id, token=ticket.token), False)


def test_after_the_worker_fuzz_every_block_returns(workers):
    wait_idle(workers.decode, timeout=30)
    wait_idle(workers.prefill, timeout=30)


@pytest.mark.parametrize(
    ("request_id", "said"),
    [("", "must not be empty"), ("r" * (MAX_REQUEST_ID_CHARS + 1), "at most"), ("a\nb", "printable ASCII")],
    ids=["empty", "too long", "a newline"],
)
def test_a_request_id_the_router_would_refuse_is_refused_by_every_worker_entry(workers, rng, request_id, said):
    """A peer's request ids are held to the router's rule: a worker kept a reservation's 40 MB id as long as its lease
    (twelve of them took 600 MB), and an empty one reserved blocks no KV could ever reach."""
    prompt = random_prompt(rng, 24, VOCAB)
    calls = [
        (
            workers.decode.stub.Reserve,
            decode_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt, params=wire_params(4)),
        ),
        (
            workers.decode.stub.Generate,
            decode_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, params=wire_params(4)),
        ),
        (
            workers.prefill.stub.Prefill,
            prefill_pb2.PrefillRequest(
                request_id=request_id, prompt_token_ids=prompt, params=wire_params(4), ticket_follows=True
            ),
        ),
    ]
    for call, request in calls:
        error = rpc_error(call, request, timeout=20)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and said in error.details(), (call, error.details())
    wait_idle(workers.decode, timeout=30)
