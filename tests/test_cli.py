"""The command line: `python -m gogpt` refuses bad settings in one line, serves, and stops cleanly."""

from __future__ import annotations

import asyncio
import resource
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import CHAT_API_KEY, SECRET_KEY, FakeUpstream
from serving import free_port, start_gogpt, wait_until_listening

Process = asyncio.subprocess.Process
ExitWaiter = Callable[..., Awaitable[tuple[int, str]]]  # (process, signum=SIGTERM) -> (status, stderr)


async def _run_to_exit(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, list[str]]:
    """Run gogpt when it is expected to refuse to start; its exit status and stderr lines."""
    process = await start_gogpt(env, cwd, *args)
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stderr.decode().splitlines()


@pytest.fixture
async def stop() -> AsyncIterator[ExitWaiter]:
    """Send SIGTERM (or the signal given) and wait for the exit; kill any server a test leaves behind."""
    started: list[Process] = []

    async def stop_with(process: Process, signum: int = signal.SIGTERM) -> tuple[int, str]:
        started.append(process)
        process.send_signal(signum)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode is not None
        return process.returncode, stderr.decode()

    yield stop_with
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _serve(
    env: dict[str, str], cwd: Path, port: int, *args: str, preexec_fn: Callable[[], object] | None = None
) -> Process:
    process = await start_gogpt(env, cwd, *args, preexec_fn=preexec_fn)
    try:
        await wait_until_listening(port, process)
    except BaseException:
        if process.returncode is None:
            process.kill()
        _, stderr = await process.communicate()
        raise AssertionError(stderr.decode()) from None
    return process


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "SECRET_KEY"),
        ({"SECRET_KEY": ""}, "SECRET_KEY"),
        ({"SECRET_KEY": SECRET_KEY, "PORT": "eighty"}, "PORT"),
        ({"SECRET_KEY": SECRET_KEY, "API_PROXY": "ftp://files.example.com"}, "API_PROXY"),
        ({"SECRET_KEY": SECRET_KEY, "MAX_BODY_BYTES": "-4096"}, "MAX_BODY_BYTES"),
        ({"SECRET_KEY": SECRET_KEY, "UPSTREAM_TIMEOUT": "soon"}, "UPSTREAM_TIMEOUT"),
        ({"SECRET_KEY": SECRET_KEY, "GOGPT_DB": "no/such/directory/gogpt.db"}, "GOGPT_DB"),
        ({"SECRET_KEY": SECRET_KEY, "GOGPT_DB": ":memory:", "WORKERS": "2"}, "GOGPT_DB"),
    ],
    ids=[
        "missing SECRET_KEY",
        "empty SECRET_KEY",
        "PORT",
        "API_PROXY",
        "MAX_BODY_BYTES",
        "UPSTREAM_TIMEOUT",
        "GOGPT_DB that cannot be created",
        "GOGPT_DB=:memory: with 2 workers",
    ],
)
async def test_a_bad_or_missing_variable_exits_1_with_one_line_naming_it(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    code, lines = await _run_to_exit(env, tmp_path)
    assert code == 1
    assert len(lines) == 1, lines
    assert named in lines[0]
    assert "Traceback" not in lines[0]


async def test_a_bad_variable_in_the_env_file_exits_1_with_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"SECRET_KEY={SECRET_KEY}\nWORKERS=none\n")
    code, lines = await _run_to_exit({}, tmp_path)
    assert (code, len(lines)) == (1, 1), lines
    assert "WORKERS" in lines[0]


@pytest.mark.parametrize("name", ["nope.env", ".env"])
async def test_a_missing_env_file_option_exits_1(tmp_path: Path, name: str) -> None:
    code, lines = await _run_to_exit({"SECRET_KEY": SECRET_KEY}, tmp_path, "--env-file", name)
    assert code == 1
    assert len(lines) == 1, lines
    assert "--env-file" in lines[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_the_server_answers_token_and_exits_0_on_a_stop_signal(
    tmp_path: Path, stop: ExitWaiter, signum: int
) -> None:
    port = free_port()
    process = await _serve({"SECRET_KEY": SECRET_KEY, "HOST": "127.0.0.1", "PORT": str(port)}, tmp_path, port)
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{port}/token", params={"id": "u", "hour": "1", "key": SECRET_KEY}
        ) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["token"]
    code, _ = await stop(process, signum)
    assert code == 0


