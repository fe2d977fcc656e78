"""The benchmark's load client: raw HTTP/1.1 on asyncio protocols, checking every byte of every event.

One process drives all streams of a profile against one target and reports what it saw.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import cast

from .upstream import PAYLOAD_BYTE, embedding_answer


@dataclass
class Tally:
    events: int = 0
    streams: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_us: list[int] = field(default_factory=list)
    first_byte_ms: list[float] = field(default_factory=list)
    round_trips_us: list[int] = field(
        default_factory=list
    )  # each request, from its write to its answer's end


class StreamProtocol(asyncio.Protocol):
    """One connection, one or more sequential requests; parses chunked SSE and checks each event."""

    def __init__(
        self, request: bytes, spec: dict, tally: Tally, done: asyncio.Future[None], repeat: int
    ) -> None:
        self.request, self.spec, self.tally, self.done, self.repeat = request, spec, tally, done, repeat
        self.payload = PAYLOAD_BYTE * spec["size"]
        self.transport: asyncio.Transport | None = None
        self.start()

    def start(self) -> None:
        self.raw = b""
        self.headers_done = False
        self.chunked = False
        self.length = 0
        self.body = b""
        self.events = b""
        self.next_seq = 0
        self.sent_at = time.perf_counter()
        self.first_byte = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.tally.errors.append(f"connection lost: {exc!r}")
            self.done.set_result(None)

    def fail(self, why: str) -> None:
        self.tally.errors.append(why)
        if not self.done.done():
            self.done.set_result(None)
        assert self.transport is not None
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if not self.first_byte:
            self.first_byte = True
            self.tally.first_byte_ms.append((time.perf_counter() - self.sent_at) * 1000)
        self.raw += data
        if not self.headers_done:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.raw = self.raw[:end].lower(), self.raw[end + 4 :]
            if not head.startswith(b"http/1.1 200"):
                return self.fail(f"status: {head[:40]!r}")
            self.headers_done = True
            self.chunked = b"transfer-encoding: chunked" in head
            if not self.chunked:
                self.length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        if self.chunked:
            self.read_chunks()
        elif len(self.raw) >= self.length:
            self.finish_json(self.raw[: self.length])

    def read_chunks(self) -> None:
        raw = self.raw
        position = 0
        while True:
            line_end = raw.find(b"\r\n", position)
            if line_end < 0:
                break
            size = int(raw[position:line_end], 16)
            if len(raw) < line_end + 2 + size + 2:
                break
            if size == 0:
                self.raw = raw[line_end + 4 :]
                self.read_events()
                return self.finish_stream()
            self.events += raw[line_end + 2 : line_end + 2 + size]
            position = line_end + 2 + size + 2
        self.raw = raw[position:]
        self.read_events()

    def read_events(self) -> None:
        now = time.time_ns()
        parts = self.events.split(b"\n\n")
        self.events = parts.pop()
        for part in parts:
            fields = part.split(b" ")
            if (
                len(fields) != 4
                or fields[0] != b"data:"
                or int(fields[1]) != self.next_seq
                or fields[3] != self.payload
            ):
                return self.fail(f"event {self.next_seq} corrupted or out of order: {part[:60]!r}")
            self.next_seq += 1
            self.tally.latencies_us.append((now - int(fields[2])) // 1000)
        self.tally.events += len(parts)

    def finish_stream(self) -> None:
        if self.events or self.next_seq != self.spec["count"]:
            return self.fail(f"stream ended after {self.next_seq} of {self.spec['count']} events")
        self.next_request()

    def finish_json(self, body: bytes) -> None:
        if self.spec.get("floats"):  # the same answer every time: compared, not parsed
            if body != embedding_answer(int(self.spec["floats"])):
                return self.fail("embeddings answer corrupted")
            self.tally.latencies_us.append(int((time.perf_counter() - self.sent_at) * 1_000_000))
        else:
            answer = json.loads(body)
            if answer["choices"][0]["message"]["content"] != "x" * self.spec["size"]:
                return self.fail("json answer corrupted")
            self.tally.latencies_us.append((time.time_ns() - answer["sent_ns"]) // 1000)
        self.tally.events += 1
        self.raw = self.raw[self.length :]
        self.next_request()

    def next_request(self) -> None:
        self.tally.round_trips_us.append(int((time.perf_counter() - self.sent_at) * 1_000_000))
        self.tally.streams += 1
        self.repeat -= 1
        if self.repeat <= 0:
            self.done.set_result(None)
            assert self.transport is not None
            self.transport.close()
            return
        self.start()
        assert self.transport is not None
        self.transport.write(self.request)


def build_request(port: int, path: str, token: str, spec: dict, stream: bool) -> bytes:
    body = json.dumps({"model": "bench", "stream": stream, "messages": [], "bench": spec}).encode()
    auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
        % (path.encode(), port, auth, len(body), body)
    )


async def run_load(
    port: int, path: str, token: str, streams: int, spec: dict, stream: bool, repeat: int
) -> Tally:
    """Open `streams` connections at once; each makes `repeat` requests in turn. Returns the tally."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    request = build_request(port, path, token, spec, stream)
    done = [loop.create_future() for _ in range(streams)]

    async def connect(future: asyncio.Future[None]) -> None:
        try:
            await loop.create_connection(
                lambda: StreamProtocol(request, spec, tally, future, repeat), "127.0.0.1", port
            )
        except OSError as exc:
            tally.errors.append(f"connect: {exc!r}")
            future.set_result(None)

    await asyncio.gather(*(connect(future) for future in done))
    await asyncio.gather(*done)
    return tally
