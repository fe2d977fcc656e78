"""Finding an answer's usage while it is relayed, without parsing every event.

Every usage object OpenAI sends has a key ending in `_tokens"` (`prompt_tokens`, `input_tokens`),
and in a JSON string a quote is escaped, so those bytes appear nowhere else in an answer. An
event stream therefore passes through untouched while each read ends at an event boundary and
holds no such key: a byte search per read, and a count of content deltas for the estimate
should the usage never come. A read that holds the key or ends inside an event is taken the
careful way: cut at event boundaries, the events holding the key read, the usage-only chunk
gogpt asked for itself dropped, and (when dropping) the unfinished last event held back until
its end comes. A client can do nothing with half an event, so holding it delays nothing it sees.

Through the splice the same is done on chunked bytes: a read whose every chunk ends an event is
passed on framed as it came; otherwise its data is taken out of the framing and framed again.
Parsing only, no I/O: tested on plain bytes, split every way.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["USAGE_KEY", "Dechunker", "EventWatch", "JsonWatch"]

USAGE_KEY = b'_tokens"'
_EVENT_ENDS = (b"\n\n", b"\n\r\n", b"\r\r")  # the blank line that ends an event, as SSE allows it
_FRAMED_EVENT_END = b"\n\n\r\n"  # an event's end that is also its chunk's end
_MAX_HELD_BYTES = 8 << 20  # an unfinished event longer than this is let through unread
_JSON_KEPT_BYTES = 16 << 20  # a JSON answer up to this is kept whole (to decode it); beyond, its tail
_JSON_TAIL_BYTES = 64 << 10  # where the usage of a large, unencoded JSON answer is


def _after_last_event(data: bytes, start: int = 0, end: int | None = None) -> int:
    """Where the last whole event in data[start:end] ends, or `start` when none does."""
    last = start
    for ending in _EVENT_ENDS:
        at = data.rfind(ending, start, end)
        if at >= 0:
            last = max(last, at + len(ending))
    return last


def _event_end(data: bytes, start: int) -> int:
    """Where the event going on at `start` ends: after its blank line, or at the end of `data`."""
    ends = [at + len(ending) for ending in _EVENT_ENDS if (at := data.find(ending, start)) >= 0]
    return min(ends) if ends else len(data)


class Dechunker:
    """The data of chunked bytes that `splice.ChunkedFraming` has already checked.

    Those bytes never end inside a size line or a chunk's CRLF (the framing keeps such a part
    back until the rest comes), so nothing here needs to be validated or kept but a count.
    """

    __slots__ = ("_crlf_due", "_left")

    def __init__(self) -> None:
        self._left = 0  # data bytes of the current chunk still to come
        self._crlf_due = False

    def feed(self, framed: bytes) -> bytes:
        parts: list[bytes] = []
        pos, end = 0, len(framed)
        while pos < end:
            if self._left:
                step = min(self._left, end - pos)
                parts.append(framed[pos : pos + step])
                pos += step
                self._left -= step
                self._crlf_due = not self._left
            elif self._crlf_due:
                pos += 2
                self._crlf_due = False
            else:
                eol = framed.index(b"\n", pos)
                self._left = int(framed[pos:eol].split(b";", 1)[0], 16)  # int() ignores the spaces and CR
                pos = eol + 1
        return b"".join(parts)


class EventWatch:
    """Watches one event stream for its usage; with `strip`, drops the usage-only chunk from it.

    `read_event(event)` is called with each whole event that holds a usage key and says whether
    it is the usage-only chunk. `deltas` counts the content deltas relayed: the `delta` pattern
    (`"content":"`), less the empty ones (`"content":""`, as OpenAI's first chunk has).
    """

    __slots__ = (
        "_chunks",
        "_dechunker",
        "_delta",
        "_empty_delta",
        "_held",
        "_read_event",
        "_strip",
        "_whole_chunks",
        "deltas",
    )

    def __init__(self, read_event: Callable[[bytes], bool], *, delta: bytes, strip: bool) -> None:
        self._read_event = read_event
        self._delta = delta
        self._empty_delta = delta + b'"'
        self._strip = strip
        self._held = b""  # the unfinished last event: held back when stripping, else a copy to read it
        self._dechunker = Dechunker()
        self._chunks = 0  # chunks the framing had started when the last read was seen
        self._whole_chunks = True  # the last read ended between two chunks
        self.deltas = 0

    def feed(self, data: bytes) -> bytes:
        """Body bytes as they arrive, chunk framing already removed; returns what to send now."""
        if not self._held and data.endswith(_EVENT_ENDS) and data.find(USAGE_KEY) < 0:
            self.deltas += data.count(self._delta) - data.count(self._empty_delta)
            return data
        ready = self._careful(data, last=False)
        return ready if self._strip else data

    def feed_framed(self, framed: bytes, chunks: int, between_chunks: bool, last: bool) -> bytes:
        """Chunked bytes as the splice checked them; returns the chunked bytes to send now.

        `chunks` is how many chunks the framing has started so far, `between_chunks` whether
        `framed` ends between two, `last` whether the terminal chunk came after it.
        """
        started, self._chunks = chunks - self._chunks, chunks
        whole_chunks, self._whole_chunks = self._whole_chunks, between_chunks
        if (
            whole_chunks
            and between_chunks
            and not self._held
            and (  # every chunk of it ends an event: no usage key can be cut by framing or reads
                framed.endswith(_FRAMED_EVENT_END)
                if started == 1
                else framed.count(_FRAMED_EVENT_END) == started
            )
            and framed.find(USAGE_KEY) < 0
        ):
            self.deltas += framed.count(self._delta) - framed.count(self._empty_delta)
            return framed
        ready = self._careful(self._dechunker.feed(framed), last=last)
        if not self._strip:
            return framed
        return b"%x\r\n%s\r\n" % (len(ready), ready) if ready else b""

    def end(self) -> bytes:
        """At the end of the body: what is still held back (an unfinished last event)."""
        return self._careful(b"", last=True) if self._strip else b""

    def whole(self, body: bytes) -> None:
        """An event stream read whole (never: streams are relayed as they come)."""
        self._careful(body, last=True)

    def _careful(self, data: bytes, *, last: bool) -> bytes:
        """Whole events ready to go, the usage ones read (and dropped when stripping)."""
        buffer = self._held + data if self._held else data
        cut = len(buffer) if last else _after_last_event(buffer)
        if len(buffer) - cut > _MAX_HELD_BYTES:
            cut = len(buffer)  # not an event stream after all
        ready, self._held = buffer[:cut], buffer[cut:]
        if not ready:
            return b""
        self.deltas += ready.count(self._delta) - ready.count(self._empty_delta)
        return self._read_usage(ready) if USAGE_KEY in ready else ready

    def _read_usage(self, ready: bytes) -> bytes:
        kept: list[bytes] = []
        start = 0  # the start of what is not yet in `kept`
        event_start = 0
        key = ready.find(USAGE_KEY)
        while key >= 0:
            event_start = _after_last_event(ready, event_start, key)
            event_end = _event_end(ready, key)
            if self._read_event(ready[event_start:event_end]) and self._strip:
                kept.append(ready[start:event_start])
                start = event_end
            event_start = event_end
            key = ready.find(USAGE_KEY, event_end)
        if start == 0:
            return ready
        kept.append(ready[start:])
        return b"".join(kept)


class JsonWatch:
    """Keeps a JSON answer (or, past a bound, its tail, where the usage is) as it is relayed."""

    __slots__ = ("_dechunker", "_encoded", "_kept", "_parts", "complete")

    def __init__(self, *, encoded: bool) -> None:
        self._encoded = encoded  # gzip or deflate: only the whole body can be decoded
        self._parts: list[bytes] = []
        self._kept = 0
        self._dechunker = Dechunker()
        self.complete = True  # False once bytes were let go (a tail is kept, or nothing)

    def feed(self, data: bytes) -> bytes:
        self._keep(data)
        return data

    def feed_framed(self, framed: bytes, chunks: int, between_chunks: bool, last: bool) -> bytes:
        self._keep(self._dechunker.feed(framed))
        return framed

    def end(self) -> bytes:
        return b""

    def whole(self, body: bytes) -> None:
        self._parts, self._kept, self.complete = [body], len(body), True

    def body(self) -> bytes | None:
        """The answer as kept: whole, or its tail when unencoded; None when nothing usable is."""
        if not self.complete and self._encoded:
            return None
        return b"".join(self._parts)

    def _keep(self, data: bytes) -> None:
        self._parts.append(data)
        self._kept += len(data)
        if self._kept > (_JSON_KEPT_BYTES if self.complete else 2 * _JSON_TAIL_BYTES):
            self.complete = False
            tail = b"".join(self._parts)[-_JSON_TAIL_BYTES:] if not self._encoded else b""
            self._parts, self._kept = [tail], len(tail)
