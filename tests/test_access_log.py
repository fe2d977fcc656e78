"""The access log of a real `python -m gogpt`: one line per request, whatever a client puts in it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import jwt
import pytest
from aiohttp import web
from conftest import SECRET_KEY, FakeUpstream
from prometheus_client import REGISTRY
from serving import free_port, start_gogpt, wait_until_listening
from yarl import URL

from gogpt import Settings, create_app
from gogpt.auth import public
from gogpt.logs import ACCESS_LOGGER, AccessLogger
from gogpt.metrics import PENDING

# A whole access line, as a client would like to slip it in: a reader could not tell it apart.
FORGED = '1999-01-01 00:00:00,000 INFO gogpt.access: 10.9.9.9 "GET /metrics" 200 9 0.001s id=admin'
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")
# Percent-encoded, since a request line cannot hold them raw; aiohttp decodes them into request.path.
BREAKS = {"%0A": "\n", "%0D": "\r", "%C2%85": "\x85", "%E2%80%A8": "\u2028", "%0B": "\v", "%1E": "\x1e"}


@dataclass
class Gateway:
    url: str
    process: asyncio.subprocess.Process

    async def stop(self) -> str:
        """SIGTERM, then everything gogpt wrote to stderr."""
        self.process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(self.process.communicate(), 30)
        assert self.process.returncode == 0, stderr.decode()
        return stderr.decode()


Start = Callable[[str], Awaitable[Gateway]]  # LOG_FORMAT -> a running gogpt


@pytest.fixture
async def start(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[Start]:
    started: list[asyncio.subprocess.Process] = []

    async def run(log_format: str) -> Gateway:
        port = free_port()
        env = {
            "SECRET_KEY": SECRET_KEY,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "API_PROXY": upstream.url,
            "LOG_FORMAT": log_format,
        }
        process = await start_gogpt(env, tmp_path)
        started.append(process)
        await wait_until_listening(port, process)
        return Gateway(f"http://127.0.0.1:{port}", process)

    yield run
    for process in started:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _forging_path(line_break: str) -> URL:
    return URL("/v1/models" + line_break + FORGED.replace(" ", "%20").replace('"', "%22"), encoded=True)


def _old_token(identity: str) -> str:
    """A token /token would have signed before it refused ids that are not printable."""
    return jwt.encode({"jti": identity, "iat": int(time.time()), "exp": 2**40}, SECRET_KEY, algorithm="HS256")


async def _send_forgeries(url: str) -> None:
    bearer = {"Authorization": f"Bearer {_old_token('bob' + chr(10) + FORGED)}"}
    async with aiohttp.ClientSession(url) as session:
        for encoded in BREAKS:
            async with session.get(_forging_path(encoded)) as resp:
                assert resp.status in (401, 404)  # refused, and logged all the same: anyone can do it
        async with session.get("/v1/models", headers=bearer) as resp:
            await resp.read()


async def test_no_path_or_token_id_forges_a_text_access_log_line(start: Start) -> None:
    gateway = await start("text")
    await _send_forgeries(gateway.url)
    log = await gateway.stop()
    lines = log.split("\n")[:-1]  # what a log reader splits on, ...
    for line in lines:
        assert LOG_LINE.match(line), line  # ... and every piece is a line gogpt wrote
        assert "\r" not in line and "\x85" not in line and "\u2028" not in line and "\x1e" not in line
    access = [line for line in lines if "gogpt.access" in line and "/v1/models" in line]
    assert len(access) == len(BREAKS) + 1
    assert r"/v1/models\n1999-01-01 00:00:00,000 INFO gogpt.access: 10.9.9.9 \"GET /metrics\"" in log
    assert r"/v1/models\u2028" in log


async def test_a_json_access_log_keeps_the_raw_path_and_a_message_of_one_line(start: Start) -> None:
    """The fields are exact for machines; `message` is the text line, safe to print (`jq -r .message`)."""
    gateway = await start("json")
    await _send_forgeries(gateway.url)
    log = await gateway.stop()
    entries = [json.loads(line) for line in log.split("\n")[:-1]]
    paths = [entry["path"] for entry in entries if entry.get("logger") == "gogpt.access"]
    for encoded, line_break in BREAKS.items():
        assert "/v1/models" + line_break + FORGED in paths, encoded
    for entry in entries:
        assert entry["message"].isprintable(), entry["message"]


async def test_a_client_that_leaves_mid_stream_gets_a_499_line(start: Start, upstream: FakeUpstream) -> None:
    """aiohttp writes no line for a cancelled handler: the estimated usage of a hang-up must still
    be traceable to a request in the log."""

    async def one_event_then_thinking(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await asyncio.Event().wait()  # until the client leaves
        return response

    upstream.respond = one_event_then_thinking
    gateway = await start("text")
    token = jwt.encode({"jti": "alice", "exp": 2**40}, SECRET_KEY, algorithm="HS256")
    async with (
        aiohttp.ClientSession(gateway.url) as session,
        session.post("/chat", json={"stream": True}, headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        assert await resp.content.readline() == b"data: first\n"
    await asyncio.wait_for(upstream.disconnected.wait(), 10)  # gogpt saw the hang-up
    log = await gateway.stop()
    [line] = [line for line in log.splitlines() if '"POST /chat"' in line]
    status, sent, _, identity = line.split('"POST /chat" ')[1].split()
    assert (status, identity) == ("499", "id=alice")
    assert int(sent) > len(b"data: first\n\n")  # the head and the event went out


class _Lines(logging.Handler):
    """The access lines written, and an event for each."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.written = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self.written.set()


async def test_a_client_that_leaves_while_its_answer_is_written_gets_one_499_line(
    aiohttp_client, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """When the hang-up showed as a failed write rather than a cancelled handler, the relay took it
    for the end of the answer: the line said 200 and 0 bytes, or, if the last write failed, aiohttp
    logged a traceback and no line at all, while /metrics counted a 499."""

    @public
    async def leaves_mid_answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"x" * 100)
        assert request.transport is not None
        request.transport.close()  # the client is gone, its handler not yet cancelled
        await response.write(b"the rest")
        return response

    app = create_app(settings)
    app.router.add_get("/leaves", leaves_mid_answer)
    access = logging.getLogger("gogpt.access.test")
    caplog.set_level(logging.INFO, logger=access.name)
    lines = _Lines()
    access.addHandler(lines)
    app[ACCESS_LOGGER] = AccessLogger(access, "")
    client = await aiohttp_client(app, server_kwargs={"access_log_class": AccessLogger, "access_log": access})
    try:
        with pytest.raises(aiohttp.ClientError):
            await (await client.get("/leaves")).read()
        await asyncio.wait_for(lines.written.wait(), 10)
    finally:
        access.removeHandler(lines)
    [line] = lines.lines
    status, sent = line.split('"GET /leaves" ')[1].split()[:2]
    assert status == "499"
    assert int(sent) > 100  # the head and the first write went out
    assert not [record for record in caplog.records if record.name == "aiohttp.server"]  # no traceback
    PENDING.add_up()  # what the metrics scrape adds first
    assert (
        REGISTRY.get_sample_value(
            "gogpt_requests_total", {"route": "/leaves", "method": "GET", "status": "499"}
        )
        == 1
    )
