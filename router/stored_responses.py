"""The Responses API's store: each stored response's latest answer and the input items that made it (earlier turns'
included), so that a later request continues it (``previous_response_id``), a client reads it back
(``GET /v1/responses/{id}`` and its ``input_items``) or deletes it, and a background response runs on after its
request has been answered (polled until it ends; cancellable). A background response keeps its stream's events, so
a client streams it from any event on (``GET /v1/responses/{id}?stream=true&starting_after=n``), while it runs and
after, as OpenAI's do.

A stored response is the API key's whose request made it: another key's requests do not find it. One router owns
its store, in memory, bounded by the bytes its responses take as JSON (``responses_store_mb``): past
the bound the least recently used finished ones go first. A router's restart forgets them all, and a router started
beside it holds its own (the chart runs one router).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from contract.sampling import FieldError
from router.orchestrator import GenerationError

MIB = 1024 * 1024
# The statuses a response ends in; before, a background one is queued, then in progress.
ENDED = frozenset({"completed", "incomplete", "failed", "cancelled"})
CONTINUABLE = frozenset({"completed", "incomplete"})  # what previous_response_id may name


@dataclass
class Stored:
    response: dict[str, Any]
    items: list[dict[str, Any]]  # the input items, earlier turns' first: what input_items lists
    owner: str = ""  # the API key's hash whose request made it: only that key's requests find it ("": no keys)
    size: int = 0
    task: asyncio.Task | None = field(default=None, repr=False)  # a background response's generation
    events: list[str] | None = field(default=None, repr=False)  # a background response's stream, event by event
    events_size: int = 0
    ended: bool = False  # a background response's stream has its last event
    grew: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # set (and replaced) at each event

    @property
    def history(self) -> list[dict[str, Any]]:
        """The items a response continuing this one starts from: its input items, then its output as input."""
        return self.items + [as_input(item) for item in self.response["output"]]


def as_input(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as a later request's input item: a message's text parts lose their logprobs (the answer's,
    not the conversation's); a reasoning item or a function call stays as it was."""
    if item["type"] != "message":
        return item
    content = [{"type": part["type"], "text": part["text"], "annotations": []} for part in item["content"]]
    return {**item, "content": content}


class ResponseStore:
    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * MIB)
        self.bytes = 0
        self._stored: OrderedDict[str, Stored] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._stored)

    def check(self, store: bool, background: bool, previous_response_id: str | None) -> None:
        """FieldError naming what a request asks of a store this router does not keep, or a background response
        whose answer would be lost (``store`` false)."""
        if not self.enabled:
            for name, asked in (
                ("store", store),
                ("background", background),
                ("previous_response_id", previous_response_id is not None),
            ):
                if asked:
                    raise FieldError(name, f"{name}: this router stores no responses (its responses_store_mb is 0)")
        if background and not store:
            raise FieldError("background", "a background response is read back later: it needs store true")

    def previous(self, response_id: str, owner: str) -> Stored:
        """The response a request of ``owner`` continues; 404 naming ``previous_response_id`` when it is not here
        (or another key's), 400 when it did not end in an answer to continue."""
        stored = self._find(response_id, owner, "previous_response_id")
        status = stored.response["status"]
        if status not in CONTINUABLE:
            raise GenerationError(
                f"Previous response '{response_id}' is {status}; only a completed or incomplete one is continued",
                400,
                "invalid_request_error",
                "previous_response_id",
            )
        return stored

    def get(self, response_id: str, owner: str = "") -> Stored:
        """The stored response (now the most recently used); 404 when there is none by that id of ``owner``'s."""
        return self._find(response_id, owner)

    def put(
        self, response: dict[str, Any], items: list[dict[str, Any]], owner: str = "", background: bool = False
    ) -> Stored:
        """Stores a response of ``owner``'s (``background``: one whose stream's events are kept as they come);
        then the least recently used finished ones go until the store fits."""
        stored = Stored(response, items, owner, events=[] if background else None)
        self._stored[response["id"]] = stored
        self._resize(stored)
        return stored

    def update(self, response: dict[str, Any]) -> None:
        """A background response's new state, unless it was deleted meanwhile."""
        stored = self._stored.get(response["id"])
        if stored is not None:
            stored.response = response
            self._resize(stored)

    def record(self, stored: Stored, event: str) -> None:
        """A background response's next event (its sequence number its place in ``events``), to its followers."""
        stored.events.append(event)
        stored.events_size += len(event)
        self._wake(stored)

    def end_events(self, stored: Stored) -> None:
        """A background response's stream has ended (whatever ended its generation); its events now count against
        the store's bound."""
        stored.ended = True
        self._wake(stored)
        if stored.response["id"] in self._stored:
            self._resize(stored)

    @staticmethod
    def _wake(stored: Stored) -> None:
        grew, stored.grew = stored.grew, asyncio.Event()
        grew.set()

    async def follow(self, stored: Stored, starting_after: int = -1) -> AsyncIterator[str]:
        """A background response's events after the one numbered ``starting_after``, as they come, to its last."""
        index = starting_after + 1
        while True:
            grew = stored.grew
            while index < len(stored.events):
                yield stored.events[index]
                index += 1
            if stored.ended:
                return
            await grew.wait()

    def _resize(self, stored: Stored) -> None:
        size = len(json.dumps(stored.response)) + len(json.dumps(stored.items)) + stored.events_size
        self.bytes += size - stored.size
        stored.size = size
        excess, dropped = self.bytes - self.max_bytes, []
        for response_id, oldest in self._stored.items():  # from the least recently used, only while over the bound
            if excess <= 0:
                break
            if oldest.response["status"] in ENDED:
                dropped.append(response_id)
                excess -= oldest.size
        for response_id in dropped:
            self.bytes -= self._stored.pop(response_id).size

    def delete(self, response_id: str, owner: str = "") -> None:
        """Forgets a response (a background one still running is cancelled first: nothing would read its end)."""
        stored = self._find(response_id, owner)
        if stored.task is not None:
            stored.task.cancel()
        self.bytes -= self._stored.pop(response_id).size

    def run(self, stored: Stored, generation: Coroutine) -> None:
        """Runs a background response's generation, which puts its updates here itself."""
        stored.task = asyncio.get_running_loop().create_task(generation)

    async def cancel(self, response_id: str, owner: str = "") -> dict[str, Any]:
        """Cancels a background response still running, and waits for it to write its end; the response as it
        stands. 400 for one not in the background, 404 for none."""
        stored = self._find(response_id, owner)
        if stored.task is None:
            raise GenerationError(
                f"Response '{response_id}' was not created in the background: only a background response is cancelled",
                400,
                "invalid_request_error",
            )
        if not stored.task.done():
            stored.task.cancel()
            await asyncio.wait((stored.task,))
        return stored.response

    async def background_done(self) -> None:
        """Returns once every background response has ended (a router's stop waits for them, as for requests)."""
        tasks = [s.task for s in self._stored.values() if s.task is not None and not s.task.done()]
        if tasks:
            await asyncio.wait(tasks)

    def _find(self, response_id: str, owner: str, param: str | None = None) -> Stored:
        """Another key's response is not found, as if it were not here."""
        stored = self._stored.get(response_id)
        if stored is None or not hmac.compare_digest(stored.owner, owner):
            why = "it was never stored here, was deleted, or was dropped to keep the store within its bound"
            if not self.enabled:
                why = "this router stores no responses (its responses_store_mb is 0)"
            raise GenerationError(f"No response with id '{response_id}': {why}", 404, "not_found", param)
        self._stored.move_to_end(response_id)
        return stored
