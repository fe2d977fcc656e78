"""SSE_KEEPALIVE: an event stream that has sent the client nothing for that long gets `: keep-alive`
between events, never inside one, spliced or not; load balancers that cut idle connections then
leave a thinking model's stream alone. Real loopback sockets throughout."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from balancer import IdleCuttingProxy
from conftest import FakeUpstream

from gogpt import Settings, create_app

COMMENT = b": keep-alive\n\n"


def events_with_a_pause(before: list[bytes], pause: float, after: list[bytes]):
    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in before:
            await response.write(piece)
        await asyncio.sleep(pause)  # the model thinks: the upstream says nothing
        for piece in after:
            await response.write(piece)
        return response

    return respond


@pytest.fixture
def make_gateway(aiohttp_client, settings: Settings):
    async def make(**overrides) -> TestClient:
        return await aiohttp_client(create_app(settings.with_overrides(**overrides)))

    return make


@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions"])
async def test_a_silent_stream_gets_comments_between_events_and_is_otherwise_unchanged(
    make_gateway, upstream: FakeUpstream, auth, path: str
):
    before, after = [b"data: 1\n\n", b"data: 2\n\n"], [b"data: 3\n\n", b"data: [DONE]\n\n"]
    upstream.respond = events_with_a_pause(before, 3.5, after)
    gateway = await make_gateway(sse_keepalive=1)
    resp = await gateway.post(path, json={"stream": True}, headers=auth)
    body = await resp.read()
    assert body.count(COMMENT) >= 2
    assert body.replace(COMMENT, b"") == b"".join(before + after)
    assert body.partition(COMMENT)[0] == b"".join(before)  # the first comment came after the last whole event


async def test_a_conv_reply_gets_comments_too(make_gateway, upstream: FakeUpstream, auth):
    before = [b'data: {"message": {"id": "m1"}, "conversation_id": "c1"}\n\n']
    upstream.respond = events_with_a_pause(before, 2.5, [b"data: [DONE]\n\n"])
    gateway = await make_gateway(sse_keepalive=1)
    resp = await gateway.post("/conv", json={"content": "hi"}, headers={**auth, "Chat-Type": "conversation"})
    body = await resp.read()
    assert body.count(COMMENT) >= 1
    assert body.replace(COMMENT, b"") == before[0] + b"data: [DONE]\n\n"


async def test_an_event_split_across_reads_is_never_interrupted(make_gateway, upstream: FakeUpstream, auth):
    upstream.respond = events_with_a_pause([b"data: 1\n\n", b"data: hal"], 2.5, [b"f of it\n\n"])
    gateway = await make_gateway(sse_keepalive=0.5)
    resp = await gateway.post("/chat", json={"stream": True}, headers=auth)
    body = await resp.read()
    # gogpt may hold the unfinished event back (usage.py), so a comment may come before it: never in it
    assert body.replace(COMMENT, b"") == b"data: 1\n\ndata: half of it\n\n"
    assert b"data: half of it\n\n" in body


async def test_sse_keepalive_0_sends_none(make_gateway, upstream: FakeUpstream, auth):
    upstream.respond = events_with_a_pause([b"data: 1\n\n"], 1.5, [b"data: 2\n\n"])
    gateway = await make_gateway(sse_keepalive=0)
    resp = await gateway.post("/chat", json={"stream": True}, headers=auth)
    assert await resp.read() == b"data: 1\n\ndata: 2\n\n"


async def test_answers_that_are_not_event_streams_get_none(make_gateway, upstream: FakeUpstream, auth):
    async def slow_json(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"a": ')
        await asyncio.sleep(1.5)
        await response.write(b"1}")
        return response

    upstream.respond = slow_json
    gateway = await make_gateway(sse_keepalive=0.3)
    resp = await gateway.post("/v1/responses", json={}, headers=auth)
    assert await resp.read() == b'{"a": 1}'


def sdk_chunk(delta: str) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    body["choices"] = [{"index": 0, "delta": {"content": delta}, "finish_reason": None}]
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def test_the_openai_sdk_reads_a_stream_with_keepalives(
    aiohttp_server, settings: Settings, upstream: FakeUpstream, token: str
):
    upstream.respond = events_with_a_pause([sdk_chunk("Hel")], 2.5, [sdk_chunk("lo"), b"data: [DONE]\n\n"])
    server: TestServer = await aiohttp_server(create_app(settings.with_overrides(sse_keepalive=1)))
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=token, max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert [part.choices[0].delta.content async for part in stream] == ["Hel", "lo"]
    finally:
        await client.close()


@pytest.mark.parametrize(("keepalive", "survives"), [(0.5, True), (0, False)])
async def test_a_thinking_stream_survives_a_proxy_that_cuts_idle_connections(
    aiohttp_server, settings: Settings, upstream: FakeUpstream, auth, keepalive: float, survives: bool
):
    """Scaled down: the model thinks 4 s, the balancer cuts after 1.5 s of idleness."""
    upstream.respond = events_with_a_pause([b"data: 1\n\n"], 4, [b"data: 2\n\n"])
    gateway: TestServer = await aiohttp_server(create_app(settings.with_overrides(sse_keepalive=keepalive)))
    proxy = IdleCuttingProxy(gateway.port, idle=1.5)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/chat"
    async with (
        server,
        aiohttp.ClientSession() as session,
        session.post(url, json={"stream": True}, headers=auth) as resp,
    ):
        try:
            body: bytes | None = await resp.read()
        except aiohttp.ClientPayloadError:
            body = None
    if survives:
        assert body is not None and body.replace(COMMENT, b"") == b"data: 1\n\ndata: 2\n\n"
        assert proxy.cut == 0
    else:
        assert body is None and proxy.cut == 1
