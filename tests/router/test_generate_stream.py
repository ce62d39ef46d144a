"""A decode worker's Generate calls over one stream (router/worker_streams.py, decode.proto's GenerateStream), against
a real decode worker: requests sharing the stream come back as their own calls would (tokens, text, finish), a refused
one fails with its own call's status and leaves the stream to the others, a cancelled one stops on the worker and
returns its blocks, and a worker lost fails every request on its stream with the error a lost call has, after which
the next request opens a new stream."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from protos import decode_pb2, decode_pb2_grpc
from protos.cluster_auth import ClusterAuth
from router.worker_streams import GenerateLink
from tests.router.conftest import random_prompt
from tests.workers.harness import start_worker, wait_idle, wire_params

TIMEOUT_S = 60


def _request(request_id: str, prompt: list[int], max_tokens: int, **params) -> decode_pb2.GenerateRequest:
    return decode_pb2.GenerateRequest(
        request_id=request_id, prompt_token_ids=prompt, params=wire_params(max_tokens, **params)
    )


async def _read_all(call) -> list[decode_pb2.GenerateResponse]:
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


def _said(responses: list[decode_pb2.GenerateResponse]) -> tuple[list[int], str, str]:
    return [t for r in responses for t in r.token_ids], "".join(r.text for r in responses), responses[-1].finish_reason


def _run(address: str, scenario, timeout: float = TIMEOUT_S):
    async def main():
        async with ClusterAuth.from_env().aio_channel(address) as channel:
            stub = decode_pb2_grpc.DecodeWorkerStub(channel)
            return await asyncio.wait_for(scenario(stub, GenerateLink(stub)), timeout)

    return asyncio.run(main())


def test_requests_sharing_the_stream_come_back_as_their_own_calls(cluster):
    rng = random.Random(5)
    asked = [(random_prompt(rng, rng.randint(3, 40)), rng.randint(1, 24), rng.choice([0.0, 1.0])) for _ in range(8)]

    async def scenario(stub, link):
        def request(kind: str, index: int):
            prompt, max_tokens, temperature = asked[index]
            return _request(f"{kind}-{index}", prompt, max_tokens, temperature=temperature, seed=index, ignore_eos=True)

        own = await asyncio.gather(*(_read_all(stub.Generate(request("own", i))) for i in range(len(asked))))
        shared = await asyncio.gather(*(_read_all(link.generate(request("shared", i))) for i in range(len(asked))))
        return own, shared, link.opened

    own, shared, opened = _run(cluster.decode.address, scenario)
    assert [_said(r) for r in shared] == [_said(r) for r in own]
    assert [len(_said(r)[0]) for r in shared] == [max_tokens for _, max_tokens, _ in asked]
    assert opened == 1, "every request went on one stream"


def test_a_refused_request_fails_with_its_own_calls_status_and_the_stream_goes_on(cluster):
    bad = _request("bad", [10**6], 4)  # a token id outside the vocabulary

    async def scenario(stub, link):
        with pytest.raises(grpc.aio.AioRpcError) as own:
            await _read_all(stub.Generate(bad))
        call = link.generate(bad)
        with pytest.raises(grpc.aio.AioRpcError) as shared:
            await _read_all(call)
        assert call.done()
        running = link.generate(_request("twice", [5, 6], 3, ignore_eos=True))
        with pytest.raises(grpc.aio.AioRpcError) as twice:  # an id running on the stream: as the engine refuses it
            await _read_all(link.generate(_request("twice", [5, 6], 3)))
        assert twice.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already in use" in twice.value.details()
        assert len(_said(await _read_all(running))[0]) == 3, "the running one keeps its responses"
        good = await _read_all(link.generate(_request("good", [5, 6, 7], 3, ignore_eos=True)))
        return own.value, shared.value, good, link.opened

    own, shared, good, opened = _run(cluster.decode.address, scenario)
    assert (shared.code(), shared.details()) == (own.code(), own.details())
    assert own.code() == grpc.StatusCode.INVALID_ARGUMENT and "token ids in [0, " in own.details()
    assert len(_said(good)[0]) == 3 and opened == 1


def test_a_cancelled_request_stops_on_the_worker_and_returns_its_blocks(cluster):
    async def scenario(stub, link):
        call = link.generate(_request("long", [5, 6, 7, 8], 2000, ignore_eos=True))
        first = await call.read()
        assert call.cancel() and not call.cancel(), "cancelled once"
        with pytest.raises(asyncio.CancelledError):
            await call.read()
        return first

    first = _run(cluster.decode.address, scenario)
    assert first.token_ids
    stats = wait_idle(cluster.decode, timeout=10)
    assert stats.running == 0


def test_a_lost_worker_fails_every_request_on_its_stream_and_the_next_opens_another(checkpoint):
    decode = start_worker("decode", str(checkpoint.path))
    port = decode.address.rsplit(":", 1)[1]
    restarted = None
    try:

        async def scenario(stub, link):
            calls = [link.generate(_request(f"long-{i}", [5, 6, 7, i + 8], 2000, ignore_eos=True)) for i in range(3)]
            for call in calls:
                await call.read()
            await asyncio.to_thread(decode.kill)
            errors = []
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as lost:
                    await _read_all(call)
                errors.append(lost.value.code())
            nonlocal restarted
            restarted = await asyncio.to_thread(start_worker, "decode", str(checkpoint.path), "grpc", "--port", port)
            for _ in range(100):  # the channel reconnects to the worker in its place
                try:
                    again = await _read_all(link.generate(_request("after", [5, 6, 7], 2, ignore_eos=True)))
                    return errors, again, link.opened
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    await asyncio.sleep(0.1)
            raise AssertionError("the restarted worker was never reached")

        errors, again, opened = _run(decode.address, scenario)
    finally:
        for worker in (decode, restarted):
            if worker is not None:
                worker.stop()
    assert errors == [grpc.StatusCode.UNAVAILABLE] * 3
    assert len(_said(again)[0]) == 2 and opened >= 2


def test_a_worker_ignores_an_id_sent_again_on_its_stream_while_it_runs(cluster):
    """The router never sends an id twice (the link refuses it); a stream that does anyway gets the running
    request's answers, once, where the second took the first's place and the client got an error for both."""
    request = _request("again", [5, 6, 7], 5, ignore_eos=True)

    async def scenario(stub, link):
        finished = asyncio.Event()

        async def requests():
            for _ in range(2):
                yield decode_pb2.GenerateStreamRequest(generate=request)
            await finished.wait()  # then the client has written its last request

        answers = []
        async for message in stub.GenerateStream(requests()):
            answers.append(message)
            if message.HasField("error") or message.response.finish_reason:
                finished.set()
        return answers

    answers = _run(cluster.decode.address, scenario)
    assert not any(a.HasField("error") for a in answers), answers
    assert {a.request_id for a in answers} == {"again"}
    assert [a.response.finish_reason for a in answers if a.response.finish_reason] == ["length"]
    assert len([t for a in answers for t in a.response.token_ids]) == 5
