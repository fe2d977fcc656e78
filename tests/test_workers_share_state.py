"""A real `python -m gogpt --workers 2` keeps one machine's state in its GOGPT_DB file: a limit, a
/conv lease and the first-list rule hold for the machine, and the state outlives a restart."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

from backend_api import LIST, POST, Backend, message
from conftest import FakeUpstream
from gateways import Starter, serving_worker
from serving import new_connections


async def test_a_rate_limit_of_3_lets_exactly_3_of_12_requests_through_on_2_workers(start: Starter, auth):
    gateway = await start(RATE_LIMIT="3")
    async with new_connections() as session:
        statuses = []
        for _ in range(12):
            async with session.post(f"{gateway.url}/chat", json={}, headers=auth) as resp:
                statuses.append(resp.status)
    assert sorted(statuses) == [200] * 3 + [429] * 9


async def test_a_conv_reply_on_one_worker_answers_409_on_the_other(start: Starter, backend: Backend, auth):
    gateway = await start()
    backend.gate.clear()
    url = f"{gateway.url}/conv"
    statuses = []
    async with (
        new_connections() as session,
        session.post(url, json=message(), headers={**auth, **POST}) as streaming,
    ):
        await backend.started.wait()
        for _ in range(8):
            async with session.post(url, json=message(), headers={**auth, **POST}) as other:
                statuses.append(other.status)
        backend.gate.set()
        await streaming.read()
    assert statuses == [409] * 8


async def test_the_first_list_after_start_up_is_empty_once_for_all_workers(
    start: Starter, backend: Backend, auth
):
    gateway = await start()
    async with new_connections() as session:
        totals = []
        for _ in range(8):
            async with session.get(f"{gateway.url}/conv", headers={**auth, **LIST}) as resp:
                totals.append((await resp.json())["total"])
    assert totals == [0] + [7] * 7


async def test_a_lease_left_by_a_killed_worker_holds_until_its_ttl_then_frees(
    start: Starter, backend: Backend, auth, tmp_path: Path
):
    gateway = await start()
    backend.gate.clear()
    session = new_connections()
    streaming = await session.post(f"{gateway.url}/conv", json=message(), headers={**auth, **POST})
    await backend.started.wait()
    assert streaming.connection is not None and streaming.connection.transport is not None
    holder = serving_worker(gateway, streaming.connection.transport.get_extra_info("sockname")[1])
    os.kill(holder, signal.SIGKILL)
    await gateway.wait_for_log("serving on", 3)  # its replacement listens
    streaming.close()
    await session.close()

    async with new_connections() as session:
        for _ in range(4):  # both workers, the survivor and the new one, see the dead worker's lease
            async with session.post(f"{gateway.url}/conv", json=message(), headers={**auth, **POST}) as resp:
                assert resp.status == 409
        with sqlite3.connect(tmp_path / "gogpt.db") as db:
            [(expires,)] = db.execute("SELECT expires FROM leases WHERE key = 'conv:session:account'")
            assert time.time() < expires <= time.time() + 30  # no more than its TTL left
            db.execute("UPDATE leases SET expires = ? WHERE key = 'conv:session:account'", (time.time(),))
        backend.gate.set()
        async with session.post(f"{gateway.url}/conv", json=message(), headers={**auth, **POST}) as resp:
            assert resp.status == 200  # the TTL has passed: any worker takes the session
            await resp.read()


async def test_a_worker_killed_right_after_it_started_is_started_again(start: Starter):
    """A worker that exits by itself within seconds of starting (a port taken, a bad setting) stops
    gogpt, as another start would fail the same way; one killed by a signal is no such sign. The
    supervisor used to stop every worker when a fresh one was killed (by the OOM killer, say)."""
    gateway = await start()
    for restarts in (1, 2):  # the second kill is of a replacement, fresh from its start
        os.kill(gateway.worker_pids()[0], signal.SIGKILL)
        await gateway.wait_for_log("starting a new one", restarts)
        await gateway.wait_for_log("serving on", 2 + restarts)
    async with new_connections() as session:
        for _ in range(4):
            async with session.get(f"{gateway.url}/healthz") as resp:
                assert resp.status == 200
    assert gateway.process.returncode is None


async def test_cached_state_is_kept_across_a_restart(
    start: Starter, backend: Backend, upstream: FakeUpstream, auth
):
    answers = []
    for _ in range(2):
        gateway = await start(workers=1)
        async with new_connections() as session:
            chat_type = {"Chat-Type": "conversation/conv-3"}
            async with session.get(f"{gateway.url}/conv", headers={**auth, **chat_type}) as resp:
                answers.append(await resp.json())
        assert await gateway.stop() == 0
    assert (
        answers[0]
        == answers[1]
        == {"current_node": "node-1", "title": "Greeting", "update_time": 1700000000.5}
    )
    assert [request.path for request in upstream.requests] == ["/backend-api/conversation/conv-3"]


async def test_the_first_list_after_a_restart_is_empty_again(start: Starter, backend: Backend, auth):
    totals = []
    for _ in range(2):
        gateway = await start(workers=1)
        async with new_connections() as session:
            for _ in range(2):
                async with session.get(f"{gateway.url}/conv", headers={**auth, **LIST}) as resp:
                    totals.append((await resp.json())["total"])
        assert await gateway.stop() == 0
    assert totals == [0, 7, 0, 7]
