"""Upstream answers that gogpt reads whole (error answers, /conv JSON): bounded while read and decoded.

An upstream, or anyone on a plain-http path to it, decides how long an answer is and how far it
inflates. gogpt reads at most `max_bytes` of it and decodes at most as many, and answers 502
beyond either rather than hold whatever it is sent. It asks upstreams only for the content
codings it can decode itself, and refuses an answer it must read in any other.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Iterable

import aiohttp
from multidict import CIMultiDictProxy

from .errors import ApiError, upstream_error

__all__ = ["DECODABLE", "ERROR_ANSWER_BYTES", "accept_encoding", "content_codings", "decoded", "read_decoded"]

log = logging.getLogger("gogpt.relay")

# Error answers are read whole to be checked for secrets; OpenAI's are well under 1 KiB.
ERROR_ANSWER_BYTES = 1 << 20
# The codings zlib undoes, as an Accept-Encoding value: gogpt asks upstreams for no others.
DECODABLE = "gzip, deflate"
_DECODABLE = ("gzip", "deflate")
_ALIASES = {"x-gzip": "gzip"}
_MAX_CODINGS = 4  # `gzip, gzip` is legal and seen; a longer stack is someone playing games
_MAX_GZIP_MEMBERS = 16  # 50,000 empty ones fit in 1 MiB and take 0.4 s to walk
_GZIP_WBITS = 16 + zlib.MAX_WBITS


def accept_encoding(client_values: Iterable[str]) -> str:
    """The Accept-Encoding for the upstream: the client's codings that gogpt can decode too, else identity.

    A successful answer reaches the client as the upstream encoded it, so the client must read
    it; an error answer is decoded here to be checked, so gogpt must read it as well.
    """
    return _readable_by_both(", ".join(client_values))


@functools.lru_cache(maxsize=64)  # clients send a handful of distinct values: parsed once each
def _readable_by_both(client_value: str) -> str:
    accepted: dict[str, bool] = {}
    for item in client_value.split(","):
        coding, *parameters = item.split(";")
        coding = coding.strip().lower()
        accepted[_ALIASES.get(coding, coding)] = not any(map(_is_zero_weight, parameters))
    anything = accepted.get("*", False)
    return ", ".join(coding for coding in _DECODABLE if accepted.get(coding, anything)) or "identity"


def _is_zero_weight(parameter: str) -> bool:
    name, _, value = parameter.partition("=")
    if name.strip().lower() != "q":
        return False
    try:
        return float(value) == 0
    except ValueError:
        return False


async def read_decoded(upstream: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The whole body without its content codings; 502 past `max_bytes` read or decoded, or undecodable.

    The upstream connection is closed when the body is refused unread, so it never goes back
    to the pool with the rest still coming.
    """
    body = await _read_at_most(upstream, max_bytes)
    try:
        return decoded(body, upstream.headers, max_bytes)
    except _TooLarge:
        raise _too_large(max_bytes) from None
    except ValueError:
        raise _undecodable() from None


def decoded(body: bytes, headers: CIMultiDictProxy[str], max_bytes: int) -> bytes:
    """`body` without the content codings `headers` name; ValueError if undecodable or past `max_bytes`."""
    codings = content_codings(headers)
    if not codings or not body:
        return body
    if len(codings) > _MAX_CODINGS or any(coding not in _DECODABLE for coding in codings):
        raise ValueError("an unknown content coding")
    try:
        for coding in reversed(codings):  # the last one listed was applied last
            body = (
                _inflate_deflate(body, max_bytes)
                if coding == "deflate"
                else _inflate(body, _GZIP_WBITS, max_bytes)
            )
    except zlib.error:
        raise ValueError("a body that does not decode") from None
    return body


class _TooLarge(ValueError):
    """A body that decodes to more than it may."""


async def _read_at_most(upstream: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    if upstream.method == "HEAD" or upstream.status in (204, 304):
        return b""  # a Content-Length here describes a body that is not sent
    length = upstream.content_length
    if length is not None and length > max_bytes:
        upstream.close()
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in upstream.content.iter_any():
            received += len(chunk)
            if received > max_bytes:
                upstream.close()
                raise _too_large(max_bytes)
            chunks.append(chunk)
    except (TimeoutError, aiohttp.ClientError) as exc:
        upstream.close()
        raise upstream_error(exc) from None
    return b"".join(chunks)


def content_codings(headers: CIMultiDictProxy[str]) -> list[str]:
    """Every coding of every Content-Encoding header, in the order applied, without `identity`."""
    values = headers.getall("Content-Encoding", ())
    codings = (coding.strip().lower() for value in values for coding in value.split(","))
    return [_ALIASES.get(coding, coding) for coding in codings if coding not in ("", "identity")]


def _inflate_deflate(data: bytes, max_bytes: int) -> bytes:
    """`deflate` as the standard says (zlib framing), or the raw deflate some servers send."""
    try:
        return _inflate(data, zlib.MAX_WBITS, max_bytes)
    except zlib.error:
        return _inflate(data, -zlib.MAX_WBITS, max_bytes)


def _inflate(data: bytes, wbits: int, max_bytes: int) -> bytes:
    """`data` inflated, every gzip member of it, stopping as soon as the output passes `max_bytes`."""
    parts: list[bytes] = []
    room = max_bytes
    for _ in range(_MAX_GZIP_MEMBERS):
        inflater = zlib.decompressobj(wbits)
        part = inflater.decompress(data, room + 1)
        if len(part) > room:
            raise _TooLarge()
        if not inflater.eof:  # cut short
            raise zlib.error("truncated")
        parts.append(part)
        room -= len(part)
        data = inflater.unused_data
        if not data:
            return b"".join(parts)
        if wbits != _GZIP_WBITS:  # only gzip may hold several members
            raise zlib.error("trailing bytes")
    raise zlib.error("too many gzip members")


def _too_large(max_bytes: int) -> ApiError:
    log.warning("refused an upstream answer larger than gogpt reads whole (%d bytes)", max_bytes)
    return ApiError(
        502,
        f"The upstream's answer is larger than gogpt reads whole ({max_bytes} bytes).",
        code="upstream_error",
    )


def _undecodable() -> ApiError:
    log.warning("refused an upstream answer gogpt could not decode")  # its coding's name may be anything
    return ApiError(502, "The upstream's answer could not be decoded.", code="upstream_error")
