"""Failure outcomes on the data path: each ends in a clean gRPC status, never a hang, and every KV
block returns to its pool (checked over the Stats RPC) while the workers keep serving.

Blocks of a stopped reservation return at once over gRPC (the decode worker copied what it got);
over NIXL (a sender may still be writing into them) once the sender says it stopped (its abort or
commit), else at the lease deadline. Most tests reserve with a long lease on gRPC, to show the
release does not wait for it, and a short one on NIXL; the cancellation tests use a long one on both.
"""

from __future__ import annotations

import contextlib

import grpc
import pytest

from contract.errors import UNREACHABLE_PEER
from kv_transfer.integrity import checksum
from protos import common_pb2, decode_pb2, kv_transfer_pb2, kv_transfer_pb2_grpc, prefill_pb2
from tests.workers.conftest import LONG_PROMPT_LEN, SLOW_DECODE_LEASE_MS, random_prompt
from tests.workers.harness import (
    aggregated,
    claim,
    disaggregated,
    frozen,
    new_id,
    prefill_future,
    reserve,
    rpc_error,
    token_of,
    wait_idle,
    wait_until,
    wire_params,
)

GRPC_LEASE_MS = 20_000
NIXL_LEASE_MS = 2_000


def lease_ms(cluster, nixl_ms: int = NIXL_LEASE_MS) -> int:
    return GRPC_LEASE_MS if cluster.transport == "grpc" else nixl_ms


def release_timeout(cluster, nixl_ms: int = NIXL_LEASE_MS) -> float:
    """gRPC: at once (well before the lease); NIXL: by the lease deadline."""
    return 3.0 if cluster.transport == "grpc" else nixl_ms / 1000 + 3.0


def assert_still_serves(prefill, decode, rng) -> None:
    """The pair serves a request after a failure: disaggregated, its tokens the decode worker's own; both idle after."""
    prompt = random_prompt(rng, 21)
    tokens, last = disaggregated(prefill, decode, new_id("alive"), prompt, wire_params(5), timeout=30)
    assert tokens == aggregated(decode, new_id("alive-agg"), prompt, wire_params(5), timeout=30)
    assert last.finish_reason == "length"
    wait_idle(prefill)
    wait_idle(decode)


# -- leases -------------------------------------------------------------------------------------


def test_lease_expiry_frees_blocks_and_fails_late_calls(cluster, rng):
    decode, prefill = cluster.decode, cluster.prefill
    expired_before = decode.stats().leases_expired
    prompt = random_prompt(rng, 40)
    request_id = new_id("lease")
    ticket = reserve(decode, request_id, prompt, lease_ms=300)
    assert len(ticket.block_ids) == 3
    early = claim(decode, request_id)  # a client already waiting on the reservation

    after = wait_idle(decode, timeout=5)
    assert after.leases_expired == expired_before + 1
    error = rpc_error(lambda: early)
    assert error.code() == grpc.StatusCode.ABORTED and "lease" in error.details()
    late = rpc_error(claim, decode, request_id)
    assert late.code() == grpc.StatusCode.NOT_FOUND, late.details()

    refused = rpc_error(prefill_future(prefill, request_id, prompt, ticket).result)
    assert refused.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND), refused.details()
    wait_idle(prefill)
    assert_still_serves(prefill, decode, rng)


# -- aborts at every stage ----------------------------------------------------------------------


def test_abort_of_unknown_request(cluster):
    for worker in (cluster.prefill, cluster.decode):
        assert not worker.stub.Abort(common_pb2.AbortRequest(request_id=new_id("never")), timeout=5).found
        wait_idle(worker)


