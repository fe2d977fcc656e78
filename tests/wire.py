"""Below the HTTP client: raw bytes on a fresh connection, and /metrics text read as samples."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["exchange", "samples"]


async def exchange(client: TestClient, raw: bytes) -> bytes:
    """Write `raw` on a fresh connection and read until gogpt closes it."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Each sample of a /metrics text by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found
