"""The Responses API's store through the real router and workers, with the OpenAI SDK: a stored response is continued
by ``previous_response_id`` (the model sees the chat of every earlier turn, as a chat completion of the same turns
answers, token for token), read back whole and by its input items (paged as OpenAI pages them), deleted, and run in
the background (polled to its end, streamed as it runs and again from any event, or cancelled with its KV back in
the pool); what the store cannot do is a 4xx
naming it; the store keeps to its bound, dropping the least recently used first."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from router.orchestrator import GenerationError
from router.stored_responses import MIB, ResponseStore
from tests.router.conftest import MAX_MODEL_LEN, SERVED_MODEL, metric_sum, wait_for
from tests.router.test_errors import assert_error, post
from tests.workers.harness import wait_idle

LIMIT = 10
FIRST, SECOND, THIRD = "3 5 7 9", "and then 11 13", "what comes after?"


@pytest.fixture(scope="module")
def client(router) -> openai.OpenAI:
    return router.openai()


def _create(client: openai.OpenAI, **fields):
    return client.responses.create(model=SERVED_MODEL, max_output_tokens=LIMIT, temperature=0, **fields)


def _chat(client: openai.OpenAI, messages: list[dict]):
    return client.chat.completions.create(model=SERVED_MODEL, messages=messages, max_tokens=LIMIT, temperature=0)


def _assert_answers_as(response, chat) -> None:
    """The response is the chat completion's answer, to the token (same text, same counts)."""
    assert response.output_text == (chat.choices[0].message.content or "")
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens


def test_a_chain_of_responses_is_the_chat_of_every_turn_before_it(client):
    """Three turns chained by previous_response_id: each answers as the chat completion of all the turns so far
    (the earlier answers as assistant messages). The first turn's instructions are not carried on, as OpenAI's
    are not; the last turn's are its own system message."""
    first = _create(client, instructions="Count in odd numbers.", input=FIRST)
    assert (first.store, first.previous_response_id) == (True, None)
    second = _create(client, input=SECOND, previous_response_id=first.id)
    assert second.previous_response_id == first.id
    said = [{"role": "user", "content": FIRST}, {"role": "assistant", "content": first.output_text}]
    said.append({"role": "user", "content": SECOND})
    _assert_answers_as(second, _chat(client, said))
    third = _create(
        client, instructions="Be brief.", input=[{"role": "user", "content": THIRD}], previous_response_id=second.id
    )
    said += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": THIRD}]
    _assert_answers_as(third, _chat(client, [{"role": "system", "content": "Be brief."}, *said]))


def test_truncation_auto_drops_the_earliest_turns_that_do_not_fit(router, client):
    """A chain whose conversation outgrows the context: without truncation a 400 naming input (as OpenAI answers);
    with truncation "auto" the earliest whole turns go, and the answer is the chat completion of the turns kept."""
    long_turn = lambda n: " ".join(str(n + i % 7) for i in range(500))  # a few hundred tokens or more

    def tokens(text: str) -> int:
        return httpx.post(f"{router.http}/tokenize", json={"prompt": text}, timeout=10).json()["count"]

    per_turn = tokens(long_turn(1))
    turns = MAX_MODEL_LEN // per_turn + 1  # together more than the context holds
    response = _create(client, input=long_turn(0))
    for n in range(1, turns):
        response = _create(client, input=long_turn(n), previous_response_id=response.id, truncation="auto")
    assert response.truncation == "auto"
    body = {"model": SERVED_MODEL, "input": "and now?", "previous_response_id": response.id, "max_output_tokens": 8}
    error = assert_error(post(router, "/v1/responses", body), 400, param="input")
    assert "maximum context length" in error["message"]
    last = _create(client, input="and now?", previous_response_id=response.id, truncation="auto")
    # What it kept: the latest turns that leave room for its max_output_tokens, from a user message on.
    items = list(client.responses.input_items.list(response.id, order="asc"))
    said = [{"role": item.role, "content": item.content[0].text} for item in items]
    said += [{"role": "assistant", "content": response.output_text}, {"role": "user", "content": "and now?"}]
    kept = next(
        said[start:]
        for start in range(len(said))
        if said[start]["role"] == "user" and _chat_tokens(router, said[start:]) + LIMIT <= MAX_MODEL_LEN
    )
    assert len(kept) < len(said)
    _assert_answers_as(last, _chat(client, kept))


def _chat_tokens(router, messages: list[dict]) -> int:
    return httpx.post(f"{router.http}/tokenize", json={"messages": messages}, timeout=10).json()["count"]