def test_abort_while_reserved(cluster, rng):
    decode, prefill = cluster.decode, cluster.prefill
    expired_before = decode.stats().leases_expired
    prompt = random_prompt(rng, 50)
    request_id = new_id("reserved")
    ticket = reserve(decode, request_id, prompt, lease_ms=lease_ms(cluster))
    stream = claim(decode, request_id)
    assert decode.stats().waiting_for_kv == 1

    assert decode.stub.Abort(
        common_pb2.AbortRequest(request_id=request_id, token=token_of(request_id)), timeout=5
    ).found
    error = rpc_error(lambda: stream)
    assert error.code() == grpc.StatusCode.ABORTED and "aborted" in error.details()
    refused = rpc_error(prefill_future(prefill, request_id, prompt, ticket).result)
    assert refused.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND), refused.details()

    assert wait_idle(decode, timeout=release_timeout(cluster)).leases_expired == expired_before
    wait_idle(prefill)


@pytest.mark.parametrize("how", ["cancel", "abort_rpc"])
def test_abort_mid_transfer(cluster, rng, how):
    """A long prompt on the slow pair: the cancel lands while layers are still being pushed."""
    decode, prefill = cluster.slow_decode, cluster.slow_prefill
    prompt = random_prompt(rng, LONG_PROMPT_LEN)
    request_id = new_id("midway")
    ticket = reserve(decode, request_id, prompt)
    stream = claim(decode, request_id)
    future = prefill_future(prefill, request_id, prompt, ticket)
    wait_until(lambda: prefill.stats().running >= 1, 10, interval=0.02, what="the prefill to start")
    with frozen(prefill):  # the prefill stays under way until the cancel or abort is sent, however fast the machine
        if how == "cancel":
            assert future.cancel(), "the prefill finished before it could be cancelled"
        else:
            abort = prefill.stub.Abort.future(common_pb2.AbortRequest(request_id=request_id), timeout=5)
    if how == "abort_rpc":
        assert abort.result().found
        error = rpc_error(future.result)
        assert error.code() == grpc.StatusCode.ABORTED, error.details()

    error = rpc_error(lambda: stream)
    assert error.code() == grpc.StatusCode.ABORTED, error.details()
    wait_idle(prefill, timeout=10)
    wait_idle(decode, timeout=3.0 if cluster.transport == "grpc" else SLOW_DECODE_LEASE_MS / 1000 + 3.0)


CANCEL_LEASE_MS = 20_000  # far longer than any wait below: only the cancellation can free the blocks


@contextlib.contextmanager
def _long_transfer(cluster, rng, request_id):
    """A long prompt's prefill on the slow pair, started; the block runs with the prefill worker frozen, so the
    prefill stays under way, however fast the machine, until the block has acted."""
    decode, prefill = cluster.slow_decode, cluster.slow_prefill
    prompt = random_prompt(rng, LONG_PROMPT_LEN)
    ticket = reserve(decode, request_id, prompt, lease_ms=CANCEL_LEASE_MS)
    stream = claim(decode, request_id, timeout=60)
    future = prefill_future(prefill, request_id, prompt, ticket, timeout=60)
    wait_until(lambda: prefill.stats().running >= 1, 10, interval=0.02, what="the prefill to start")
    with frozen(prefill):
        assert decode.stats().kv_blocks_used >= 94, "the reservation does not hold its blocks"
        yield stream, future


def test_client_leaving_mid_transfer_frees_every_block_at_once(cluster, rng):
    """What the router does when its client goes: cancel the decode stream and the prefill together."""
    decode, prefill = cluster.slow_decode, cluster.slow_prefill
    expired_before = decode.stats().leases_expired
    with _long_transfer(cluster, rng, new_id("leaving")) as (stream, future):
        assert not future.done(), "the prefill finished before the client left"
        stream.cancel()
        future.cancel()

    wait_idle(decode, timeout=3)  # NIXL too: the sender's abort says its writes are over
    wait_idle(prefill, timeout=10)
    assert decode.stats().leases_expired == expired_before
    assert_still_serves(prefill, decode, rng)


