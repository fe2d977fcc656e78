"""Keeping what a JSON answer's usage is read from as the answer is relayed, in bounded memory.

An answer up to INLINE_BYTES is kept whole, to be parsed: the bound request bodies are parsed on
the loop under (1 MiB of an embedding's numbers took 20 ms there). Of a larger one only its
first and last 64 KiB are kept, where usage_reports looks up its model and its usage. A compressed answer is
decoded as it passes, at most _MAX_DECODED_BYTES of it, and past its first MiB at most
_MAX_RATIO times what has come: neither its size nor its coding decides what gogpt holds, or how
long the loop works on one read of it (a bomb is given up after a few MiB, and the usage is
estimated). Parsing only, no I/O: tested on plain bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from .answers import Decoder
from .chunked_coding import Dechunker
from .json_parser import INLINE_BYTES
from .usage_reports import MODEL_NEAR_START, UsageReport, json_report
from .watching import Framing

__all__ = ["JsonWatch"]

# Kept of a larger answer: its start, where its model is named, and its end, where its usage is.
_TAIL_BYTES = 64 << 10
_MAX_DECODED_BYTES = 64 << 20
# JSON compresses 2 to 6 times; an answer stuck repeating one word, up to ~1,000 times, as a bomb
# does, so the ratio is only checked past a size such an answer stays under.
_MAX_RATIO = 64
_RATIO_UNCHECKED_BYTES = 1 << 20
_SEAM = b"\0"  # between the two ends: no JSON value decodes across it


class JsonWatch:
    """Keeps a JSON answer, or its two ends, as it is relayed (watching.BodyWatch); `report` reads them."""

    __slots__ = ("_dechunker", "_decoder", "_head", "_kept", "_parts", "_unreadable")

    dropped = 0  # it takes nothing out

    def __init__(self, codings: Sequence[str] = ()) -> None:
        self._unreadable = False  # the answer did not decode: nothing is kept
        self._decoder: Decoder | None = None
        if codings:
            try:
                self._decoder = Decoder(
                    codings, _MAX_DECODED_BYTES, max_ratio=_MAX_RATIO, unchecked_bytes=_RATIO_UNCHECKED_BYTES
                )
            except ValueError:  # a coding gogpt cannot undo (it asks upstreams for none such)
                self._unreadable = True
        self._dechunker: Dechunker | None = None  # made for a chunked answer through the splice
        self._head: bytes | None = None  # its first MODEL_NEAR_START bytes, once past INLINE_BYTES
        self._parts: list[bytes] = []  # the answer so far; past INLINE_BYTES, its latest bytes
        self._kept = 0

    def feed(self, data: bytes) -> bytes:
        self._keep(data)
        return data

    def feed_framed(self, framed: bytes, framing: Framing, last: bool) -> bytes:
        if self._dechunker is None:
            self._dechunker = Dechunker()
        self._keep(self._dechunker.feed(framed))
        return framed

    def end(self) -> bytes:
        return b""

    def whole(self, body: bytes) -> None:
        self._keep(body)

    def report(self) -> UsageReport | None:
        """What the answer reports of its usage; None if it cannot be read (it did not decode, or
        its coding was cut short)."""
        if self._unreadable or (self._decoder is not None and not self._decoder.finished):
            return None
        if self._head is None:
            return json_report(b"".join(self._parts), whole=True)
        return json_report(b"".join((self._head, _SEAM, *self._parts)), whole=False)

    def _keep(self, data: bytes) -> None:
        if self._unreadable:
            return
        if self._decoder is None:
            self._keep_decoded(data)
            return
        try:
            for step in self._decoder.feed(data):  # each step kept before the next is inflated
                self._keep_decoded(step)
        except ValueError:
            self._unreadable, self._head, self._parts = True, None, []

    def _keep_decoded(self, data: bytes) -> None:
        self._parts.append(data)
        self._kept += len(data)
        if self._head is None:
            if self._kept > INLINE_BYTES:  # from now on, only the two ends are kept
                answer = b"".join(self._parts)
                self._head = answer[:MODEL_NEAR_START]
                self._parts, self._kept = [answer[-_TAIL_BYTES:]], _TAIL_BYTES
        elif self._kept > 2 * _TAIL_BYTES:
            tail = b"".join(self._parts)[-_TAIL_BYTES:]
            self._parts, self._kept = [tail], len(tail)