def test_a_stored_response_reads_back_as_answered_with_its_input_items_paged(router, client):
    first = _create(client, input=FIRST)
    second = _create(client, input=[{"role": "user", "content": SECOND}], previous_response_id=first.id)
    assert client.responses.retrieve(second.id).model_dump() == second.model_dump()
    # Its input items: the first turn's input and answer, then its own input; newest first by default.
    items = client.responses.input_items.list(second.id)
    texts = [(item.role, item.content[0].text) for item in items.data]
    assert texts == [("user", SECOND), ("assistant", first.output_text), ("user", FIRST)]
    assert items.data[1].id == first.output[0].id and len({item.id for item in items.data}) == 3
    # Paged one at a time, oldest first: the SDK follows has_more and after to the end.
    paged = list(client.responses.input_items.list(second.id, order="asc", limit=1))
    assert [item.id for item in paged] == [item.id for item in reversed(items.data)]
    page = client.responses.input_items.list(second.id, limit=2)
    assert (page.has_more, page.first_id, page.last_id) == (True, items.data[0].id, items.data[1].id)
    # The store's gauges say what it holds.
    samples, held = (
        router.metrics(),
        router.call(lambda: (len(router.router.frontend.responses), router.router.frontend.responses.bytes)),
    )
    assert (
        metric_sum(samples, "splitserve_stored_responses"),
        metric_sum(samples, "splitserve_stored_responses_bytes"),
    ) == held
    assert held[0] >= 2


def test_a_streamed_response_is_stored_as_its_last_event_says(client):
    events = list(_create(client, input=FIRST, stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")  # at the limit: incomplete
    final = events[-1].response
    assert final.store is True
    assert client.responses.retrieve(final.id).model_dump() == final.model_dump()
    continued = _create(client, input=SECOND, previous_response_id=final.id)
    said = [{"role": "user", "content": FIRST}, {"role": "assistant", "content": final.output_text}]
    _assert_answers_as(continued, _chat(client, [*said, {"role": "user", "content": SECOND}]))


def test_deleted_and_unstored_responses_are_gone_with_a_404_naming_them(router, client):
    kept, unstored = _create(client, input=FIRST), _create(client, input=FIRST, store=False)
    assert unstored.store is False
    deleted = httpx.delete(f"{router.http}/v1/responses/{kept.id}", timeout=10).raise_for_status().json()
    assert deleted == {"id": kept.id, "object": "response.deleted", "deleted": True}
    for gone in (kept.id, unstored.id):
        for call in (client.responses.retrieve, client.responses.delete, client.responses.input_items.list):
            with pytest.raises(openai.NotFoundError) as missing:
                call(gone)
            assert gone in str(missing.value)
        body = {"model": SERVED_MODEL, "input": SECOND, "previous_response_id": gone}
        assert_error(post(router, "/v1/responses", body), 404, param="previous_response_id")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"background": True, "store": False}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_what_the_store_cannot_do_is_a_400_naming_it(router, body, param):
    assert_error(post(router, "/v1/responses", {"model": SERVED_MODEL, "input": FIRST, **body}), 400, param=param)


def test_reading_back_refuses_what_it_does_not_offer_by_name(router, client):
    response = _create(client, input=FIRST)
    base = f"{router.http}/v1/responses/{response.id}"
    for url, param in [
        (f"{base}?stream=true", "stream"),
        (f"{base}?include[]=message.output_text.logprobs", "include[]"),
        (f"{base}/input_items?limit=0", "limit"),
        (f"{base}/input_items?limit=101", "limit"),
        (f"{base}/input_items?limit=%C2%B2", "limit"),  # a superscript two: a digit to str.isdigit, not to int
        (f"{base}/input_items?limit={'9' * 5000}", "limit"),
        (f"{base}/input_items?order=up", "order"),
        (f"{base}/input_items?after=msg_nothing", "after"),
        (f"{base}/input_items?limit=1&limit=2", "limit"),
    ]:
        assert_error(httpx.get(url, timeout=10), 400, param=param)
    with pytest.raises(openai.BadRequestError, match="background"):
        client.responses.cancel(response.id)


def test_a_background_response_is_polled_to_the_answer_it_would_have_given(client):
    foreground = _create(client, input=THIRD)
    queued = _create(client, input=THIRD, background=True)
    assert (queued.status, queued.background, queued.output) == ("queued", True, [])
    polled = client.responses.retrieve(queued.id)
    deadline = time.monotonic() + 60
    while polled.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.05)
        polled = client.responses.retrieve(queued.id)
    assert polled.status == foreground.status
    assert polled.output_text == foreground.output_text
    counted = lambda r: (r.usage.input_tokens, r.usage.output_tokens)  # the cached share differs: the prefix cache
    assert counted(polled) == counted(foreground)
    # Cancelling one that ended changes nothing.
    assert client.responses.cancel(queued.id).status == foreground.status


