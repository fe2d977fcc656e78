"""A real `python -m gogpt` starting and stopping: a setting it cannot use stops it in one line;
SIGTERM/SIGINT stop accepting, let streams finish, and exit 0."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import SECRET_KEY, FakeUpstream
from serving import free_port, refusing, start_gogpt, wait_until_listening

from gogpt import mint_token
from gogpt.ledger import UsageLedger
from gogpt.memory_store import MemoryStore
from gogpt.revocation import Revocations
from gogpt.store import StoreUnavailable, UsageRow

TAIL_EVENTS = 10


def gated_stream(gate: asyncio.Event, started: asyncio.Event, tail: int = TAIL_EVENTS):
    async def respond(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        started.set()
        await gate.wait()
        for n in range(tail):  # a model still writing, an event every 0.1 s: it outlasts a short grace
            await asyncio.sleep(0.1)
            await response.write(b"data: %d\n\n" % n)
        await response.write(b"data: [DONE]\n\n")
        return response

    return respond


Process = asyncio.subprocess.Process
Starter = Callable[..., Awaitable[tuple[Process, int]]]


@pytest.fixture
async def start(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[Starter]:
    """Start gogpt against the fake upstream: `await start(grace, *args)` -> (process, port).

    A process a failing test leaves running is stopped, and killed if it will not stop.
    """
    started: list[Process] = []

    async def start_with(grace: float, *args: str) -> tuple[Process, int]:
        port = free_port()
        env = {
            "SECRET_KEY": SECRET_KEY,
            "API_PROXY": upstream.url,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "SHUTDOWN_GRACE": str(grace),
        }
        process = await start_gogpt(env, tmp_path, *args)
        started.append(process)
        await wait_until_listening(port, process)
        return process, port

    yield start_with
    for process in started:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.communicate(), 5)
            except TimeoutError:
                process.kill()
                await process.communicate()


@pytest.mark.parametrize(
    ("signum", "workers"),
    [(signal.SIGTERM, "1"), (signal.SIGINT, "1"), (signal.SIGTERM, "2")],
    ids=["SIGTERM", "SIGINT", "SIGTERM to 2 workers"],
)
async def test_a_running_stream_finishes_after_the_stop_signal_and_gogpt_exits_0(
    start: Starter, upstream: FakeUpstream, signum: int, workers: str
):
    gate, started = asyncio.Event(), asyncio.Event()
    upstream.respond = gated_stream(gate, started)
    process, port = await start(20, "--workers", workers)
    headers = {"Authorization": mint_token(SECRET_KEY, "u", 1)}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/chat", json={}, headers=headers) as resp,
    ):
        assert await resp.content.readline() == b"data: first\n"
        process.send_signal(signum)
        await asyncio.wait_for(refusing(port), 10)  # no new connections once stopping
        gate.set()
        rest = await asyncio.wait_for(resp.read(), 10)
    assert rest == b"\n" + b"".join(b"data: %d\n\n" % n for n in range(TAIL_EVENTS)) + b"data: [DONE]\n\n"
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0
    # each worker that served says it is stopping, then that it stopped: a log reader tells this
    # from a crash (a second worker may still have been starting when the signal came)
    said = [
        line.split("gogpt.serve: ")[1] for line in stderr.decode().splitlines() if "gogpt.serve: s" in line
    ]
    serving = sum(line.startswith("serving on") for line in said)
    stopping = "stopping: no new connections; running requests have 20 s to finish (SHUTDOWN_GRACE)"
    assert serving >= 1
    assert (said.count(stopping), said.count("stopped")) == (serving, serving)
    assert said.index(stopping) < said.index("stopped")


@pytest.mark.parametrize(
    ("grace", "writing"),
    [(0.5, False), (0, False), (1, True)],
    ids=["SHUTDOWN_GRACE=0.5", "SHUTDOWN_GRACE=0", "SHUTDOWN_GRACE=1, the model still writing"],
)
async def test_streams_still_running_after_the_grace_period_are_closed(
    start: Starter, upstream: FakeUpstream, grace: float, writing: bool
):
    """Still writing, a stream is cut at the grace, not later: aiohttp waits its shutdown_timeout
    for a handler, then as long again once it has cancelled the request's body, so given the whole
    grace it let a stream run for twice SHUTDOWN_GRACE, past a service manager's kill (systemd's
    TimeoutStopSec), which lost the stream's usage."""
    gate, started = asyncio.Event(), asyncio.Event()
    upstream.respond = gated_stream(
        gate, started, tail=15
    )  # once open: 1.5 s of events, past 1 s, short of 2 s
    process, port = await start(grace)
    headers = {"Authorization": mint_token(SECRET_KEY, "u", 1)}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/chat", json={}, headers=headers) as resp,
    ):
        await resp.content.readline()
        process.send_signal(signal.SIGTERM)
        if writing:
            gate.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), 10)  # cut, never a clean end
    await asyncio.wait_for(process.wait(), 10)
    assert process.returncode == 0
    await asyncio.wait_for(upstream.disconnected.wait(), 5)  # and the upstream was closed too
    gate.set()


