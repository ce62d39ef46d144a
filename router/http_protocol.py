"""uvicorn's HTTP/1.1 protocol (httptools) with read deadlines: a client that sends its request slowly
(slowloris: headers a byte at a time, or a body that never ends) loses its connection instead of holding it.

uvicorn bounds only the idle time between requests (``timeout_keep_alive``). Here:

    connection made, or a request's first byte ─(header_timeout_s)─▶ headers ─(body_timeout_s)─▶ body complete
                                         408 + close if not reached ┘       408 + close if not reached ┘

Each deadline is a total, not an idle timer: a byte every few seconds does not extend it. The response is
never timed: a slow but progressing stream is the application's business (its own request timeout).
A 408 goes out only while no response has started (HTTP allows it then); otherwise the connection closes.

A request's line and headers are bounded in size too (``MAX_HEADER_BYTES``, 431 + close past it): httptools
gathers a header a piece at a time, at a cost that grows with the square of its length, on the one event loop
that serves every client and checks the workers' health; a 90 MB header, sent within the deadline, held it 7 s.

A client whose host vanished (its link down: no FIN, no RST ever comes) is let go once it has been silent for
cluster_auth.PEER_SILENCE_S: while data waits for it, it has acknowledged nothing (the kernel's TCP_INFO, read every
second); while it waits for an answer (a completion not streamed), it has not answered TCP keepalive probes. Its
request sees the disconnect, and the decode worker stops its stream, where TCP would wait ~15 min, or for ever. A
client that only stops reading is kept: its kernel still acknowledges the window probes (TCP_USER_TIMEOUT would
end it too, so it is not used here).

A response's head, which uvicorn writes apart from its body, goes out with it in one send (``_HeadJoinsBody``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from protos.cluster_auth import PEER_SILENCE_S, end_silent_peers

# struct tcp_info (linux/tcp.h): eight one-byte fields, then 32-bit ones in a fixed order.
_TCP_INFO_BYTES = 104
_UNACKED = struct.Struct("=24xI")  # tcpi_unacked: segments sent and not yet acknowledged
_LAST_ACK_RECV = struct.Struct("=56xI")  # tcpi_last_ack_recv: ms since the peer last acknowledged anything


# A request line and headers above this are refused (431): Node's limit is 16 KiB, nginx's 4 x 8 KiB buffers.
MAX_HEADER_BYTES = 64 * 1024


def _closing_response(status: str, kind: str, message: str) -> bytes:
    """A whole response, in the OpenAI error shape, for a connection about to close."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    fields = ("content-type: application/json", "connection: close", f"content-length: {len(body)}")
    return "\r\n".join((f"HTTP/1.1 {status}", *fields, "", "")).encode() + body


def _response_408(message: str) -> bytes:
    return _closing_response("408 Request Timeout", "request_timeout", message)


class DeadlineProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with header and body read deadlines; :func:`protocol_with_deadlines` sets them."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._body_deadline: asyncio.TimerHandle | None = None
        self._socket: socket.socket | None = None
        self._silence_check: asyncio.TimerHandle | None = None
        # Between one request's end and the next one's headers' end: the bytes read meanwhile (a read that also
        # ended a request is not counted: what of it the next request's headers hold is at most one read).
        self._in_headers = True
        self._header_bytes = 0
        self._headers_ended = 0

    # -- headers --------------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(_HeadJoinsBody(transport, self.loop))
        self._arm_header_deadline()  # a connection that never sends a byte is held no longer than a slow one
        sock = transport.get_extra_info("socket")
        self._socket = sock if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) else None
        if self._socket is not None:
            end_silent_peers(self._socket, unacknowledged=False)
            if hasattr(socket, "TCP_INFO"):  # Linux's; elsewhere TCP's own timeouts stand
                self._silence_check = self.loop.call_later(1.0, self._check_silence)

    def _check_silence(self) -> None:
        self._silence_check = None
        if self.transport.is_closing():
            return
        try:
            info = self._socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
        except OSError:
            return
        unacked, silent_ms = _UNACKED.unpack_from(info)[0], _LAST_ACK_RECV.unpack_from(info)[0]
        if unacked and silent_ms >= PEER_SILENCE_S * 1000:
            self.transport.abort()  # connection_lost follows: the application sees the client gone
            return
        self._silence_check = self.loop.call_later(1.0, self._check_silence)

    def data_received(self, data: bytes) -> None:
        ended = self._headers_ended
        in_headers = self._in_headers
        super().data_received(data)
        if not (in_headers and self._in_headers and ended == self._headers_ended):
            return  # a request's headers ended within this read, or its body came
        self._header_bytes += len(data)
        if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            if self.cycle is None or self.cycle.response_complete:
                message = f"the request line and headers exceed {MAX_HEADER_BYTES} bytes"
                status = "431 Request Header Fields Too Large"
                self.transport.write(_closing_response(status, "invalid_request_error", message))
            self.transport.close()  # else a response is being written (a pipelined request): no room for a 431

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._cancel_header_deadline()
        self._in_headers, self._header_bytes = False, 0
        self._headers_ended += 1
        super().on_headers_complete()

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_response_408(f"request headers not received within {self.header_timeout_s:g} s"))
        self.transport.close()  # else a response is being written (a pipelined request): no room for a 408

    # -- body -----------------------------------------------------------------------------------------

    def _start_asgi_task(self, cycle: RequestResponseCycle, app) -> None:
        # The deadline starts when the request's turn comes: a pipelined request's body is not read before.
        if cycle.more_body and self._body_deadline is None:
            self._body_deadline = self.loop.call_later(self.body_timeout_s, self._body_too_slow, cycle)
        self.transport.hold_next()  # this request's response head
        super()._start_asgi_task(cycle, app)

    def on_message_complete(self) -> None:
        self._in_headers = True  # what comes next is the next request's
        if self.cycle is not None and self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None
        super().on_message_complete()

    def _body_too_slow(self, cycle: RequestResponseCycle) -> None:
        self._body_deadline = None
        if self.transport.is_closing() or not cycle.more_body:
            return
        if not cycle.response_started:
            self.transport.write(_response_408(f"request body not received within {self.body_timeout_s:g} s"))
            cycle.response_started = cycle.response_complete = True
        # The application sees the client gone: its receive() answers http.disconnect, its send() is dropped.
        cycle.disconnected = True
        cycle.message_event.set()
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        if self._silence_check is not None:
            self._silence_check.cancel()
            self._silence_check = None
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None
        super().connection_lost(exc)


class _HeadJoinsBody:
    """A connection's transport, except that a response's head, which uvicorn writes on its own, waits for the next
    write (the body, or a stream's first chunk) made in the same turn of the event loop: both leave in one send, one
    TCP segment and one wake-up of the client where there were two. A head that nothing follows in its turn goes
    out at the loop's next turn; a stream's later chunks are never held."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._hold = False
        self._held: bytes | None = None

    def hold_next(self) -> None:
        """The next write is a response's head."""
        self._hold = True

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
        elif self._hold:
            self._hold, self._held = False, data
            self._loop.call_soon(self._flush)
            return
        self._transport.write(data)

    def _flush(self) -> None:
        if self._held is not None:
            data, self._held = self._held, None
            if not self._transport.is_closing():  # a client gone meanwhile gets nothing, as from uvicorn
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


def protocol_with_deadlines(header_timeout_s: float, body_timeout_s: float) -> type[DeadlineProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)``."""
    return type(
        "DeadlineProtocol",
        (DeadlineProtocol,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s},
    )
