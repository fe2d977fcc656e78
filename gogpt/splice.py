"""Upstream connections on aiohttp's internals: the streaming fast path, and no unasked-for bytes.

Everything in gogpt that touches an aiohttp internal is in this module, each use marked
`internal:` with what it relies on; `check_internals()` looks for all of them at start-up
(checked on aiohttp 3.14.4 and 3.14.5, the lowest and newest pyproject.toml allows). When
they are not as expected, or `SPLICE=off`, gogpt relays the ordinary way (`iter_any`), byte
for byte all the same.

Two things live on the protocol of every upstream connection (`UpstreamProtocol`):
- *No unasked-for bytes.* A byte that arrives after an answer has ended, or a second answer to
  one request, closes the connection: otherwise aiohttp parses it as the answer to whichever
  request is sent next on the pooled connection, and an upstream could plant an answer for
  another caller.
- *The splice.* Relayed the ordinary way, each upstream chunk is parsed into a StreamReader,
  wakes the relay task and is framed again by the server's writer: most of gogpt's CPU per
  event. For a chunked answer to an HTTP/1.1 client, the splice instead passes the body on as it
  came, framing and all, from `data_received` straight to the client's transport, once
  `ChunkedFraming` (chunked_coding.py) has checked it. The relay task sleeps until the answer
  ends, the client falls behind, or either side fails. The terminal chunk goes back to
  aiohttp's parser, which ends the message as usual, so the connection returns to the pool.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.client_proto import ResponseHandler  # internal: the client's protocol class

from .chunked_coding import ChunkedFraming, MalformedChunk
from .watching import BodyWatch

__all__ = [
    "EVENT_ENDS",
    "KEEPALIVE",
    "Splice",
    "SplicingResponse",
    "UpstreamBrokeOff",
    "check_internals",
    "guard_connections",
    "held_body",
    "send_100_continue",
]

log = logging.getLogger("gogpt.relay")

# Where a head ends: the first empty line, CRLF or (as aiohttp's lenient parser reads it) bare LF.
_HEAD_END = re.compile(rb"\n\r?\n")
_MAX_HELD_BYTES = 1 << 20  # between the head and the relay's decision; reading pauses beyond
_MAX_HEAD_BYTES = 1 << 16  # more than aiohttp accepts in a head

_HEAD, _HOLD, _FORWARD, _GIVEN_BACK = range(4)

# An SSE comment, which every parser skips; sent only where an event has just ended.
KEEPALIVE = b": keep-alive\n\n"
EVENT_ENDS = (b"\n\n", b"\n\r\n", b"\r\r")  # the blank line that ends an event
_FRAMED_KEEPALIVE = b"%x\r\n%s\r\n" % (len(KEEPALIVE), KEEPALIVE)
_FRAMED_EVENT_ENDS = tuple(end + b"\r\n" for end in EVENT_ENDS)  # the event's end, then its chunk's


class UpstreamBrokeOff(aiohttp.ClientPayloadError):
    """The upstream closed, fell silent or sent bad framing in the middle of a spliced answer."""


class UpstreamProtocol(ResponseHandler):
    """aiohttp's protocol for an upstream connection, refusing unasked-for bytes and able to splice.

    It also bounds a head as a whole: from its first byte, all of it must come within the read
    timeout (UPSTREAM_TIMEOUT). aiohttp's read timeout counts silence only, so an upstream
    sending its head a byte at a time could hold a call for as long as it liked.

    internal: subclasses `ResponseHandler` and overrides `set_response_params` (called once per
    request sent), `feed_data` (called with each parsed head) and `data_received`; reads its
    `read_timeout` and calls its `set_exception`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._answers = 0  # final heads parsed for the request in flight
        self._answered = False  # the answer has ended: any further byte is unasked-for
        self.last_head: Any = None  # the final head aiohttp parsed last (a RawResponseMessage)
        self.splice: Splice | None = None
        self._head_due: asyncio.TimerHandle | None = None  # the head's deadline, from its first byte

    def set_response_params(self, **kwargs: Any) -> None:
        self._answers, self._answered, self.last_head, self.splice = 0, False, None, None
        self._cancel_head_deadline()
        super().set_response_params(**kwargs)

    def feed_data(self, data: Any, size: int = 0) -> None:
        self._cancel_head_deadline()  # a head has come whole (after a 1xx one, the next has its own)
        message, payload = data
        if 100 <= message.code < 200 and message.code != 101:  # 100 Continue: the answer follows
            super().feed_data(data, size)
            return
        self._answers += 1
        if self._answered or self._answers > 1:
            self._refuse_unasked()
            return
        self.last_head = message
        payload.on_eof(self._answer_ended)  # before aiohttp's own, which pools the connection
        super().feed_data(data, size)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            if data:  # empty: aiohttp resuming a decompression, not the network
                self._refuse_unasked()
            return
        splice = self.splice
        if splice is None:
            super().data_received(data)
        else:
            splice.data_received(data)
        # a head begun and not ended by this read (most come whole in one: no timer for them)
        if self.last_head is None and self._head_due is None and data and self.read_timeout:
            self._head_due = self._loop.call_later(self.read_timeout, self._head_too_slow)  # internal: _loop

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_deadline()
        if self.splice is not None:
            self.splice.connection_lost()
        super().connection_lost(exc)

    def _cancel_head_deadline(self) -> None:
        if self._head_due is not None:
            self._head_due.cancel()
            self._head_due = None

    def _head_too_slow(self) -> None:
        self._head_due = None
        log.warning("an upstream sent a head slower than UPSTREAM_TIMEOUT allows: its connection is closed")
        self.set_exception(aiohttp.ServerTimeoutError("Timeout on reading the response head"))
        self.force_close()
        if self.transport is not None:
            self.transport.close()

    def refuse_unasked(self) -> None:
        """Bytes beyond the answer: close the connection rather than let the pool keep them."""
        self._refuse_unasked()

    def parse(self, data: bytes) -> None:
        """Hand `data` to aiohttp's parser, as if no splice had been in between."""
        super().data_received(data)

    def _answer_ended(self) -> None:
        self._answered = True

    def _refuse_unasked(self) -> None:
        log.warning("an upstream sent bytes after its answer: its connection is closed, not reused")
        self.force_close()
        if self.transport is not None:
            self.transport.close()  # is_connected() is now false: the pool drops it


