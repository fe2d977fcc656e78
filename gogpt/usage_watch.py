"""Finding an answer's usage while it is relayed, without parsing every event.

Every usage object OpenAI sends has a key ending in `_tokens"` (`prompt_tokens`, `input_tokens`),
and in a JSON string a quote is escaped, so those bytes appear nowhere else in an answer. An
event stream therefore passes through untouched while its reads hold no such key and their
events are whole: one byte search per read, nothing per event. Where the key is, or where the
reads cut events, the stream is taken the careful way: cut at event boundaries, the events
holding the key read, the usage-only chunk gogpt asked for itself dropped, and (when dropping)
an unfinished event held back until its end comes. A client can do nothing with half an event,
so holding it delays nothing it sees.

Through the splice the same is done on chunked bytes. Upstreams write an event per chunk, so
the fast way there asks the splice's framing whether every chunk it read whole ended an event
(it checks as it goes, at no cost), passes them on framed as they came, and keeps back only the
start of a chunk the read cut, until the chunk is whole; of a read's chunks it opens only the
last one holding a usage key, searching from the end. Otherwise the data is taken out of the
framing and framed again. Parsing only, no I/O: tested on plain bytes, split every way.
"""

from __future__ import annotations

from collections.abc import Callable

from .chunked_coding import CHECKED_SIZE_LINES, Dechunker, chunk_size
from .usage_reports import EventReport
from .watching import Framing

__all__ = ["USAGE_KEY", "EventWatch"]

USAGE_KEY = b'_tokens"'
_EVENT_ENDS = (b"\n\n", b"\n\r\n", b"\r\r")  # the blank line that ends an event, as SSE allows it
_FRAMED_EVENT_END = b"\n\n\r\n"  # an event's end that is also its chunk's end
_FRAMED_END_BYTES = len(_FRAMED_EVENT_END)
# An unfinished event longer than this is let through unread. OpenAI's events are far smaller:
# the largest, a long answer's `response.completed`, holds its text once (100k tokens, ~0.5 MB).
# What is held is copied as it is joined, so each stream could cost several times this.
_MAX_HELD_BYTES = 2 << 20
_FIRST_BYTES = 1024  # kept of a stream's start, to look at its first event


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


def _still_to_come(framed: bytes, start: int) -> int:
    """The bytes still to come of the one chunk framed[start:] starts, or 0 if it is not that."""
    eol = framed.find(b"\n", start)
    if eol < 0:
        return 0
    try:
        size = chunk_size(framed[start:eol])
    except ValueError:
        return 0
    return max(eol + 1 + size + 2 - len(framed), 0)


