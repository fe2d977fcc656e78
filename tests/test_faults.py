"""Faults at scale: mass hang-ups and upstream failures leave no stream, lock, task or socket behind."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import FakeUpstream
from serving import free_port
from test_conv import POST, Backend, message

from gogpt import Settings, create_app
from gogpt.keys import STORE

STREAMS = 200


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settle(condition, within: float = 10) -> None:
    """Wait until `condition()` holds: sockets close on the loop's schedule, not on an event we hold."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - fd counts and task sets have no event to await
            await asyncio.sleep(0.02)


class HeldStreams:
    """An upstream that sends one event per stream, then holds it open; counts the closed ones."""

    def __init__(self, expected: int) -> None:
        self.opened = 0
        self.closed = 0
        self.all_open = asyncio.Event()
        self.all_closed = asyncio.Event()
        self.expected = expected

    async def respond(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        self.opened += 1
        if self.opened == self.expected:
            self.all_open.set()
        try:
            await asyncio.Event().wait()  # a model that never finishes
        finally:
            self.closed += 1
            if self.closed == self.expected:
                self.all_closed.set()
        return response


async def test_hundreds_of_hang_ups_close_every_upstream_stream_and_free_their_sockets(
    client: TestClient, upstream: FakeUpstream, auth
):
    held = HeldStreams(STREAMS)
    upstream.respond = held.respond
    baseline = open_fds()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        responses = [session.post(client.make_url("/chat"), json={}, headers=auth) for _ in range(STREAMS)]
        opened = await asyncio.gather(*responses)
        await asyncio.wait_for(held.all_open.wait(), 30)
        for resp in opened:
            await resp.content.readline()
        for resp in opened:
            resp.close()  # every client hangs up at once
        await asyncio.wait_for(held.all_closed.wait(), 10)
    await settle(lambda: open_fds() <= baseline + 5)


async def test_hundreds_of_hang_ups_free_every_conv_session(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth
):
    backend = Backend()
    backend.gate.clear()
    upstream.respond = backend.respond
    app = create_app(settings.with_overrides(multi=True))
    client = await aiohttp_client(app)
    ids = [f"conv-{n}" for n in range(100)]
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
        store = app[STORE]
        assert all([await store.is_held(f"conv:session:{i}") for i in ids])
        for resp in opened:
            resp.close()
        await settle(lambda: len(upstream.requests) == 100)
        async with asyncio.timeout(10):
            while any([await store.is_held(f"conv:session:{i}") for i in ids]):  # noqa: ASYNC110 - freed by cancelled handlers
                await asyncio.sleep(0.02)
    backend.gate.set()


async def _silent_before_answering(request: web.Request) -> web.StreamResponse:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


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


@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        (_silent_before_answering, 504),
        (_silent_mid_stream, "cut"),
        (_cut_mid_stream, "cut"),
        (None, 502),  # connection refused
    ],
    ids=["slow first byte", "silence mid-stream", "abrupt close mid-stream", "refused connection"],
)
async def test_upstream_faults_leave_no_task_or_socket_behind(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth, fault, outcome
):
    proxy = upstream.url if fault else f"127.0.0.1:{free_port()}"
    if fault:
        upstream.respond = fault
    client = await aiohttp_client(create_app(settings.with_overrides(api_proxy=proxy, upstream_timeout=0.3)))
    await client.post("/chat", json={}, headers=auth)  # warm up: connection pools, lazy imports
    tasks, fds = len(asyncio.all_tasks()), open_fds()
    for _ in range(5):
        resp = await client.post("/chat", json={}, headers=auth)
        if outcome == "cut":
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        else:
            assert resp.status == outcome
    await settle(lambda: len(asyncio.all_tasks()) <= tasks and open_fds() <= fds + 2)


async def test_a_chunked_upload_over_the_limit_is_413_and_never_completes_upstream(
    aiohttp_client, settings: Settings, upstream: FakeUpstream, auth
):
    client = await aiohttp_client(create_app(settings.with_overrides(max_body_bytes=2 << 20)))

    async def three_mebibytes():  # no Content-Length: the limit must hold while streaming
        for _ in range(48):
            yield b"x" * 65536

    resp = await client.post("/v1/files", data=three_mebibytes(), headers=auth)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "request_too_large"
    assert upstream.requests == []  # the upstream never got a whole request
