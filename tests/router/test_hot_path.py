"""The request path's shortcuts keep their contracts: the cluster secret on every worker call, admission's queue and
refusals, a decode stream read up to its finish and no further (no async iterator between), a finished stream left
to end by itself (no cancellation, no Abort), and a request that waits for its answer in its own task, where only
its client's leaving becomes a 499."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from protos import decode_pb2
from router import openai_api
from router.config import RouterConfig
from router.frontend import Admission, Overloaded
from router.metrics import RouterMetrics
from router.orchestrator import GenerationError, Orchestrator
from router.server import run_event_loop
from router.workers import SecretStub, WorkerHandle
from tests.router.conftest import SERVED_MODEL, random_prompt, wait_for

SECRET = (("x-splitserve-cluster-secret", "s3cret"),)


class _RecordingStub:
    def __init__(self) -> None:
        self.calls = []

    def Generate(self, request, **kwargs):  # noqa: N802 - a gRPC method's name
        self.calls.append((request, kwargs))
        return "call"


def test_secret_stub_puts_the_secret_before_the_calls_own_metadata():
    inner = _RecordingStub()
    stub = SecretStub(inner, SECRET)
    assert stub.Generate("request", timeout=5, metadata=(("traceparent", "00-ab"),)) == "call"
    assert stub.Generate("again", timeout=1) == "call"
    assert inner.calls == [
        ("request", {"timeout": 5, "metadata": (*SECRET, ("traceparent", "00-ab"))}),
        ("again", {"timeout": 1, "metadata": SECRET}),
    ]
    assert SecretStub(inner, ()).Generate("open") == "call" and inner.calls[-1] == ("open", {"metadata": ()})
    with pytest.raises(AttributeError):
        stub.NoSuchMethod  # noqa: B018


def test_admission_takes_free_slots_at_once_queues_then_refuses():
    async def scenario():
        admission = Admission(max_running=1, max_queued=1, queue_timeout_s=0.2, metrics=RouterMetrics())
        holding, release = asyncio.Event(), asyncio.Event()

        async def hold():
            async with admission.slot():
                holding.set()
                await release.wait()

        holder = asyncio.create_task(hold())
        await holding.wait()
        assert admission.running == 1
        queued = asyncio.create_task(hold())
        await asyncio.sleep(0)
        assert admission.waiting == 1
        with pytest.raises(Overloaded) as full:  # the queue holds one
            async with admission.slot():
                pass
        assert full.value.status == 429
        release.set()
        await holder
        await queued  # got the slot the first one left
        assert (admission.running, admission.waiting) == (0, 0)
        release.clear()
        holding.clear()
        holder = asyncio.create_task(hold())
        await holding.wait()
        with pytest.raises(Overloaded) as late:  # waited queue_timeout_s
            async with admission.slot():
                pass
        assert late.value.status == 503 and admission.waiting == 0
        release.set()
        await holder

    asyncio.run(scenario())


class _Stream:
    """A gRPC response stream read with ``read()``; after its responses the status is still to come (a read
    waits). An async iterator over it would be a layer more per response: refused."""

    def __init__(self, responses) -> None:
        self.responses = list(responses)
        self.reads = 0

    async def read(self):
        self.reads += 1
        if self.reads <= len(self.responses):
            return self.responses[self.reads - 1]
        await asyncio.Event().wait()  # the status, still to come

    def __aiter__(self):
        raise AssertionError("the decode stream is read, not iterated")


def test_decode_stream_reads_up_to_the_finish_and_no_further():
    stream = _Stream(
        [
            decode_pb2.GenerateResponse(token_ids=[7], text="a"),
            decode_pb2.GenerateResponse(token_ids=[8], text="b", finish_reason="length"),
        ]
    )
    orchestrator = Orchestrator(RouterConfig(), pool=None, model=None, metrics=RouterMetrics())
    worker = WorkerHandle("d:1", "decode", channel=None, stub=None)

    async def collect():
        stream_of = orchestrator._decode_stream(worker, stream, skip_first=False)
        return await asyncio.wait_for(_all(stream_of), 5)  # a read past the finish would wait for the status

    deltas = asyncio.run(collect())
    assert [(d.token_ids, d.text, d.finish_reason) for d in deltas] == [((7,), "a", None), ((8,), "b", "length")]
    assert stream.reads == 2


async def _all(stream) -> list:
    return [item async for item in stream]


class _CountingStub:
    """A worker's real stub (or its generate link), recording each call made through it (method name, the call
    object) in ``calls``."""

    def __init__(self, stub, calls: list | None = None) -> None:
        self._stub = stub
        self.calls: list[tuple[str, object]] = [] if calls is None else calls

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)

        def call(*args, **kwargs):
            made = method(*args, **kwargs)
            self.calls.append((name, made))
            return made

        return call


@pytest.mark.parametrize("stream", [False, True])
def test_a_finished_request_cancels_nothing_and_aborts_nothing(make_router, cluster, rng, stream):
    """A Generate whose finish arrived ends by itself: the router neither cancels it (the worker would be told) nor,
    for a reserved one, sends the decode worker an Abort, on every request, disaggregated or not. The requests go on
    the worker's one stream (router/worker_streams.py), whose calls are counted as the stub's are."""
    router = make_router(cluster.prefills, [cluster.decode], local_prefill_threshold=32)
    handle = router.router.pool.workers[cluster.decode.address]
    counting = _CountingStub(handle.stub)
    router.call(lambda: setattr(handle, "stub", counting))
    router.call(lambda: setattr(handle, "link", _CountingStub(handle.link, counting.calls)))
    client = router.openai()
    for length in (40, 8, 40, 8):  # remote prefill (reserved on D), then prefilled by D itself
        prompt = random_prompt(rng, length)
        made = client.completions.create(
            model=SERVED_MODEL,
            prompt=[prompt],
            max_tokens=3,
            temperature=0,
            stream=stream,
            extra_body={"ignore_eos": True},
        )
        finishes = [c.choices[0].finish_reason for c in made] if stream else [made.choices[0].finish_reason]
        assert finishes[-1] == "length"
    assert router.decisions() == {"remote_prefill": 2.0, "local_prefill": 2.0}
    generates = [call for name, call in counting.calls if name in ("Generate", "generate")]
    assert len(generates) == 4
    wait_for(lambda: router.call(lambda: all(call.done() for call in generates)), 10, "the Generate calls' statuses")
    assert router.call(lambda: [call.cancelled() for call in generates]) == [False] * 4
    assert "Abort" not in [name for name, _ in counting.calls]


class _Client:
    """Stands in for the one thing ``_unless_disconnected`` asks of Starlette's Request: whether its client has
    disconnected (here: from the ``gone_after``-th ask on)."""

    def __init__(self, gone_after: int | None = None) -> None:
        self.gone_after, self.asks = gone_after, 0

    async def is_disconnected(self) -> bool:
        self.asks += 1
        return self.gone_after is not None and self.asks >= self.gone_after


def test_a_request_waits_in_its_own_task_and_only_its_clients_leaving_is_a_499(monkeypatch):
    monkeypatch.setattr(openai_api, "DISCONNECT_CHECK_S", 0.01)

    async def answered_at_once():
        client, before = _Client(gone_after=1), len(asyncio.all_tasks())

        async def work():
            assert len(asyncio.all_tasks()) == before  # no task of its own, and no watcher task yet
            return "answer"

        result = await openai_api._unless_disconnected(client, work())
        await asyncio.sleep(0.05)  # the watch's timer would have fired by now
        return result, client.asks, asyncio.current_task().cancelling()

    assert asyncio.run(answered_at_once()) == ("answer", 0, 0)

    async def client_leaves():
        client, stopped = _Client(gone_after=3), asyncio.Event()

        async def work():
            try:
                await asyncio.Event().wait()
            finally:
                stopped.set()  # the work's own clean-up ran before the 499 left

        with pytest.raises(GenerationError) as caught:
            await openai_api._unless_disconnected(client, work())
        return caught.value.status, client.asks, stopped.is_set(), asyncio.current_task().cancelling()

    assert asyncio.run(client_leaves()) == (499, 3, True, 0)

    async def cancelled_from_outside():
        async def request():
            await openai_api._unless_disconnected(_Client(), asyncio.Event().wait())

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0.05)  # a few checks, the client still there
        task.cancel()  # the server shutting down, say: that is no client leaving
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled_from_outside())


def test_the_router_runs_on_uvloops_event_loop():
    async def running_loop():
        return type(asyncio.get_running_loop())

    assert run_event_loop(running_loop()) is uvloop.Loop
