"""A client that reads nothing is cut after CLIENT_TIMEOUT: its upstream stream is closed and a /conv
reply it held is freed for everyone else. Real sockets: the stalled client is a raw TCP socket that
sends its request and never reads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import FakeUpstream

from gogpt import Settings, create_app

EVENT = b"data: " + b"x" * 4000 + b"\n\n"


async def endless_stream(request: web.Request) -> web.StreamResponse:
    """An upstream that streams until the gateway hangs up."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    while True:
        await response.write(EVENT)


async def stalled_request(port: int, path: str, headers: dict[str, str], body: dict) -> asyncio.StreamWriter:
    """Send a request and never read its answer; the caller closes the returned writer."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: gogpt",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
    ]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
    await writer.drain()
    return writer


@pytest.fixture
async def gateway(aiohttp_server: Callable[..., Awaitable[TestServer]], settings: Settings) -> TestServer:
    return await aiohttp_server(create_app(settings.with_overrides(client_timeout=0.5)))


@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions"])
async def test_a_client_that_reads_nothing_is_cut_and_its_upstream_closed(
    gateway: TestServer, upstream: FakeUpstream, auth, path: str
):
    upstream.respond = endless_stream
    writer = await stalled_request(gateway.port, path, auth, {"stream": True})
    try:
        await asyncio.wait_for(upstream.disconnected.wait(), 15)  # without the bound: for ever
    finally:
        writer.close()


async def test_a_stalled_conv_reply_frees_the_session_for_the_next_caller(
    gateway: TestServer, upstream: FakeUpstream, auth
):
    upstream.respond = endless_stream
    conv = {**auth, "Chat-Type": "conversation"}
    writer = await stalled_request(gateway.port, "/conv", conv, {"content": "hello"})
    try:
        await asyncio.wait_for(upstream.disconnected.wait(), 15)
        upstream.disconnected.clear()

        async def short_reply(request: web.Request) -> web.StreamResponse:
            return web.Response(body=b'data: {"message": {"id": "m1"}}\n\n', content_type="text/event-stream")

        upstream.respond = short_reply
        url = gateway.make_url("/conv")
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json={"content": "hi"}, headers=conv) as resp,
        ):
            assert resp.status == 200  # not 409: the stalled reply's lease was freed
    finally:
        writer.close()


async def test_a_slow_but_reading_client_is_not_cut(gateway: TestServer, upstream: FakeUpstream, auth):
    events = 400  # 1.6 MB: more than the socket buffers hold, so the client's pace matters

    async def long_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(events):
            await response.write(EVENT)
        return response

    upstream.respond = long_stream
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.make_url("/chat"), json={"stream": True}, headers=auth) as resp,
    ):
        received = 0
        async for data in resp.content.iter_chunked(64 * 1024):
            received += len(data)
            await asyncio.sleep(0.01)  # about 6 MB/s: slow, but never idle for the 0.5 s bound
    assert received == events * len(EVENT)
