"""A worker's calls over one long-lived gRPC stream: a decode worker's Generate calls (decode.proto's GenerateStream),
and every worker's unary calls on the data path (``Calls``: Reserve; Prefill and SendTicket).

A gRPC call per request costs both ends more than a short request's own work (call set-up, metadata, its status):
a 1-token request round trip is ~0.8 ms as its own call and ~0.25 ms as messages on a stream that stays open
(grpc 1.85, this machine). So the router opens one stream of each kind per worker and sends each call on it; each
answer names its call. A call here reads as its own call would: a Generate's ``read`` until ``grpc.aio.EOF`` (after
its finish), a unary call awaited for its response; ``cancel`` (the worker is told to stop it), done-callbacks, and
the ``AioRpcError`` its own call would have ended with: the worker's status for it (with its trailing metadata), a
deadline's DEADLINE_EXCEEDED, or the stream's status when the stream breaks (every call on it fails as calls on a
lost channel do). With tracing on, a call that carries a span's context keeps its own call (the context travels in
the call's metadata).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import operator
from collections.abc import AsyncIterator, Callable

import grpc

from protos import decode_pb2, prefill_pb2

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_NONE = grpc.aio.Metadata()


class StreamedCall:
    """One request's Generate, on its worker's stream."""

    def __init__(self, link: GenerateLink, request_id: str) -> None:
        self._link = link
        self.request_id = self.key = request_id
        self._items: collections.deque = collections.deque()  # responses, then EOF or the error that ended it
        self._waiter: asyncio.Future | None = None
        self._callbacks: list[Callable] = []
        self._done = False
        self._cancelled = False

    async def read(self):
        """The next response, or ``grpc.aio.EOF`` after the last; the call's error, or CancelledError once
        cancelled."""
        while not self._items:
            if self._cancelled:
                raise asyncio.CancelledError()
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        item = self._items[0]
        if isinstance(item, asyncio.CancelledError):
            raise asyncio.CancelledError()  # one of its own for each read: the stream's ended every call
        if isinstance(item, BaseException):
            raise item
        if item is not grpc.aio.EOF:
            self._items.popleft()
        return item

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> bool:
        """Stops the request (the worker is told); False if it had ended."""
        if self._done:
            return False
        self._cancelled = True
        self._link.tell_cancelled(self)
        self._end()
        return True

    def _wake(self) -> None:
        """A read waiting for the next item goes on."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def add_done_callback(self, callback: Callable) -> None:
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def deliver(self, message: decode_pb2.GenerateStreamResponse) -> None:
        if message.HasField("error"):
            self.fail(_rpc_error(message.error))
            return
        self._put(message.response)
        if message.response.finish_reason:
            self._put(grpc.aio.EOF)
            self._end()

    def fail(self, error: BaseException) -> None:
        self._put(error)
        self._end()

    def _put(self, item) -> None:
        self._items.append(item)
        self._wake()

    def _end(self) -> None:
        if self._done:
            return
        self._done = True
        self._wake()
        self._link.forget(self)
        for callback in self._callbacks:
            callback(self)
        self._callbacks.clear()


class _StreamLink:
    """One worker's stream of a kind, opened by the first call and again after it breaks: each message read goes to
    the call it names (``key``: a message's call key); ``cancelling``: the message that tells the worker a call (by
    its key) was given up on; when the stream ends, every call still on it fails."""

    def __init__(self, method: Callable, key: Callable, cancelling: Callable, late: Callable | None = None) -> None:
        self._method = method  # the worker's stream method (SecretStub's: the stream carries the cluster secret)
        self._key = key
        self._cancelling = cancelling
        self._late = late  # given each message for a call no longer on the stream (ended, cancelled, past its deadline)
        self._calls: dict = {}
        self._outbox: asyncio.Queue | None = None
        self._reader: asyncio.Task | None = None
        self.opened = 0  # streams opened so far

    def send(self, message) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(message)

    def tell_cancelled(self, call) -> None:
        """The worker stops ``call`` (unless the stream is gone: then it ended every call itself)."""
        self.send(self._cancelling(call.key))

    def forget(self, call) -> None:
        if self._calls.get(call.key) is call:
            del self._calls[call.key]

    def _start(self, call) -> None:
        """``call`` is on the stream (opened now if none is); ``grpc.aio.UsageError`` where the channel is closed."""
        if self._reader is None or self._reader.done():
            self._open()
        self._calls[call.key] = call

    def _open(self) -> None:
        outbox: asyncio.Queue = asyncio.Queue()  # messages to send, then None once the stream ended

        async def requests() -> AsyncIterator:
            while (message := await outbox.get()) is not None:
                yield message

        stream = self._method(requests())
        self.opened += 1
        self._outbox = outbox
        self._reader = asyncio.get_running_loop().create_task(self._read(stream, outbox), name=type(self).__name__)

    async def _read(self, stream, outbox: asyncio.Queue) -> None:
        error: BaseException
        try:
            while (message := await stream.read()) is not grpc.aio.EOF:
                call = self._calls.get(self._key(message))
                if call is not None and not call.done():
                    call.deliver(message)
                elif self._late is not None:  # given up on: gone, or ended and not yet forgotten
                    self._late(message)
            error = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, _NONE, _NONE, "the worker's stream ended")
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:  # the channel closed (the worker left the pool), or the router stops
            error = asyncio.CancelledError()
        finally:
            self._outbox = None
            outbox.put_nowait(None)  # gRPC's task that sends our messages ends too, not left waiting for one
        for call in list(self._calls.values()):
            call.fail(error)
        stream.cancel()


