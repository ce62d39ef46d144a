"""A worker's unary calls over one stream (router/worker_streams.py's CallLink, worker_server/calls.py; the ``Calls``
RPC of decode.proto and prefill.proto), against real workers: a disaggregated request's Reserve, Prefill and SendTicket
on the streams give what their own calls give; a refused call fails with its own call's status, details and trailing
metadata (UNREACHABLE_PEER) and the stream goes on; a cancelled call, or one past its deadline, stops on the worker and
returns what it held, and a Reserve given up on as the worker answers it leaves no reservation behind; a lost worker
fails every call on its stream as a lost call fails, and the next call opens another stream."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from bench.processes import free_port
from contract.errors import UNREACHABLE_PEER
from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from protos.cluster_auth import ClusterAuth
from router.worker_streams import CallLink, decode_calls, prefill_calls
from router.workers import WorkerHandle
from tests.workers.harness import new_id, start_worker, wait_idle, wait_until, wire_params

TIMEOUT_S = 60
PROMPT = [5, 9, 14, 20, 27, 35, 44, 54, 65, 77, 90, 104, 119, 135, 152, 170, 189]


def _links(decode_address: str, prefill_address: str, scenario, timeout: float = TIMEOUT_S):
    """Runs ``scenario(decode stub, decode link, prefill stub, prefill link)`` on one event loop."""

    async def main():
        auth = ClusterAuth.from_env()
        async with auth.aio_channel(decode_address) as d_channel, auth.aio_channel(prefill_address) as p_channel:
            decode, prefill = decode_pb2_grpc.DecodeWorkerStub(d_channel), prefill_pb2_grpc.PrefillWorkerStub(p_channel)
            d_link, p_link = decode_calls(decode), prefill_calls(prefill)
            return await asyncio.wait_for(scenario(decode, d_link, prefill, p_link), timeout)

    return asyncio.run(main())


def _reserve(request_id: str, max_tokens: int = 6) -> decode_pb2.ReserveRequest:
    params = wire_params(max_tokens, ignore_eos=True)
    return decode_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=PROMPT, params=params, lease_ms=20_000)


def _prefill(request_id: str, max_tokens: int = 6) -> prefill_pb2.PrefillRequest:
    params = wire_params(max_tokens, ignore_eos=True)
    return prefill_pb2.PrefillRequest(
        request_id=request_id, prompt_token_ids=PROMPT, params=params, ticket_follows=True
    )


async def _generated(decode, ticket: decode_pb2.Ticket) -> list[int]:
    request = decode_pb2.GenerateRequest(request_id=ticket.request_id, reserved=True, token=ticket.token)
    return [token for response in [r async for r in decode.Generate(request)] for token in response.token_ids]


def _on_streams(d_link: CallLink, p_link: CallLink) -> tuple:
    """Reserve, Prefill and SendTicket on the workers' streams, with the router's deadlines."""
    return (
        lambda request: d_link.call("Reserve", request, 10),
        lambda request: p_link.call("Prefill", request, 30),
        lambda delivery: p_link.call("SendTicket", delivery, 10),
    )


async def _request(decode, prefill, reserve, prefill_call, send_ticket, tag: str) -> tuple[int, list[int], int]:
    """One disaggregated request as the router makes it, with the given ways of calling: (first token, the decode
    worker's tokens, the ticket's blocks)."""
    request_id = new_id(tag)
    prefilling = asyncio.ensure_future(prefill_call(_prefill(request_id)))
    ticket = await reserve(_reserve(request_id))
    accepted = await send_ticket(prefill_pb2.TicketDelivery(request_id=request_id, ticket=ticket))
    assert accepted == prefill_pb2.TicketAccepted()
    first = await prefilling
    assert first.kv_bytes_sent > 0
    return first.first_token_id, await _generated(decode, ticket), len(ticket.block_ids)


def test_a_disaggregated_request_on_the_streams_gets_what_its_own_calls_get(cluster):
    async def scenario(decode, d_link, prefill, p_link):
        own = await _request(decode, prefill, decode.Reserve, prefill.Prefill, prefill.SendTicket, "own")
        streamed = [
            await _request(
                decode,
                prefill,
                *_on_streams(d_link, p_link),
                f"streamed-{i}",
            )
            for i in range(3)
        ]
        return own, streamed, d_link.opened, p_link.opened

    own, streamed, d_opened, p_opened = _links(cluster.decode.address, cluster.prefills[0].address, scenario)
    assert streamed == [own] * 3
    assert len(own[1]) == 6 and own[1][0] == own[0]  # the decode worker streams the prefill worker's first token too
    assert (d_opened, p_opened) == (1, 1), "every call went on one stream per worker"
    wait_idle(cluster.decode)
    wait_idle(cluster.prefills[0])


def test_a_refused_call_fails_as_its_own_call_would_and_the_stream_goes_on(cluster):
    """The same status and details, the trailing metadata that names a peer the prefill worker could not reach."""

    async def both(own_call, streamed_call) -> list[grpc.aio.AioRpcError]:
        errors = []
        for call in (own_call, streamed_call):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call()
            errors.append(refused.value)
        return errors

    async def scenario(decode, d_link, prefill, p_link):
        outcomes = {}
        no_ticket = prefill_pb2.PrefillRequest(
            request_id=new_id("bare"), prompt_token_ids=PROMPT, params=wire_params(2)
        )
        outcomes["no ticket"] = await both(
            lambda: prefill.Prefill(no_ticket), lambda: p_link.call("Prefill", no_ticket, 10)
        )
        too_long = _reserve(new_id("long"))
        too_long.prompt_token_ids.extend([7] * 100_000)
        outcomes["too long"] = await both(
            lambda: decode.Reserve(too_long), lambda: d_link.call("Reserve", too_long, 10)
        )
        # A ticket naming a decode worker nobody listens for: the prefill worker cannot reach it.
        tickets = []
        for _ in range(2):
            ticket = await d_link.call("Reserve", _reserve(new_id("gone")), 10)
            tickets.append(ticket)
        nowhere = f"127.0.0.1:{free_port()}"
        requests = [
            prefill_pb2.PrefillRequest(
                request_id=ticket.request_id,
                prompt_token_ids=PROMPT,
                params=wire_params(6, ignore_eos=True),
                ticket=decode_pb2.Ticket(**{**_fields(ticket), "address": nowhere}),
            )
            for ticket in tickets
        ]
        outcomes["unreachable"] = await both(
            lambda: prefill.Prefill(requests[0]), lambda: p_link.call("Prefill", requests[1], 30)
        )
        for ticket in tickets:
            await decode.Abort(common_pb2.AbortRequest(request_id=ticket.request_id, token=ticket.token))
        after = await _request(
            decode,
            prefill,
            *_on_streams(d_link, p_link),
            "after",
        )
        return outcomes, after, d_link.opened, p_link.opened

    outcomes, after, d_opened, p_opened = _links(cluster.decode.address, cluster.prefills[0].address, scenario)
    for what, (own, streamed) in outcomes.items():
        assert streamed.code() == own.code(), what
        assert _without_ids(streamed.details()) == _without_ids(own.details()), what
        assert dict(streamed.trailing_metadata()) == dict(own.trailing_metadata()), what
    assert outcomes["no ticket"][0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert outcomes["too long"][0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert outcomes["unreachable"][0].code() == grpc.StatusCode.UNAVAILABLE
    assert UNREACHABLE_PEER in dict(outcomes["unreachable"][1].trailing_metadata()), "it names the peer"
    assert len(after[1]) == 6 and (d_opened, p_opened) == (1, 1), "the streams went on"
    wait_idle(cluster.decode)
    wait_idle(cluster.prefills[0])


def test_a_cancelled_call_and_one_past_its_deadline_stop_on_the_worker(cluster):
    """Cancelled by ``cancel``, by cancelling the task that awaits it, or by its deadline."""
    # A Prefill whose ticket never comes holds the prefill worker's blocks and a transfer slot until its call ends.
    prefill_worker = cluster.prefills[1]

    async def scenario(decode, d_link, prefill, p_link):
        in_flight = lambda: prefill_worker.stats().transfers_in_flight  # noqa: E731
        cancelled = p_link.call("Prefill", _prefill(new_id("cancelled")), 30)
        await asyncio.to_thread(wait_until, lambda: in_flight() == 1, 10, what="the prefill under way")
        assert cancelled.cancel() and not cancelled.cancel(), "cancelled once"
        assert cancelled.done() and cancelled.cancelled()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        # While the stream stays open: the worker was told (it would otherwise wait for the ticket for 30 s).
        await asyncio.to_thread(wait_idle, prefill_worker, 5)
        # The task that awaits a call cancelled, as the router cancels a prefill whose Reserve failed.
        awaiting = asyncio.ensure_future(_awaited(p_link.call("Prefill", _prefill(new_id("awaited")), 30)))
        await asyncio.to_thread(wait_until, lambda: in_flight() == 1, 10, what="the awaited prefill under way")
        awaiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await awaiting
        await asyncio.to_thread(wait_idle, prefill_worker, 5)
        late = p_link.call("Prefill", _prefill(new_id("late")), 1.0)
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await late
        stats = await asyncio.to_thread(wait_idle, prefill_worker, 5)
        return expired.value.code(), stats, p_link.opened

    code, stats, opened = _links(cluster.decode.address, prefill_worker.address, scenario)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and opened == 1
    assert stats.transfers_in_flight == 0 and stats.running == 0


def test_reserves_given_up_on_as_the_worker_answers_them_leave_no_reservation(cluster):
    """A Reserve whose deadline passes while the worker makes it: the worker skips it, releases it itself, or answers
    it after the router gave up, which releases the ticket (``WorkerHandle.late_answer``). Either way no block waits
    for the lease (20 s here)."""
    decode_worker = cluster.decode

    async def scenario(decode, d_link, prefill, p_link):
        handle = WorkerHandle(decode_worker.address, "decode", None, decode)
        link = decode_calls(decode, handle.late_answer)
        outcomes = []
        for i in range(24):
            call = link.call("Reserve", _reserve(new_id(f"given-up-{i}")), timeout=0.0005 * (i % 6))
            try:
                ticket = await call
                await handle.abort(ticket.request_id, ticket.token)  # in time: ours to release
                outcomes.append("answered")
            except grpc.aio.AioRpcError as exc:
                outcomes.append(exc.code().name)
        await asyncio.to_thread(wait_idle, decode_worker, 5)
        return outcomes

    outcomes = _links(decode_worker.address, cluster.prefills[0].address, scenario)
    assert "DEADLINE_EXCEEDED" in outcomes, outcomes


def test_a_lost_worker_fails_every_call_on_its_stream_and_the_next_opens_another(cluster, checkpoint):
    prefill_worker = start_worker("prefill", str(checkpoint.path))
    port = prefill_worker.address.rsplit(":", 1)[1]
    restarted = None
    try:

        async def scenario(decode, d_link, prefill, p_link):
            calls = [p_link.call("Prefill", _prefill(new_id(f"waiting-{i}")), 30) for i in range(3)]
            await asyncio.to_thread(wait_until, lambda: prefill_worker.stats().transfers_in_flight == 3, 10, what="all")
            await asyncio.to_thread(prefill_worker.kill)
            errors = []
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as lost:
                    await call
                errors.append(lost.value.code())
            nonlocal restarted
            restarted = await asyncio.to_thread(start_worker, "prefill", str(checkpoint.path), "grpc", "--port", port)
            for _ in range(100):  # the channel reconnects to the worker in its place
                try:
                    again = await _request(
                        decode,
                        prefill,
                        *_on_streams(d_link, p_link),
                        "again",
                    )
                    return errors, again, p_link.opened
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    await asyncio.sleep(0.1)
            raise AssertionError("the restarted worker was never reached")

        errors, again, opened = _links(cluster.decode.address, prefill_worker.address, scenario)
    finally:
        for worker in (prefill_worker, restarted):
            if worker is not None:
                worker.stop()
    assert errors == [grpc.StatusCode.UNAVAILABLE] * 3
    assert len(again[1]) == 6 and opened >= 2
    wait_idle(cluster.decode)


async def _awaited(call):
    return await call


def _fields(ticket: decode_pb2.Ticket) -> dict:
    return {field.name: value for field, value in ticket.ListFields()}


def _without_ids(details: str) -> str:
    """A status's details with request ids (which differ between the two calls) left out."""
    return " ".join(word for word in details.split() if not any(tag in word for tag in ("bare-", "long-", "gone-")))
