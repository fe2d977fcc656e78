"""The streaming fast path (gogpt/splice.py): chunk framing checked and passed on exactly,
however the upstream's bytes are split into reads; the connection pooled afterwards, and closed
when the upstream sends a byte nobody asked for."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import subprocess
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import SECRET_KEY, FakeUpstream
from serving import free_port, start_gogpt, wait_until_listening

from gogpt import Settings, chunked_coding, create_app, mint_token
from gogpt.chunked_coding import ChunkedFraming, MalformedChunk

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes, size_line: bytes = b"%x\r\n") -> bytes:
    return size_line % len(data) + data + b"\r\n"


# Chunks with an extension, upper-case hex, spaces, and data that looks like framing.
CHUNKS = (
    chunk(b'data: {"n":1}\n\n')
    + chunk(b"data: 0\r\n\r\n looks like the end\n\n", b"%X;name=value\r\n")
    + chunk(b"\r\n0\r\n")
    + chunk(b"data: [DONE]\n\n" * 20, b"%x  \r\n")
)
TERMINAL = b"0\r\nX-Trailer: yes\r\n\r\n"


def framed(reads: list[bytes]) -> tuple[bytes, bytes | None]:
    """Feed `reads` through one ChunkedFraming: (what may go on, what came from the terminal chunk on)."""
    framing, passed, terminal = ChunkedFraming(), b"", None
    for data in reads:
        if terminal is not None:
            terminal += data
            continue
        ready, terminal = framing.feed(data)
        passed += ready
    return passed, terminal


def test_chunks_pass_unchanged_wherever_the_reads_split_them():
    body = CHUNKS + TERMINAL
    for split in range(1, len(body)):
        assert framed([body[:split], body[split:]]) == (CHUNKS, TERMINAL), split


def test_chunks_pass_unchanged_arriving_a_byte_at_a_time():
    body = CHUNKS + TERMINAL
    assert framed([body[i : i + 1] for i in range(len(body))]) == (CHUNKS, TERMINAL)


def test_the_data_size_is_counted_without_framing():
    framing = ChunkedFraming()
    framing.feed(chunk(b"hello") + chunk(b"world!"))
    assert framing.data_bytes == 11


@pytest.mark.parametrize(
    "bad",
    [
        b"zz\r\nhello\r\n",  # not hex
        b"0x5\r\nhello\r\n",  # int() would take these
        b"+5\r\nhello\r\n",
        b"5\nhello\r\n",  # bare LF
        b"5\r\nhelloXY",  # no CRLF after the data
        b"5\r\nhello\n\n",
        b"1" * 5000,  # a size line that never ends
    ],
)
def test_bad_framing_is_refused(bad: bytes):
    with pytest.raises(MalformedChunk):
        framed([CHUNKS, bad, b"0\r\n\r\n"])


def test_bytes_between_a_chunks_data_and_its_crlf_are_refused_wherever_the_reads_split():
    """`helloXY` would reach the client if anything but CRLF were taken after the data."""
    body = b"5\r\nhelloXY\r\n0\r\n\r\n"
    for split in range(len(body) + 1):
        reads = [body[:split], body[split:]] if 0 < split < len(body) else [body]
        with pytest.raises(MalformedChunk):
            framed(reads)


def test_an_upstream_cannot_grow_the_table_of_checked_size_lines_without_bound():
    framing = ChunkedFraming()
    for size in range(1, 6000):  # a new size line for every chunk
        assert framing.feed(chunk(b"x" * size)) == (chunk(b"x" * size), None)
        assert framing.chunks == 1
    assert len(chunked_coding.CHECKED_SIZE_LINES) <= chunked_coding._MAX_CHECKED_SIZE_LINES


def test_nothing_after_the_last_good_chunk_is_passed_on():
    framing = ChunkedFraming()
    assert framing.feed(CHUNKS) == (CHUNKS, None)
    with pytest.raises(MalformedChunk):
        framing.feed(b"zz\r\n<injected>\r\n")


# -- through a real gogpt and real loopback sockets ----------------------------------------------


class RawUpstream:
    """A loopback HTTP/1.1 server that writes chunked answers in awkward pieces, keeping connections."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.connections = 0
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                self.requests += 1
                writer.write(HEAD)
                for piece in self.pieces:
                    writer.write(piece)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[tuple[RawUpstream, str]]:
    body = CHUNKS + TERMINAL
    fake = RawUpstream([body[:5], body[5:40], body[40:41], body[41:-7], body[-7:]])
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield fake, f"http://127.0.0.1:{port}"