def test_a_background_response_streams_as_it_runs_and_again_from_any_event(client):
    """Created with stream true, a background response streams its events as a foreground one does, but created
    queued (response.queued, then in progress from its first token); the client may leave, and
    retrieve(stream=True, starting_after=n) gives the same events after the n-th again."""
    foreground = list(_create(client, input=THIRD, stream=True))
    streamed = list(_create(client, input=THIRD, background=True, stream=True))
    kinds = [event.type for event in streamed]
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert streamed[0].response.status == "queued" and streamed[0].response.background
    assert kinds[3:] == [event.type for event in foreground][2:]  # after created and in_progress: the same
    assert [e.sequence_number for e in streamed] == list(range(len(streamed)))
    text = lambda events: "".join(e.delta for e in events if e.type == "response.output_text.delta")  # noqa: E731
    assert (
        text(streamed) == text(foreground) and streamed[-1].response.output_text == foreground[-1].response.output_text
    )
    response_id = streamed[0].response.id
    assert client.responses.retrieve(response_id).status == streamed[-1].response.status
    for after in (-1, 0, 4, len(streamed) - 2, len(streamed) - 1):
        again = list(client.responses.retrieve(response_id, stream=True, starting_after=after))
        assert [e.model_dump() for e in again] == [e.model_dump() for e in streamed[after + 1 :]], after
    again = list(client.responses.retrieve(response_id, stream=True))
    assert [e.model_dump() for e in again] == [e.model_dump() for e in streamed]