async def test_idle_keep_alive_connections_do_not_hold_up_the_exit(start: Starter):
    process, port = await start(3600)  # a grace an idle connection could hold up: an hour
    async with aiohttp.ClientSession() as session:  # its pooled connection stays open, idle
        async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 10)
    assert process.returncode == 0


async def _refused_start(tmp_path: Path, env: dict[str, str], *args: str) -> list[str]:
    process = await start_gogpt({"SECRET_KEY": SECRET_KEY, **env}, tmp_path, *args)
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 1
    text = stderr.decode()
    assert "Traceback" not in text
    return text.splitlines()


async def test_a_port_already_taken_stops_start_up_in_one_line(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        [line] = await _refused_start(tmp_path, {"HOST": "127.0.0.1", "PORT": str(port)})
    assert "PORT" in line
    assert str(port) in line


async def test_a_host_that_does_not_resolve_stops_start_up_in_one_line(tmp_path: Path):
    [line] = await _refused_start(tmp_path, {"HOST": "no such host", "PORT": str(free_port())})
    assert "HOST" in line


@pytest.mark.parametrize("kind", ["not UTF-8", "a directory"])
async def test_an_unreadable_env_file_stops_start_up_in_one_line_naming_it(tmp_path: Path, kind: str):
    if kind == "a directory":
        (tmp_path / ".env").mkdir()
    else:
        (tmp_path / ".env").write_bytes(b"SECRET_KEY=\xff\xfe\n")
    [line] = await _refused_start(tmp_path, {})
    assert ".env" in line


class SwallowingStore(MemoryStore):
    """As redis-py can: a cancellation landing inside a call comes out as a failed call."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = asyncio.Event()
        self.release = asyncio.Event()

    async def _swallowing_call(self) -> None:
        if self.release.is_set():
            return
        self.inside.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.release.set()  # once: a writer that went on can still be stopped
            raise StoreUnavailable() from None

    async def revocations_version(self) -> int:
        await self._swallowing_call()
        return 0

    async def add_usage(self, batch: str, rows: Sequence[UsageRow]) -> None:
        await self._swallowing_call()


@pytest.mark.parametrize("writer", ["revocations", "usage"])
async def test_a_store_that_swallows_a_cancellation_does_not_hold_up_the_shutdown(writer: str):
    store = SwallowingStore()
    if writer == "revocations":
        task = asyncio.create_task(Revocations(store).run(interval=0))
    else:
        ledger = UsageLedger(store)
        ledger.record(
            "alice", "2026-11-26", "gpt-4o-mini", prompt=1, completion=1, estimated=False, reported_model="m"
        )
        task = asyncio.create_task(ledger.run(interval=0))
    await store.inside.wait()
    task.cancel()
    try:
        await asyncio.wait({task}, timeout=5)
        assert task.cancelled(), (
            "the writer went on after its cancellation: the app's cleanup would wait for ever"
        )
    finally:
        store.release.set()
        task.cancel()  # a writer that went on is stopped, outside the store this time
        await asyncio.wait({task})
