"""Request bodies: bounded in decoded bytes and in time, parsed where a big one cannot stall gogpt,
and a chunked request's trailers never reach the next request on the connection."""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestClient
from conftest import SECRET_KEY, FakeUpstream

from gogpt import Settings, create_app

CONV = {"Chat-Type": "conversation"}
MIB = 1 << 20


def gzip_bomb(size: int, prefix: bytes = b'{"messages":[', suffix: bytes = b"]}") -> bytes:
    """A JSON object of about `size` bytes, nearly all of it empty objects, gzipped to a few KiB."""
    count = (size - len(prefix) - len(suffix) - 2) // 3
    return gzip.compress(prefix + b"{}," * count + b"{}" + suffix, compresslevel=9)


async def exchange(client: TestClient, raw: bytes) -> bytes:
    """Write `raw` on a fresh connection and read until gogpt closes it."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# ---- /token: a small public body, refused before it is parsed ---------------------------------


@pytest.mark.parametrize(
    "body, headers",
    [
        (gzip_bomb(MIB, b"[", b""), {"Content-Type": "application/json", "Content-Encoding": "gzip"}),
        (b"id=" + b"x" * 9000 + b"&hour=1&key=k", {"Content-Type": "application/x-www-form-urlencoded"}),
    ],
    ids=["gzip bomb", "long form"],
)
async def test_a_token_body_over_a_few_kib_is_413(client: TestClient, body: bytes, headers: dict[str, str]):
    resp = await client.post("/token", data=body, headers=headers)
    assert resp.status == 413
    assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_a_token_body_declared_larger_than_a_few_kib_is_refused_before_it_arrives(client: TestClient):
    head = b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(head + b"i")
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status_line.split()[1] == b"413"


async def test_a_token_is_minted_from_a_multipart_form_as_fetch_sends_a_form_data(client: TestClient):
    form = aiohttp.FormData({"id": "ünï", "hour": "2", "key": SECRET_KEY}, default_to_multipart=True)
    resp = await client.post("/token", data=form)
    assert resp.status == 200
    claims = jwt.decode((await resp.json())["token"], SECRET_KEY, algorithms=["HS256"])
    assert (claims["jti"], claims["exp"] - claims["iat"]) == ("ünï", 2 * 3600)


# ---- /chat and /conv: JSON bodies checked without stalling gogpt ------------------------------


async def test_a_large_chat_body_is_forwarded_unchanged(client: TestClient, upstream: FakeUpstream, auth):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "é" * (2 * MIB)}]}).encode()
    resp = await client.post("/chat", data=body, headers=auth)
    assert resp.status == 200
    assert upstream.last.body == body


async def test_a_large_conv_message_reaches_the_upstream(client: TestClient, upstream: FakeUpstream, auth):
    content = "long message " * 20000
    resp = await client.post("/conv", json={"content": content}, headers={**auth, **CONV})
    assert resp.status == 200
    assert json.loads(upstream.last.body)["messages"][0]["content"]["parts"] == [content]


@pytest.mark.parametrize("path", ["/chat", "/conv"])
@pytest.mark.parametrize("body", [b"[" + b"1," * 100_000 + b"1]", b'{"a": "' + b"x" * 100_000])
async def test_a_large_body_that_is_not_a_json_object_is_400(
    client: TestClient, upstream: FakeUpstream, auth, path: str, body: bytes
):
    resp = await client.post(path, data=body, headers={**auth, **CONV})
    assert resp.status == 400
    assert upstream.requests == []


# ---- bodies that never finish arriving ---------------------------------------------------------


@pytest.fixture
async def impatient(aiohttp_client, settings: Settings) -> TestClient:
    return await aiohttp_client(create_app(settings.with_overrides(upstream_timeout=0.5)))


async def test_a_token_body_that_dribbles_in_is_408_and_the_connection_closed(impatient: TestClient):
    head = b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    answer = await exchange(impatient, head + b'{"id"')
    assert status_of(answer) == 408


UPLOADS = {
    "chat": (b"/chat", b"", b"Content-Length: 1000", b'{"model"'),
    "conv": (b"/conv", b"Chat-Type: conversation\r\n", b"Content-Length: 1000", b'{"content"'),
    "v1 streamed": (b"/v1/files", b"", b"Content-Length: %d" % (4 * MIB), b"x" * (2 * MIB)),
    "v1 chunked": (b"/v1/files", b"", b"Transfer-Encoding: chunked", b"10\r\n0123456789abcdef\r\n"),
}


@pytest.mark.parametrize("upload", UPLOADS.values(), ids=UPLOADS.keys())
async def test_an_upload_that_falls_silent_is_408_and_the_connection_closed(
    impatient: TestClient, upstream: FakeUpstream, token: str, upload: tuple[bytes, bytes, bytes, bytes]
):
    path, extra, framing, part = upload
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n%s%s\r\n\r\n" % (
        path,
        token.encode(),
        extra,
        framing,
    )
    answer = await exchange(impatient, head + part)
    assert status_of(answer) == 408
    assert b"Connection: close" in answer.partition(b"\r\n\r\n")[0]
    assert all(request.body != part for request in upstream.requests)  # never taken for a whole body


@pytest.mark.parametrize(
    "path, status",
    [(b"/chat", 401), (b"/token", 413), (b"/healthz", 200)],
    ids=["refused before reading", "refused midway", "never read"],
)
async def test_a_compressed_body_left_unfinished_ends_the_connection_instead_of_being_inflated(
    client: TestClient, path: bytes, status: int
):
    """Kept open, the connection would first have 32 MiB inflated, and then stay open."""
    method = b"GET" if path == b"/healthz" else b"POST"
    body = gzip_bomb(32 * MIB, b"[", b"]")
    head = b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Type: application/json\r\n" % (
        method,
        path,
    )
    answer = await exchange(client, head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert status_of(answer) == status