class GenerateLink(_StreamLink):
    """One decode worker's GenerateStream."""

    def __init__(self, stub) -> None:
        cancelling = lambda request_id: decode_pb2.GenerateStreamRequest(cancel=request_id)  # noqa: E731
        super().__init__(stub.GenerateStream, operator.attrgetter("request_id"), cancelling)

    def generate(self, request: decode_pb2.GenerateRequest) -> StreamedCall:
        """The request's call; ``grpc.aio.UsageError`` where the worker's channel is closed. An id the stream has
        running already fails as the worker would refuse it (the running one keeps its responses)."""
        call = StreamedCall(self, request.request_id)
        if request.request_id in self._calls:
            details = f"request id {request.request_id!r} is already in use"
            call.fail(grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, _NONE, _NONE, details))
            return call
        self._start(call)
        self.send(decode_pb2.GenerateStreamRequest(generate=request))
        return call


class UnaryCall:
    """One unary call on its worker's ``Calls`` stream: awaited, its response; else the error its own call raises
    (``AioRpcError``; CancelledError once cancelled: by ``cancel``, or by cancelling the task that awaits it)."""

    def __init__(self, link: CallLink, key: int, timeout: float | None) -> None:
        self._link = link
        self.key = key
        loop = asyncio.get_running_loop()
        self._future: asyncio.Future = loop.create_future()
        self._future.add_done_callback(self._ended)
        self._timer = None if timeout is None else loop.call_later(timeout, self._expire)

    def __await__(self):
        return self._future.__await__()

    def done(self) -> bool:
        return self._future.done()

    def cancelled(self) -> bool:
        return self._future.cancelled()

    def cancel(self) -> bool:
        """Stops the call (the worker is told); False if it had ended."""
        return self._future.cancel()

    def add_done_callback(self, callback: Callable) -> None:
        self._future.add_done_callback(lambda _: callback(self))

    def deliver(self, message) -> None:
        if message.WhichOneof("kind") == "error":
            self.fail(_rpc_error(message.error))
        elif not self._future.done():
            self._future.set_result(getattr(message, message.WhichOneof("kind")))

    def fail(self, error: BaseException) -> None:
        if self._future.done():
            return
        if isinstance(error, asyncio.CancelledError):
            self._future.cancel()
        else:
            self._future.set_exception(error)

    def _expire(self) -> None:
        if not self._future.done():
            self._link.tell_cancelled(self)
            self.fail(grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, _NONE, _NONE, "Deadline Exceeded"))

    def _ended(self, future: asyncio.Future) -> None:
        if future.cancelled():
            self._link.tell_cancelled(self)
        else:
            future.exception()  # retrieved: a call that failed after its caller stopped waiting logs nothing
        if self._timer is not None:
            self._timer.cancel()
        self._link.forget(self)


class CallLink(_StreamLink):
    """One worker's ``Calls`` stream: ``kinds`` names each method it carries by its call message's field
    (``{"Reserve": "reserve"}``); ``message``: the stream's call message (``decode_pb2.DecodeCall``, ...); ``late``:
    given an answer that came after its call was given up on (a cancel crossed it on the wire: a Reserve's ticket to
    release, say)."""

    def __init__(self, stub, message: type, kinds: dict[str, str], late: Callable | None = None) -> None:
        super().__init__(stub.Calls, operator.attrgetter("id"), lambda key: message(id=key, cancel=True), late)
        self._message = message
        self._kinds = kinds
        self._ids = itertools.count(1)

    def call(self, method: str, request, timeout: float | None = None) -> UnaryCall:
        """``method``'s call with ``request``, ending DEADLINE_EXCEEDED after ``timeout`` s; ``grpc.aio.UsageError``
        where the worker's channel is closed."""
        call = UnaryCall(self, next(self._ids), timeout)
        try:
            self._start(call)
        except BaseException:
            call.fail(asyncio.CancelledError())
            raise
        self.send(self._message(id=call.key, **{self._kinds[method]: request}))
        return call


def decode_calls(stub, late: Callable | None = None) -> CallLink:
    """A decode worker's ``Calls`` stream: its Reserve calls."""
    return CallLink(stub, decode_pb2.DecodeCall, {"Reserve": "reserve"}, late)


def prefill_calls(stub) -> CallLink:
    """A prefill worker's ``Calls`` stream: its Prefill and SendTicket calls."""
    return CallLink(stub, prefill_pb2.PrefillCall, {"Prefill": "prefill", "SendTicket": "ticket"})


def _rpc_error(status: decode_pb2.CallStatus) -> grpc.aio.AioRpcError:
    """The error a call of its own would have raised, ending with ``status``."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    trailing = grpc.aio.Metadata(*status.trailing_metadata.items()) if status.trailing_metadata else _NONE
    return grpc.aio.AioRpcError(code, _NONE, trailing, status.details)