def guard_connections(connector: aiohttp.TCPConnector) -> bool:
    """Give every connection of `connector` an `UpstreamProtocol`; False if that cannot be done.

    internal: `BaseConnector._factory`, the protocol factory (a partial of ResponseHandler).
    """
    factory = getattr(connector, "_factory", None)
    if not (isinstance(factory, functools.partial) and factory.func is ResponseHandler):
        return False
    connector._factory = functools.partial(UpstreamProtocol, loop=asyncio.get_running_loop())  # type: ignore[assignment]
    return True


class SplicingResponse(aiohttp.ClientResponse):
    """The ClientResponse of the splicing session: asks the connection to hold a chunked body."""

    async def start(self, connection: Any) -> SplicingResponse:
        # internal: `ClientResponse.start(connection)` reads the head from the protocol's queue.
        protocol = connection.protocol
        if isinstance(protocol, UpstreamProtocol) and self.method != "HEAD" and protocol.last_head is None:
            protocol.splice = Splice(protocol)  # the head has not come yet: the splice sees it first
        await super().start(connection)
        return self


def held_body(upstream: aiohttp.ClientResponse) -> Splice | None:
    """The splice holding `upstream`'s chunked body, if there is one."""
    connection = upstream.connection
    protocol = connection.protocol if connection is not None else None
    splice = protocol.splice if isinstance(protocol, UpstreamProtocol) else None
    return splice if splice is not None and splice.holding else None


