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
from collections.abc import Iterable, Iterator

import aiohttp
from multidict import CIMultiDictProxy

from .errors import ApiError, upstream_error

__all__ = [
    "DECODABLE",
    "ERROR_ANSWER_BYTES",
    "Decoder",
    "accept_encoding",
    "content_codings",
    "decoded",
    "read_decoded",
]

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
_STEP = 1 << 20  # output inflated at a time


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
    decoder = Decoder(codings, max_bytes)
    body = b"".join(decoder.feed(body))
    if not decoder.finished:
        raise ValueError("a body cut short")
    return body


class Decoder:
    """Undoes content codings (gzip and deflate, stacked as `codings` lists them) as the bytes
    arrive, at most `max_bytes` of output in all; ValueError for bytes that do not decode.

    `feed` yields the output a step of at most _STEP bytes at a time, each inflated only once the
    one before is used, so what a read makes gogpt hold does not grow with how far it inflates.
    With `max_ratio`, the output past its first `unchecked_bytes` may run at most that many times
    the bytes fed, so a read's work is bounded by its size, not by how far it inflates.
    `finished`: every coding's end has come, with nothing after it.
    """

    __slots__ = ("_credit", "_inflaters", "_max_ratio", "_room")

    def __init__(
        self, codings: Iterable[str], max_bytes: int, *, max_ratio: int = 0, unchecked_bytes: int = 0
    ) -> None:
        codings = list(codings)
        if len(codings) > _MAX_CODINGS or any(coding not in _DECODABLE for coding in codings):
            raise ValueError("an unknown content coding")
        # the coding listed last was applied last, so it is undone first
        self._inflaters = [_Inflater(coding == "gzip") for coding in reversed(codings)]
        self._room = max_bytes
        self._max_ratio = max_ratio
        self._credit = unchecked_bytes  # the output the ratio still allows

    @property
    def finished(self) -> bool:
        return all(inflater.finished for inflater in self._inflaters)

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._credit += self._max_ratio * len(data)
        steps: Iterable[bytes] = (data,)
        for inflater in self._inflaters:
            steps = inflater.inflate(steps)
        try:
            for step in steps:
                self._room -= len(step)
                self._credit -= len(step)
                if self._room < 0 or (self._max_ratio and self._credit < 0):
                    raise _TooLarge()
                yield step
        except zlib.error:
            raise ValueError("a body that does not decode") from None


class _Inflater:
    """One coding undone as its bytes arrive: every member of a gzip body (up to _MAX_GZIP_MEMBERS),
    deflate as the standard says (zlib framing) or the raw deflate some servers send."""

    __slots__ = ("_gzip", "_inflater", "_members", "_start")

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        # deflate's framing (zlib or raw) is told by its first two bytes, so its inflater waits for them
        self._inflater = zlib.decompressobj(_GZIP_WBITS) if gzip else None
        self._members = 1
        self._start = b""

    @property
    def finished(self) -> bool:
        return self._inflater is not None and self._inflater.eof and not self._inflater.unused_data

    def inflate(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        """`pieces` inflated, at most _STEP bytes at a time."""
        for data in pieces:
            if self._inflater is None:
                data = self._start + data
                if len(data) < 2:
                    self._start = data
                    continue
                zlib_framed = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0  # RFC 1950
                self._inflater = zlib.decompressobj(zlib.MAX_WBITS if zlib_framed else -zlib.MAX_WBITS)
            while True:
                step = self._inflater.decompress(data, _STEP)
                if step:
                    yield step
                if not self._inflater.eof:
                    data = self._inflater.unconsumed_tail  # what did not fit in the step
                    if not data and len(step) < _STEP:  # a full step may have left output behind
                        break
                    continue
                data = self._inflater.unused_data
                if not data:
                    break
                if not self._gzip or self._members == _MAX_GZIP_MEMBERS:  # bytes after the end
                    raise zlib.error("trailing bytes")
                self._inflater = zlib.decompressobj(_GZIP_WBITS)  # another gzip member
                self._members += 1


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
