"""Shared fixtures: settings, a real fake upstream on loopback, and a client of gogpt."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis.asyncio as redis
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDictProxy
from serving import kill_leftovers

from gogpt import Settings, create_app, mint_token

SECRET_KEY = "test-secret-key-0123456789abcdef-0123456789"
ADMIN = {"Authorization": f"Bearer {SECRET_KEY}"}  # the admin credential
CHAT_API_KEY = "sk-upstream-test-key-000000000000"
ACCESS_TOKEN = "chatgpt-access-token-000000000000"

# Fixtures kept beside the helpers they go with, shared by every test module.
pytest_plugins = ("backend_api", "browser_pages", "gateways", "shared_state")

Responder = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Recorded:
    """One request as the fake upstream received it."""

    method: str
    path: str
    query_string: str
    headers: CIMultiDictProxy[str]
    body: bytes
    raw_path: str  # the path as it came, percent-encoded


async def _ok(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True})


@dataclass
class FakeUpstream:
    """A loopback HTTP server standing in for OpenAI or the ChatGPT backend-api.

    Tests set `respond` to shape the answer. `requests` records what arrived; `disconnected`
    is set when gogpt closes the connection while a response is still being written.
    """

    url: str = ""
    respond: Responder = _ok
    requests: list[Recorded] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Recorded(
                request.method, request.path, request.query_string, request.headers, body, request.raw_path
            )
        )
        try:
            return await self.respond(request)
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected.set()
            raise

    @property
    def last(self) -> Recorded:
        return self.requests[-1]


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeUpstream:
    fake = FakeUpstream()
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = await aiohttp_server(app)
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
def settings(upstream: FakeUpstream, tmp_path: Path) -> Settings:
    """Settings for gogpt in front of `upstream`, its state in a file of the test's own directory."""
    return Settings(
        secret_key=SECRET_KEY,
        api_proxy=upstream.url,
        chat_api_key=CHAT_API_KEY,
        unofficial_proxy=upstream.url + "/backend-api",
        access_token=ACCESS_TOKEN,
        upstream_timeout=5,
        splice=os.environ.get("SPLICE", "on") != "off",  # CI runs the suite both ways
        gogpt_db=str(tmp_path / "gogpt.db"),
    )


@pytest.fixture
async def client(aiohttp_client: Callable[..., Awaitable[TestClient]], settings: Settings) -> TestClient:
    return await aiohttp_client(create_app(settings))


@pytest.fixture
def token() -> str:
    return mint_token(SECRET_KEY, "alice", 1)


@pytest.fixture
def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# Every variable gogpt reads.
async def ask_token(client: TestClient, transport: str, params: dict[str, Any]) -> ClientResponse:
    """Ask /token the way a client would: query string (`get`), `json` body or `form` body."""
    if transport == "get":
        return await client.get("/token", params=params)
    if transport == "json":
        return await client.post("/token", json=params)
    return await client.post("/token", data=params)


def signed_claims(token: str) -> dict[str, Any]:
    """The claims of a token signed with the tests' SECRET_KEY."""
    return jwt.decode(token, SECRET_KEY, algorithms=["HS256"])


GOGPT_VARIABLES = (
    "API_PROXY",
    "CHAT_API_KEY",
    "UNOFFICIAL_PROXY",
    "ACCESS_TOKEN",
    "OPENAI_ORGANIZATION",
    "OPENAI_PROJECT",
    "SECRET_KEY",
    "HOST",
    "PORT",
    "MAX_BODY_BYTES",
    "UPSTREAM_TIMEOUT",
    "SHUTDOWN_GRACE",
    "RATE_LIMIT",
    "TOKEN_FAILURE_LIMIT",
    "REDIS_URL",
    "GOGPT_DB",
    "WORKERS",
    "LOG_FORMAT",
    "CLIENT_TIMEOUT",
    "IDLE_TIMEOUT",
    "SPLICE",
    "UPSTREAM_RETRIES",
    "SSE_KEEPALIVE",
    "BUDGET_RESERVE",
)


@pytest.fixture
def bare_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No gogpt variable set, in an empty working directory (returned)."""
    for name in GOGPT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


class RedisServer:
    """A real redis-server on a loopback port, which tests may stop and start again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail("redis-server is not installed: apt-get install redis-server (.ci/run does)")
        self.process = await asyncio.create_subprocess_exec(
            *(
                executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            async with asyncio.timeout(10):
                while True:
                    try:
                        await client.ping()
                        return
                    except redis.ConnectionError:
                        await asyncio.sleep(0.02)  # polling a starting server: there is no event to await
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), 10)
            self.process = None


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    from serving import free_port

    server = RedisServer(free_port())
    await server.start()
    yield server
    await server.stop()


class Clock:
    """`time.time` held still wherever a test sets `now`: limits are tested without the wall clock."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, now: float) -> None:
        self.now = now
        monkeypatch.setattr(time, "time", lambda: self.now)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A second before a minute's edge, so a test that moves on crosses it; and over a minute
    behind the real clock, by which PyJWT checks the `iat` of a token /token has just minted."""
    return Clock(monkeypatch, float(int(time.time()) // 60 * 60 - 61))


@pytest.fixture(autouse=True)
def _no_gogpt_left_running() -> Iterator[None]:
    yield
    kill_leftovers()
