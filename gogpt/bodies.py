"""Request bodies: read bounded in decoded bytes and in time, whatever their encoding.

aiohttp decodes gzip, deflate, br and zstd bodies as they arrive, a piece of at most 64 KiB at a
time, pausing its parser until the piece is read (since 3.14.1; before, a small compressed body
could still be inflated whole). So counting what the stream yields bounds a body's decoded size
while it is decoded: a bomb is refused at the limit, never inflated first and measured after.
Each wait for the client is bounded too: a body that stops arriving is answered 408 and its
connection closed, so slow uploads cannot hold connections for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import contextmanager
from email.parser import BytesParser
from email.policy import HTTP as HTTP_POLICY
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from .errors import ApiError, json_object
from .json_child import FieldNames
from .json_parser import INLINE_BYTES, JSON_PARSER
from .keys import CALLER, SETTINGS

__all__ = [
    "TOKEN_BODY_BYTES",
    "body_was_decoded",
    "read_json_object",
    "read_whole_body",
    "request_body",
    "settle_connection",
    "token_fields",
]

# /token's id, hour and key fit in this many times over; it is public, so it gets no more.
TOKEN_BODY_BYTES = 8 << 10
_TOKEN_BODY_SECONDS = 30.0  # for the whole /token body (never more than UPSTREAM_TIMEOUT)
# Reads ask for at most aiohttp's own read size: `read(n)` past it raises the stream's buffer and
# decompression limits to n (and `read()` lifts them), which would inflate a bomb in one go. A
# read returns at once while data is buffered, and taking data resumes aiohttp's parser, which
# decodes more on the spot: so after each piece the loop gets its turn, or a large compressed
# body would be inflated and read in one go (about 0.1 s for 32 MiB) while nothing else runs.
_STEP_BYTES = 1 << 16
# A large body holds one of the parser's few turns while it is read, so it must keep coming:
# within _TURN_GRACE_SECONDS, and one more second for each _TURN_MIN_RATE bytes that came, as
# Apache's mod_reqtimeout asks (MinRate). A slower upload is answered 408, and frees its turn.
_TURN_GRACE_SECONDS = 10.0
_TURN_MIN_RATE = 64 << 10
# /v1 bodies up to this size are read whole and sent with a Content-Length; larger ones stream.
_READ_WHOLE_BYTES = 1 << 20
# aiohttp's server decodes request bodies in these encodings (its parser's list), so what gogpt
# passes on is the decoded body: its Content-Encoding and Content-Length no longer describe it.
_DECODED_BY_AIOHTTP = frozenset({"gzip", "deflate", "br", "zstd"})


def body_was_decoded(request: web.BaseRequest) -> bool:
    return any(
        value.lower() in _DECODED_BY_AIOHTTP for value in request.headers.getall("Content-Encoding", ())
    )


class _Body:
    """A request body read in steps, each wait for the client at most `idle` seconds (None: no bound)."""

    def __init__(self, request: web.BaseRequest, idle: float | None, *, whole: bytes | None = None) -> None:
        """`whole`: the body, when `_came_whole` has read it already."""
        self._content = request.content
        self._idle = idle
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False
        self._pace: tuple[float, int] | None = None  # (the time due, at the size then), once paced
        if whole is None:
            whole = _came_whole(request)
        if whole is not None:
            self._add(whole)
            self.complete = True

    async def read_past(self, limit: int) -> None:
        """Read until the body ends or more than `limit` bytes are in."""
        while not self.complete and self.size <= limit:
            chunk = await self.next_chunk(min(_STEP_BYTES, limit + 1 - self.size))
            if chunk:
                self._add(chunk)
                await asyncio.sleep(0)  # see _STEP_BYTES
            else:
                self.complete = True

    async def next_chunk(self, at_most: int = _STEP_BYTES) -> bytes:
        """Up to `at_most` bytes of what has arrived (or of the next to arrive), decoded."""
        wait = self._idle
        if self._pace is not None:
            due, size = self._pace
            left = due + (self.size - size) / _TURN_MIN_RATE - asyncio.get_running_loop().time()
            wait = left if wait is None else min(wait, left)
        async with asyncio.timeout(wait):  # what has arrived is read even when no wait is left
            return await self._content.read(at_most)

    def keep_pace(self) -> None:
        """From now on the rest must come at _TURN_MIN_RATE, after _TURN_GRACE_SECONDS."""
        self._pace = (asyncio.get_running_loop().time() + _TURN_GRACE_SECONDS, self.size)

    def _add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)

    async def read_all(self, max_bytes: int) -> None:
        """Read to the end, refused with 413 past `max_bytes`."""
        await self.read_past(max_bytes)
        if not self.complete or self.size > max_bytes:
            raise _too_large(max_bytes)

    def joined(self) -> bytes:
        if len(self.chunks) > 1:
            self.chunks = [b"".join(self.chunks)]  # the pieces go at once, not when the request ends
        return self.chunks[0] if self.chunks else b""

    async def whole(self, max_bytes: int) -> bytes:
        """All of it, refused with 413 past `max_bytes`."""
        await self.read_all(max_bytes)
        return self.joined()

    async def stream(self, max_bytes: int) -> AsyncIterator[bytes]:
        """What was read so far, then the rest as it arrives; 413 past `max_bytes`."""
        read, self.chunks = self.chunks, []
        for chunk in read:
            yield chunk
        while True:
            with _client_faults():
                chunk = await self.next_chunk()
            if not chunk:
                return
            self.size += len(chunk)
            if self.size > max_bytes:
                raise _too_large(max_bytes)
            yield chunk
            await asyncio.sleep(0)  # see _STEP_BYTES


@contextmanager
def _client_faults() -> Iterator[None]:
    """A broken or stalled body is the client's doing: 400 or 408, never a 5xx."""
    try:
        yield
    except web.RequestPayloadError:  # a broken chunk or compressed body
        raise _unreadable() from None
    except TimeoutError:
        raise ApiError(408, "The request body did not arrive in time.", code="request_timeout") from None