def test_client_gone_before_commit_stops_the_sender(cluster, rng):
    """Only the decode side's client leaves: the reservation stops, the sender is refused, blocks return
    — over gRPC at once, over NIXL when the sender's commit (after its last write) is refused."""
    decode, prefill = cluster.slow_decode, cluster.slow_prefill
    expired_before = decode.stats().leases_expired
    with _long_transfer(cluster, rng, new_id("gone")) as (stream, future):
        assert not future.done(), "the prefill finished before the client left"
        stream.cancel()
        if cluster.transport == "grpc":  # the reservation is gone before the prefill's next chunk
            wait_idle(decode, timeout=3)
    error = rpc_error(future.result)
    assert error.code() == grpc.StatusCode.ABORTED, error.details()
    if cluster.transport == "nixl":  # over gRPC the blocks are gone already: later chunks find no reservation
        assert "went away" in error.details()
    wait_idle(decode, timeout=3)
    wait_idle(prefill, timeout=10)
    assert decode.stats().leases_expired == expired_before


@pytest.mark.parametrize("how", ["cancel", "abort_rpc"])
def test_abort_while_decoding(cluster, rng, how):
    decode, prefill = cluster.decode, cluster.prefill
    prompt = random_prompt(rng, 30)
    request_id = new_id("decoding")
    params = wire_params(400, ignore_eos=True)
    ticket = reserve(decode, request_id, prompt, params)
    stream = claim(decode, request_id, timeout=60)
    prefill_future(prefill, request_id, prompt, ticket, params).result()
    assert next(stream).token_ids and next(stream).token_ids
    assert decode.stats().running == 1
    if how == "cancel":
        stream.cancel()
    else:
        assert decode.stub.Abort(
            common_pb2.AbortRequest(request_id=request_id, token=token_of(request_id)), timeout=5
        ).found
        rest = list(stream)
        assert rest and rest[-1].finish_reason == "abort"
        assert rest[-1].usage.completion_tokens < 400
    wait_idle(decode, timeout=5)
    wait_idle(prefill)


# -- no room ------------------------------------------------------------------------------------


def test_reservation_refused_when_pool_is_full(cluster, rng):
    decode = cluster.slow_decode  # 106 blocks: one 1,500-token prompt (94 blocks) fits, two do not
    first_id = new_id("hog")
    reserve(decode, first_id, random_prompt(rng, LONG_PROMPT_LEN), lease_ms=lease_ms(cluster, 4000))
    held = decode.stats()
    assert held.kv_blocks_used == 94 and held.waiting_for_kv == 1

    busy = rpc_error(reserve, decode, new_id("busy"), random_prompt(rng, LONG_PROMPT_LEN))
    assert busy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "blocks" in busy.details()
    never = rpc_error(reserve, decode, new_id("huge"), random_prompt(rng, 1800))  # more than the whole pool
    assert never.code() == grpc.StatusCode.INVALID_ARGUMENT and "KV pool" in never.details()
    after = decode.stats()
    assert (after.kv_blocks_used, after.waiting_for_kv) == (94, 1), "a refused reservation allocated blocks"

    assert decode.stub.Abort(common_pb2.AbortRequest(request_id=first_id, token=token_of(first_id)), timeout=5).found
    wait_idle(decode, timeout=release_timeout(cluster, 4000))
    reserve(decode, new_id("fits-now"), random_prompt(rng, LONG_PROMPT_LEN), lease_ms=300)
    wait_idle(decode, timeout=5)


# -- handshake ----------------------------------------------------------------------------------


def test_handshake_refuses_other_model(cluster, rng):
    prefill, decode = cluster.prefill, cluster.slow_decode  # tiny model vs slow model
    prompt = random_prompt(rng, 40)
    request_id = new_id("model")
    ticket = reserve(decode, request_id, prompt, lease_ms=lease_ms(cluster))
    error = rpc_error(prefill_future(prefill, request_id, prompt, ticket).result)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    for named in ("model", "number of layers", "number of KV heads", "head dim"):
        assert named in error.details()
    _refused_and_freed(error, ticket, prefill, decode, request_id)


