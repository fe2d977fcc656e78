"""A bare aiohttp relay: what aiohttp's own server and client cost, as a bench row.

    python -m bench.floor LISTEN_PORT UPSTREAM_PORT

One web app with no middleware, one shared `ClientSession` (no connection limit, nothing
decoded), each answer's status, end-to-end headers and body relayed as it arrives with
`iter_any`; uvloop, no access log. What gogpt costs above this row is its own: auth, CORS,
metrics, logging and header work, over the same aiohttp.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterable

import aiohttp
import uvloop
from aiohttp import web

HOP_BY_HOP = frozenset({"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"})
NOT_SENT_UPSTREAM = HOP_BY_HOP | {"host", "content-length"}
SESSION = web.AppKey("floor.session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("floor.upstream", str)


def end_to_end(headers: Iterable[tuple[str, str]], dropped: frozenset[str]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in headers if name.lower() not in dropped]


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    async with request.app[SESSION].request(
        request.method,
        request.app[UPSTREAM] + request.path_qs,
        headers=end_to_end(request.headers.items(), NOT_SENT_UPSTREAM),
        data=body or None,
    ) as upstream:
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=end_to_end(upstream.headers.items(), HOP_BY_HOP),
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def shared_session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        app[SESSION] = session
        yield


def create_app(upstream_port: int) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = f"http://127.0.0.1:{upstream_port}"
    app.cleanup_ctx.append(shared_session)
    app.router.add_route("*", "/{path:.*}", relay)
    return app


if __name__ == "__main__":
    web.run_app(
        create_app(int(sys.argv[2])),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        backlog=4096,  # as gogpt listens
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )
