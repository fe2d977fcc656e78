"""Upstream connections: bytes nobody asked for close them, odd heads never break an answer already
started, and a protocol switch is refused; through real loopback sockets, spliced or not."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient

from gogpt import Settings, create_app

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
STREAM = b'10\r\ndata: {"n": 1}\n\n\r\n10\r\ndata: {"n": 2}\n\n\r\n0\r\n\r\n'
EVENTS = b'data: {"n": 1}\n\ndata: {"n": 2}\n\n'
INJECTED = b'HTTP/1.1 200 OK\r\nContent-Length: 19\r\n\r\n{"who":"INJECTED1"}'
HONEST = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{"who":"honest"}'


class ScriptedUpstream:
    """A loopback HTTP/1.1 server that answers the n-th request with `answers[n]`, in one write.

    `closed_by_gateway` is set when gogpt closes a connection; `idle_extra` is written on a
    connection after its first answer, while it sits in gogpt's pool.
    """

    def __init__(self, answers: list[bytes], idle_extra: bytes = b"") -> None:
        self.answers = answers
        self.idle_extra = idle_extra
        self.connections = 0
        self.requests = 0
        self.closed_by_gateway = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                writer.write(self.answers[min(self.requests, len(self.answers) - 1)])
                self.requests += 1
                if self.idle_extra:
                    await writer.drain()
                    writer.write(self.idle_extra)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_gateway.set()
        finally:
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    fake = ScriptedUpstream([])
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    fake.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"  # type: ignore[attr-defined]
    async with server:
        yield fake


@pytest.fixture
async def gateway(aiohttp_client, settings: Settings, scripted: ScriptedUpstream) -> TestClient:
    return await aiohttp_client(create_app(settings.with_overrides(api_proxy=scripted.url)))  # type: ignore[attr-defined]


@pytest.mark.parametrize("first", [HEAD + STREAM, HONEST], ids=["chunked stream", "answer of known length"])
async def test_an_answer_planted_after_another_in_the_same_write_reaches_nobody(
    gateway: TestClient, scripted: ScriptedUpstream, auth, first: bytes, caplog
):
    scripted.answers = [first + INJECTED, HONEST]
    resp = await gateway.post("/v1/chat/completions", json={"stream": True}, headers=auth)
    assert resp.status == 200
    await resp.read()
    await asyncio.wait_for(scripted.closed_by_gateway.wait(), 5)  # gogpt closed the poisoned connection
    resp = await gateway.post("/v1/chat/completions", json={}, headers=auth)
    assert await resp.json() == {"who": "honest"}
    assert scripted.requests == 2  # the second request reached the upstream
    assert scripted.connections == 2
    assert "sent bytes after its answer" in caplog.text


async def test_bytes_arriving_on_an_idle_pooled_connection_close_it(
    gateway: TestClient, scripted: ScriptedUpstream, auth
):
    scripted.answers = [HONEST]
    scripted.idle_extra = INJECTED
    resp = await gateway.post("/v1/chat/completions", json={}, headers=auth)
    assert await resp.json() == {"who": "honest"}
    await asyncio.wait_for(scripted.closed_by_gateway.wait(), 5)
    scripted.idle_extra = b""
    resp = await gateway.post("/v1/chat/completions", json={}, headers=auth)
    assert await resp.json() == {"who": "honest"}
    assert scripted.connections == 2


async def test_a_single_stray_byte_after_a_stream_never_reaches_the_next_caller(
    gateway: TestClient, scripted: ScriptedUpstream, settings: Settings, auth
):
    scripted.answers = [HEAD + STREAM + b"H", HONEST]
    resp = await gateway.post("/v1/chat/completions", json={"stream": True}, headers=auth)
    assert await resp.read() == EVENTS
    if settings.splice:  # the splice sees where the message ends: the connection is closed at once
        await asyncio.wait_for(scripted.closed_by_gateway.wait(), 5)
    # (aiohttp's own parser keeps a partial head to itself, and drops it with the next request)
    resp = await gateway.post("/v1/chat/completions", json={}, headers=auth)
    assert await resp.json() == {"who": "honest"}
    assert scripted.requests == 2


async def test_streams_keep_their_pooled_connection_when_the_upstream_behaves(
    gateway: TestClient, scripted: ScriptedUpstream, auth
):
    scripted.answers = [HEAD + STREAM]
    for _ in range(3):
        resp = await gateway.post("/v1/chat/completions", json={"stream": True}, headers=auth)
        assert await resp.read() == EVENTS
    assert scripted.connections == 1


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding:\r\n chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\n",
    ],
    ids=["bare LF before the coding", "folded coding", "bare LF ending the head"],
)
async def test_an_odd_head_gives_the_stream_or_a_clean_502_never_a_second_head(
    gateway: TestClient, scripted: ScriptedUpstream, auth, head: bytes, caplog
):
    caplog.set_level(logging.INFO)
    scripted.answers = [head + STREAM]
    resp = await gateway.post("/v1/chat/completions", json={"stream": True}, headers=auth)
    body = await resp.read()
    if resp.status == 200:
        assert body == EVENTS
    else:
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "upstream_error"
    assert b"HTTP/1.1" not in body
    assert "Traceback" not in caplog.text


async def test_an_upstream_switching_protocols_is_answered_502(
    gateway: TestClient, scripted: ScriptedUpstream, auth
):
    scripted.answers = [
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n" + STREAM
    ]
    resp = await gateway.post("/v1/chat/completions", json={}, headers=auth)
    assert resp.status == 502
    assert "Upgrade" not in resp.headers
    assert (await resp.json())["error"]["code"] == "upstream_error"
