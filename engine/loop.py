"""Runs an Engine on its own thread and hands work in and outputs out, for the workers.

Contract: only the loop thread touches the engine. Other threads use ``call`` (run a function of
the engine between steps and wait for its result), ``post`` (the same with nobody waiting: its error
is logged), ``add_request`` / ``watch`` (get a RequestStream of a request's outputs) and ``abort``.
Hooks run on the loop thread.

Failures stay local; the loop thread never dies and no stream is left waiting:
- an error attributable to one request (recording its results, or its part of a step, which the
  engine narrows a failed step down to) ends that request's stream with ``RequestFailed``; its
  blocks are freed by the engine's normal finish, and every other request keeps streaming;
- an error of the whole step that names no request (the scheduler's or the engine's bookkeeping)
  fails the requests that take part in steps (not those WAITING_FOR_KV, whose blocks their
  reservation owns), because their state can no longer be trusted; the loop then serves on;
- an error in a hook (``after_step``) or in publishing KV events is logged and the loop serves on.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from contract.sampling import SamplingParams
from engine.block_manager import KVEvent
from engine.engine import Engine
from engine.errors import InvalidRequestError
from engine.output import RequestOutput
from engine.request import RequestState
from engine.threads import name_os_thread

log = logging.getLogger(__name__)
T = TypeVar("T")


class RequestFailed(Exception):
    """A request ended without a normal finish (lease expired, transfer failed, engine error). ``invalid``: what
    failed it was the request's own (fields that contradict each other), which a worker reports as the caller's
    error, INVALID_ARGUMENT."""

    def __init__(self, reason: str, invalid: bool = False, field: str | None = None) -> None:
        super().__init__(reason)
        self.invalid = invalid
        self.field = field  # an invalid request's field to change, if one is (InvalidRequestError.field)

    @classmethod
    def of(cls, request_id: str, error: BaseException) -> RequestFailed:
        """What the engine's failing ``error`` says to the request's caller."""
        if isinstance(error, InvalidRequestError):
            return cls(str(error), invalid=True, field=error.field)
        return cls(f"engine error in request {request_id}: {type(error).__name__}: {error}")


class RequestStream:
    """One request's outputs, in order, from the loop thread to one consumer."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: queue.Queue[RequestOutput | BaseException] = queue.Queue()
        self._lock = threading.Lock()
        self._sink: Callable[[str, RequestOutput | BaseException], None] | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        with self._lock:
            if self._sink is None:
                self._queue.put(item)
                return
        self._sink(self.request_id, item)

    def forward(self, sink: Callable[[str, RequestOutput | BaseException], None]) -> None:
        """From now on hands each output to ``sink(request_id, item)`` (in order: those queued first), where a
        consumer serving many requests reads them (decode_worker's GenerateStream); ``get`` then has none."""
        with self._lock:
            while not self._queue.empty():
                sink(self.request_id, self._queue.get_nowait())
            self._sink = sink

    def get(self, timeout: float | None = None) -> RequestOutput:
        """The next output; raises queue.Empty on timeout, or the error the request failed with."""
        item = self._queue.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator[RequestOutput]:
        while True:
            output = self.get()
            yield output
            if output.finished:
                return


@dataclass
class KVEventSubscription:
    """A subscriber's view: the snapshot taken when it joined, then every later event in order.
    ``events`` yields None once the subscriber fell too far behind (it must resubscribe)."""

    cached_hashes: list[int]
    last_event_id: int
    events: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=4096))
    closed: bool = False


