"""What the relay shows an answer to: one watcher per answer, asked once, at the answer's head.

A leaf: the relay and the splice call these without knowing what watches (usage.py does).
"""

from __future__ import annotations

from typing import Protocol

import aiohttp

__all__ = ["AnswerWatch", "BodyWatch", "Framing"]


class Framing(Protocol):
    """What the splice's chunk framing (chunked_coding.ChunkedFraming) found in the last read."""

    chunks: int  # chunks started
    unaligned: int  # chunks read whole whose data does not end an event
    between_chunks: bool  # the bytes so far end between two chunks


class BodyWatch(Protocol):
    """Sees a body as it is relayed and says what to send; it may hold back or drop whole events."""

    dropped: int  # body bytes taken out of what is sent

    def feed(self, data: bytes) -> bytes:
        """Body bytes as they arrive (no chunk framing); returns the bytes to send now."""

    def feed_framed(self, framed: bytes, framing: Framing, last: bool) -> bytes | memoryview:
        """Chunked bytes checked by the splice's `framing`; returns the chunked bytes to send now (a
        view of `framed` when they are a part of it, so the transport writes them without a copy).
        `last`: the terminal chunk follows `framed` (anything still held goes now)."""

    def end(self) -> bytes:
        """The body has ended (no chunk framing): what is still held back, to send now."""

    def whole(self, body: bytes) -> None:
        """The body, read whole and sent as it is."""


class AnswerWatch(Protocol):
    def observe(self, upstream: aiohttp.ClientResponse) -> BodyWatch | None:
        """Called once with a successful (2xx) answer's head: the watcher of its body, if any."""
