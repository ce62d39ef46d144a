"""The data plane accepts cluster members only, and a ticket is a capability bound to its sender.

Real workers on 127.0.0.1 (in this process, so the test can also reach their internals' results),
real gRPC clients; the hostile client is written here with raw stubs."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig
from prefill_worker.worker import PrefillWorker
from protos import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    kv_transfer_pb2,
    kv_transfer_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from protos.cluster_auth import SECRET_METADATA, ClusterAuth, TLSFiles
from tests.checkpoints import write_checkpoint
from tests.worker_server.certs import TestCA

SECRET = "the-real-cluster-secret"
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def engine_config(path, **changes) -> EngineConfig:
    return EngineConfig(model=str(path), kv_cache_memory_bytes=4 * 1024 * 1024, **changes)


@pytest.fixture(scope="module")
def pair(tiny):
    auth = ClusterAuth(secret=SECRET)
    decode = DecodeWorker(engine_config(tiny), auth=auth, reservations_per_peer=6, subscriptions_per_peer=2)
    prefill = PrefillWorker(engine_config(tiny), auth=auth)
    decode.start()
    prefill.start()
    yield decode, prefill
    prefill.stop()
    decode.stop()


def member(address: str) -> grpc.Channel:
    return ClusterAuth(secret=SECRET).channel(address)


def params(max_tokens: int = 4) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _push_after_the_answer(push, first, later, timeout: float = 5) -> grpc.StatusCode:
    """The status of a push stream whose second message follows only once the receiver answered the first
    (or after ``timeout``, when it took it): its refusal of the first then reaches the client as its status.
    (Sent back to back, or after a fixed pause a loaded receiver outlasts, gRPC's client may report the stream
    CANCELLED instead, when it was still sending as the receiver ended the call.) A receiver that wrongly took
    the first would read the second and write it."""
    answered = threading.Event()

    def messages():
        yield first
        answered.wait(timeout)
        yield later

    call = push.future(messages(), timeout=timeout * 2)
    call.add_done_callback(lambda _: answered.set())
    try:
        call.result()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# -- the cluster secret -----------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [(), ((SECRET_METADATA, "a-guess"),)], ids=["no secret", "wrong secret"])
def test_a_worker_refuses_every_call_without_the_secret(pair, metadata):
    decode, prefill = pair
    with grpc.insecure_channel(decode.address) as channel:
        stub = decode_pb2_grpc.DecodeWorkerStub(channel)
        kv = kv_transfer_pb2_grpc.KVReceiverStub(channel)
        reserve = decode_pb2.ReserveRequest(request_id="hostile", prompt_token_ids=[5] * 40, params=params())
        refused = [
            code_of(stub.Stats, common_pb2.StatsRequest(), metadata=metadata, timeout=5),
            code_of(stub.Reserve, reserve, metadata=metadata, timeout=5),
            code_of(stub.Abort, common_pb2.AbortRequest(request_id="x"), metadata=metadata, timeout=5),
            code_of(stub.SubscribeKVEvents, common_pb2.SubscribeKVEventsRequest(), metadata=metadata, timeout=5),
            code_of(kv.Handshake, kv_transfer_pb2.HandshakeRequest(), metadata=metadata, timeout=5),
            code_of(kv.PushKV, iter([kv_transfer_pb2.KVChunk(request_id="x")]), metadata=metadata, timeout=5),
            code_of(kv.Commit, kv_transfer_pb2.CommitRequest(request_id="x"), metadata=metadata, timeout=5),
        ]
        assert refused == [grpc.StatusCode.UNAUTHENTICATED] * len(refused)
        # The standard health check needs no secret: it says SERVING and nothing else.
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(prefill.address) as channel:
        stub = prefill_pb2_grpc.PrefillWorkerStub(channel)
        assert code_of(stub.Stats, common_pb2.StatsRequest(), metadata=metadata, timeout=5) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    assert len(decode.reservations) == 0  # nothing reached the servicer


# -- tickets are capabilities -----------------------------------------------------------------------


def test_another_requests_ticket_or_a_wrong_token_is_refused_and_disturbs_nothing(pair):
    decode, prefill = pair
    with member(decode.address) as d_channel, member(prefill.address) as p_channel:
        d = decode_pb2_grpc.DecodeWorkerStub(d_channel)
        kv = kv_transfer_pb2_grpc.KVReceiverStub(d_channel)
        prompt = [7 + i % 50 for i in range(70)]
        victim = d.Reserve(decode_pb2.ReserveRequest(request_id="victim", prompt_token_ids=prompt, params=params()))
        mine = d.Reserve(decode_pb2.ReserveRequest(request_id="insider", prompt_token_ids=[9] * 40, params=params()))
        assert victim.token and mine.token and victim.token != mine.token
        try:
            region = decode.engine.kv_cache.layout.region_bytes
            poison = kv_transfer_pb2.KVChunk(layer=0, block_ids=victim.block_ids[:1], data=b"\x55" * region)
            near_miss = victim.token[:-1] + ("A" if victim.token[-1] != "A" else "B")  # one character off, always
            for token in (mine.token, "", near_miss):
                first = kv_transfer_pb2.KVChunk(request_id="victim", instance_id=victim.instance_id, token=token)
                pushed = _push_after_the_answer(kv.PushKV, first, poison)
                assert pushed == grpc.StatusCode.PERMISSION_DENIED, (token == mine.token, token, victim.token, pushed)
                commit = kv_transfer_pb2.CommitRequest(request_id="victim", token=token, first_token_id=1)
                assert code_of(kv.Commit, commit, timeout=5) == grpc.StatusCode.PERMISSION_DENIED
                abort = kv_transfer_pb2.CommitRequest(request_id="victim", token=token, abort=True)
                assert code_of(kv.Commit, abort, timeout=5) == grpc.StatusCode.PERMISSION_DENIED
                assert code_of(d.Abort, common_pb2.AbortRequest(request_id="victim", token=token), timeout=5) == (
                    grpc.StatusCode.PERMISSION_DENIED
                )
                claim = decode_pb2.GenerateRequest(request_id="victim", reserved=True, token=token)
                assert code_of(d.Generate, claim, timeout=5) == grpc.StatusCode.PERMISSION_DENIED
            landing = decode.inbox.get("victim")
            assert landing is not None and landing.accepting and landing.bytes_received == 0
            # The real sender still delivers, and the client gets the right tokens.
            outputs = d.Generate(decode_pb2.GenerateRequest(request_id="victim", reserved=True, token=victim.token))
            first = prefill_pb2_grpc.PrefillWorkerStub(p_channel).Prefill(
                prefill_pb2.PrefillRequest(
                    request_id="victim", prompt_token_ids=prompt, params=params(), ticket=victim
                ),
                timeout=30,
            )
            tokens = [t for output in outputs for t in output.token_ids]
            local = d.Generate(decode_pb2.GenerateRequest(request_id="local", prompt_token_ids=prompt, params=params()))
            assert tokens == [t for output in local for t in output.token_ids]
            assert tokens[0] == first.first_token_id
            assert d.Abort(common_pb2.AbortRequest(request_id="insider", token=mine.token), timeout=5).found
        finally:  # a failure above leaves the module's decode worker no reservation of this test's
            for ticket in (victim, mine):
                code_of(d.Abort, common_pb2.AbortRequest(request_id=ticket.request_id, token=ticket.token), timeout=5)


def test_a_claimed_reservations_request_is_still_only_its_tickets_holders_to_abort(pair):
    """A reservation whose KV landed before its client claimed it loses its record at the claim, and its request runs
    on: a wrong token's Abort must still be PERMISSION_DENIED (it ended another request's stream 277 tokens into 300),
    and the stream goes on to the same tokens as without it."""
    decode, prefill = pair
    prompt, limit = [5 + i % 40 for i in range(50)], 900  # long enough to be running at the abort
    with member(decode.address) as d_channel, member(prefill.address) as p_channel:
        d = decode_pb2_grpc.DecodeWorkerStub(d_channel)
        reserve = decode_pb2.ReserveRequest(request_id="claimed", prompt_token_ids=prompt, params=params(limit))
        victim = d.Reserve(reserve)
        try:
            prefill_pb2_grpc.PrefillWorkerStub(p_channel).Prefill(
                prefill_pb2.PrefillRequest(
                    request_id="claimed", prompt_token_ids=prompt, params=params(limit), ticket=victim
                ),
                timeout=30,
            )
            outputs = d.Generate(decode_pb2.GenerateRequest(request_id="claimed", reserved=True, token=victim.token))
            first = next(outputs)
            assert decode.reservations.get("claimed") is None and "claimed" in decode.engine.requests
            for token in ("", "not-the-token"):
                abort = common_pb2.AbortRequest(request_id="claimed", token=token)
                assert code_of(d.Abort, abort, timeout=5) == grpc.StatusCode.PERMISSION_DENIED
            rest = list(outputs)
        finally:
            code_of(d.Abort, common_pb2.AbortRequest(request_id="claimed", token=victim.token), timeout=5)
        local = d.Generate(
            decode_pb2.GenerateRequest(request_id="unclaimed", prompt_token_ids=prompt, params=params(limit))
        )
        assert rest[-1].finish_reason == "length"
        assert [t for o in (first, *rest) for t in o.token_ids] == [t for o in local for t in o.token_ids]


# -- per-peer limits ----------------------------------------------------------------------------------


def test_one_peer_cannot_hold_every_reservation(pair):
    decode, _ = pair
    with member(decode.address) as channel:
        d = decode_pb2_grpc.DecodeWorkerStub(channel)
        tickets = []
        for i in range(decode.reservations.max_per_peer):
            request = decode_pb2.ReserveRequest(request_id=f"hog-{i}", prompt_token_ids=[11 + i] * 20, params=params())
            tickets.append(d.Reserve(request, timeout=5))
        extra = decode_pb2.ReserveRequest(request_id="hog-extra", prompt_token_ids=[3] * 20, params=params())
        assert code_of(d.Reserve, extra, timeout=5) == grpc.StatusCode.RESOURCE_EXHAUSTED
        for ticket in tickets:
            d.Abort(common_pb2.AbortRequest(request_id=ticket.request_id, token=ticket.token), timeout=5)
        again = d.Reserve(extra, timeout=5)  # room again once its own reservations ended
        assert d.Abort(common_pb2.AbortRequest(request_id="hog-extra", token=again.token), timeout=5).found


def test_kv_event_subscriptions_are_bounded_and_health_and_stats_still_answer(tiny):
    worker = DecodeWorker(engine_config(tiny), auth=ClusterAuth(secret=SECRET), max_rpc_threads=8)
    worker.start()
    calls = []
    try:
        with member(worker.address) as channel:
            d = decode_pb2_grpc.DecodeWorkerStub(channel)
            refused = 0
            for _ in range(40):
                call = d.SubscribeKVEvents(common_pb2.SubscribeKVEventsRequest())
                calls.append(call)
                try:
                    next(call)  # the snapshot: the subscription is live
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    refused += 1
            assert refused == 40 - worker.subscriptions.total > 0
            start = time.perf_counter()
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            stats = d.Stats(common_pb2.StatsRequest(), timeout=2)
            assert health.status == health_pb2.HealthCheckResponse.SERVING and stats.role == "decode"
            assert time.perf_counter() - start < 1.0
    finally:
        for call in calls:
            call.cancel()
        worker.stop()


# -- Stats never waits for the engine -------------------------------------------------------------


def test_stats_answers_in_milliseconds_while_a_long_prefill_runs(tmp_path):
    path = tmp_path / "slow"  # its 3,000-token prefill: one step of ~3 s on a 2-core EPYC, long enough on a faster CPU
    shape = dict(TINY, hidden_size=256, intermediate_size=1024, num_hidden_layers=24, num_attention_heads=8)
    write_checkpoint(
        path, "LlamaForCausalLM", seed=6, **dict(shape, num_key_value_heads=4, max_position_embeddings=4096)
    )
    config = EngineConfig(model=str(path), kv_cache_memory_bytes=128 * 1024 * 1024, max_num_batched_tokens=4096)
    worker = DecodeWorker(config, auth=ClusterAuth(secret=SECRET))
    worker.start()
    try:
        with member(worker.address) as channel:
            d = decode_pb2_grpc.DecodeWorkerStub(channel)
            d.Stats(common_pb2.StatsRequest(), timeout=5)  # warm the channel
            prompt = [3 + i % 300 for i in range(3000)]
            request = decode_pb2.GenerateRequest(request_id="long", prompt_token_ids=prompt, params=params(1))
            done, failed = threading.Event(), []
            started = time.perf_counter()

            def generate():
                try:
                    list(d.Generate(request, timeout=120))
                except grpc.RpcError as error:
                    failed.append(error)
                finally:
                    done.set()

            threading.Thread(target=generate, daemon=True).start()
            time.sleep(0.2)  # the prefill step is under way
            latencies = []
            while not done.is_set():
                begin = time.perf_counter()
                d.Stats(common_pb2.StatsRequest(), timeout=5)
                latencies.append(time.perf_counter() - begin)
                time.sleep(0.02)
            prefill_s = time.perf_counter() - started
        assert not failed, failed
        assert prefill_s > 0.5, f"the prefill took {prefill_s:.2f} s: too short to show anything"
        assert latencies and max(latencies) < 0.1, f"Stats took up to {max(latencies) * 1000:.0f} ms"
    finally:
        worker.stop()


# -- mutual TLS -------------------------------------------------------------------------------------


def test_mutual_tls_refuses_a_client_without_a_valid_certificate(tiny, tmp_path):
    ca = TestCA(tmp_path)
    server, client = ca.issue("decode-worker"), ca.issue("router")
    stranger_ca = TestCA(tmp_path, "stranger-ca")
    stranger = stranger_ca.issue("stranger")
    worker = DecodeWorker(
        engine_config(tiny), auth=ClusterAuth(secret=SECRET, tls=TLSFiles(server.cert, server.key, ca.path))
    )
    worker.start()
    try:
        good = ClusterAuth(secret=SECRET, tls=TLSFiles(client.cert, client.key, ca.path))
        with good.channel(worker.address) as channel:
            assert (
                decode_pb2_grpc.DecodeWorkerStub(channel).Stats(common_pb2.StatsRequest(), timeout=10).role == "decode"
            )
        no_cert = grpc.ssl_channel_credentials(root_certificates=open(ca.path, "rb").read())
        with grpc.secure_channel(worker.address, no_cert) as channel:
            stub = decode_pb2_grpc.DecodeWorkerStub(channel)
            metadata = ((SECRET_METADATA, SECRET),)
            assert code_of(stub.Stats, common_pb2.StatsRequest(), metadata=metadata, timeout=5) == (
                grpc.StatusCode.UNAVAILABLE
            )
        foreign = ClusterAuth(secret=SECRET, tls=TLSFiles(stranger.cert, stranger.key, ca.path))
        with foreign.channel(worker.address) as channel:
            stub = decode_pb2_grpc.DecodeWorkerStub(channel)
            assert code_of(stub.Stats, common_pb2.StatsRequest(), timeout=5) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(worker.address) as channel:  # plaintext: not even a TLS handshake
            stub = decode_pb2_grpc.DecodeWorkerStub(channel)
            metadata = ((SECRET_METADATA, SECRET),)
            assert code_of(stub.Stats, common_pb2.StatsRequest(), metadata=metadata, timeout=5) == (
                grpc.StatusCode.UNAVAILABLE
            )
    finally:
        worker.stop()