async def test_the_access_log_never_holds_a_key_or_a_token(
    tmp_path: Path, stop: ExitWaiter, upstream: FakeUpstream
) -> None:
    port = free_port()
    env = {
        "SECRET_KEY": SECRET_KEY,
        "CHAT_API_KEY": CHAT_API_KEY,
        "API_PROXY": upstream.url,
        "HOST": "127.0.0.1",
        "PORT": str(port),
    }
    process = await _serve(env, tmp_path, port)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        async with session.get("/token", params={"id": "dora", "hour": "1", "key": SECRET_KEY}) as resp:
            token = (await resp.json())["token"]
        async with session.post("/token", json={"id": "dora", "hour": 1, "key": SECRET_KEY}) as resp:
            assert resp.status == 200
        async with session.post("/chat", json={"model": "m"}, headers={"Authorization": token}) as resp:
            assert resp.status == 200
        async with session.get("/v1/models", headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200
        async with session.get("/v1/models", headers={"Authorization": SECRET_KEY}) as resp:
            assert resp.status == 200
    code, log = await stop(process)
    assert code == 0
    assert "/token" in log
    assert "/chat" in log
    assert "dora" in log  # the caller is identified by the token's id ...
    for secret in (SECRET_KEY, token, CHAT_API_KEY):  # ... and never by the token itself
        assert secret not in log


async def test_port_and_host_options_override_the_environment(tmp_path: Path, stop: ExitWaiter) -> None:
    port = free_port()
    env = {
        "SECRET_KEY": SECRET_KEY,
        "HOST": "192.0.2.1",  # TEST-NET-1: no local interface has it, so binding it would fail
        "PORT": str(free_port()),
    }
    process = await _serve(env, tmp_path, port, "--host", "127.0.0.1", "--port", str(port))
    code, _ = await stop(process)
    assert code == 0


async def test_env_file_option_reads_the_named_file(tmp_path: Path, stop: ExitWaiter) -> None:
    port = free_port()
    (tmp_path / "gateway.env").write_text(f"SECRET_KEY={SECRET_KEY}\nHOST=127.0.0.1\nPORT={port}\n")
    process = await _serve({}, tmp_path, port, "--env-file", "gateway.env")
    code, _ = await stop(process)
    assert code == 0


@pytest.mark.parametrize(
    ("env", "warned"),
    [
        ({"SECRET_KEY": "short"}, ["SECRET_KEY has 5 characters", "CHAT_API_KEY is empty"]),
        ({"SECRET_KEY": SECRET_KEY, "CHAT_API_KEY": CHAT_API_KEY}, []),
        ({"SECRET_KEY": SECRET_KEY, "API_PROXY": "127.0.0.1:11434"}, []),  # a local model server
    ],
    ids=["short key, no upstream key", "as meant", "no key for a local model server"],
)
async def test_settings_an_operator_did_not_mean_are_warned_of_once_serving(
    tmp_path: Path, stop: ExitWaiter, env: dict[str, str], warned: list[str]
) -> None:
    port = free_port()
    process = await _serve({**env, "HOST": "127.0.0.1", "PORT": str(port)}, tmp_path, port)
    status, stderr = await stop(process)
    assert status == 0
    warnings = [
        line.split("gogpt.serve: ")[1] for line in stderr.splitlines() if " WARNING gogpt.serve: " in line
    ]
    if _hard_open_file_limit() < 4096:  # this machine's own limit is warned of too
        warned = [*warned, "the open-file limit is"]
    assert [warning[: len(prefix)] for warning, prefix in zip(warnings, warned, strict=True)] == warned
    assert "short" not in stderr  # named by its length, never quoted


def _hard_open_file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def _open_files(soft: int, hard: int | None = None) -> Callable[[], None]:
    """A preexec_fn giving gogpt these open-file limits (hard: this process's hard limit)."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard or _hard_open_file_limit()))


async def test_connections_past_a_low_soft_open_file_limit_are_served(
    tmp_path: Path, stop: ExitWaiter
) -> None:
    """gogpt lifts its soft limit to the hard one, as Go's runtime does: under a soft limit of 128
    it used to drop the 110th connection unanswered, and log nothing."""
    assert _hard_open_file_limit() >= 1024, "this test needs a hard open-file limit of 1,024 or more"
    port = free_port()
    env = {"SECRET_KEY": SECRET_KEY, "HOST": "127.0.0.1", "PORT": str(port)}
    process = await _serve(env, tmp_path, port, preexec_fn=_open_files(128))
    connections: list[asyncio.StreamWriter] = []
    try:
        statuses = []
        for _ in range(300):  # each held open, as streams are
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            connections.append(writer)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: gogpt\r\n\r\n")
            statuses.append((await reader.readline())[:12])
        assert statuses == [b"HTTP/1.1 200"] * 300
    finally:
        for writer in connections:
            writer.close()
        status, stderr = await stop(process)
    assert status == 0
    assert "open-file limit" not in stderr or _hard_open_file_limit() < 4096


async def test_a_low_open_file_limit_is_warned_of_once_serving(tmp_path: Path, stop: ExitWaiter) -> None:
    port = free_port()
    env = {"SECRET_KEY": SECRET_KEY, "HOST": "127.0.0.1", "PORT": str(port)}
    process = await _serve(env, tmp_path, port, preexec_fn=_open_files(256, 256))
    status, stderr = await stop(process)
    assert status == 0
    warning = "WARNING gogpt.serve: the open-file limit is 256: a worker holds at most about 128 streams"
    assert warning in stderr


@pytest.mark.parametrize(
    ("sent", "answered"),
    [
        (b"", False),
        (b"POST /chat HTTP/1.1\r\nHost: gogpt\r\nContent-Le", False),  # a slow head, or none to come
        (b"GET /healthz HTTP/1.1\r\nHost: gogpt\r\n\r\n", True),
    ],
    ids=["nothing", "half a head", "one request, then nothing"],
)
async def test_a_connection_with_no_request_on_it_is_closed_after_idle_timeout(
    tmp_path: Path, stop: ExitWaiter, sent: bytes, answered: bool
) -> None:
    """Before aiohttp 3.14.4 a connection that never sent a whole request was kept for ever."""
    port = free_port()
    env = {"SECRET_KEY": SECRET_KEY, "HOST": "127.0.0.1", "PORT": str(port), "IDLE_TIMEOUT": "0.5"}
    process = await _serve(env, tmp_path, port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(sent)
        received = await asyncio.wait_for(reader.read(), 10)  # until gogpt closes the connection
        writer.close()
    finally:
        status, _ = await stop(process)
    assert received.startswith(b"HTTP/1.1 200 OK") == answered
    assert status == 0


async def test_a_stream_longer_than_idle_timeout_is_not_cut(
    tmp_path: Path, stop: ExitWaiter, upstream: FakeUpstream
) -> None:
    """IDLE_TIMEOUT is for a connection with no request on it; a request being answered is not idle."""

    async def slow_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for n in range(8):  # 1.6 s of events, past the idle timeout three times over
            await response.write(b"data: %d\n\n" % n)
            await asyncio.sleep(0.2)
        await response.write(b"data: [DONE]\n\n")
        return response

    upstream.respond = slow_stream
    port = free_port()
    env = {"SECRET_KEY": SECRET_KEY, "API_PROXY": upstream.url, "HOST": "127.0.0.1", "PORT": str(port)}
    process = await _serve({**env, "IDLE_TIMEOUT": "0.5"}, tmp_path, port)
    try:
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {SECRET_KEY}"}
            async with session.post(
                f"http://127.0.0.1:{port}/chat", json={"stream": True}, headers=headers
            ) as resp:
                assert (await resp.read()).endswith(b"data: 7\n\ndata: [DONE]\n\n")
    finally:
        status, _ = await stop(process)
    assert status == 0
