"""/event: the Go server's Server-Sent Events demo, kept for the clients written against it."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp_sse import sse_response

from .auth import public
from .errors import ApiError

__all__ = ["event_handler"]

EVENT_INTERVAL = 2.0  # seconds between the two demo events, as in the original


@public
async def event_handler(request: web.Request) -> web.StreamResponse:
    """Two `data:` events, then `event: close`, then the end of the stream."""
    names = ("appId", "page", "pageSize")
    missing = [name for name in names if not request.query.get(name)]
    if missing:
        raise ApiError(400, f"Missing parameter: {', '.join(missing)}.", code="missing_parameter")
    values = "".join(request.query[name] for name in names)
    async with sse_response(request) as sse:
        await sse.send(f"0{values}")
        await asyncio.sleep(EVENT_INTERVAL)
        await sse.send(f"1{values}")
        await sse.send("close", event="close")
    return sse