def test_a_background_response_followed_while_it_runs_ends_its_stream_when_cancelled(router, cluster, client):
    long = _long_in_background(client, cluster)
    followed = client.responses.retrieve(long.id, stream=True)
    first = [next(iter(followed)) for _ in range(5)]
    assert [e.type for e in first[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert client.responses.cancel(long.id).status == "cancelled"
    rest = list(followed)  # the stream ends: its response was cancelled
    assert all(e.type != "response.completed" for e in rest)
    # What it gave stays in the cancelled response, as its followers had it, and what it cost.
    streamed = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
    stored = client.responses.retrieve(long.id)
    assert stored.status == "cancelled" and streamed and stored.output_text == streamed
    assert stored.output[0].status == "incomplete" and stored.usage.output_tokens >= 1
    base = f"{router.http}/v1/responses/{long.id}"
    for url, param in [
        (f"{base}?stream=true&starting_after=-2", "starting_after"),
        (f"{base}?stream=true&starting_after=x", "starting_after"),
        (f"{base}?starting_after=3", "starting_after"),
        (f"{base}?stream=yes", "stream"),
    ]:
        assert_error(httpx.get(url, timeout=10), 400, param=param)


def _long_in_background(client: openai.OpenAI, cluster):
    """A background response of seconds of decoding (a JSON string of 1500 characters or more: hundreds of tokens
    before the model may end), once it decodes."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "minLength": 1500}}, "required": ["a"]}
    long = client.responses.create(
        model=SERVED_MODEL,
        input="go on " * 8,
        max_output_tokens=MAX_MODEL_LEN - 128,
        background=True,
        text={"format": {"type": "json_schema", "name": "long", "schema": schema}},
    )
    wait_for(lambda: cluster.decode.stats().running == 1, 20, "the background response to decode")
    return long


def test_a_cancelled_background_response_stops_its_work_and_says_so(router, cluster, client):
    long = _long_in_background(client, cluster)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(long.id).status == "cancelled"
    for worker in cluster.workers:
        wait_idle(worker, 5)
    wait_for(lambda: router.running() == 0, 2, "the router to release the slot")
    with pytest.raises(openai.BadRequestError) as refused:
        _create(client, input=SECOND, previous_response_id=long.id)
    assert "cancelled" in str(refused.value)


def test_a_background_response_whose_generation_breaks_ends_failed(make_router, cluster, caplog):
    """A fault of the server's own (here, a stream that raises what no request raises) still ends the response:
    failed, and logged, where the task died and left the response in progress for the client to poll for good."""
    router = make_router(cluster.prefills, [cluster.decode])

    async def broken(job):
        raise RuntimeError("a bug")
        yield  # an async generator, as Frontend.stream is

    router.router.frontend.stream = broken
    queued = _create(router.openai(), input=FIRST, background=True)
    wait_for(lambda: router.openai().responses.retrieve(queued.id).status != "queued", 10, "the response to end")
    ended = router.openai().responses.retrieve(queued.id)
    assert ended.status == "failed" and "its log says why" in ended.error.message
    assert "a bug" in caplog.text and len([r for r in caplog.records if r.levelname == "ERROR"]) == 1  # logged once
    # Its stream ends as a failed one does, so that a client following it learns the end from the stream.
    streamed = list(router.openai().responses.retrieve(queued.id, stream=True))
    kinds = [e.type for e in streamed]
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"], kinds
    assert kinds[-2:] == ["error", "response.failed"], kinds
    assert streamed[-2].code == "server_error" and "its log says why" in streamed[-2].message
    assert streamed[-1].response.model_dump() == ended.model_dump()
    assert [e.sequence_number for e in streamed] == list(range(len(streamed)))


def test_a_router_stopping_gives_background_responses_its_grace_then_fails_them_naming_the_stop(make_router, cluster):
    router = make_router(cluster.prefills, [cluster.decode], shutdown_grace_s=0.5)
    long = _long_in_background(router.openai(), cluster)
    router.stop()  # the grace ends long before the response would
    ended = router.router.frontend.responses.get(long.id).response
    assert ended["status"] == "failed" and "the router is stopping" in ended["error"]["message"]
    for worker in cluster.workers:
        wait_idle(worker, 5)


def test_a_stored_response_is_found_only_by_the_api_key_that_made_it(make_router, cluster):
    router = make_router(cluster.prefills, [cluster.decode], api_keys=("sk-alice", "sk-bob"))
    alice, bob = router.openai(api_key="sk-alice"), router.openai(api_key="sk-bob")
    made = _create(alice, input=FIRST)
    for call in (bob.responses.retrieve, bob.responses.input_items.list, bob.responses.delete):
        with pytest.raises(openai.NotFoundError):
            call(made.id)
    with pytest.raises(openai.NotFoundError):
        _create(bob, input=SECOND, previous_response_id=made.id)
    assert alice.responses.retrieve(made.id).id == made.id  # still there, for its own key
    assert _create(alice, input=SECOND, previous_response_id=made.id).previous_response_id == made.id


def test_a_router_without_a_store_refuses_by_name_what_needs_one(make_router, cluster):
    router = make_router(cluster.prefills, [cluster.decode], responses_store_mb=0)
    client = router.openai()
    assert _create(client, input=FIRST).store is False  # not asked: not stored, as before
    for field, value in [("store", True), ("background", True), ("previous_response_id", "resp_1")]:
        body = {"model": SERVED_MODEL, "input": FIRST, field: value}
        error = assert_error(post(router, "/v1/responses", body), 400, param=field)
        assert "responses_store_mb is 0" in error["message"]


def test_the_store_keeps_to_its_bound_dropping_the_least_recently_used():
    item = {"type": "message", "id": "msg_x", "role": "user", "content": [{"type": "input_text", "text": "x" * 900}]}

    def response(n: int, status: str = "completed") -> dict:
        return {"id": f"resp_{n}", "status": status, "output": []}

    size = len(json.dumps(response(0))) + len(json.dumps([item]))
    store = ResponseStore(max_mb=3.5 * size / MIB)  # three fit, four do not
    for n in range(2):
        store.put(response(n), [item])
    store.get("resp_0")  # now resp_1 is the least recently used
    running = store.put(response(2, "in_progress"), [item])
    store.put(response(3), [item])
    assert len(store) == 3 and 3 * size <= store.bytes <= store.max_bytes
    with pytest.raises(GenerationError, match="resp_1") as dropped:
        store.get("resp_1")
    assert dropped.value.status == 404
    store.put(response(4), [item])  # a background response still running is never dropped: resp_0 goes
    assert store.get("resp_2") is running and len(store) == 3
    with pytest.raises(GenerationError, match="resp_0"):
        store.get("resp_0")
    store.update({**response(2), "output": [{"type": "message"}]})  # its end, a little larger
    store.delete("resp_3")
    assert store.bytes == sum(store.get(f"resp_{n}").size for n in (2, 4)) > 2 * size
