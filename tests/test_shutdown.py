"""SIGTERM/SIGINT on a real `python -m gogpt`: stop accepting, let streams finish, exit 0."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import SECRET_KEY, FakeUpstream
from serving import free_port, start_gogpt, wait_until_listening

from gogpt import mint_token


def gated_stream(gate: asyncio.Event, started: asyncio.Event):
    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        started.set()
        await gate.wait()
        await response.write(b"data: last\n\ndata: [DONE]\n\n")
        return response

    return respond


async def _refusing(port: int) -> None:
    """Return once the port refuses new connections."""
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.02)  # polling a socket's state: there is no event to await


async def _start(
    tmp_path: Path, upstream: FakeUpstream, grace: float
) -> tuple[asyncio.subprocess.Process, int]:
    port = free_port()
    env = {
        "SECRET_KEY": SECRET_KEY,
        "API_PROXY": upstream.url,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "SHUTDOWN_GRACE": str(grace),
    }
    process = await start_gogpt(env, tmp_path)
    await wait_until_listening(port, process)
    return process, port


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_running_stream_finishes_after_the_stop_signal_and_gogpt_exits_0(
    tmp_path: Path, upstream: FakeUpstream, signum: int
):
    gate, started = asyncio.Event(), asyncio.Event()
    upstream.respond = gated_stream(gate, started)
    process, port = await _start(tmp_path, upstream, grace=20)
    headers = {"Authorization": mint_token(SECRET_KEY, "u", 1)}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/chat", json={}, headers=headers) as resp,
    ):
        assert await resp.content.readline() == b"data: first\n"
        process.send_signal(signum)
        await asyncio.wait_for(_refusing(port), 10)  # no new connections once stopping
        gate.set()
        rest = await asyncio.wait_for(resp.read(), 10)
    assert rest == b"\ndata: last\n\ndata: [DONE]\n\n"
    await asyncio.wait_for(process.wait(), 20)
    assert process.returncode == 0


async def test_streams_still_running_after_the_grace_period_are_closed(
    tmp_path: Path, upstream: FakeUpstream
):
    gate, started = asyncio.Event(), asyncio.Event()
    upstream.respond = gated_stream(gate, started)
    process, port = await _start(tmp_path, upstream, grace=0.5)
    headers = {"Authorization": mint_token(SECRET_KEY, "u", 1)}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/chat", json={}, headers=headers) as resp,
    ):
        await resp.content.readline()
        process.send_signal(signal.SIGTERM)
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), 10)  # cut, never a clean end
    await asyncio.wait_for(process.wait(), 10)
    assert process.returncode == 0
    await asyncio.wait_for(upstream.disconnected.wait(), 5)  # and the upstream was closed too
    gate.set()
