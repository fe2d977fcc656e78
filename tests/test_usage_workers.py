"""A real `python -m gogpt --workers 2`: the usage of both workers adds up in the shared store (the
default GOGPT_DB file, or Redis), none of it is lost on SIGTERM (not even a stream's that ends
during the grace), and it outlives a restart."""

from __future__ import annotations

import asyncio
import signal

from conftest import ADMIN, FakeUpstream
from fake_chat import CHAT, OpenAIChat, chat_stream, row
from gateways import Starter
from serving import new_connections, refusing


async def test_usage_adds_up_over_two_workers_is_written_on_sigterm_and_survives_a_restart(
    start: Starter, shared_store: dict[str, str], upstream: FakeUpstream, auth
):
    fake = OpenAIChat()
    upstream.respond = fake
    last_write = len(chat_stream(with_usage=True)) - 1
    fake.gates = {last_write: asyncio.Event()}  # the stream's [DONE] waits until gogpt is stopping
    gateway = await start(**shared_store)
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

    gateway = await start(**shared_store)
    async with new_connections() as session, session.get(f"{gateway.url}/usage", headers=ADMIN) as resp:
        rows = (await resp.json())["usage"]
    assert rows == [row(requests=13, prompt=13 * 9, completion=13 * 3)]
    assert await gateway.stop() == 0