def test_handshake_refuses_other_dtype_and_block_size(cluster, rng):
    prefill, decode = cluster.odd_prefill, cluster.decode  # bfloat16 and 32-token blocks vs float32 and 16
    prompt = random_prompt(rng, 40)  # 3 blocks of 16, 2 of 32: the block size must be named, not a count
    request_id = new_id("layout")
    ticket = reserve(decode, request_id, prompt, lease_ms=lease_ms(cluster))
    error = rpc_error(prefill_future(prefill, request_id, prompt, ticket).result)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert "dtype: receiver 'float32' vs sender 'bfloat16'" in error.details()
    assert "block size: receiver 16 vs sender 32" in error.details()
    assert "model" not in error.details()
    _refused_and_freed(error, ticket, prefill, decode, request_id)
    assert_still_serves(cluster.prefill, decode, rng)


def _refused_and_freed(error: grpc.RpcError, ticket, prefill, decode, request_id: str) -> None:
    """A refused handshake blames the link (a router pairs the two no more for a while), and the sender's word that
    no KV will come frees the reservation at once, where it waited for its lease on NIXL: the router's Abort that
    follows finds nothing left to stop."""
    assert (UNREACHABLE_PEER, ticket.address) in tuple(error.trailing_metadata() or ())
    wait_idle(decode, timeout=5)
    abort = common_pb2.AbortRequest(request_id=request_id, token=token_of(request_id))
    assert not decode.stub.Abort(abort, timeout=5).found
    wait_idle(prefill)


# -- malformed and oversized messages -----------------------------------------------------------


class KVGeometry:
    def __init__(self, ticket: decode_pb2.Ticket) -> None:
        layout = ticket.layout
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[layout.dtype]
        self.region_bytes = 2 * layout.block_size * layout.num_kv_heads * layout.head_dim * itemsize
        self.num_layers = layout.num_layers

    def chunk(
        self, request_id: str, layer: int, blocks, nbytes: int | None = None, good_checksum: bool = True
    ) -> kv_transfer_pb2.KVChunk:
        data = bytes(self.region_bytes * len(blocks) if nbytes is None else nbytes)
        return kv_transfer_pb2.KVChunk(
            request_id=request_id,
            layer=layer,
            block_ids=list(blocks),
            data=data,
            checksum=checksum(data) if good_checksum else 12345,
        )


def _push(receiver, messages) -> grpc.RpcError:
    return rpc_error(receiver.PushKV, iter(messages), timeout=10)


MALFORMED_PUSHES = (
    "blocks not reserved",
    "wrong byte size",
    "bad checksum",
    "layer out of range",
    "commit too early",
    "oversized message",
)


def _malformed_push(case: str, ticket: decode_pb2.Ticket):
    """The messages after a push's opening one, and the status (and words in its message) they must earn."""
    geometry, request_id, blocks = KVGeometry(ticket), ticket.request_id, list(ticket.block_ids)
    code = grpc.StatusCode
    if case == "blocks not reserved":
        return [geometry.chunk(request_id, 0, [max(blocks) + 1])], code.INVALID_ARGUMENT, "not reserved"
    if case == "wrong byte size":
        return (
            [geometry.chunk(request_id, 0, blocks, nbytes=geometry.region_bytes * len(blocks) - 4)],
            code.INVALID_ARGUMENT,
            "bytes",
        )
    if case == "bad checksum":
        return [geometry.chunk(request_id, 0, blocks, good_checksum=False)], code.DATA_LOSS, "checksum"
    if case == "layer out of range":
        return [geometry.chunk(request_id, geometry.num_layers, blocks)], code.INVALID_ARGUMENT, "layer"
    if case == "commit too early":
        return (
            [geometry.chunk(request_id, 0, blocks), kv_transfer_pb2.KVChunk(request_id=request_id, commit=True)],
            code.FAILED_PRECONDITION,
            "before layers",
        )
    assert case == "oversized message"  # over the workers' 64 MiB limit
    return (
        [kv_transfer_pb2.KVChunk(request_id=request_id, layer=0, block_ids=blocks, data=bytes(65 * 1024 * 1024))],
        code.RESOURCE_EXHAUSTED,
        "",
    )


