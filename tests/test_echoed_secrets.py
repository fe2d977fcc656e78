"""An upstream that quotes gogpt's secrets back never shows them to a client, however it sends them.

Each case is a way issue 17 found to get a key past the redaction: content codings gogpt did
not read, error answers too large or streamed, headers and the reason phrase, status codes
outside 4xx and 5xx, methods that echo the request, and keys of a pool. The client here never
decodes anything itself, so the assertions see the bytes exactly as gogpt sent them.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import ACCESS_TOKEN, CHAT_API_KEY, SECRET_KEY, FakeUpstream

from gogpt import Settings, create_app, mint_token

SECRETS = (CHAT_API_KEY, ACCESS_TOKEN, SECRET_KEY)
POOL = ("sk-pool-first-key-1111111111111111", "sk-pool-second-key-222222222222222")
Responder = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def raw_client(aiohttp_client, settings: Settings) -> TestClient:
    """A client of gogpt that decodes nothing: what it reads is what went over the wire."""
    return await aiohttp_client(create_app(settings), auto_decompress=False)


def quoting(secret: str) -> bytes:
    return json.dumps({"error": {"message": f"Incorrect API key provided: {secret}."}}).encode()


def answering(status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> Responder:
    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.Response(status=status, body=body, content_type="application/json")
        for name, value in headers or ():
            response.headers.add(name, value)
        return response

    return respond


def every_reading(body: bytes) -> list[bytes]:
    """The body and every layer a gzip or deflate decoder could peel off it: a key must be in none."""
    readings = [body]
    for _ in range(4):
        for wbits in (47, -15):
            try:
                body = zlib.decompressobj(wbits).decompress(body)
            except zlib.error:
                continue
            readings.append(body)
            break
        else:
            break
    return readings


async def assert_nothing_secret(resp, secrets: tuple[str, ...] = SECRETS) -> bytes:
    body = await resp.read()
    head = f"{resp.reason}\n" + "\n".join(f"{name}: {value}" for name, value in resp.headers.items())
    for secret in secrets:
        assert secret not in head
        for reading in every_reading(body):
            assert secret.encode() not in reading
    return body


def assert_refused_with_502(resp, body: bytes) -> None:
    assert resp.status == 502
    assert json.loads(body)["error"]["code"] == "upstream_error"


# ---- content codings -------------------------------------------------------------------------


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "x-unknown"])
async def test_an_error_answer_in_a_coding_gogpt_cannot_decode_is_refused_with_502(
    raw_client: TestClient, upstream: FakeUpstream, auth, coding: str
):
    # the body is not really encoded: a client that took it as it came would read the key
    upstream.respond = answering(401, quoting(CHAT_API_KEY), [("Content-Encoding", coding)])
    resp = await raw_client.post("/chat", json={}, headers={**auth, "Accept-Encoding": "br, zstd, gzip"})
    assert_refused_with_502(resp, await assert_nothing_secret(resp))


@pytest.mark.parametrize(
    ("codings", "encode"),
    [
        (["gzip, gzip"], lambda text: gzip.compress(gzip.compress(text))),
        (["identity", "gzip"], gzip.compress),  # two headers; the first once hid the second
        (["deflate", "gzip"], lambda text: gzip.compress(zlib.compress(text))),
        (["GZIP , Identity"], gzip.compress),
    ],
)
async def test_an_error_answer_in_stacked_codings_comes_back_decoded_and_redacted(
    raw_client: TestClient, upstream: FakeUpstream, auth, codings: list[str], encode
):
    headers = [("Content-Encoding", value) for value in codings]
    upstream.respond = answering(401, encode(quoting(CHAT_API_KEY)), headers)
    resp = await raw_client.post("/chat", json={}, headers={**auth, "Accept-Encoding": "gzip, deflate"})
    body = await assert_nothing_secret(resp)
    assert resp.status == 401
    assert "Content-Encoding" not in resp.headers
    assert json.loads(body)["error"]["message"] == "Incorrect API key provided: [redacted]."


# ---- size and content type -------------------------------------------------------------------


async def test_an_error_answer_over_1_mib_is_refused_with_502(
    raw_client: TestClient, upstream: FakeUpstream, auth
):
    padded = b'{"padding": "' + b"x" * (1 << 20) + b'", "error": "bad key ' + CHAT_API_KEY.encode() + b'"}'
    upstream.respond = answering(400, padded)
    resp = await raw_client.post("/v1/chat/completions", json={}, headers=auth)
    assert_refused_with_502(resp, await assert_nothing_secret(resp))


async def test_a_streamed_event_stream_error_comes_back_redacted(
    raw_client: TestClient, upstream: FakeUpstream, auth
):
    async def streamed_error(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=429, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)  # chunked: the relay's streaming fast path would take it
        await response.write(b"event: error\ndata: " + quoting(CHAT_API_KEY) + b"\n\n")
        await response.write_eof()
        return response

    upstream.respond = streamed_error
    resp = await raw_client.post("/chat", json={"stream": True}, headers=auth)
    body = await assert_nothing_secret(resp)
    assert resp.status == 429
    assert (
        body == b'event: error\ndata: {"error": {"message": "Incorrect API key provided: [redacted]."}}\n\n'
    )


# ---- status line and headers -----------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 401, 500])
async def test_headers_and_reason_quoting_a_secret_come_back_redacted_on_any_answer(
    raw_client: TestClient, upstream: FakeUpstream, auth, status: int
):
    async def echoing(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"ok": True},
            status=status,
            reason=f"Key {CHAT_API_KEY} is fine",
            headers={
                "WWW-Authenticate": f'Bearer error="invalid_token", key="{CHAT_API_KEY}"',
                "X-Echo-Authorization": f"Bearer {CHAT_API_KEY}",
                SECRET_KEY: "a header named by a secret",
                "X-Request-Id": "req-1",
            },
        )

    upstream.respond = echoing
    resp = await raw_client.post("/chat", json={}, headers=auth)
    await assert_nothing_secret(resp)
    assert resp.status == status
    assert resp.reason == "Key [redacted] is fine"
    assert resp.headers["X-Echo-Authorization"] == "Bearer [redacted]"
    assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token", key="[redacted]"'
    assert resp.headers["X-Request-Id"] == "req-1"


async def test_headers_of_a_streamed_answer_come_back_redacted(
    raw_client: TestClient, upstream: FakeUpstream, auth
):
    async def streaming(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Echo": f"Bearer {CHAT_API_KEY}"}
        )
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await response.write_eof()
        return response

    upstream.respond = streaming
    resp = await raw_client.post("/chat", json={"stream": True}, headers=auth)
    assert await assert_nothing_secret(resp) == b"data: 1\n\n"
    assert resp.headers["X-Echo"] == "Bearer [redacted]"


@pytest.mark.parametrize("status", [301, 302, 307])
async def test_a_redirect_quoting_a_secret_comes_back_redacted(
    raw_client: TestClient, upstream: FakeUpstream, auth, status: int
):
    upstream.respond = answering(
        status,
        f"moved, key={CHAT_API_KEY}".encode(),
        [("Location", f"https://elsewhere.test/?key={CHAT_API_KEY}")],
    )
    resp = await raw_client.get("/v1/models", headers=auth, allow_redirects=False)
    body = await assert_nothing_secret(resp)
    assert resp.status == status
    assert body == b"moved, key=[redacted]"
    assert resp.headers["Location"] == "https://elsewhere.test/?key=[redacted]"


# ---- every secret ----------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [CHAT_API_KEY, ACCESS_TOKEN, SECRET_KEY])
async def test_each_configured_secret_quoted_in_an_error_is_redacted(
    raw_client: TestClient, upstream: FakeUpstream, auth, secret: str
):
    upstream.respond = answering(401, quoting(secret))
    resp = await raw_client.post("/chat", json={}, headers=auth)
    body = await assert_nothing_secret(resp)
    assert json.loads(body)["error"]["message"] == "Incorrect API key provided: [redacted]."


@pytest.mark.parametrize("key", POOL)
async def test_every_key_of_a_comma_separated_chat_api_key_is_redacted(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth, key: str
):
    client = await aiohttp_client(create_app(settings.with_overrides(chat_api_key=" , ".join(POOL))))
    upstream.respond = answering(401, quoting(key), [("X-Key", key)])
    resp = await client.post("/chat", json={}, headers=auth)
    body = await assert_nothing_secret(resp, POOL)
    assert json.loads(body)["error"]["message"] == "Incorrect API key provided: [redacted]."
    assert resp.headers["X-Key"] == "[redacted]"


async def test_a_secret_quoted_with_json_escapes_is_redacted(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth
):
    secret = 'admin/key"with\\odd-characters-0123456789'
    client = await aiohttp_client(create_app(settings.with_overrides(secret_key=secret)))
    escaped = json.dumps(secret)[1:-1]  # admin/key\"with\\odd...
    slashes_escaped = escaped.replace("/", "\\/")  # as PHP's json_encode writes it
    upstream.respond = answering(400, f'{{"a": "{escaped}", "b": "{slashes_escaped}"}}'.encode())
    resp = await client.post("/chat", json={}, headers={"Authorization": mint_token(secret, "alice", 1)})
    assert json.loads(await resp.read()) == {"a": "[redacted]", "b": "[redacted]"}


# ---- methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["TRACE", "PUT", "PATCH", "PROPFIND"])
async def test_v1_refuses_methods_the_openai_api_does_not_use_with_405(
    raw_client: TestClient, upstream: FakeUpstream, auth, method: str
):
    async def echoing(request: web.Request) -> web.StreamResponse:
        return web.Response(text=f"{request.method} with {request.headers.get('Authorization')}")

    upstream.respond = echoing
    resp = await raw_client.request(method, "/v1/x", headers=auth)
    body = await assert_nothing_secret(resp)
    assert resp.status == 405
    assert resp.headers["Allow"] == "GET, HEAD, POST, DELETE, OPTIONS"
    assert json.loads(body)["error"]["code"] == "method_not_allowed"
    assert upstream.requests == []


@pytest.mark.parametrize("target", [b"/v1/x", b"api.openai.com:443"])
async def test_connect_is_refused_with_405_and_never_reaches_the_upstream(
    raw_client: TestClient, upstream: FakeUpstream, token: str, target: bytes
):
    reader, writer = await asyncio.open_connection(raw_client.host, raw_client.port)
    writer.write(
        b"CONNECT %s HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\nConnection: close\r\n\r\n"
        % (target, token.encode())
    )
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 ")
    assert b"\r\nAllow: GET, HEAD, POST, DELETE, OPTIONS\r\n" in head
    assert json.loads(body)["error"]["code"] == "method_not_allowed"
    assert upstream.requests == []


# ---- what gogpt asks for ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accepted", "asked"),
    [
        ("br, zstd, gzip;q=0.5", "gzip"),
        ("br", "identity"),
        ("gzip, deflate, br, zstd", "gzip, deflate"),
        ("*", "gzip, deflate"),
        ("gzip;q=0, *;q=0.1", "deflate"),
        ("x-gzip", "gzip"),
    ],
)
async def test_upstreams_are_asked_only_for_codings_both_gogpt_and_the_client_read(
    raw_client: TestClient, upstream: FakeUpstream, auth, accepted: str, asked: str
):
    await raw_client.post("/chat", json={}, headers={**auth, "Accept-Encoding": accepted})
    assert upstream.last.headers.getall("Accept-Encoding") == [asked]


# ---- /conv -----------------------------------------------------------------------------------

CONV_READS = ["conversations", "conversation/abc"]


@pytest.mark.parametrize("chat_type", CONV_READS)
async def test_a_conv_read_error_in_stacked_gzip_comes_back_decoded_and_redacted(
    raw_client: TestClient, upstream: FakeUpstream, auth, chat_type: str
):
    body = gzip.compress(gzip.compress(quoting(ACCESS_TOKEN)))
    upstream.respond = answering(401, body, [("Content-Encoding", "gzip, gzip")])
    resp = await raw_client.get("/conv", headers={**auth, "Chat-Type": chat_type})
    body = await assert_nothing_secret(resp)
    assert resp.status == 401
    assert json.loads(body)["error"]["message"] == "Incorrect API key provided: [redacted]."


@pytest.mark.parametrize("chat_type", CONV_READS)
@pytest.mark.parametrize("coding", ["x-unknown", "compress"])
async def test_a_conv_read_error_in_a_coding_gogpt_cannot_decode_is_refused_with_502(
    raw_client: TestClient, upstream: FakeUpstream, auth, chat_type: str, coding: str
):
    # gzip under another name: passed on undecoded, a client could still read the token in it
    upstream.respond = answering(403, gzip.compress(quoting(ACCESS_TOKEN)), [("Content-Encoding", coding)])
    resp = await raw_client.get("/conv", headers={**auth, "Chat-Type": chat_type})
    assert_refused_with_502(resp, await assert_nothing_secret(resp))


async def test_a_conv_read_error_whose_content_type_quotes_a_secret_comes_back_redacted(
    raw_client: TestClient, upstream: FakeUpstream, auth
):
    async def odd_type(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=401, body=b"expired", headers={"Content-Type": f"text/plain; token={ACCESS_TOKEN}"}
        )

    upstream.respond = odd_type
    resp = await raw_client.get("/conv", headers={**auth, "Chat-Type": "conversations"})
    assert await assert_nothing_secret(resp) == b"expired"
    assert resp.headers["Content-Type"] == "text/plain; token=[redacted]"


async def test_a_conv_reply_error_streamed_as_events_comes_back_redacted(
    raw_client: TestClient, upstream: FakeUpstream, auth
):
    async def streamed_error(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=401, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: " + quoting(ACCESS_TOKEN) + b"\n\n")
        await response.write_eof()
        return response

    upstream.respond = streamed_error
    resp = await raw_client.post(
        "/conv", json={"content": "hi"}, headers={**auth, "Chat-Type": "conversation"}
    )
    body = await assert_nothing_secret(resp)
    assert resp.status == 401
    assert b"Incorrect API key provided: [redacted]." in body
