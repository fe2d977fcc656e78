"""A fast fake OpenAI upstream for the benchmark: timestamped SSE events straight off a raw protocol.

POST any path with a JSON body holding `"bench": {"count": N, "interval": S, "size": B}` streams
N events `data: <seq> <time_ns> <payload of B bytes>\\n\\n`, S seconds apart (0: as fast as
the socket takes them); `"stream": false` answers one JSON completion instead, or, with
`"floats": F` in "bench", an embeddings answer of F numbers. Keep-alive.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import sys
import time
from typing import cast

PAYLOAD_BYTE = b"x"


def usage_chunk(count: int) -> bytes:
    usage = {"prompt_tokens": 10, "completion_tokens": count, "total_tokens": 10 + count}
    body = b"data: %s\n\n" % json.dumps({"id": "bench", "choices": [], "usage": usage}).encode()
    return b"%x\r\n%s\r\n" % (len(body), body)


@functools.lru_cache(maxsize=4)
def embedding_answer(floats: int) -> bytes:
    """An embeddings answer holding `floats` numbers, written as OpenAI writes them: the kind of
    JSON answer that is slowest to parse, and large."""
    numbers = random.Random(floats)
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": [numbers.uniform(-0.1, 0.1) for _ in range(1536)],
        }
        for index in range(max(floats // 1536, 1))
    ]
    usage = {"prompt_tokens": 10, "total_tokens": 10}
    return json.dumps({"object": "list", "data": data, "model": "bench", "usage": usage}).encode()


def event(seq: int, size: int) -> bytes:
    body = b"data: %d %d %s\n\n" % (seq, time.time_ns(), PAYLOAD_BYTE * size)
    return b"%x\r\n%s\r\n" % (len(body), body)


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.paused = asyncio.Event()
        self.paused.set()
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def pause_writing(self) -> None:
        self.paused.clear()

    def resume_writing(self) -> None:
        self.paused.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self.next_request()

    def next_request(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].decode("latin-1").lower()
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip() == "content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        self.busy = True
        asyncio.get_running_loop().create_task(self.answer(json.loads(body or b"{}")))

    async def answer(self, request: dict) -> None:
        transport = self.transport
        assert transport is not None
        spec = request.get("bench", {})
        count, interval, size = (
            int(spec.get("count", 10)),
            float(spec.get("interval", 0)),
            int(spec.get("size", 64)),
        )
        if not request.get("stream", True) and spec.get("floats"):
            body = embedding_answer(int(spec["floats"]))
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
        elif not request.get("stream", True):
            body = json.dumps(
                {
                    "id": "bench",
                    "object": "chat.completion",
                    "sent_ns": time.time_ns(),
                    "choices": [{"message": {"content": "x" * size}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
                }
            ).encode()
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
        else:
            transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            for seq in range(count):
                if transport.is_closing():
                    return
                transport.write(event(seq, size))
                if interval:
                    await asyncio.sleep(interval)
                elif not self.paused.is_set():
                    await self.paused.wait()
            if (request.get("stream_options") or {}).get("include_usage") is True:
                transport.write(usage_chunk(count))
            transport.write(b"0\r\n\r\n")
        self.busy = False
        if self.buffer:
            self.next_request()


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(UpstreamProtocol, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    uvloop.run(serve(int(sys.argv[1])))