@pytest.mark.parametrize("case", MALFORMED_PUSHES)
def test_malformed_kv_push_is_rejected(cluster, rng, case):
    decode = cluster.decode
    receiver = kv_transfer_pb2_grpc.KVReceiverStub(decode.channel)
    expired_before = decode.stats().leases_expired
    nixl_lease_ms = 4000 if case == "oversized message" else NIXL_LEASE_MS  # 65 MiB take a while to send
    request_id = new_id("bad")
    ticket = reserve(decode, request_id, random_prompt(rng, 40), lease_ms=lease_ms(cluster, nixl_lease_ms))
    stream = claim(decode, request_id)
    messages, code, words = _malformed_push(case, ticket)

    error = _push(
        receiver,
        [kv_transfer_pb2.KVChunk(request_id=request_id, instance_id=ticket.instance_id, token=ticket.token), *messages],
    )
    assert error.code() == code, error.details()
    assert words in error.details()
    refused = rpc_error(lambda: stream)
    assert refused.code() == grpc.StatusCode.ABORTED, f"the reservation was not stopped: {refused.details()}"
    assert wait_idle(decode, timeout=release_timeout(cluster, nixl_lease_ms)).leases_expired == expired_before
    assert_still_serves(cluster.prefill, decode, rng)


def test_kv_push_outside_any_reservation_is_rejected(cluster, rng):
    decode = cluster.decode
    receiver = kv_transfer_pb2_grpc.KVReceiverStub(decode.channel)
    unknown = _push(receiver, [kv_transfer_pb2.KVChunk(request_id=new_id("nobody"))])
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    nameless = _push(receiver, [kv_transfer_pb2.KVChunk()])
    assert nameless.code() == grpc.StatusCode.INVALID_ARGUMENT

    request_id = new_id("instance")
    reserve(decode, request_id, random_prompt(rng, 20), lease_ms=lease_ms(cluster))
    stranger = _push(receiver, [kv_transfer_pb2.KVChunk(request_id=request_id, instance_id="someone-else")])
    assert stranger.code() == grpc.StatusCode.FAILED_PRECONDITION and "instance" in stranger.details()
    assert decode.stub.Abort(
        common_pb2.AbortRequest(request_id=request_id, token=token_of(request_id)), timeout=5
    ).found
    wait_idle(decode, timeout=release_timeout(cluster))


def test_malformed_commits_are_rejected(cluster, rng):
    decode = cluster.decode
    receiver = kv_transfer_pb2_grpc.KVReceiverStub(decode.channel)
    unknown = rpc_error(receiver.Commit, kv_transfer_pb2.CommitRequest(request_id=new_id("nobody")), timeout=10)
    assert unknown.code() == grpc.StatusCode.NOT_FOUND

    request_id = new_id("commit")
    # NIXL: a commit waits up to 5 s for the notifications of trailing writes; the lease outlasts that.
    ticket = reserve(decode, request_id, random_prompt(rng, 40), lease_ms=lease_ms(cluster, 7000))
    stranger = rpc_error(
        receiver.Commit, kv_transfer_pb2.CommitRequest(request_id=request_id, instance_id="someone-else"), timeout=10
    )
    assert stranger.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert decode.stats().waiting_for_kv == 1, "a commit naming another instance touched this reservation"
    early = rpc_error(
        receiver.Commit,
        kv_transfer_pb2.CommitRequest(request_id=request_id, instance_id=ticket.instance_id, token=ticket.token),
        timeout=30,
    )
    assert early.code() == grpc.StatusCode.FAILED_PRECONDITION and "before layers" in early.details()
    wait_idle(decode, timeout=release_timeout(cluster, 7000))