def _dechunked(chunks: bytes) -> bytes:
    out, rest = b"", chunks
    while rest:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        out, rest = out + rest[:size], rest[size + 2 :]
    return out


async def test_streams_through_gogpt_arrive_exact_and_the_upstream_connection_is_reused(
    aiohttp_client, settings: Settings, raw_upstream, auth
):
    fake, url = raw_upstream
    client: TestClient = await aiohttp_client(create_app(settings.with_overrides(api_proxy=url)))
    for _ in range(3):
        resp = await client.post("/chat", json={"stream": True}, headers=auth)
        assert resp.status == 200
        assert await resp.read() == _dechunked(CHUNKS)
    assert fake.requests == 3
    assert fake.connections == 1  # the terminal chunk went back to aiohttp, which pooled it


async def test_an_http_1_0_client_gets_the_stream_whole_without_chunking(
    aiohttp_server, settings: Settings, upstream: FakeUpstream, auth
):
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(3):
            await response.write(b"data: %d\n\n" % n)
        return response

    upstream.respond = stream
    server = await aiohttp_server(create_app(settings))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"POST /chat HTTP/1.0\r\nHost: x\r\nAuthorization: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n{}" % auth["Authorization"].encode()
    )
    answer = await reader.read()  # HTTP/1.0: the body ends with the connection
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_a_slow_reader_gets_a_large_stream_intact(client: TestClient, upstream: FakeUpstream, auth):
    piece = bytes(range(256)) * 64  # 16 KiB
    sent = hashlib.sha256()

    async def large(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(512):  # 8 MiB, more than the socket buffers between here and the client
            chunk = piece[n % 256 :] + piece[: n % 256]
            sent.update(chunk)
            await response.write(chunk)
        return response

    upstream.respond = large
    resp = await client.post("/chat", json={"stream": True}, headers=auth)
    received = hashlib.sha256()
    async for data in resp.content.iter_chunked(1000):  # small reads: the client lags the upstream
        received.update(data)
        await asyncio.sleep(0)
    assert received.hexdigest() == sent.hexdigest()


async def test_a_steady_stream_outlasts_upstream_timeout_and_silence_still_cuts(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth
):
    """The splice keeps aiohttp's sock_read rule itself: silence is limited, not the stream's length."""
    client: TestClient = await aiohttp_client(create_app(settings.with_overrides(upstream_timeout=0.3)))
    ticks = 8
    go_silent = asyncio.Event()

    async def steady_then_silent(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(ticks):  # 8 x 0.1 s: longer than the 0.3 s timeout, never silent that long
            await response.write(b"data: %d\n\n" % n)
            await asyncio.sleep(0.1)
        if request.query.get("then") == "silence":
            await go_silent.wait()  # never set: the upstream says nothing more
        return response

    upstream.respond = steady_then_silent
    resp = await client.post("/v1/chat/completions", json={}, headers=auth)
    assert await resp.read() == b"".join(b"data: %d\n\n" % n for n in range(ticks))

    resp = await client.post("/v1/chat/completions?then=silence", json={}, headers=auth)
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


# -- over TLS, through a real `python -m gogpt` (uvloop, as users run it) --------------------------


@pytest.fixture
def certificate(tmp_path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1, made with Debian's openssl."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


async def test_streams_from_a_tls_upstream_arrive_exact_and_its_connection_is_reused(
    certificate: tuple[str, str], tmp_path
):
    cert, key = certificate
    events = [b"data: %d %s\n\n" % (n, b"x" * (n * 37 % 3000)) for n in range(200)]
    peers: set[object] = set()

    async def stream(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    upstream_port, port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port, ssl_context=context).start()
    env = {
        "SECRET_KEY": SECRET_KEY,
        "API_PROXY": f"https://127.0.0.1:{upstream_port}",
        "SSL_CERT_FILE": cert,  # OpenSSL's default trust store, for this process only
        "HOST": "127.0.0.1",
        "PORT": str(port),
    }
    gogpt = await start_gogpt(env, tmp_path)
    try:
        await wait_until_listening(port, gogpt)
        headers = {"Authorization": mint_token(SECRET_KEY, "tls", 1)}
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.post(f"http://127.0.0.1:{port}/chat", json={}, headers=headers) as resp:
                    assert resp.status == 200
                    assert await resp.read() == b"".join(events)
    finally:
        gogpt.terminate()
        await gogpt.communicate()
        await runner.cleanup()
    assert len(peers) == 1  # one TLS connection carried all three: given back and pooled each time