class Splice:
    """One answer's body, held after its head, then forwarded to the client or given back."""

    def __init__(self, protocol: UpstreamProtocol) -> None:
        self._loop = protocol._loop  # internal: BaseProtocol._loop
        self._protocol = protocol
        self._transport: asyncio.Transport = protocol.transport  # type: ignore[assignment]
        self._state = _HEAD
        self._head = b""  # the head received so far, to find where it ends
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._reading_paused = False
        self._framing = ChunkedFraming()
        self._client: asyncio.Transport  # set by forward_to
        self._client_protocol: Any = None
        self._waiter: asyncio.Future[None] | None = None
        self._failure: BaseException | None = None
        self._finished = False
        self._read_timeout: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._keepalive = 0.0  # seconds of quiet before a comment goes to the client; 0: never
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._last_write = 0.0
        # the last bytes written (a view of a read, when a watch cut it): a stream starts between events
        self._last_written: bytes | memoryview = b"\n\n\r\n"
        self._watch: BodyWatch | None = None
        self.forwarded_bytes = 0  # wire bytes written to the client

    @property
    def holding(self) -> bool:
        return self._state == _HOLD

    @property
    def body_bytes(self) -> int:
        return self._framing.data_bytes

    # -- the relay's side ---------------------------------------------------------------------

    def release(self) -> None:
        """Not spliced after all: aiohttp's parser gets the held bytes and everything after."""
        if self._state in (_HEAD, _HOLD):
            self._give_back(b"".join(self._held))

    async def forward_to(
        self, request: web.BaseRequest, *, keepalive: float = 0.0, watch: BodyWatch | None = None
    ) -> None:
        """Move the body to `request`'s client until the terminal chunk; raise if either side fails.

        With `keepalive`, an SSE comment goes out between events after that many quiet seconds.
        With `watch`, each read's checked bytes pass through it (watching.py) on their way.

        internal: the server protocol's `writing_paused`, and the writer's `buffer_size` and
        `output_size`, which the access log and aiohttp's "response started" read.
        """
        if self._state != _HOLD:
            raise RuntimeError("forward_to() follows the head of a held answer, once")
        client = request.transport
        if client is None or client.is_closing():
            raise ConnectionResetError("The client closed the connection.")
        client_protocol, writer = request.protocol, request.writer
        self._client, self._client_protocol = client, client_protocol
        self._watch = watch
        self._state = _FORWARD
        protocol = self._protocol
        self._read_timeout = protocol.read_timeout  # aiohttp's sock_read, kept here with one timer
        protocol.read_timeout = None
        protocol._drop_timeout()  # internal: cancels aiohttp's timer, which would see no data now
        held, self._held = b"".join(self._held), []
        self._last_read = self._last_write = self._loop.time()
        self._resume_reading()
        self._arm_idle_timer()
        if keepalive:
            self._keepalive = keepalive
            self._keepalive_timer = self._loop.call_at(self._last_write + keepalive, self._keep_alive)
        try:
            if held:
                self._forward(held)
            while True:
                if self._failure is not None:
                    raise self._failure
                if self._finished:
                    return
                if client_protocol.writing_paused:
                    await writer.drain()
                    self._last_read = self._loop.time()  # the pause was the client's, not the upstream's
                    self._resume_reading()
                    continue
                self._waiter = self._loop.create_future()
                await self._waiter
        finally:
            self._waiter = None
            self._cancel_idle_timer()
            if self._keepalive_timer is not None:
                self._keepalive_timer.cancel()
            if self._state == _FORWARD:  # failed or cancelled: aiohttp's protocol sees the end
                self._state = _GIVEN_BACK
                protocol.splice = None
            writer.buffer_size += self.forwarded_bytes
            writer.output_size += self.forwarded_bytes

    # -- the upstream connection's bytes, from UpstreamProtocol.data_received ----------------

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
        else:
            self._protocol.parse(data)

    def connection_lost(self) -> None:
        if self._state == _FORWARD:
            self._fail(UpstreamBrokeOff("The upstream closed the connection mid-answer."))

    # -- inside --------------------------------------------------------------------------------

    def _read_head(self, data: bytes) -> None:
        """Heads go to aiohttp's parser; the body of a chunked final answer, as parsed, is held."""
        seen = len(self._head)
        self._head += data
        end = _HEAD_END.search(self._head, max(seen - 2, 0))
        if end is None:
            if len(self._head) > _MAX_HEAD_BYTES:  # aiohttp refuses such a head; nothing to hold
                self._give_back(data)
            else:
                self._protocol.parse(data)
            return
        rest = self._head[end.end() :]
        self._head = b""
        protocol = self._protocol
        before = protocol.last_head
        protocol.parse(data[: len(data) - len(rest)])
        head = protocol.last_head
        if head is before:  # an interim 100 Continue: the answer follows
            if rest:
                self._read_head(rest)
        elif head is not None and head.chunked and not head.upgrade and head.code not in (204, 304):
            self._state = _HOLD
            if rest:
                self.data_received(rest)
        else:  # not chunked, no body, or read otherwise by aiohttp: never spliced
            self._give_back(rest)

    def _give_back(self, data: bytes) -> None:
        self._state = _GIVEN_BACK
        self._held, self._head = [], b""
        self._protocol.splice = None
        self._resume_reading()
        if data:
            self._protocol.parse(data)

    def _forward(self, data: bytes) -> None:
        self._last_read = self._last_write = self._loop.time()
        try:
            framed, terminal = self._framing.feed(data)
        except MalformedChunk:
            return self._fail(UpstreamBrokeOff("The upstream sent a malformed chunk."))
        watch = self._watch
        body = framed if watch is None else watch.feed_framed(framed, self._framing, terminal is not None)
        if body:
            client = self._client
            if client.is_closing():  # the client left; its handler is being cancelled
                return self._fail(ConnectionResetError("The client closed the connection."))
            client.write(body)
            self.forwarded_bytes += len(body)
            self._last_written = body
            if self._client_protocol.writing_paused:
                self._pause_reading()
                self._wake()
        if terminal is not None:
            self._finished = True
            self._protocol.read_timeout = self._read_timeout
            end = terminal.find(b"\r\n\r\n")  # the end of the trailer section, if it is here
            extra = end >= 0 and end + 4 < len(terminal)
            self._give_back(terminal[: end + 4] if extra else terminal)  # aiohttp ends the message
            if extra:
                self._protocol.refuse_unasked()
            self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
            self._pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
            self._cancel_idle_timer()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()
            if self._state == _FORWARD:
                self._arm_idle_timer()

    def _keep_alive(self) -> None:
        """While the client has had nothing for `keepalive` seconds, a comment between events."""
        due = self._last_write + self._keepalive
        if self._loop.time() >= due:
            if (
                self._failure is None
                and self._framing.between_chunks
                and bytes(self._last_written[-8:]).endswith(_FRAMED_EVENT_ENDS)
                and not self._client.is_closing()
            ):
                self._client.write(_FRAMED_KEEPALIVE)
                self.forwarded_bytes += len(_FRAMED_KEEPALIVE)
            self._last_write = self._loop.time()
            due = self._last_write + self._keepalive
        self._keepalive_timer = self._loop.call_at(due, self._keep_alive)

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


async def send_100_continue(request: web.BaseRequest) -> None:
    """The interim answer to `Expect: 100-continue`, as aiohttp's own expect handler sends it.

    internal: the writer's `output_size`, reset so the interim answer does not count as the
    response having started (aiohttp's `_default_expect_handler` does the same).
    """
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0


def check_internals() -> str | None:
    """Why the internals this module relies on are not usable here, or None when they are."""
    from aiohttp.http_writer import StreamWriter  # internal: the server's body writer
    from aiohttp.web_protocol import RequestHandler  # internal: the server's protocol class

    needed = {
        ResponseHandler: (
            "set_response_params",
            "feed_data",
            "data_received",
            "read_timeout",
            "_drop_timeout",
            "force_close",
            "set_exception",
        ),
        RequestHandler: ("writing_paused",),
        StreamWriter: ("buffer_size", "output_size"),
        aiohttp.ClientResponse: ("start",),
    }
    for owner, names in needed.items():
        missing = [name for name in names if not hasattr(owner, name)]
        if missing:
            return f"aiohttp's {owner.__name__} has no {', '.join(missing)}"
    return None
