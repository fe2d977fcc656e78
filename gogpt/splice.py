"""The streaming fast path: a chunked upstream answer moved to the client by transport callbacks.

Relayed the ordinary way, each upstream chunk is parsed into aiohttp's StreamReader, wakes the
relay task, and is framed again by the server's writer: most of gogpt's CPU per event. Here a
chunked answer for an HTTP/1.1 client is passed on as it came, chunk framing and all, from the
upstream connection's `data_received` straight to the client's transport, after the framing
is checked chunk by chunk. The relay task sleeps until the answer ends, the client falls
behind, or either side fails. The terminal chunk goes back to aiohttp's parser, which ends the
message as usual, so the connection returns to the pool.

The relay asks for this by setting `SPLICE_WANTED` around its upstream call; the session's
`SplicingResponse` then puts a `Splice` in front of aiohttp's protocol. It lets response heads
through and holds the body until the relay, having seen the parsed head, either calls
`forward_to` or `release` (which hands the held bytes to aiohttp, as if nothing had happened).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler

__all__ = ["SPLICE_WANTED", "Splice", "SplicingResponse", "is_spliceable"]

SPLICE_WANTED: ContextVar[bool] = ContextVar("gogpt_splice_wanted", default=False)

# A chunk-size line: hex size, optional extensions, CRLF (RFC 9112 section 7.1). Anything else
# is refused: these bytes go to the client unparsed, so they must frame exactly what they say.
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r\n")
_MAX_SIZE_LINE = 4096
_CHUNKED_HEAD = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked[ \t]*\r\n", re.IGNORECASE)
_NO_BODY_STATUSES = (b"204", b"304")
_MAX_HELD_BYTES = 1 << 20  # between the head and the relay's decision; reading pauses beyond
_MAX_HEAD_BYTES = 1 << 16  # more than aiohttp accepts in a head

_HEAD, _HOLD, _FORWARD, _GIVEN_BACK = range(4)


class UpstreamBrokeOff(aiohttp.ClientPayloadError):
    """The upstream closed, fell silent or sent bad framing in the middle of a spliced answer."""


class SplicingResponse(aiohttp.ClientResponse):
    """A ClientResponse that, when the relay asks, holds a chunked body for a `Splice`."""

    splice: Splice | None = None

    async def start(self, connection: Any) -> SplicingResponse:
        transport, protocol = connection.transport, connection.protocol
        if SPLICE_WANTED.get() and self.method != "HEAD" and transport is not None and protocol is not None:
            self.splice = Splice(transport, protocol)
        await super().start(connection)
        return self


def is_spliceable(upstream: aiohttp.ClientResponse) -> bool:
    """A chunked answer, in no other transfer coding, with a body, as aiohttp parsed its head."""
    return upstream.headers.getall("Transfer-Encoding", ()) == ["chunked"] and (
        "Content-Length" not in upstream.headers
    )


class Splice(asyncio.Protocol):
    """Stands in for aiohttp's protocol on one upstream connection, for one answer."""

    def __init__(self, transport: asyncio.Transport, real: ResponseHandler) -> None:
        self._loop = asyncio.get_running_loop()
        self._upstream = transport
        self._real = real
        self._state = _HEAD
        self._head = b""  # the head received so far, to find where it ends
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._reading_paused = False
        # while forwarding
        self._client: asyncio.Transport  # set by forward_to
        self._client_protocol: Any = None
        self._waiter: asyncio.Future[bool] | None = None
        self._partial = b""  # an unfinished chunk-size line
        self._in_chunk = 0  # bytes of chunk data still to come
        self._crlf_due = False  # the CRLF that closes a chunk's data, when it did not come with it
        self._failure: BaseException | None = None
        self._finished = False
        self._read_timeout: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self.forwarded_bytes = 0  # wire bytes written to the client
        self.body_bytes = 0  # chunk data among them
        transport.set_protocol(self)

    # -- the relay's side ---------------------------------------------------------------------

    def release(self) -> None:
        """Not spliced after all: aiohttp's protocol gets the held bytes and everything after."""
        if self._state in (_HEAD, _HOLD):
            self._give_back(b"".join(self._held))

    async def forward_to(
        self, client: asyncio.Transport, client_protocol: Any, drain: Callable[[], Awaitable[None]]
    ) -> None:
        """Move the body to `client` until the terminal chunk; raise if either side fails.

        `client_protocol.writing_paused` says the client is behind; `drain()` waits for it.
        """
        if self._state != _HOLD:
            raise RuntimeError("forward_to() follows the head of a held answer, once")
        self._client, self._client_protocol = client, client_protocol
        self._state = _FORWARD
        self._read_timeout = self._real.read_timeout  # aiohttp's sock_read, now kept here, cheaply
        self._real.read_timeout = None
        self._real.start_timeout()  # cancels aiohttp's timer: it would fire, as it sees no data now
        held, self._held = b"".join(self._held), []
        self._last_read = self._loop.time()
        self._resume_reading()
        self._arm_idle_timer()
        try:
            if held:
                self._forward(held)
            while True:
                if self._failure is not None:
                    raise self._failure
                if self._finished:
                    return
                if client_protocol.writing_paused:
                    await drain()
                    self._last_read = self._loop.time()  # the pause was the client's, not the upstream's
                    self._resume_reading()
                    continue
                self._waiter = self._loop.create_future()
                await self._waiter
        finally:
            self._waiter = None
            self._cancel_idle_timer()
            if self._state == _FORWARD:  # failed or cancelled: aiohttp's protocol sees the end
                self._state = _GIVEN_BACK
                self._upstream.set_protocol(self._real)

    # -- asyncio.Protocol, for the upstream connection -----------------------------------------

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _FORWARD:
            if self._failure is None:
                self._forward(data)
        elif state == _HOLD:
            self._held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes > _MAX_HELD_BYTES:
                self._pause_reading()
        elif state == _HEAD:
            self._read_head(data)
        else:  # bytes that arrived in the same callback round as the give-back
            self._real.data_received(data)

    def eof_received(self) -> None:
        self._real.eof_received()  # which keeps nothing half-open: the transport closes

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._state == _FORWARD:
            self._fail(UpstreamBrokeOff("The upstream closed the connection mid-answer."))
        self._real.connection_lost(exc)

    def pause_writing(self) -> None:
        self._real.pause_writing()

    def resume_writing(self) -> None:
        self._real.resume_writing()

    # -- inside --------------------------------------------------------------------------------

    def _read_head(self, data: bytes) -> None:
        """Let heads through to aiohttp; keep the body of a chunked final answer."""
        seen = len(self._head)
        self._head += data
        end = self._head.find(b"\r\n\r\n", max(seen - 3, 0))
        if end < 0:
            if len(self._head) > _MAX_HEAD_BYTES:  # aiohttp refuses such a head; nothing to hold
                self._give_back(data)
            else:
                self._real.data_received(data)
            return
        head_end = end + 4
        head, rest = self._head[:head_end], self._head[head_end:]
        self._real.data_received(data[: len(data) - len(rest)])
        status = head[9:12]
        if status.startswith(b"1") and status != b"101":  # 100 Continue and the like: the answer follows
            self._head = b""
            if rest:
                self._read_head(rest)
        elif status in _NO_BODY_STATUSES or not _CHUNKED_HEAD.search(head):
            self._give_back(rest)
        else:
            self._state = _HOLD
            self._head = b""
            if rest:
                self.data_received(rest)

    def _give_back(self, data: bytes) -> None:
        self._state = _GIVEN_BACK
        self._held, self._head = [], b""
        self._upstream.set_protocol(self._real)
        self._resume_reading()
        if data:
            self._real.data_received(data)

    def _forward(self, data: bytes) -> None:
        """Check the framing of `data`, write it on, and stop at the terminal chunk."""
        self._last_read = self._loop.time()
        if self._partial:
            data, self._partial = self._partial + data, b""
        pos, end = 0, len(data)
        while pos < end:
            if self._in_chunk:
                step = min(self._in_chunk, end - pos)
                pos += step
                self._in_chunk -= step
                continue
            eol = data.find(b"\n", pos)
            if eol < 0:
                if end - pos > _MAX_SIZE_LINE:
                    return self._fail(UpstreamBrokeOff("The upstream sent a malformed chunk."))
                self._partial = data[pos:]
                end = pos
                break
            if self._crlf_due:
                if eol != pos + 1 or data[pos] != 0x0D:
                    return self._fail(UpstreamBrokeOff("The upstream sent a malformed chunk."))
                self._crlf_due = False
                pos = eol + 1
                continue
            size_line = _CHUNK_SIZE_LINE.fullmatch(data, pos, eol + 1)
            if size_line is None:
                return self._fail(UpstreamBrokeOff("The upstream sent a malformed chunk."))
            size = int(size_line[1], 16)
            if size == 0:
                self._write(data[:pos])
                return self._finish(data[pos:])
            self.body_bytes += size
            pos = eol + 1
            after = pos + size
            if data[after : after + 2] == b"\r\n":  # the usual case: the whole chunk is here
                pos = after + 2
            else:
                self._in_chunk, self._crlf_due = size, True
        self._write(data if end == len(data) else data[:end])

    def _write(self, data: bytes) -> None:
        if not data:
            return
        client = self._client
        if client.is_closing():  # the client left; its handler is being cancelled
            return self._fail(ConnectionResetError("The client closed the connection."))
        client.write(data)
        self.forwarded_bytes += len(data)
        if self._client_protocol.writing_paused:
            self._pause_reading()
            self._wake()

    def _finish(self, terminal: bytes) -> None:
        """The terminal chunk: aiohttp's parser ends the message and pools the connection."""
        self._finished = True
        self._real.read_timeout = self._read_timeout
        self._give_back(terminal)
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
            self._pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._upstream.pause_reading()
            self._cancel_idle_timer()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._upstream.resume_reading()
            if self._state == _FORWARD:
                self._arm_idle_timer()

    # The upstream's silence is limited as aiohttp's sock_read would, without a timer per chunk:
    # one timer per timeout period, which looks at when data last came.

    def _arm_idle_timer(self) -> None:
        if self._read_timeout and self._idle_timer is None:
            self._idle_timer = self._loop.call_at(self._last_read + self._read_timeout, self._check_idle)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._loop.time() - self._last_read >= (self._read_timeout or 0.0):
            self._fail(aiohttp.ServerTimeoutError("Timeout on reading data from socket"))
        else:
            self._arm_idle_timer()
