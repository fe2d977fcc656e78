"""Faults and limits: upstream failures, mass hang-ups and oversized or broken uploads.

None of them leaves a stream, lock, task, socket or object behind, and none reaches the upstream
as a whole request when the client's side was at fault.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import os
import signal
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from backend_api import POST, Backend, message
from conftest import SECRET_KEY, FakeUpstream
from serving import free_port, start_gogpt, wait_until_listening

from gogpt import Settings, create_app
from gogpt.keys import STORE

STREAMS = 200
Fault = Callable[[web.Request], Awaitable[web.StreamResponse]]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def live_objects() -> int:
    """Requests and responses alive on either side of gogpt: what a leaked stream would keep."""
    gc.collect()
    kinds = (web.BaseRequest, web.StreamResponse, aiohttp.ClientResponse)
    return sum(isinstance(obj, kinds) for obj in gc.get_objects())


async def settle(condition: Callable[[], bool], within: float = 10) -> None:
    """Wait until `condition()` holds: sockets close on the loop's schedule, not on an event we hold."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - fd counts and task sets have no event to await
            await asyncio.sleep(0.02)


class HeldStreams:
    """Wraps an upstream answer: counts the streams opened and those closed before they ended."""

    def __init__(self, expected: int, respond: Fault | None = None) -> None:
        self.opened = 0
        self.closed = 0
        self.all_open = asyncio.Event()
        self.all_closed = asyncio.Event()
        self.expected = expected
        self.inner = respond or self.first_event_then_silence

    async def first_event_then_silence(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        self.opened += 1
        if self.opened == self.expected:
            self.all_open.set()
        await asyncio.Event().wait()  # a model that never finishes
        return response

    async def respond(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self.inner(request)
        finally:
            self.closed += 1
            if self.closed == self.expected:
                self.all_closed.set()


# ---- hang-ups --------------------------------------------------------------------------------


async def test_hundreds_of_hang_ups_close_every_upstream_stream_and_free_sockets_and_memory(
    client: TestClient, upstream: FakeUpstream, auth
):
    held = HeldStreams(STREAMS)
    upstream.respond = held.respond
    await client.post("/chat", json={}, headers=auth)  # warm up: pools and lazy imports
    held.opened = held.closed = 0
    held.all_open.clear()
    tasks, fds, objects = len(asyncio.all_tasks()), open_fds(), live_objects()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        opened = await asyncio.gather(
            *(session.post(client.make_url("/chat"), json={}, headers=auth) for _ in range(STREAMS))
        )
        await asyncio.wait_for(held.all_open.wait(), 30)
        for resp in opened:
            assert await resp.content.readline() == b"data: first\n"
        gc.disable()  # so only gogpt's own closing, not the collector, can end the upstream streams
        try:
            for resp in opened:
                resp.close()  # every client hangs up at once
            await asyncio.wait_for(held.all_closed.wait(), 5)
        finally:
            gc.enable()
        del opened, resp
    await settle(lambda: open_fds() <= fds + 2 and len(asyncio.all_tasks()) <= tasks)
    assert live_objects() <= objects


async def test_hundreds_of_hang_ups_free_every_conv_session_and_close_every_upstream(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth
):
    backend = Backend()
    backend.gate.clear()  # replies stay open until the clients leave
    held = HeldStreams(100, backend.respond)
    upstream.respond = held.respond
    app = create_app(settings.with_overrides(multi=True))
    client = await aiohttp_client(app)
    store = app[STORE]
    ids = [f"conv-{n}" for n in range(100)]
    fds = open_fds()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        opened = await asyncio.gather(
            *(
                session.post(
                    client.make_url("/conv"),
                    json=message(conversation_id=i, parent_message_id="p"),
                    headers={**auth, **POST},
                )
                for i in ids
            )
        )
        for resp in opened:
            assert resp.status == 200
            await resp.content.readline()
        assert all([await store.is_held(f"conv:session:{i}") for i in ids])
        for resp in opened:
            resp.close()
        await asyncio.wait_for(held.all_closed.wait(), 10)  # every upstream reply was closed
        async with asyncio.timeout(10):
            while any([await store.is_held(f"conv:session:{i}") for i in ids]):  # noqa: ASYNC110 - freed by cancelled handlers
                await asyncio.sleep(0.02)
        del opened, resp
    await settle(lambda: open_fds() <= fds + 2)


async def test_hang_ups_on_a_real_gogpt_close_every_upstream_and_return_its_fds(
    tmp_path: Path, upstream: FakeUpstream, token: str
):
    held = HeldStreams(100)
    upstream.respond = held.respond
    port = free_port()
    env = {"SECRET_KEY": SECRET_KEY, "API_PROXY": upstream.url, "HOST": "127.0.0.1", "PORT": str(port)}
    process = await start_gogpt(env, tmp_path)
    try:
        await wait_until_listening(port, process)
        url, headers = f"http://127.0.0.1:{port}/chat", {"Authorization": token}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async with session.post(url, json={}, headers=headers) as resp:  # warm up the pools
                await resp.content.readline()
            await settle(lambda: held.closed == 1)
            # the usage of that call opens the GOGPT_DB file within a second: open it now instead
            async with session.get(
                f"http://127.0.0.1:{port}/usage", headers={"Authorization": SECRET_KEY}
            ) as resp:
                assert resp.status == 200
            held.opened = held.closed = 0
            fds = len(os.listdir(f"/proc/{process.pid}/fd"))
            opened = await asyncio.gather(*(session.post(url, json={}, headers=headers) for _ in range(100)))
            await asyncio.wait_for(held.all_open.wait(), 30)
            for resp in opened:
                resp.close()
            # closed only when gogpt cancels its relays on hang-up (handler_cancellation): the
            # upstream is silent, so no failed write would ever tell the relay the client left
            await asyncio.wait_for(held.all_closed.wait(), 10)
        await settle(lambda: len(os.listdir(f"/proc/{process.pid}/fd")) <= fds + 2)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0


# ---- upstream faults -------------------------------------------------------------------------


async def _silent_before_answering(request: web.Request) -> web.StreamResponse:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def _closes_before_answering(request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.close()
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def _answers_garbage(request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.write(b"THIS IS NOT HTTP\r\n\r\n")
    request.transport.close()
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def _answer_cut_short(status: int) -> Fault:
    """An answer of known length (1000 bytes), cut after its first few."""

    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b'{"error": ' if status >= 400 else b'{"choices": ')
        assert request.transport is not None
        request.transport.close()
        return response

    return respond


async def _silent_mid_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: partial\n\n")
    await asyncio.Event().wait()
    return response


async def _cut_mid_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b"data: partial\n\n")
    assert request.transport is not None
    request.transport.close()
    return response


FAULTS = {
    "slow first byte": (_silent_before_answering, 504),
    "closed before answering": (_closes_before_answering, 502),
    "garbage instead of HTTP": (_answers_garbage, 502),
    "error answer cut short": (_answer_cut_short(500), 502),
    "silence mid-stream": (_silent_mid_stream, "cut"),
    "abrupt close mid-stream": (_cut_mid_stream, "cut"),
    "refused connection": (None, 502),
}
# A short non-streamed answer is read whole first on /chat (one write), so a cut is a clean 502;
# /conv watches every chunk it relays, so the client sees the cut.
CHAT_FAULTS = {**FAULTS, "completion cut short": (_answer_cut_short(200), 502)}
CONV_FAULTS = {**FAULTS, "completion cut short": (_answer_cut_short(200), "cut")}


async def _expect(resp: aiohttp.ClientResponse, outcome: int | str) -> None:
    if outcome == "cut":  # the headers went out; only a cut connection can say the answer is partial
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    else:
        assert resp.status == outcome
        error = (await resp.json())["error"]
        assert error["code"] in ("upstream_timeout", "upstream_unreachable", "upstream_error")


def _upstream_with(upstream: FakeUpstream, fault: Fault | None) -> str:
    """The upstream's URL with `fault` as its answer, or a port nothing listens on for None."""
    if fault is None:
        return f"127.0.0.1:{free_port()}"
    upstream.respond = fault
    return upstream.url


@pytest.mark.parametrize(("fault", "outcome"), CHAT_FAULTS.values(), ids=CHAT_FAULTS.keys())
async def test_upstream_faults_on_chat_leave_no_task_or_socket_behind(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth, fault: Fault | None, outcome: int | str
):
    proxy = _upstream_with(upstream, fault)
    client = await aiohttp_client(create_app(settings.with_overrides(api_proxy=proxy, upstream_timeout=0.3)))
    await _expect(await client.post("/chat", json={}, headers=auth), outcome)  # warm up: pools, lazy imports
    tasks, fds = len(asyncio.all_tasks()), open_fds()
    for _ in range(5):
        await _expect(await client.post("/chat", json={}, headers=auth), outcome)
    await settle(lambda: len(asyncio.all_tasks()) <= tasks and open_fds() <= fds + 2)


@pytest.mark.parametrize(("fault", "outcome"), CONV_FAULTS.values(), ids=CONV_FAULTS.keys())
async def test_upstream_faults_on_conv_free_the_session(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth, fault: Fault | None, outcome: int | str
):
    proxy = _upstream_with(upstream, fault)
    app = create_app(settings.with_overrides(unofficial_proxy=proxy + "/backend-api", upstream_timeout=0.3))
    client = await aiohttp_client(app)
    await _expect(await client.post("/conv", json=message(), headers={**auth, **POST}), outcome)  # warm up
    tasks, fds = len(asyncio.all_tasks()), open_fds()
    for _ in range(3):  # single mode: a lease left behind would make the next one 409
        await _expect(await client.post("/conv", json=message(), headers={**auth, **POST}), outcome)
    assert not await app[STORE].is_held("conv:session:account")
    await settle(lambda: len(asyncio.all_tasks()) <= tasks and open_fds() <= fds + 2)


# ---- limits and broken uploads ---------------------------------------------------------------

LIMIT = 1 << 20
ROUTES = {
    "/chat": {},
    "/conv": POST,
    "/v1/files": {},
    "/token": {"Content-Type": "application/x-www-form-urlencoded"},
}


@pytest.fixture
async def limited(aiohttp_client, settings: Settings) -> TestClient:
    return await aiohttp_client(create_app(settings.with_overrides(max_body_bytes=LIMIT)))


async def _over_the_limit() -> AsyncIterator[bytes]:
    """No Content-Length: the limit must hold while the body streams in."""
    for _ in range(LIMIT // 65536 + 2):
        yield b"x" * 65536


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("declared", [True, False], ids=["Content-Length", "chunked"])
async def test_a_body_over_the_limit_is_413_in_the_openai_shape_and_nothing_reaches_the_upstream(
    limited: TestClient, upstream: FakeUpstream, auth, path: str, declared: bool
):
    data = b"x" * (LIMIT + 1) if declared else _over_the_limit()
    resp = await limited.post(path, data=data, headers={**auth, **ROUTES[path]})
    assert resp.status == 413
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert upstream.requests == []


@pytest.mark.parametrize("path", ["/chat", "/conv", "/v1/files", "/token"])
async def test_a_compressed_body_that_expands_past_the_limit_is_413(
    limited: TestClient, upstream: FakeUpstream, auth, path: str
):
    bomb = gzip.compress(b"{" + b" " * (64 * LIMIT) + b"}", compresslevel=9)  # 64 MiB in ~64 KiB
    assert len(bomb) < LIMIT
    headers = {**auth, **ROUTES[path], "Content-Type": "application/json", "Content-Encoding": "gzip"}
    resp = await limited.post(path, data=bomb, headers=headers)
    assert resp.status == 413
    assert upstream.requests == []


@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions", "/v1/files"])
async def test_a_small_compressed_body_that_decodes_past_a_low_limit_is_413(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth, path: str
):
    client = await aiohttp_client(create_app(settings.with_overrides(max_body_bytes=4096)))
    body = gzip.compress(
        b'{"model": "gpt-4o", "input": "' + b"x" * 8192 + b'"}'
    )  # arrives whole with its head
    assert len(body) < 4096
    headers = {**auth, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    resp = await client.post(path, data=body, headers=headers)
    assert resp.status == 413
    assert upstream.requests == []


@pytest.mark.parametrize("size", [100, 3 << 20], ids=["read whole", "streamed"])
async def test_a_compressed_upload_reaches_the_upstream_decoded_and_labelled_so(
    client: TestClient, upstream: FakeUpstream, auth, size: int
):
    body = b"0123456789abcdef" * (size // 16)
    resp = await client.post(
        "/v1/files", data=gzip.compress(body), headers={**auth, "Content-Encoding": "gzip"}
    )
    assert resp.status == 200
    assert upstream.last.body == body
    assert "Content-Encoding" not in upstream.last.headers


@pytest.mark.parametrize("path", ["/chat", "/conv", "/v1/files", "/token"])
async def test_a_compressed_body_that_does_not_decode_is_400(
    client: TestClient, upstream: FakeUpstream, auth, path: str
):
    headers = {**auth, **ROUTES[path], "Content-Type": "application/json", "Content-Encoding": "gzip"}
    resp = await client.post(path, data=b"this is not gzip" * 100, headers=headers)
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []


async def test_a_chunked_upload_broken_mid_stream_is_400_and_never_completes_upstream(
    client: TestClient, upstream: FakeUpstream, token: str
):
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    writer.write(head.encode() + b"10000\r\n" + b"x" * 65536 + b"\r\n")
    await writer.drain()
    writer.write(b"zz-not-a-chunk-size\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    assert answer.split(b" ", 2)[1] == b"400"
    assert b"upstream" not in answer.partition(b"\r\n\r\n")[2]  # the client's fault, not the upstream's
    assert upstream.requests == []


async def test_an_upstream_error_answer_is_relayed_decoded_whatever_its_deflate_framing(
    client: TestClient, upstream: FakeUpstream, auth
):
    text = b'{"error": {"message": "bad model"}}'
    raw = zlib.compressobj(wbits=-15)

    async def deflated(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=400, body=raw.compress(text) + raw.flush(), headers={"Content-Encoding": "deflate"}
        )

    upstream.respond = deflated
    resp = await client.post("/chat", json={}, headers={**auth, "Accept-Encoding": "deflate"})
    assert resp.status == 400
    assert "Content-Encoding" not in resp.headers
    assert await resp.read() == text


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_an_upstream_trickling_its_head_is_cut_at_upstream_timeout(
    aiohttp_client, settings, auth, stream
):
    """One byte of the head every 0.2 s never leaves UPSTREAM_TIMEOUT (1 s) of silence, yet the
    head as a whole must come within it: the call is answered 504 and the connection closed."""
    closed = asyncio.Event()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + b"X-Pad: " + b"x" * 200 + b"\r\n\r\n"
        )
        try:
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.2)
        except ConnectionError:
            pass
        finally:
            closed.set()
            writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    app = create_app(settings.with_overrides(api_proxy=f"http://127.0.0.1:{port}", upstream_timeout=1))
    client = await aiohttp_client(app)
    async with server:
        resp = await client.post("/v1/chat/completions", json={"model": "m", "stream": stream}, headers=auth)
        assert resp.status == 504
        assert (await resp.json())["error"]["code"] == "upstream_timeout"
        await asyncio.wait_for(closed.wait(), 5)  # gogpt closed it, long before the head's 41 s
