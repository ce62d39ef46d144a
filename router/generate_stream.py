"""A decode worker's Generate calls over one gRPC stream (decode.proto's GenerateStream).

A gRPC call per request costs both ends more than a short request's own work (call set-up, metadata, its status):
a 1-token request round trip is ~0.8 ms as its own call and ~0.25 ms as messages on a stream that stays open
(grpc 1.85, this machine). So the router opens one stream per decode worker and sends each request on it; each
response names its request. A request's call here reads as its own call would: ``read`` until ``grpc.aio.EOF``
(after its finish), ``cancel`` (the worker is told to stop it), done-callbacks, and the ``AioRpcError`` its own call
would have ended with: the worker's status for it, or the stream's when the stream breaks (every request on it
fails as calls on a lost channel do). With tracing on, a request keeps its own call (its span's context travels in
the call's metadata).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable

import grpc

from protos import decode_pb2

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_NONE = grpc.aio.Metadata()


class StreamedCall:
    """One request's Generate, on its worker's stream."""

    def __init__(self, link: GenerateLink, request_id: str) -> None:
        self._link = link
        self.request_id = request_id
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
        self._link.send(decode_pb2.GenerateStreamRequest(cancel=self.request_id))
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
            code = _CODES.get(message.error.code, grpc.StatusCode.UNKNOWN)
            self.fail(grpc.aio.AioRpcError(code, _NONE, _NONE, message.error.details))
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


class GenerateLink:
    """One decode worker's GenerateStream, opened by the first request and again after it breaks."""

    def __init__(self, stub) -> None:
        self._stub = stub  # the worker's (SecretStub: the stream carries the cluster secret)
        self._calls: dict[str, StreamedCall] = {}
        self._outbox: asyncio.Queue | None = None
        self._reader: asyncio.Task | None = None
        self.opened = 0  # streams opened so far

    def generate(self, request: decode_pb2.GenerateRequest) -> StreamedCall:
        """The request's call; ``grpc.aio.UsageError`` where the worker's channel is closed. An id the stream has
        running already fails as the worker would refuse it (the running one keeps its responses)."""
        if request.request_id in self._calls:
            call = StreamedCall(self, request.request_id)
            details = f"request id {request.request_id!r} is already in use"
            call.fail(grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, _NONE, _NONE, details))
            return call
        if self._reader is None or self._reader.done():
            self._open()
        call = self._calls[request.request_id] = StreamedCall(self, request.request_id)
        self.send(decode_pb2.GenerateStreamRequest(generate=request))
        return call

    def send(self, message: decode_pb2.GenerateStreamRequest) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(message)

    def forget(self, call: StreamedCall) -> None:
        if self._calls.get(call.request_id) is call:
            del self._calls[call.request_id]

    def _open(self) -> None:
        outbox: asyncio.Queue = asyncio.Queue()

        async def requests() -> AsyncIterator[decode_pb2.GenerateStreamRequest]:
            while True:
                yield await outbox.get()

        stream = self._stub.GenerateStream(requests())
        self.opened += 1
        self._outbox = outbox
        self._reader = asyncio.get_running_loop().create_task(self._read(stream), name="generate-stream")

    async def _read(self, stream) -> None:
        error: BaseException
        try:
            while (message := await stream.read()) is not grpc.aio.EOF:
                call = self._calls.get(message.request_id)
                if call is not None:
                    call.deliver(message)
            error = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, _NONE, _NONE, "the generate stream ended")
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:  # the channel closed (the worker left the pool), or the router stops
            error = asyncio.CancelledError()
        finally:
            self._outbox = None
        for call in list(self._calls.values()):
            call.fail(error)
        stream.cancel()
