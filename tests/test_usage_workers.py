"""A real `python -m gogpt --workers 2`: the usage of both workers adds up in the shared store (the
default GOGPT_DB file, or Redis), none of it is lost on SIGTERM (not even a stream's that ends
during the grace), and it outlives a restart."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from conftest import ADMIN, SECRET_KEY, FakeUpstream, RedisServer
from serving import Gateway, new_connections, refusing
from test_usage import CHAT, OpenAIChat, chat_stream, row

Starter = Callable[[], Awaitable[Gateway]]


@pytest.fixture(params=["sqlite", "redis"])
async def start(
    request, tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer
) -> AsyncIterator[Starter]:
    """`await start()`: gogpt with two workers, its state in tmp_path/gogpt.db or in the test's Redis."""
    started: list[Gateway] = []
    shared = {"REDIS_URL": redis_server.url} if request.param == "redis" else {}

    async def start_gateway() -> Gateway:
        env = {"SECRET_KEY": SECRET_KEY, "API_PROXY": upstream.url, **shared}
        gateway = await Gateway.start(env, tmp_path, workers=2)
        started.append(gateway)
        return gateway

    yield start_gateway
    for gateway in started:
        if gateway.process.returncode is None:  # a failed test's: its workers would outlive it
            for pid in gateway.worker_pids():
                os.kill(pid, signal.SIGKILL)
        await gateway.stop()


async def test_usage_adds_up_over_two_workers_is_written_on_sigterm_and_survives_a_restart(
    start: Starter, upstream: FakeUpstream, auth
):
    fake = OpenAIChat()
    upstream.respond = fake
    last_write = len(chat_stream(with_usage=True)) - 1
    fake.gates = {last_write: asyncio.Event()}  # the stream's [DONE] waits until gogpt is stopping
    gateway = await start()
    async with new_connections() as session:
        for _ in range(12):
            async with session.post(f"{gateway.url}/chat", json=CHAT, headers=auth) as resp:
                assert resp.status == 200
        async with session.post(
            f"{gateway.url}/chat", json={**CHAT, "stream": True}, headers=auth
        ) as streaming:
            assert await streaming.content.readline()  # the stream has started
            gateway.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(refusing(gateway.port), 10)  # the workers are stopping: the grace
            fake.gates[last_write].set()
            await streaming.read()
    assert await asyncio.wait_for(gateway.process.wait(), 30) == 0, "".join(gateway.log)

    gateway = await start()
    async with new_connections() as session, session.get(f"{gateway.url}/usage", headers=ADMIN) as resp:
        rows = (await resp.json())["usage"]
    assert rows == [row(requests=13, prompt=13 * 9, completion=13 * 3)]
    assert await gateway.stop() == 0
