"""A worker's unary calls over one stream (decode.proto's ``DecodeCall``, prefill.proto's ``PrefillCall``): the
worker's side.

A call of its own costs both ends more than a short request's work (a 1-token disaggregated request made three:
Reserve, Prefill, SendTicket), so the router sends them as messages on one stream per worker. Each runs the servicer
method its own call would run, on a thread of the worker's RPC pool, with ``StreamedContext`` standing in for the
call's context: ``abort`` ends the call with its status (and the trailing metadata set before it), ``add_callback``
runs once the call ends however it ends (answered, cancelled by the client, or its stream gone), and ``is_active`` is
False from then on. So a method reads the same whichever way it was called.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor

import grpc

from protos import decode_pb2
from worker_server.base import status_of, trailing_of

log = logging.getLogger(__name__)
POLL_S = 0.5  # how often a stream with nothing to send checks that its client is still there


class _Aborted(Exception):
    pass


class StreamedContext:
    """What a unary servicer method asks of its call's context, for a call on a ``Calls`` stream (``stream``: that
    stream's own context: its peer, its metadata)."""

    def __init__(self, stream: grpc.ServicerContext) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._ended = False
        self._status: tuple[grpc.StatusCode, str] | None = None
        self.trailing_metadata: tuple = ()

    def abort(self, code: grpc.StatusCode, details: str):
        self._status = code, details
        raise _Aborted(details)

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing_metadata = tuple(metadata)

    def code(self) -> grpc.StatusCode | None:
        return self._status[0] if self._status else None

    def details(self) -> str | None:
        return self._status[1] if self._status else None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """False if the call ended already (the callback will not run), as a call's own context says."""
        with self._lock:
            if not self._ended:
                self._callbacks.append(callback)
                return True
        return False

    def is_active(self) -> bool:
        return not self._ended and self._stream.is_active()

    def peer(self) -> str:
        return self._stream.peer()

    def invocation_metadata(self):
        return self._stream.invocation_metadata()

    def end(self) -> None:
        """The call is over: its callbacks run (here, once)."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # as gRPC does with a call's callback: logged, the others still run
                log.exception("a call's callback failed")


def serve_calls(
    requests: Iterator,
    context: grpc.ServicerContext,
    handlers: dict[str, tuple[Callable, str]],
    answer: type,
    pool: Executor,
) -> Iterator:
    """A ``Calls`` stream's answers. ``handlers``: a call message's kind (its oneof field) -> (the servicer method its
    own call runs, the ``answer`` field its response goes in); ``pool``: the threads the methods run on."""
    answers: queue.SimpleQueue = queue.SimpleQueue()  # answers, and None once the client sent its last call
    running: dict[int, StreamedContext] = {}
    lock = threading.Lock()

    def finish(call_id: int, call: StreamedContext, message) -> None:
        with lock:  # an answer is queued before its call leaves ``running``: the stream ends only after both
            # Sent even when the call was cancelled meanwhile: what it did (a Reserve's blocks) is the client's to undo,
            # and only the answer tells it (the router's late answers, router/worker_streams.py).
            answers.put(message)
            if running.get(call_id) is call:
                del running[call_id]
        call.end()

    def run(call_id: int, method: Callable, field: str, request, call: StreamedContext) -> None:
        if not call.is_active():
            return  # cancelled before it started (behind a stalled engine, say): as gRPC runs no cancelled call
        try:
            message = answer(id=call_id, **{field: method(request, call)})
        except _Aborted:
            message = answer(id=call_id, error=call_status(call.code(), call.details(), call.trailing_metadata))
        except Exception as exc:  # what a call of its own would end with: INTERNAL, logged
            message = answer(id=call_id, error=call_status(*status_of(exc), trailing_of(exc)))
        finish(call_id, call, message)

    def start(message) -> None:
        kind = message.WhichOneof("kind")
        if kind == "cancel":
            with lock:
                call = running.pop(message.id, None)
            if call is not None:
                call.end()
            return
        if kind not in handlers:
            refusal = grpc.StatusCode.INVALID_ARGUMENT, f"call {message.id} names no method this worker serves"
            answers.put(answer(id=message.id, error=call_status(*refusal)))
            return
        call = StreamedContext(context)
        with lock:
            if message.id in running:
                refusal = grpc.StatusCode.INVALID_ARGUMENT, f"call id {message.id} is in use on this stream"
                answers.put(answer(id=message.id, error=call_status(*refusal)))
                return
            running[message.id] = call
        method, field = handlers[kind]
        pool.submit(run, message.id, method, field, getattr(message, kind), call)

    def read() -> None:
        try:
            for message in requests:
                start(message)
        except grpc.RpcError:
            pass  # the stream ended: what runs on it ends below
        except RuntimeError:  # the pool shut down: the worker is stopping
            log.info("calls stream: the worker stops; its calls end")
        finally:
            answers.put(None)

    threading.Thread(target=read, name="calls-stream", daemon=True).start()
    client_done = False
    try:
        while True:
            if client_done:
                with lock:
                    if not running and answers.empty():
                        return
            try:
                item = answers.get(timeout=POLL_S)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if item is None:
                client_done = True
            else:
                yield item
    finally:  # the stream is gone (or the client is done): what still runs on it ends as its own call would
        with lock:
            left = list(running.values())
            running.clear()
        for call in left:
            call.end()


def call_status(code: grpc.StatusCode, details: str, trailing_metadata=()) -> decode_pb2.CallStatus:
    """A status as a stream's message carries it for one of its calls."""
    return decode_pb2.CallStatus(code=code.value[0], details=details, trailing_metadata=dict(trailing_metadata))