def test_invalid_requests_are_refused_without_allocating(cluster, rng):
    decode, prefill = cluster.decode, cluster.prefill
    code = grpc.StatusCode
    prompt = random_prompt(rng, 20)

    out_of_vocab = rpc_error(reserve, decode, new_id("vocab"), prompt + [320])
    assert out_of_vocab.code() == code.INVALID_ARGUMENT and "320" in out_of_vocab.details()
    no_tokens = rpc_error(reserve, decode, new_id("zero"), prompt, wire_params(0))
    assert no_tokens.code() == code.INVALID_ARGUMENT and "max_tokens" in no_tokens.details()
    empty = rpc_error(reserve, decode, new_id("empty"), [])
    assert empty.code() == code.INVALID_ARGUMENT
    hot = rpc_error(aggregated, decode, new_id("hot"), prompt, wire_params(4, temperature=-1.0))
    assert hot.code() == code.INVALID_ARGUMENT and "temperature" in hot.details()
    huge_stop = wire_params(4, stop=["x" * (65 * 1024 * 1024)])  # over the workers' 64 MiB message limit
    too_big = rpc_error(reserve, decode, new_id("big"), prompt, huge_stop)
    assert too_big.code() == code.RESOURCE_EXHAUSTED

    held_id = new_id("dup")
    ticket = reserve(decode, held_id, prompt, lease_ms=lease_ms(cluster))
    duplicate = rpc_error(reserve, decode, held_id, prompt)
    assert duplicate.code() == code.INVALID_ARGUMENT and "in use" in duplicate.details()
    assert decode.stub.Abort(common_pb2.AbortRequest(request_id=held_id, token=token_of(held_id)), timeout=5).found

    no_ticket = rpc_error(
        prefill.stub.Prefill,
        prefill_pb2.PrefillRequest(request_id=new_id("p"), prompt_token_ids=prompt, params=wire_params(4)),
        timeout=10,
    )
    assert no_ticket.code() == code.INVALID_ARGUMENT and "ticket" in no_ticket.details()
    short_ticket = decode_pb2.Ticket()
    short_ticket.CopyFrom(ticket)
    del short_ticket.block_ids[-1]
    miscounted = rpc_error(prefill_future(prefill, held_id, prompt, short_ticket).result)
    assert miscounted.code() == code.INVALID_ARGUMENT and "blocks" in miscounted.details()
    nowhere = decode_pb2.Ticket()
    nowhere.CopyFrom(ticket)
    nowhere.address = "127.0.0.1:1"
    unreachable = rpc_error(prefill_future(prefill, new_id("nowhere"), prompt, nowhere).result)
    assert unreachable.code() == code.UNAVAILABLE
    # The peer is named, so a router blames the link and not this prefill worker (tests/router/test_partition.py).
    assert dict(unreachable.trailing_metadata())[UNREACHABLE_PEER] == "127.0.0.1:1"
    out_of_vocab_prefill = rpc_error(prefill_future(prefill, new_id("pv"), prompt[:-1] + [999], ticket).result)
    assert out_of_vocab_prefill.code() == code.INVALID_ARGUMENT
    too_big_prefill = rpc_error(prefill_future(prefill, new_id("pbig"), prompt, ticket, huge_stop).result)
    assert too_big_prefill.code() == code.RESOURCE_EXHAUSTED

    wait_idle(decode, timeout=release_timeout(cluster))
    wait_idle(prefill)
    assert_still_serves(prefill, decode, rng)


def test_a_ticket_without_an_address_is_refused_as_bad_input(cluster, rng):
    """No receiver issues a ticket without an address: INVALID_ARGUMENT naming it, not UNAVAILABLE (which
    tells a router the decode worker is down and to try another)."""
    prefill, decode = cluster.prefill, cluster.decode
    prompt = random_prompt(rng, 40)
    request_id = new_id("no-address")
    ticket = reserve(decode, request_id, prompt, lease_ms=lease_ms(cluster))
    ticket.address = ""
    error = rpc_error(prefill_future(prefill, request_id, prompt, ticket).result)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "ticket.address" in error.details()
    assert decode.stub.Abort(
        common_pb2.AbortRequest(request_id=request_id, token=token_of(request_id)), timeout=5
    ).found
    wait_idle(prefill)
    wait_idle(decode, timeout=release_timeout(cluster))
    assert_still_serves(prefill, decode, rng)
