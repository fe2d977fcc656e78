"""The relay against a real fake upstream on loopback: streaming, hang-ups, faults, headers."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import CHAT_API_KEY, FakeUpstream
from yarl import URL

from gogpt import Settings, create_app

CHAT = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def sse_responder(chunks: list[bytes], *, gates: list[asyncio.Event] | None = None):
    """An upstream that writes `chunks` as separate writes, waiting on `gates[i]` before chunk i."""

    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, chunk in enumerate(chunks):
            if gates is not None and index < len(gates):
                await gates[index].wait()
            await response.write(chunk)
        await response.write_eof()
        return response

    return respond


async def test_event_stream_is_relayed_byte_for_byte(client: TestClient, upstream: FakeUpstream, auth):
    text = 'data: {"delta": "héllo 世界 🙂"}\n\n'.encode()
    # Split inside multi-byte characters: the relay must not decode or re-chunk.
    chunks = [text[:14], text[14:27], text[27:35], text[35:], b"data: [DONE]\n\n"]
    upstream.respond = sse_responder(chunks)
    resp = await client.post("/chat", json=CHAT, headers=auth)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert await resp.read() == b"".join(chunks)


async def test_each_event_reaches_the_client_before_the_upstream_sends_the_next(
    client: TestClient, upstream: FakeUpstream, auth
):
    events = [f"data: {n}\n\n".encode() for n in range(4)]
    gates = [asyncio.Event() for _ in events]
    gates[0].set()
    upstream.respond = sse_responder(events, gates=gates)
    resp = await client.post("/chat", json=CHAT, headers=auth)
    for index, event in enumerate(events):
        received = b""
        while len(received) < len(event):
            received += await asyncio.wait_for(resp.content.readany(), 2)
        assert received == event
        if index + 1 < len(gates):
            gates[index + 1].set()  # the upstream only sends the next event now
    assert await resp.read() == b""


async def test_hang_up_closes_the_upstream_stream(client: TestClient, upstream: FakeUpstream, auth):
    never = asyncio.Event()
    upstream.respond = sse_responder([b"data: first\n\n", b"data: never\n\n"], gates=[_set(), never])
    resp = await client.post("/chat", json=CHAT, headers=auth)
    assert await resp.content.readline() == b"data: first\n"
    resp.close()  # the client hangs up while the upstream is silent
    await asyncio.wait_for(upstream.disconnected.wait(), 1)


def _set() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


async def test_unreachable_upstream_is_a_502_json_error(aiohttp_client, settings: Settings, auth):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = await aiohttp_client(create_app(_with(settings, api_proxy=f"127.0.0.1:{port}")))
    resp = await client.post("/chat", json=CHAT, headers=auth)
    assert resp.status == 502
    body = await resp.json()
    assert body["error"]["code"] == "upstream_unreachable"
    assert str(port) not in body["error"]["message"]


async def test_upstream_silent_before_answering_is_a_504_json_error(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth
):
    release = asyncio.Event()

    async def silent(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response({})

    upstream.respond = silent
    client = await aiohttp_client(create_app(_with(settings, upstream_timeout=0.2)))
    resp = await client.post("/chat", json=CHAT, headers=auth)
    release.set()
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_timeout"


async def test_upstream_breaking_off_mid_stream_cuts_the_client(
    client: TestClient, upstream: FakeUpstream, auth
):
    async def breaks_off(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: partial\n\n")
        assert request.transport is not None
        request.transport.close()  # no terminating chunk
        return response

    upstream.respond = breaks_off
    resp = await client.post("/chat", json=CHAT, headers=auth)
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


async def test_upstream_silent_mid_stream_cuts_the_client(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth
):
    upstream.respond = sse_responder(
        [b"data: partial\n\n", b"data: late\n\n"], gates=[_set(), asyncio.Event()]
    )
    client = await aiohttp_client(create_app(_with(settings, upstream_timeout=0.3)))
    resp = await client.post("/chat", json=CHAT, headers=auth)
    assert await resp.content.readline() == b"data: partial\n"
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(resp.read(), 3)


async def test_chat_body_is_forwarded_unchanged_with_every_field(
    client: TestClient, upstream: FakeUpstream, auth
):
    body = json.dumps(
        {"model": "m", "messages": [], "temperature": 0.2, "tools": [{"type": "function"}], "max_tokens": 7},
        separators=(",", ":"),
    ).encode()
    resp = await client.post("/chat", data=body, headers={**auth, "Content-Type": "application/json"})
    assert resp.status == 200
    assert upstream.last.body == body
    assert upstream.last.path == "/v1/chat/completions"
    assert upstream.last.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    "body", [b"[1, 2]", b'"text"', b"42", b"null", b"{not json", b"\xff\xfe", b"[" * 100_000]
)
async def test_chat_refuses_a_body_that_is_not_a_json_object(
    client: TestClient, upstream: FakeUpstream, auth, body: bytes
):
    resp = await client.post("/chat", data=body, headers=auth)
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []


async def test_upstream_gets_the_gateway_key_and_never_the_client_credential_or_cookies(
    client: TestClient, upstream: FakeUpstream, token: str
):
    headers = {"Authorization": token, "Cookie": "session=abc"}
    await client.post("/chat", json=CHAT, headers=headers)
    sent = upstream.last.headers
    assert sent["Authorization"] == f"Bearer {CHAT_API_KEY}"
    assert "Cookie" not in sent
    assert token not in str(dict(sent))


async def test_cookies_an_upstream_sets_are_passed_back_and_never_sent_on_another_call(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth
):
    """One outbound session serves every caller: an upstream cookie kept in it would reach the next one."""
    by_name = upstream.url.replace("127.0.0.1", "localhost")  # cookie jars ignore cookies from IP addresses
    client = await aiohttp_client(create_app(_with(settings, api_proxy=by_name)))

    async def sets_a_cookie(request: web.Request) -> web.StreamResponse:
        response = web.json_response({"ok": True})
        response.set_cookie("__cf_bm", "alice-only")
        return response

    upstream.respond = sets_a_cookie
    first = await client.post("/chat", json={}, headers=auth)
    assert "alice-only" in first.headers.get("Set-Cookie", "")  # the client's own to keep, or not
    await client.post("/chat", json={}, headers=auth)
    assert "Cookie" not in upstream.last.headers


async def test_end_to_end_request_headers_are_forwarded(client: TestClient, upstream: FakeUpstream, auth):
    extra = {"OpenAI-Beta": "assistants=v2", "OpenAI-Organization": "org-1", "Idempotency-Key": "k-1"}
    await client.post("/chat", json=CHAT, headers={**auth, **extra})
    for name, value in extra.items():
        assert upstream.last.headers[name] == value


async def test_hop_by_hop_request_headers_are_not_forwarded(client: TestClient, upstream: FakeUpstream, auth):
    headers = {**auth, "Connection": "keep-alive, X-Private-Hop", "X-Private-Hop": "1", "TE": "trailers"}
    await client.post("/chat", json=CHAT, headers=headers)
    sent = upstream.last.headers
    assert "X-Private-Hop" not in sent
    assert "TE" not in sent


async def test_upstream_status_and_headers_come_back(client: TestClient, upstream: FakeUpstream, auth):
    async def created(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"id": "x"},
            status=201,
            headers={
                "x-request-id": "req-1",
                "openai-processing-ms": "12",
                "Access-Control-Allow-Origin": "evil",
            },
        )

    upstream.respond = created
    resp = await client.post("/chat", json=CHAT, headers={**auth, "Origin": "http://app.test"})
    assert resp.status == 201
    assert resp.headers["x-request-id"] == "req-1"
    assert resp.headers["openai-processing-ms"] == "12"
    assert resp.headers.getall("Access-Control-Allow-Origin") == ["http://app.test"]
    assert await resp.json() == {"id": "x"}


async def test_streamed_answers_carry_the_cors_headers(client: TestClient, upstream: FakeUpstream, auth):
    upstream.respond = sse_responder([b"data: 1\n\n"])
    resp = await client.post("/chat", json=CHAT, headers=auth)
    assert resp.headers.getall("Access-Control-Allow-Origin") == ["*"]
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"


@pytest.mark.parametrize(
    ("method", "path", "upstream_path"),
    [
        ("GET", "/v1/models", "/v1/models"),
        ("POST", "/v1/embeddings", "/v1/embeddings"),
        ("DELETE", "/v1/files/file-abc", "/v1/files/file-abc"),
        ("HEAD", "/v1/x/y", "/v1/x/y"),
    ],
)
async def test_v1_relays_the_methods_of_the_openai_api_on_any_path(
    client: TestClient, upstream: FakeUpstream, auth, method: str, path: str, upstream_path: str
):
    resp = await client.request(method, path, headers=auth)
    assert resp.status == 200
    assert (upstream.last.method, upstream.last.path) == (method, upstream_path)
    assert upstream.last.headers["Authorization"] == f"Bearer {CHAT_API_KEY}"


async def test_v1_keeps_the_query_string_exactly(client: TestClient, upstream: FakeUpstream, auth):
    await client.get("/v1/files?purpose=fine-tune&limit=2&after=a%2Fb", headers=auth)
    assert upstream.last.query_string == "purpose=fine-tune&limit=2&after=a/b"


async def test_v1_streams_a_large_upload_through_intact(client: TestClient, upstream: FakeUpstream, auth):
    payload = bytes(range(256)) * (3 * 4096)  # 3 MiB, past the read-whole threshold

    async def chunks():
        for start in range(0, len(payload), 65536):
            yield payload[start : start + 65536]

    resp = await client.post("/v1/files", data=chunks(), headers=auth)
    assert resp.status == 200
    assert upstream.last.body == payload


async def test_v1_body_over_the_limit_is_413_and_never_sent(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth
):
    client = await aiohttp_client(create_app(_with(settings, max_body_bytes=1000)))
    resp = await client.post("/v1/files", data=b"x" * 1001, headers=auth)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "request_too_large"
    assert upstream.requests == []


async def test_chat_body_over_the_limit_is_413(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth
):
    client = await aiohttp_client(create_app(_with(settings, max_body_bytes=1000)))
    resp = await client.post("/chat", json={"content": "x" * 2000}, headers=auth)
    assert resp.status == 413
    assert "error" in await resp.json()
    assert upstream.requests == []


@pytest.mark.parametrize(
    "path",
    ["/v1/a/../b", "/v1/a//b", "/v1/./models", "/v1/%2e%2e/admin", "/v1/a%2F..%2F..%2Fb", "/v1/a%5C..%5Cb"],
)
async def test_v1_refuses_path_tricks(client: TestClient, upstream: FakeUpstream, auth, path: str):
    raw = URL(str(client.make_url("")).rstrip("/") + path, encoded=True)  # sent exactly as written
    resp = await client.session.get(raw, headers=auth)
    assert resp.status in (400, 404)
    assert upstream.requests == []


async def test_v1_passes_an_encoded_slash_in_an_id_on_as_it_came(
    client: TestClient, upstream: FakeUpstream, auth
):
    """Model ids of OpenAI-compatible servers hold slashes (`meta-llama/Llama-3`): the OpenAI SDK
    encodes them, and the upstream must get one segment, not two."""
    raw = URL(str(client.make_url("")).rstrip("/") + "/v1/models/meta-llama%2FLlama-3", encoded=True)
    resp = await client.session.get(raw, headers=auth)
    assert resp.status == 200
    assert upstream.last.raw_path == "/v1/models/meta-llama%2FLlama-3"


async def test_gzip_answers_come_back_still_encoded(client: TestClient, upstream: FakeUpstream, auth):
    compressed = gzip.compress(b'{"data": []}')

    async def gzipped(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=compressed, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    upstream.respond = gzipped
    resp = await client.get("/v1/models", headers={**auth, "Accept-Encoding": "gzip"}, auto_decompress=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    assert await resp.read() == compressed
    assert upstream.last.headers["Accept-Encoding"] == "gzip"


async def test_a_client_that_accepts_no_coding_gets_answers_asked_for_as_identity(
    client: TestClient, upstream: FakeUpstream, auth
):
    await client.get("/v1/models", headers=auth, skip_auto_headers=["Accept-Encoding"])
    assert upstream.last.headers.getall("Accept-Encoding") == ["identity"]


def _with(settings: Settings, **changes) -> Settings:
    return settings.with_overrides(**changes)
