"""A TCP proxy on loopback that cuts idle connections, as cloud load balancers do."""

from __future__ import annotations

import asyncio

__all__ = ["IdleCuttingProxy"]


class IdleCuttingProxy:
    """A TCP proxy that cuts a connection when neither side has sent anything for `idle` seconds,
    as cloud load balancers do."""

    def __init__(self, target_port: int, idle: float) -> None:
        self.target_port, self.idle = target_port, idle
        self.cut = 0

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        loop = asyncio.get_running_loop()

        def cut() -> None:
            self.cut += 1
            writer.transport.abort()
            client_writer.transport.abort()

        timer = loop.call_later(self.idle, cut)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            nonlocal timer
            while data := await source.read(65536):
                timer.cancel()
                timer = loop.call_later(self.idle, cut)
                sink.write(data)
                await sink.drain()
            if sink.can_write_eof():
                sink.write_eof()

        try:
            await asyncio.gather(pipe(client_reader, writer), pipe(reader, client_writer))
        except ConnectionError:
            pass
        finally:
            timer.cancel()
            writer.close()
            client_writer.close()
