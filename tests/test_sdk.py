"""The official OpenAI SDK pointed at gogpt's /v1 with a gogpt token as its API key."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import FakeUpstream

from gogpt import create_app

MODELS = {"object": "list", "data": [{"id": "gpt-4o", "object": "model", "created": 0, "owned_by": "openai"}]}


def completion(content: str) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
    }


def chunk(delta: str) -> bytes:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}],
    }
    return f"data: {json.dumps(body)}\n\n".encode()


async def openai_like(request: web.Request) -> web.StreamResponse:
    if request.path == "/v1/models":
        return web.json_response(MODELS)
    body = await request.json()
    if body["messages"][0]["content"] == "rate me":
        error = {
            "error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}
        }
        return web.json_response(error, status=429)
    if not body.get("stream"):
        return web.json_response(completion("Hello there"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for delta in ("Hel", "lo ", "the", "re"):
        await response.write(chunk(delta))
    await response.write(b"data: [DONE]\n\n")
    return response


@pytest.fixture
async def sdk(aiohttp_server, settings, upstream: FakeUpstream, token: str) -> openai.AsyncOpenAI:
    upstream.respond = openai_like
    server: TestServer = await aiohttp_server(create_app(settings))
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=token, max_retries=0)
    yield client
    await client.close()


async def test_a_websocket_handshake_is_refused_with_501_not_relayed_as_a_plain_get(
    aiohttp_client, settings, upstream: FakeUpstream, token: str
):
    """client.realtime.connect() opens ws://BASE/realtime: gogpt used to send the upstream a GET
    without its Upgrade header, and the SDK failed on whatever came back."""
    client = await aiohttp_client(create_app(settings))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(
            "/v1/realtime?model=gpt-realtime", headers={"Authorization": f"Bearer {token}"}
        )
    assert refused.value.status == 501
    assert upstream.requests == []


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def test_sdk_non_streaming_chat(sdk: openai.AsyncOpenAI):
    answer = await sdk.chat.completions.create(model="gpt-4o", messages=ask("hi"))
    assert answer.choices[0].message.content == "Hello there"


async def test_sdk_streaming_chat_yields_the_deltas_in_order(sdk: openai.AsyncOpenAI):
    stream = await sdk.chat.completions.create(model="gpt-4o", messages=ask("hi"), stream=True)
    deltas = [part.choices[0].delta.content async for part in stream]
    assert deltas == ["Hel", "lo ", "the", "re"]


async def test_sdk_lists_models(sdk: openai.AsyncOpenAI):
    models = await sdk.models.list()
    assert [model.id for model in models.data] == ["gpt-4o"]


async def test_sdk_bad_token_raises_authentication_error(sdk: openai.AsyncOpenAI, upstream: FakeUpstream):
    with pytest.raises(openai.AuthenticationError):
        await sdk.with_options(api_key="forged").chat.completions.create(model="gpt-4o", messages=ask("hi"))
    assert upstream.requests == []


async def test_sdk_upstream_429_raises_rate_limit_error(sdk: openai.AsyncOpenAI):
    with pytest.raises(openai.RateLimitError, match="Rate limit reached"):
        await sdk.chat.completions.create(model="gpt-4o", messages=ask("rate me"))