class EngineLoop:
    def __init__(
        self,
        engine: Engine,
        name: str = "engine-loop",
        after_step: Callable[[Engine, list[RequestOutput]], None] | None = None,
        idle_interval: float = 0.05,
        after_call: Callable[[Engine], None] | None = None,
    ) -> None:
        """``after_step``: run after every loop iteration; ``after_call``: after each call, before its caller has
        its result (a worker's stats snapshot: what a call did shows in Stats once the call returned)."""
        self.engine = engine
        self._after_step = after_step
        self._after_call = after_call
        self._idle_interval = idle_interval
        self._calls: queue.SimpleQueue[tuple[Callable[[Engine], object], Future]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._subscribers: list[KVEventSubscription] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    # -- handing work in --------------------------------------------------------------------------

    def submit(self, fn: Callable[[Engine], T]) -> Future:
        future: Future = Future()
        self._calls.put((fn, future))
        self._wake.set()
        return future

    def post(self, fn: Callable[[Engine], object], what: str) -> None:
        """Runs ``fn(engine)`` on the loop thread between steps, nobody waiting for it: an error it raises is
        logged, naming ``what``, rather than kept in a Future no one reads."""

        def logged(future: Future) -> None:
            if future.exception() is not None:
                log.error("%s failed on the engine thread", what, exc_info=future.exception())

        self.submit(fn).add_done_callback(logged)

    def call(self, fn: Callable[[Engine], T], timeout: float | None = 30.0) -> T:
        """Runs ``fn(engine)`` on the loop thread between steps; returns its result or raises its error."""
        return self.submit(fn).result(timeout)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        resume_token_ids: list[int] = (),
        priority: int = 0,
    ) -> RequestStream:
        def add(engine: Engine) -> RequestStream:
            engine.add_request(request_id, prompt_token_ids, params, resume_token_ids, priority)
            return self.watch(request_id)

        return self.call(add)

    def watch(self, request_id: str) -> RequestStream:
        """Stream for a request's outputs. Loop thread only (inside a ``call``), so no output is missed."""
        stream = self._streams[request_id] = RequestStream(request_id)
        return stream

    def stream_of(self, request_id: str) -> RequestStream | None:
        return self._streams.get(request_id)

    def abort(self, request_id: str) -> bool:
        return self.call(lambda engine: engine.abort(request_id))

    def detach(self, request_id: str) -> RequestStream | None:
        """Loop thread only: stop routing a request's outputs; returns its stream."""
        return self._streams.pop(request_id, None)

    def fail(self, engine: Engine, request_id: str, error: BaseException) -> None:
        """Loop thread only: abort a request and end its stream with ``error``."""
        stream = self.detach(request_id)
        if stream is not None:
            stream.put(error)  # first: the stream ends even if the abort fails
        engine.abort(request_id)

    def subscribe_kv_events(self) -> KVEventSubscription:
        def subscribe(engine: Engine) -> KVEventSubscription:
            self._publish_events(engine.take_kv_events())
            allocator = engine.allocator
            subscription = KVEventSubscription(allocator.cached_hashes(), allocator.last_event_id)
            self._subscribers.append(subscription)
            return subscription

        return self.call(subscribe)

    def unsubscribe(self, subscription: KVEventSubscription) -> None:
        self.post(
            lambda engine: self._subscribers.remove(subscription) if subscription in self._subscribers else None,
            "dropping a KV event subscription",
        )

    # -- the loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        name_os_thread(self._thread.name)
        while not self._stop.is_set():
            self._run_calls()
            # What the calls recorded goes out before the next step, which may be long: an adopted request's first
            # token (it came with its KV) reaches its client without waiting for the step it then decodes in.
            outputs = self._deliver(self.engine.take_outputs())
            if self.engine.has_unfinished():
                outputs += self._step()
            try:
                self._publish_events(self.engine.take_kv_events())
                if self._after_step is not None:
                    self._after_step(self.engine, outputs)
            except Exception:  # a bug in a hook must not stop the loop every request waits on
                log.exception("after-step hook failed")
            if not self.engine.has_unfinished() or self.engine.stalled:
                # Nothing to run until a call comes (each sets _wake); the hooks run again within idle_interval
                # (lease expiry, releases). Stepping a stalled engine (requests waiting for their KV) again at
                # once would spin, holding the GIL from the transport threads that land that KV.
                self._wake.wait(self._idle_interval)
                self._wake.clear()

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result, error = fn(self.engine), None
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result, error = None, exc
            if self._after_call is not None:
                try:
                    self._after_call(self.engine)
                except Exception:  # a bug in a hook must not fail the call, nor stop the loop
                    log.exception("after-call hook failed")
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def _step(self) -> list[RequestOutput]:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # names no request (see the module docstring): fail those in steps, serve on
            log.exception("engine step failed; aborting the requests in steps")
            self._fail_requests_in_steps(RequestFailed(f"engine error: {exc}"))
            outputs = []  # their aborted outputs come with the next iteration, for the hooks
        return self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Hands ``outputs`` to their streams; first, a request that failed ends its stream with its error instead
        (its own abort output, among ``outputs``, then finds no stream)."""
        for request_id, error in self.engine.take_failures().items():
            stream = self.detach(request_id)
            if stream is not None:
                stream.put(RequestFailed.of(request_id, error))
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.put(output)
                if output.finished:
                    del self._streams[output.request_id]
        return outputs

    def _fail_requests_in_steps(self, error: RequestFailed) -> None:
        for request_id, request in list(self.engine.requests.items()):
            # A request waiting for KV took no part in the step; its blocks are its reservation's to free.
            if request.state is RequestState.WAITING_FOR_KV:
                continue
            try:
                self.fail(self.engine, request_id, error)
            except Exception:  # noqa: BLE001 - its stream has its error; the loop must go on
                log.exception("could not abort request %s", request_id)

    def _publish_events(self, events: list[KVEvent]) -> None:
        if not events:
            return
        for subscription in list(self._subscribers):
            fresh = [e for e in events if e.event_id > subscription.last_event_id]
            try:
                for event in fresh:
                    subscription.events.put_nowait(event)
            except queue.Full:
                subscription.closed = True
                self._subscribers.remove(subscription)
                _drop_oldest_and_close(subscription.events)


def _drop_oldest_and_close(events: queue.Queue) -> None:
    try:
        events.get_nowait()
    except queue.Empty:
        pass
    events.put_nowait(None)
