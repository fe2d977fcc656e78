"""What gogpt reads whole from an upstream is bounded while it is read and while it is decoded.

A 200 MB error answer of unknown length and a gzip bomb answering a /conv read once took
hundreds of MB each. Now gogpt stops at its bound, answers 502 in the OpenAI shape and closes
the upstream connection. Memory is what tracemalloc sees allocated in this process (gogpt,
the fake upstream and the client together) while the call runs.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import FakeUpstream

from gogpt import Settings, create_app

MiB = 1 << 20
PEAK_BOUND = 16 * MiB  # gogpt reads at most 4 MiB whole; the answers below are 200 and 64 MiB


async def peak_memory_of(call: Awaitable[None]) -> int:
    tracemalloc.start()
    try:
        await call
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def answering_200_mb(status: int) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """200 MB of JSON-ish answer, chunked, made as it is sent: only gogpt could hold it all."""

    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        chunk = b" " * (64 << 10)
        for _ in range(200 * MiB // len(chunk)):
            await response.write(chunk)
        await response.write_eof()
        return response

    return respond


@functools.cache
def gzip_bomb(opening: bytes) -> bytes:
    """About 64 KB of gzip that inflates to 64 MiB of JSON: `opening`, spaces, a closing brace."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    spaces = b" " * MiB
    parts = [deflater.compress(opening), *(deflater.compress(spaces) for _ in range(64))]
    return b"".join([*parts, deflater.compress(b"}"), deflater.flush()])


def answering_with(body: bytes, status: int = 200) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """`body` as a gzip-encoded JSON answer."""

    async def respond(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        return web.Response(status=status, body=body, headers=headers)

    return respond


def assert_502_in_openai_shape(status: int, body: bytes) -> None:
    assert status == 502
    assert json.loads(body)["error"]["code"] == "upstream_error"


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("POST", "/chat", {}, 500),
        ("GET", "/v1/models", {}, 400),
        ("GET", "/conv", {"Chat-Type": "conversations"}, 500),
        ("GET", "/conv", {"Chat-Type": "conversations"}, 200),  # a list is read whole too
        ("GET", "/conv", {"Chat-Type": "conversation/abc"}, 200),
    ],
)
async def test_a_200_mb_answer_read_whole_is_refused_with_502_in_little_memory(
    client: TestClient,
    upstream: FakeUpstream,
    auth,
    method: str,
    path: str,
    headers: dict[str, str],
    status: int,
):
    upstream.respond = answering_200_mb(status)
    answer: list[tuple[int, bytes]] = []

    async def call() -> None:
        async with client.request(method, path, json={}, headers={**auth, **headers}) as resp:
            answer.append((resp.status, await resp.read()))
        await asyncio.wait_for(upstream.disconnected.wait(), 10)  # gogpt stopped reading and hung up

    peak = await peak_memory_of(call())
    assert_502_in_openai_shape(*answer[0])
    assert peak < PEAK_BOUND


@pytest.mark.parametrize(
    ("chat_type", "opening"),
    [
        ("conversations", b'{"items": [], "total": 0'),
        ("conversation/abc", b'{"current_node": "n1", "title": "t"'),
    ],
)
async def test_a_gzip_bomb_answering_a_conv_read_is_refused_with_502_in_little_memory(
    client: TestClient, upstream: FakeUpstream, auth, chat_type: str, opening: bytes
):
    upstream.respond = answering_with(gzip_bomb(opening))
    answer: list[tuple[int, bytes]] = []

    async def call() -> None:
        async with client.get("/conv", headers={**auth, "Chat-Type": chat_type}) as resp:
            answer.append((resp.status, await resp.read()))

    peak = await peak_memory_of(call())
    assert_502_in_openai_shape(*answer[0])
    assert peak < PEAK_BOUND


async def test_an_error_answer_of_thousands_of_gzip_members_is_refused_with_502(
    client: TestClient, upstream: FakeUpstream, auth
):
    empty_member = gzip.compress(b"")  # 20 bytes: 50,000 of them fit in 1 MiB and take long to walk
    upstream.respond = answering_with(empty_member * 50_000, status=400)
    resp = await client.post("/chat", json={}, headers={**auth, "Accept-Encoding": "gzip"})
    assert_502_in_openai_shape(resp.status, await resp.read())


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_304_announcing_a_large_body_is_passed_on_as_it_is(
    aiohttp_client, settings: Settings, auth, method: str
):
    async def not_modified(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        # the length of the file the client already has: no body follows a 304
        writer.write(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 5242880\r\n\r\n')
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_modified, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client: TestClient = await aiohttp_client(create_app(settings.with_overrides(api_proxy=url)))
        resp = await client.request(
            method, "/v1/files/f-1/content", headers={**auth, "If-None-Match": '"v1"'}
        )
        assert resp.status == 304
        assert resp.headers["ETag"] == '"v1"'
