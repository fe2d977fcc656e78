"""Chunked transfer coding (RFC 9112 section 7.1) as bytes stream past, parsing only, no I/O:
checked before the splice sends it on as it came (`ChunkedFraming`), and its data taken out
of the framing again where an answer is read on the way (`Dechunker`). Tested on plain bytes.
"""

from __future__ import annotations

import re

__all__ = ["CHECKED_SIZE_LINES", "ChunkedFraming", "Dechunker", "MalformedChunk", "chunk_size"]

# A chunk-size line: hex size, optional extensions, CRLF (RFC 9112 section 7.1). Anything else
# is refused: these bytes go to the client unparsed, so they must frame exactly what they say.
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r\n")
_MAX_SIZE_LINE = 4096


def chunk_size(line: bytes) -> int:
    """The size a chunk-size line gives, extensions and CRLF around it ignored (int() skips the
    spaces and the CR); ValueError when it gives none."""
    return int(line.split(b";", 1)[0], 16)


class MalformedChunk(ValueError):
    """Bytes that are not chunked transfer coding."""


class ChunkedFraming:
    """Checks chunked transfer coding as it streams past, doing no I/O (as h11's ChunkedReader).

    `feed` returns the bytes that may go on now (a size line cut by a read waits for the rest)
    and, once the terminal chunk has come, the bytes from it on; it raises `MalformedChunk`.
    """

    __slots__ = ("_crlf_due", "_in_chunk", "_partial", "between_chunks", "chunks", "data_bytes", "unaligned")

    def __init__(self) -> None:
        self._partial = b""  # an unfinished size line, or the CR of the CRLF after a chunk's data
        self._in_chunk = 0  # bytes of chunk data still to come
        self._crlf_due = False  # the CRLF that closes a chunk's data, when it did not come with it
        self.data_bytes = 0  # chunk data seen, framing excluded
        # Of the last feed, for the usage watch, which looks at each (plain attributes: it reads
        # them once a read, and a property is a call): the chunks whose size line it read, those
        # it held whole whose data does not end an event with \n\n, and whether it ended between
        # two chunks (a size line still to come is not on the wire yet).
        self.chunks = self.unaligned = 0
        self.between_chunks = True

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        if self._partial:
            data, self._partial = self._partial + data, b""
        pos, end = 0, len(data)
        if self._in_chunk or self._crlf_due:  # the rest of a chunk an earlier read cut
            pos = self._rest_of_chunk(data, 0)
        find, sizes = data.find, CHECKED_SIZE_LINES
        chunks = unaligned = data_bytes = 0  # counted here, added to the attributes once per read
        try:
            while pos < end and not self._crlf_due:
                eol = find(b"\n", pos)
                size = sizes.get(data[pos : eol + 1])  # no line left: data[pos:0], never a key
                # the usual chunk, as few steps as can be: its size line checked before, all of it
                # here, ending an event
                while size and data[(after := eol + 1 + size) - 2 : after + 2] == b"\n\n\r\n":
                    chunks += 1
                    data_bytes += size
                    pos = after + 2
                    eol = find(b"\n", pos)
                    size = sizes.get(data[pos : eol + 1])
                if eol < 0:
                    if end - pos > _MAX_SIZE_LINE:
                        raise MalformedChunk("a chunk-size line that does not end")
                    self._partial = data[pos:]
                    return data[:pos], None
                if size is None:
                    size = _checked_size(data[pos : eol + 1])
                if size == 0:
                    return data[:pos], data[pos:]
                chunks += 1
                data_bytes += size
                after = eol + 1 + size  # where the chunk's data ends
                ending = data[after - 2 : after + 2]
                if ending == b"\n\n\r\n":  # the whole chunk is here, and ends an event (a new size line)
                    pos = after + 2
                elif ending[2:] == b"\r\n":  # the whole chunk is here
                    pos = after + 2
                    unaligned += 1
                else:  # the read cut it (or what follows its data is not CRLF, which is refused)
                    self._in_chunk, self._crlf_due = size, True
                    pos = self._rest_of_chunk(data, eol + 1)
            if self._crlf_due:  # the read ended in a chunk, or before all of its CRLF
                if data[pos:] not in (b"", b"\r"):
                    raise MalformedChunk("chunk data not followed by CRLF")
                self._partial = data[pos:]
                return data[:pos], None
            return data, None
        finally:
            self.chunks, self.unaligned = chunks, unaligned
            self.between_chunks = not (self._in_chunk or self._crlf_due)
            self.data_bytes += data_bytes

    def _rest_of_chunk(self, data: bytes, pos: int) -> int:
        """Past what `data` holds of the chunk going on at `pos`: its data, then its CRLF."""
        if self._in_chunk:
            step = min(self._in_chunk, len(data) - pos)
            pos += step
            self._in_chunk -= step
        if not self._in_chunk and len(data) - pos >= 2:
            if data[pos : pos + 2] != b"\r\n":
                raise MalformedChunk("chunk data not followed by CRLF")
            self._crlf_due = False
            pos += 2
        return pos


# Size lines seen before and found good, with their sizes: upstreams write the same few again
# and again, and a look-up costs a third of the check (the match and int()). Short lines only,
# and a bounded number of them, so an upstream cannot make this grow. The usage watch reads
# the size of a chunk the framing has checked here too.
CHECKED_SIZE_LINES: dict[bytes, int] = {}
_MAX_CHECKED_SIZE_LINES = 4096
_MAX_KEPT_SIZE_LINE = 16


def _checked_size(line: bytes) -> int:
    """The size a chunk-size line (CRLF included) gives, or `MalformedChunk`."""
    size_line = _CHUNK_SIZE_LINE.fullmatch(line)
    if size_line is None:
        raise MalformedChunk("not a chunk-size line")
    size = int(size_line[1], 16)
    if len(line) <= _MAX_KEPT_SIZE_LINE and len(CHECKED_SIZE_LINES) < _MAX_CHECKED_SIZE_LINES:
        CHECKED_SIZE_LINES[line] = size
    return size


class Dechunker:
    """The data of chunked bytes that `ChunkedFraming` has already checked.

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
                self._left = chunk_size(framed[pos:eol])
                pos = eol + 1
        return b"".join(parts)