class EventWatch:
    """Watches one event stream for its usage; with `strip`, drops the usage-only chunk from it.

    `read_event(event)` (usage_reports.event_report) is called with each whole event that holds a
    usage key; `usage` and `model` are what the last report said (the model the last one that
    named one). `events` counts the events relayed (as chunks, on the fast way
    through the splice); `first` and `last` are the first bytes of the stream and the last sent,
    where an estimate finds OpenAI's role, finish and [DONE] events. `dropped` counts the body
    bytes taken out.
    """

    # The state a stream starts in, as class defaults: a watch is made with every stream.
    _held_bytes = 0
    _dechunker: Dechunker | None = None  # made when the careful way is first needed
    _aligned = True  # chunked: so far every chunk ended an event, the fast way holds
    _open_left = 0  # the bytes of the chunk a read cut still to come, its CRLF included
    events = 0
    dropped = 0
    first = b""
    last: bytes | memoryview = b""
    usage: tuple[int, int] | None = None  # (prompt, completion)
    model: str | None = None

    def __init__(self, read_event: Callable[[bytes], EventReport | None], strip: bool) -> None:
        self._read_event = read_event
        self._strip = strip
        self._held: list[bytes] = []  # data: an unfinished event, held back when stripping, else a copy
        self._open: list[bytes] = []  # chunked, the fast way: the start of the chunk a read cut

    def feed(self, data: bytes) -> bytes:
        """Body bytes as they arrive, chunk framing already removed; returns what to send now."""
        if not self.first:
            self.first = data[:_FIRST_BYTES]
        if not self._held and data.endswith(_EVENT_ENDS) and data.find(USAGE_KEY) < 0:
            self.events += data.count(b"\n\n")
            self.last = data
            return data
        ready = self._careful(data, last=False)
        if not self._strip:
            ready = data
        if ready:
            self.last = ready
        return ready

    def feed_framed(self, framed: bytes, framing: Framing, last: bool) -> bytes | memoryview:
        """Chunked bytes as the splice's `framing` checked them; returns the chunked bytes to send now."""
        if not self.first:
            self.first = framed[:_FIRST_BYTES]
        if self._aligned:
            sent = self._aligned_read(framed, framing.chunks, framing.unaligned, framing.between_chunks)
            if sent is not None:
                if sent:
                    self.last = sent
                return sent
            from_chunk_start = b"".join(self._open) + framed if self._open else framed
            self._open, self._open_left, self._aligned = [], 0, False
        else:
            from_chunk_start = framed
        if self._dechunker is None:
            self._dechunker = Dechunker()
        ready = self._careful(self._dechunker.feed(from_chunk_start), last=last)
        self._aligned = framing.between_chunks and not self._held
        if not self._strip:
            self.last = framed
            return framed
        if not ready:
            return b""
        self.last = b"%x\r\n%s\r\n" % (len(ready), ready)
        return self.last

    def end(self) -> bytes:
        """At the end of the body (no chunk framing): what is still held back, to send now."""
        return self._careful(b"", last=True) if self._strip else b""

    def whole(self, body: bytes) -> None:
        """An event stream read whole (never: streams are relayed as they come)."""
        self._careful(body, last=True)

    def _aligned_read(
        self, framed: bytes, started: int, misfits: int, between_chunks: bool
    ) -> bytes | memoryview | None:
        """The fast way, or None when this read needs the careful one.

        Passes on every chunk up to the last one the read completed, as it came, when each of
        them ends an event; only the read's last chunk holding a usage key is opened, found by a
        search from the read's end: an answer's usage comes at its end, and an upstream that
        sends running totals sends the answer's own last. A chunk the read cut is kept (held
        back when stripping) until it is whole, then looked at the same way.
        """
        if misfits:
            return None
        completed: bytes | memoryview | None = b""
        start = 0  # where the chunks this read began start: the bytes are not copied to cut them out
        if self._open:
            if len(framed) < self._open_left:  # the cut chunk goes on
                self._open.append(framed)
                self._open_left -= len(framed)
                return b"" if self._strip else framed
            completed = b"".join(self._open) + framed[: self._open_left]
            if not completed.endswith(_FRAMED_EVENT_END):
                return None
            key = completed.rfind(USAGE_KEY)
            if key >= 0:
                completed = self._read_usage_chunk(completed, 0, len(completed), key)
            start = self._open_left
        cut, left = len(framed), 0
        if not between_chunks:  # the read cut a chunk: it starts after the last event that ended one
            at = framed.rfind(_FRAMED_EVENT_END, start)
            cut = at + _FRAMED_END_BYTES if at >= 0 else start
            left = _still_to_come(framed, cut)
            if not left or len(framed) - cut + left > _MAX_HELD_BYTES:  # too large to hold: let through
                return None
        key = framed.rfind(USAGE_KEY, start, cut)  # from the end, where an answer's usage is
        edited = self._read_usage_chunk(framed, start, cut, key) if key >= 0 else b""
        if completed is None or edited is None:
            return None
        self.events += started
        if left:
            self._open, self._open_left = [framed[cut:]], left
        elif self._open:
            self._open, self._open_left = [], 0
        if not self._strip:
            return framed
        if key >= 0:
            return b"".join((completed, edited)) if completed else edited
        if completed or start:  # one copy, of the parts that go
            return b"".join((completed, memoryview(framed)[start:cut]))
        return framed if cut == len(framed) else memoryview(framed)[:cut]

    def _read_usage_chunk(self, framed: bytes, start: int, end: int, key: int) -> bytes | memoryview | None:
        """framed[start:end], whole chunks that each end an event, with the chunk holding the usage
        key at `key` read, and (when stripping) the usage-only event taken out of it; None if that
        chunk is not as its framing said (the careful way will tell)."""
        chunk_start = framed.rfind(_FRAMED_EVENT_END, start, key)
        chunk_start = start if chunk_start < 0 else chunk_start + _FRAMED_END_BYTES
        chunk_end = framed.find(_FRAMED_EVENT_END, key, end)
        eol = framed.find(b"\n", chunk_start, key)
        if eol < 0 or chunk_end < 0:
            return None
        chunk_end += _FRAMED_END_BYTES
        size = CHECKED_SIZE_LINES.get(framed[chunk_start : eol + 1])  # the framing checked it
        if size is None:
            try:
                size = chunk_size(framed[chunk_start:eol])
            except ValueError:
                return None
        if size != chunk_end - 2 - (eol + 1):
            return None
        data = framed[eol + 1 : chunk_end - 2]
        if data.find(b"\n\n") == len(data) - 2:  # one event, as upstreams send them
            left = data
            report = self._read_event(data)  # as _read does, without the call: this is every stream's
            if report is not None:
                self.usage, model, usage_only = report
                if model is not None:
                    self.model = model
                if usage_only and self._strip:
                    left, self.dropped = b"", self.dropped + len(data)
        else:
            left = self._read_usage(data)
        if left is data:
            return framed if start == 0 and end == len(framed) else framed[start:end]
        if not left and chunk_end == end:  # the usage-only event ended the read (as OpenAI sends it)
            return memoryview(framed)[start:chunk_start]  # sent as it is: not copied
        rechunked = b"%x\r\n%s\r\n" % (len(left), left) if left else b""
        around = memoryview(framed)  # the rest is copied once, by the join
        return b"".join((around[start:chunk_start], rechunked, around[chunk_end:end]))

    def _careful(self, data: bytes, *, last: bool) -> bytes:
        """Whole events ready to go, the usage ones read (and dropped when stripping)."""
        held = self._held
        if held and not last and not _after_last_event(held[-1][-2:] + data):  # the event goes on
            held.append(data)
            self._held_bytes += len(data)
            if self._held_bytes <= _MAX_HELD_BYTES:
                return b""
            data, last = b"", True  # not an event stream after all: let it (now held) through
        buffer = b"".join(held) + data if held else data
        cut = len(buffer) if last else _after_last_event(buffer)
        if len(buffer) - cut > _MAX_HELD_BYTES:
            cut = len(buffer)
        ready = buffer[:cut]
        self._held = [buffer[cut:]] if cut < len(buffer) else []
        self._held_bytes = len(buffer) - cut
        if not ready:
            return b""
        self.events += ready.count(b"\n\n")
        return self._read_usage(ready) if USAGE_KEY in ready else ready

    def _read_usage(self, ready: bytes) -> bytes:
        kept: list[bytes] = []
        start = 0  # the start of what is not yet in `kept`
        event_start = 0
        key = ready.find(USAGE_KEY)
        while key >= 0:
            event_start = _after_last_event(ready, event_start, key)
            event_end = _event_end(ready, key)
            if self._read(ready[event_start:event_end]) and self._strip:
                kept.append(ready[start:event_start])
                start = event_end
            event_start = event_end
            key = ready.find(USAGE_KEY, event_end)
        if start == 0:
            return ready
        kept.append(ready[start:])
        left = b"".join(kept)
        self.dropped += len(ready) - len(left)
        return left

    def _read(self, event: bytes) -> bool:
        """Read an event that holds a usage key; True if it is a usage-only chat chunk."""
        report = self._read_event(event)
        if report is None:
            return False
        self.usage, model, usage_only = report
        if model is not None:
            self.model = model
        return usage_only
