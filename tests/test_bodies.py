"""Request bodies: bounded in decoded bytes and in time, parsed where a big one cannot stall gogpt,
and a chunked request's trailers never reach the next request on the connection."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestClient
from conftest import ACCESS_TOKEN, SECRET_KEY, FakeUpstream
from serving import free_port, start_gogpt, wait_until_listening
from wire import exchange

from bench.bombs import peak_rss_mb
from gogpt import Settings, bodies, create_app, mint_token
from gogpt.json_parser import INLINE_BYTES, JSON_PARSER, JsonParser
from gogpt.usage_request import REQUEST_FIELDS

CONV = {"Chat-Type": "conversation"}
MIB = 1 << 20


def gzip_bomb(size: int, prefix: bytes = b'{"messages":[', suffix: bytes = b"]}") -> bytes:
    """A JSON object of about `size` bytes, nearly all of it empty objects, gzipped to a few KiB."""
    count = (size - len(prefix) - len(suffix) - 2) // 3
    return gzip.compress(prefix + b"{}," * count + b"{}" + suffix, compresslevel=9)


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
    assert (claims["jti"], claims["exp"] - int(claims["iat"])) == ("ünï", 2 * 3600)


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


@pytest.fixture
async def small_bodies(aiohttp_client, settings: Settings) -> TestClient:
    return await aiohttp_client(create_app(settings.with_overrides(max_body_bytes=8 * MIB)))


@pytest.mark.parametrize(
    "path, prefix, suffix",
    [("/chat", b'{"messages":[', b"]}"), ("/conv", b'{"content":[', b"]}")],
)
async def test_a_json_body_that_swells_when_parsed_is_413_and_never_reaches_the_upstream(
    small_bodies: TestClient, upstream: FakeUpstream, auth, path: str, prefix: bytes, suffix: bytes
):
    """8 MiB of `{},` is within the limit, and 200 MB of Python objects once parsed."""
    headers = {**auth, **CONV, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    resp = await small_bodies.post(path, data=gzip_bomb(8 * MIB, prefix, suffix), headers=headers)
    assert resp.status == 413
    assert upstream.requests == []


async def test_a_parse_whose_client_left_never_answers_the_next_body(monkeypatch: pytest.MonkeyPatch):
    """The child answers in order: a request cancelled mid-parse must not leave its answer behind."""
    parser = JsonParser(MIB)
    first, second = (
        json.dumps({"who": who, "pad": "x" * INLINE_BYTES}).encode() for who in ("first", "second")
    )
    body_sent = asyncio.Event()
    drain = asyncio.StreamWriter.drain

    async def drain_and_tell(writer: asyncio.StreamWriter) -> None:
        await drain(writer)
        body_sent.set()

    monkeypatch.setattr(asyncio.StreamWriter, "drain", drain_and_tell)
    try:
        leaving = asyncio.ensure_future(parser.fields_in_child([first], len(first), {"who": ()}))
        await asyncio.wait_for(body_sent.wait(), 10)  # the child has the body and is parsing it
        leaving.cancel()
        async with asyncio.timeout(10):  # out of step, the child would wait for the rest of a body
            assert await parser.fields_in_child([second], len(second), {"who": ()}) == {"who": "second"}
    finally:
        await parser.close()


async def test_the_child_reads_a_large_body_s_fields_as_the_loop_reads_a_small_one():
    parser = JsonParser(MIB)
    body = {"model": ["x"], "stream": True, "stream_options": {"include_usage": True, "more": [1]}}
    large = json.dumps({**body, "pad": "x" * INLINE_BYTES}).encode()
    try:
        found = await parser.fields_in_child([large], len(large), REQUEST_FIELDS)
    finally:
        await parser.close()
    assert found == parser.fields_here(json.dumps(body).encode(), REQUEST_FIELDS)
    assert found == {"model": [], "stream": True, "stream_options": {"include_usage": True}}


@pytest.fixture
async def gogpt_process(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[tuple[int, str]]:
    """A real `python -m gogpt` with MAX_BODY_BYTES of 8 MiB: (pid, base URL)."""
    port = free_port()
    env = {
        "SECRET_KEY": SECRET_KEY,
        "API_PROXY": upstream.url,
        "UNOFFICIAL_PROXY": upstream.url + "/backend-api",
        "ACCESS_TOKEN": ACCESS_TOKEN,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MAX_BODY_BYTES": str(8 * MIB),
    }
    process = await start_gogpt(env, tmp_path)
    assert process.stderr is not None
    log = asyncio.ensure_future(process.stderr.read())  # an access line per request: keep the pipe open
    try:
        await wait_until_listening(port, process)
        yield process.pid, f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        await process.wait()
        await log


async def test_fifty_json_bombs_at_once_keep_gogpt_small_and_healthz_answering(
    gogpt_process: tuple[int, str],
):
    pid, base = gogpt_process
    auth = {"Authorization": f"Bearer {mint_token(SECRET_KEY, 'bomber', 1)}"}
    compressed = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    requests = [
        ("/chat", {}, gzip_bomb(8 * MIB)),
        ("/conv", CONV, gzip_bomb(8 * MIB, b'{"content":[', b"]}")),
        ("/v1/chat/completions", {}, gzip_bomb(8 * MIB)),
    ]
    baseline = peak_rss_mb(pid)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def bomb(number: int) -> int:
            path, headers, body = requests[number % len(requests)]
            async with session.post(
                base + path, data=body, headers={**auth, **headers, **compressed}
            ) as resp:
                await resp.read()
                return resp.status

        async with aiohttp.ClientSession() as health:
            bombs = asyncio.ensure_future(asyncio.gather(*(bomb(n) for n in range(50))))
            answered = []
            while not bombs.done():
                async with health.get(base + "/healthz") as resp:
                    answered.append(resp.status)
            statuses = await bombs
    peak = peak_rss_mb(pid)
    print(f"peak RSS {peak:.0f} MiB (at start {baseline:.0f} MiB); /healthz answered {len(answered)} times")
    assert answered and set(answered) == {200}
    assert set(statuses) <= {200, 400, 413}
    assert peak < 350


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


# ---- trailers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %(token)s\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",  # a body gogpt never reads
    ],
    ids=["relayed body", "unread body"],
)
async def test_a_chunked_requests_trailer_never_reaches_the_upstream_with_the_next_request(
    client: TestClient, upstream: FakeUpstream, token: str, first: bytes
):
    chunked = first % {b"token": token.encode()} + (
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nOpenAI-Organization: org-x\r\n\r\n"
    )
    second = (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n"
        % (token.encode())
    )
    answer = await exchange(client, chunked + second)
    assert status_of(answer) == 200
    assert all("OpenAI-Organization" not in request.headers for request in upstream.requests)


# ---- large bodies take turns: one per caller, and only while they keep coming ------------------


def _large_upload_head(token: str, size: int) -> bytes:
    return (
        b"POST /chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (token.encode(), size)
    )


async def test_one_callers_stalled_large_uploads_hold_one_turn_and_another_callers_body_goes_on(
    aiohttp_client, settings: Settings, auth, monkeypatch: pytest.MonkeyPatch
):
    """Two large uploads of one caller that stop coming held both turns: every other caller's
    large body waited until they timed out."""
    client = await aiohttp_client(create_app(settings.with_overrides(upstream_timeout=30)))
    parser = client.app[JSON_PARSER]
    asked, both_asked = 0, asyncio.Event()
    large_body = parser.large_body

    def counted(caller: str) -> AbstractAsyncContextManager[None]:
        nonlocal asked
        asked += 1
        if asked == 2:
            both_asked.set()
        return large_body(caller)

    monkeypatch.setattr(parser, "large_body", counted)
    slowpoke = mint_token(SECRET_KEY, "slowpoke", 1)
    stalled = []
    for _ in range(2):  # past INLINE_BYTES, then nothing more
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(
            _large_upload_head(slowpoke, 4 * INLINE_BYTES) + b'{"pad": "' + b"x" * (2 * INLINE_BYTES)
        )
        stalled.append((asyncio.ensure_future(reader.read()), writer))
    try:
        await asyncio.wait_for(both_asked.wait(), 10)
        body = {"pad": "x" * 2 * INLINE_BYTES}
        resp = await asyncio.wait_for(client.post("/chat", json=body, headers=auth), 10)
        assert resp.status == 200
        assert not any(answer.done() for answer, _ in stalled)  # both still waiting for their bodies
    finally:
        for answer, writer in stalled:
            writer.close()
            answer.cancel()


async def test_a_large_upload_that_falls_below_the_minimum_rate_is_408(
    aiohttp_client, settings: Settings, token: str, monkeypatch: pytest.MonkeyPatch
):
    """Each wait for the client is bounded by UPSTREAM_TIMEOUT, but a body trickling in at one byte
    a minute would hold a turn for weeks: past a grace, a large body must come at 64 KiB/s."""
    monkeypatch.setattr(bodies, "_TURN_GRACE_SECONDS", 0.2)
    client = await aiohttp_client(create_app(settings.with_overrides(upstream_timeout=30)))
    head = _large_upload_head(token, 4 * INLINE_BYTES)
    answer = await exchange(client, head + b'{"pad": "' + b"x" * (2 * INLINE_BYTES))
    assert status_of(answer) == 408
