"""Timers that guard an answer while it is relayed: one each per stream, nothing per chunk."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from .splice import EVENT_ENDS, KEEPALIVE

__all__ = ["KeepAlive", "StallWatch"]

log = logging.getLogger("gogpt.relay")


class KeepAlive:
    """`: keep-alive` between events while an event stream has sent the client nothing for `interval`.

    Load balancers cut connections idle for about a minute while a model thinks. The writer's
    byte count, which aiohttp keeps anyway, tells whether anything went out; `tail`, the last
    chunk written, whether the stream stands between two events (a comment inside an event
    would end it early).
    """

    __slots__ = ("_task", "tail")

    def __init__(self, request: web.BaseRequest, response: web.StreamResponse, interval: float) -> None:
        self.tail = b"\n\n"  # a stream starts between events
        self._task = asyncio.create_task(self._run(request.writer, response, interval))

    async def _run(self, writer: AbstractStreamWriter, response: web.StreamResponse, interval: float) -> None:
        step, quiet, sent = interval / 4, 0.0, writer.output_size
        while True:
            await asyncio.sleep(step)
            quiet = quiet + step if writer.output_size == sent else 0.0
            if quiet >= interval and self.tail.endswith(EVENT_ENDS):
                await response.write(KEEPALIVE)
                quiet = 0.0
            sent = writer.output_size

    def cancel(self) -> None:
        self._task.cancel()


class StallWatch:
    """Cuts a client that reads nothing for `bound` seconds while its answer waits to be sent.

    Otherwise a client that never reads holds an upstream stream (and a /conv lease) for as long
    as the upstream keeps going. One timer per stream, nothing per chunk: a client that reads
    nothing leaves the same bytes waiting in its transport's buffer, check after check.
    """

    __slots__ = ("_bound", "_loop", "_pending", "_period", "_stalled", "_timer", "_transport")

    def __init__(self, request: web.BaseRequest, bound: float, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = request.transport
        self._loop = loop
        self._bound, self._period = bound, bound / 4
        self._stalled, self._pending = 0.0, -1
        self._timer = self._loop.call_later(self._period, self._check)

    def _check(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        pending = transport.get_write_buffer_size()
        if pending and pending == self._pending:
            self._stalled += self._period
            if self._stalled >= self._bound:
                log.warning("a client read nothing for %g s: its connection is cut", self._bound)
                transport.abort()  # the relay's write fails, which closes the upstream
                return
        else:
            self._stalled = 0.0
        self._pending = pending
        self._timer = self._loop.call_later(self._period, self._check)

    def cancel(self) -> None:
        self._timer.cancel()