def _unreadable() -> ApiError:
    return ApiError(400, "The request body could not be read.", code="invalid_body")


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"The request body is larger than {max_bytes} bytes.", code="request_too_large")


def _came_whole(request: web.BaseRequest) -> bytes | None:
    """The whole body when all of it came with the head (most calls), read without a stepwise
    reader, a timer or an await; None when some of it is still to come."""
    content = request.content
    if not content.is_eof():
        return None
    try:
        return content.read_nowait()
    except web.RequestPayloadError:
        raise _unreadable() from None


def _in_place_bytes(max_bytes: int) -> int:
    """The largest body read and checked on the loop; a larger one waits for a large-body turn,
    where it is refused (413) past `max_bytes`."""
    return min(INLINE_BYTES, max_bytes)


def _refuse_declared_past(request: web.BaseRequest, max_bytes: int) -> None:
    """Checked here rather than by `client_max_size`, which aiohttp takes from the outermost
    application: a gateway mounted with `add_subapp` would get its host's limit instead."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise _too_large(max_bytes)


async def request_body(request: web.Request) -> bytes | AsyncIterable[bytes] | None:
    """/v1: the client's body for the upstream, read whole up to 1 MiB, streamed beyond it.

    Streaming keeps uploads (and compressed bodies that swell) out of memory; the limit holds
    either way, and each wait for the client is bounded by UPSTREAM_TIMEOUT.
    """
    if not request.body_exists:
        return None
    settings = request.app[SETTINGS]
    _refuse_declared_past(request, settings.max_body_bytes)
    data = _came_whole(request)
    if data is not None:
        if len(data) > settings.max_body_bytes:  # a compressed body, decoded
            raise _too_large(settings.max_body_bytes)
        return data
    body = _Body(request, settings.upstream_timeout)
    length = request.content_length
    if length is None or length <= _READ_WHOLE_BYTES or body_was_decoded(request):
        with _client_faults():
            await body.read_past(_READ_WHOLE_BYTES)
            if body.complete:
                return await body.whole(settings.max_body_bytes)
    return body.stream(settings.max_body_bytes)


async def read_json_object(request: web.Request, names: FieldNames) -> tuple[bytes, dict[str, Any]]:
    """The body, checked to be a JSON object, and its fields `names` (see `object_fields`).

    A body over INLINE_BYTES waits for one of the parser's few large-body turns (one per caller)
    before it is read on, at a minimum rate, and is parsed off the loop, so neither memory, nor
    the loop, nor the other callers are at its mercy.
    """
    app = request.app
    settings = app[SETTINGS]
    parser = app[JSON_PARSER]
    _refuse_declared_past(request, settings.max_body_bytes)
    inline = min(INLINE_BYTES, settings.max_body_bytes)  # _in_place_bytes, without the call
    data = _came_whole(request)
    if data is not None and len(data) <= inline:
        return data, parser.fields_here(data, names)
    body = _Body(request, settings.upstream_timeout, whole=data)
    with _client_faults():
        await body.read_past(inline)
        if body.complete and body.size <= inline:
            return body.joined(), parser.fields_here(body.joined(), names)
        async with parser.large_body(request[CALLER].identity):
            body.keep_pace()
            await body.read_all(settings.max_body_bytes)
            fields = await parser.fields_in_child(body.chunks, body.size, names)
            return body.joined(), fields  # joined only once it passed: a bomb never is


async def read_whole_body(request: web.Request) -> bytes:
    """The whole body, read as `read_json_object` reads one (bounded in size and time; one over
    INLINE_BYTES waits for one of the parser's few large-body turns), for a check of all of it."""
    settings = request.app[SETTINGS]
    _refuse_declared_past(request, settings.max_body_bytes)
    inline = _in_place_bytes(settings.max_body_bytes)
    body = _Body(request, settings.upstream_timeout)
    with _client_faults():
        await body.read_past(inline)
        if body.complete and body.size <= inline:
            return body.joined()
        async with request.app[JSON_PARSER].large_body(request[CALLER].identity):
            body.keep_pace()
            return await body.whole(settings.max_body_bytes)


async def token_fields(request: web.Request) -> dict[str, Any]:
    """POST /token's fields, from a JSON or form body.

    The route is public, so its body is small (TOKEN_BODY_BYTES) and must arrive whole within
    30 s; it is refused (413, 408) before anything in it is parsed.
    """
    settings = request.app[SETTINGS]
    _refuse_declared_past(request, TOKEN_BODY_BYTES)
    body = _Body(request, idle=None)
    with _client_faults():
        async with asyncio.timeout(min(_TOKEN_BODY_SECONDS, settings.upstream_timeout)):
            data = await body.whole(TOKEN_BODY_BYTES)
    content_type = request.content_type
    if content_type == "application/json":
        return json_object(data)
    try:
        if content_type == "multipart/form-data":
            return _multipart_fields(request.headers["Content-Type"], data)
        if content_type in ("application/x-www-form-urlencoded", ""):
            charset = request.charset or "utf-8"
            return _first_of_each(parse_qsl(data.rstrip().decode(charset), keep_blank_values=True))
    except (ValueError, LookupError):  # not in its charset, or an unknown charset
        raise ApiError(400, "The body is not a valid form.", code="invalid_form") from None
    return {}


def _multipart_fields(content_type: str, data: bytes) -> dict[str, Any]:
    """The text fields of a small multipart/form-data body (what `fetch` sends for a FormData)."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode("utf-8", "surrogateescape")
    message = BytesParser(policy=HTTP_POLICY).parsebytes(head + data)
    if not message.is_multipart():
        raise ValueError("not multipart")
    pairs = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        value = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(value, bytes):
            pairs.append((name, value.decode(part.get_content_charset() or "utf-8")))
    return _first_of_each(pairs)


def _first_of_each(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in pairs:
        fields.setdefault(name, value)
    return fields


async def settle_connection(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """After the answer to a request with a body: end the connection if that body leaves it unfit
    for another request (gateway.py calls this).

    A chunked body: aiohttp's request parser (3.14.5 and before) keeps the last trailer field of
    a chunked body and adds it to the headers of the next request on the connection, so a trailer
    `OpenAI-Organization: org-x` went upstream with the following call. aiohttp reads trailers but
    does not expose them (https://github.com/aio-libs/aiohttp/issues/1652), so which bodies had
    one cannot be told: every chunked one ends its connection after the answer. Browsers and the
    OpenAI SDKs send bodies of known length, so this costs a reconnect only to clients that stream
    uploads.

    A body left unfinished whose rest would cost to read: on a 408 (the client stalled; RFC 9110
    has the server close rather than wait on), or when compressed (aiohttp lingers up to 10 s
    reading the rest, which means inflating it: 10 s of CPU for a few MB of gzip, token or not).
    Then the connection closes as soon as the answer is out.
    """
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        response.force_close()  # says `Connection: close` unless the answer is already under way
    if (
        not request.content.is_eof()
        and (response.status == 408 or body_was_decoded(request))
        and request.transport is not None
    ):
        response.force_close()
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()  # skips aiohttp's lingering read of the rest
