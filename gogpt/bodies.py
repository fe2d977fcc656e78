"""Request bodies: read bounded in bytes, whatever their encoding."""

from __future__ import annotations

from collections.abc import AsyncIterable

import aiohttp
from aiohttp import web

from .errors import ApiError

__all__ = ["body_was_decoded", "read_body", "request_body"]

# Bodies up to this size are read whole and sent with a Content-Length; larger ones stream.
_READ_WHOLE_BYTES = 1 << 20
# aiohttp's server decodes request bodies in these encodings (its parser's list), so what gogpt
# passes on is the decoded body: its Content-Encoding and Content-Length no longer describe it.
_DECODED_BY_AIOHTTP = frozenset({"gzip", "deflate", "br", "zstd"})


def body_was_decoded(request: web.BaseRequest) -> bool:
    return any(
        value.lower() in _DECODED_BY_AIOHTTP for value in request.headers.getall("Content-Encoding", ())
    )


async def request_body(request: web.Request, max_bytes: int) -> bytes | AsyncIterable[bytes] | None:
    """The client's body for the upstream: small ones read whole, large ones streamed.

    Streaming keeps uploads out of memory; the limit is enforced either way.
    """
    length = request.content_length
    if not request.body_exists:
        return None
    if length is not None and length > max_bytes:
        raise _too_large(max_bytes)
    if length is not None and length <= _READ_WHOLE_BYTES:
        return await read_body(request, max_bytes)
    return _limited(request.content, max_bytes)


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 past `max_bytes`.

    Checked here rather than by `client_max_size`, which aiohttp takes from the outermost
    application: a gateway mounted with `add_subapp` would get its host's limit instead.
    """
    length = request.content_length
    if length is not None and length > max_bytes:
        raise _too_large(max_bytes)
    if length is not None and not body_was_decoded(request):  # it cannot outgrow its length
        try:
            return await request.content.read()
        except web.RequestPayloadError:
            raise _unreadable() from None
    chunks = [chunk async for chunk in _limited(request.content, max_bytes)]
    return b"".join(chunks)


async def _limited(content: aiohttp.StreamReader, max_bytes: int) -> AsyncIterable[bytes]:
    received = 0
    try:
        async for chunk in content.iter_any():
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes)
            yield chunk
    except web.RequestPayloadError:  # a broken chunk or compressed body: the client's fault
        raise _unreadable() from None


def _unreadable() -> ApiError:
    return ApiError(400, "The request body could not be read.", code="invalid_body")


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"The request body is larger than {max_bytes} bytes.", code="request_too_large")
