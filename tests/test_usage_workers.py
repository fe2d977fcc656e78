"""A real `python -m gogpt --workers 2`: the usage of both workers adds up in the shared store, none of
it is lost on SIGTERM (not even a stream's that ends during the grace), and it outlives a restart."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from conftest import SECRET_KEY, FakeUpstream, RedisServer
from serving import free_port, start_gogpt
from test_usage import ADMIN, CHAT, OpenAIChat, chat_stream, row

Process = asyncio.subprocess.Process
Starter = Callable[..., Awaitable[tuple[Process, str]]]


async def wait_for_workers(process: Process, workers: int) -> None:
    """Until each worker has logged that it serves (so the kernel may send connections to any)."""
    assert process.stderr is not None
    serving = 0
    async with asyncio.timeout(30):
        while serving < workers:
            line = await process.stderr.readline()
            assert line, "gogpt exited"
            serving += b"serving on" in line


async def stopped(process: Process) -> int:
    """Its exit status, once the SIGTERM it was sent has stopped it."""
    assert process.stderr is not None
    async with asyncio.timeout(30):
        log = await process.stderr.read()  # to the end, so the pipe never fills
        code = await process.wait()
    assert code == 0, log.decode()
    return code


@pytest.fixture
async def start(tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> AsyncIterator[Starter]:
    """`await start()`: gogpt with two workers on a free port, state in the test's Redis."""
    started: list[Process] = []

    async def start_gateway() -> tuple[Process, str]:
        port = free_port()
        env = {
            "SECRET_KEY": SECRET_KEY,
            "API_PROXY": upstream.url,
            "REDIS_URL": redis_server.url,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WORKERS": "2",
        }
        process = await start_gogpt(env, tmp_path)
        started.append(process)
        await wait_for_workers(process, 2)
        return process, f"http://127.0.0.1:{port}"

    yield start_gateway
    for process in started:  # one a failed test left running: its workers first, or they outlive it
        if process.returncode is None:
            for pid in worker_pids(process.pid):
                os.kill(pid, signal.SIGKILL)
            process.kill()
            await process.wait()


def worker_pids(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def new_connections() -> aiohttp.ClientSession:
    """A client that opens a connection per request, so the kernel spreads them over the workers."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def test_usage_adds_up_over_two_workers_is_flushed_on_sigterm_and_survives_a_restart(
    start: Starter, upstream: FakeUpstream, auth
):
    fake = OpenAIChat()
    upstream.respond = fake
    last_write = len(chat_stream(with_usage=True)) - 1
    fake.gates = {last_write: asyncio.Event()}  # the stream's [DONE] waits until gogpt is stopping
    process, url = await start()
    async with new_connections() as session:
        for _ in range(12):
            async with session.post(f"{url}/chat", json=CHAT, headers=auth) as resp:
                assert resp.status == 200
        async with session.post(f"{url}/chat", json={**CHAT, "stream": True}, headers=auth) as streaming:
            assert await streaming.content.readline()  # the stream has started
            process.send_signal(signal.SIGTERM)
            fake.gates[last_write].set()
            await streaming.read()
    assert await stopped(process) == 0

    process, url = await start()
    async with new_connections() as session, session.get(f"{url}/usage", headers=ADMIN) as resp:
        rows = (await resp.json())["usage"]
    assert rows == [row(requests=13, prompt=13 * 9, completion=13 * 3)]
    process.send_signal(signal.SIGTERM)
    assert await stopped(process) == 0
