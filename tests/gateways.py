"""`python -m gogpt` started by tests: the `start` fixture (registered in conftest.py), the
`shared_store` that puts its state in a file or in Redis, and which worker holds a connection."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from conftest import ACCESS_TOKEN, CHAT_API_KEY, SECRET_KEY, FakeUpstream, RedisServer
from serving import Gateway

__all__ = ["Starter", "serving_worker", "shared_store", "start"]

Starter = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[Starter]:
    """`await start(workers=2, **variables)`: gogpt in tmp_path (so its GOGPT_DB is tmp_path/gogpt.db),
    its OpenAI and backend-api the fake upstream. Each is stopped at the end; a worker a failed test
    left behind is killed."""
    started: list[Gateway] = []

    async def start_gateway(workers: int = 2, **variables: str) -> Gateway:
        env = {
            "SECRET_KEY": SECRET_KEY,
            "API_PROXY": upstream.url,
            "CHAT_API_KEY": CHAT_API_KEY,
            "UNOFFICIAL_PROXY": upstream.url + "/backend-api",
            "ACCESS_TOKEN": ACCESS_TOKEN,
            **variables,
        }
        gateway = await Gateway.start(env, tmp_path, workers=workers)
        started.append(gateway)
        return gateway

    yield start_gateway
    for gateway in started:
        workers = gateway.worker_pids() if gateway.process.returncode is None else []
        await gateway.stop()
        for pid in workers:  # gone already, unless the supervisor was killed before them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(params=["sqlite", "redis"])
def shared_store(request: pytest.FixtureRequest, redis_server: RedisServer) -> dict[str, str]:
    """The variables that keep gogpt's state in its GOGPT_DB file, or in the test's Redis."""
    return {"REDIS_URL": redis_server.url} if request.param == "redis" else {}


def serving_worker(gateway: Gateway, client_port: int) -> int:
    """The worker holding the server side of the connection from `client_port`."""
    wanted = (f"0100007F:{gateway.port:04X}", f"0100007F:{client_port:04X}")  # 127.0.0.1, as /proc writes it
    sockets = {
        f"socket:[{fields[9]}]"
        for fields in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
        if (fields[1], fields[2]) == wanted
    }
    for pid in gateway.worker_pids():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in sockets:
                    return pid
    raise AssertionError(f"no worker holds the connection from port {client_port}")
