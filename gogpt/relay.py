"""The one relay: a request goes upstream, the answer comes back as it arrives, byte for byte.

/chat, /v1 and /conv differ only in the URL, credential and body they hand to `relay`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .answers import ERROR_ANSWER_BYTES, read_decoded
from .bodies import body_was_decoded
from .errors import ApiError, upstream_error
from .keys import EVENT_LOOP, HTTP, SETTINGS, SPLICING_HTTP
from .metrics import PENDING, UPSTREAM_ERRORS
from .redact import REDACTOR
from .relayed_headers import answer_head
from .splice import held_body
from .stream_guards import KeepAlive, StallWatch
from .upstreams import KeyPool
from .watching import AnswerWatch, BodyWatch

__all__ = ["call_upstream", "pooled_call", "relay"]

log = logging.getLogger("gogpt.relay")

_STREAM_ASKED = re.compile(rb'"stream"\s*:\s*true')
_ACCEPT_ENCODING = ("Accept-Encoding",)
# Answers of known length up to this size are read whole and sent in one write with their head.
_SMALL_ANSWER_BYTES = 64 << 10


async def relay(
    request: web.Request,
    method: str,
    url: str | URL,
    *,
    headers: Mapping[str, str],
    data: bytes | AsyncIterable[bytes] | None = None,
    on_chunk: Callable[[bytes], None] | None = None,
    keys: KeyPool | None = None,
    watch: AnswerWatch | None = None,
) -> web.StreamResponse:
    """Send one request upstream and stream its answer back unchanged.

    Status, end-to-end headers and body bytes pass through as they arrive: a chunked stream
    through the splice (splice.py), a small answer of known length in one write, anything
    else chunk by chunk (`iter_any`, no re-chunking). A slow client pauses the upstream,
    which is the backpressure. If the client leaves, the upstream connection is closed at
    once; if the upstream breaks off or falls silent mid-body, the client's connection is cut
    so a truncated answer never looks whole. `on_chunk` sees each chunk after it has been
    written, so observing never delays the client. With `keys`, the call goes to the pool's
    best key, and to others while it fails before any byte was relayed (upstreams.py).
    An event stream that has sent nothing for SSE_KEEPALIVE gets a comment between events.
    `watch` is shown a successful answer's head, and its body as it goes (watching.py).
    """
    if isinstance(data, AsyncIterable) and "content-length" not in headers:
        length = request.content_length
        if length is not None and not body_was_decoded(request):
            headers = CIMultiDict(headers)
            headers["Content-Length"] = str(length)
    # The fast path (see splice.py) passes the upstream's chunking on: the client must speak HTTP/1.1.
    spliceable = on_chunk is None and request.version >= aiohttp.HttpVersion11 and _may_stream(request, data)
    upstream, done = await pooled_call(
        request, method, url, keys, headers=headers, data=data, splice=spliceable
    )
    try:
        return await _relay_answer(
            request, upstream, method, url, on_chunk=on_chunk, spliceable=spliceable, answer_watch=watch
        )
    finally:
        done()


def _nothing_to_end() -> None:
    pass


async def pooled_call(
    request: web.Request,
    method: str,
    url: str | URL,
    keys: KeyPool | None,
    *,
    headers: Mapping[str, str],
    data: bytes | AsyncIterable[bytes] | None = None,
    splice: bool = False,
) -> tuple[aiohttp.ClientResponse, Callable[[], None]]:
    """`call_upstream` on the pool's best key (and others while it fails before answering), and
    what ends that key's call once its answer has been relayed. No pool: one call, nothing to end."""
    if keys is None:
        upstream = await call_upstream(request, method, url, headers=headers, data=data, splice=splice)
        return upstream, _nothing_to_end

    def send(outgoing: Mapping[str, str]) -> Awaitable[aiohttp.ClientResponse]:
        return call_upstream(request, method, url, headers=outgoing, data=data, splice=splice)

    upstream, key = await keys.call(send, headers, data)

    def done() -> None:
        key.in_flight -= 1

    return upstream, done


def _may_stream(request: web.Request, data: bytes | AsyncIterable[bytes] | None) -> bool:
    """Whether the answer may be a stream worth splicing: OpenAI streams only when asked to, with
    `"stream": true` in the body (or `stream=` in the query of a GET). A JSON call then skips the
    splice's set-up; a stream it misses still goes the ordinary way, byte for byte."""
    if isinstance(data, bytes):
        return _STREAM_ASKED.search(data) is not None
    return data is not None or "stream" in request.query_string


async def _relay_answer(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    method: str,
    url: str | URL,
    *,
    on_chunk: Callable[[bytes], None] | None,
    spliceable: bool,
    answer_watch: AnswerWatch | None,
) -> web.StreamResponse:
    if upstream.status == 101:  # a protocol switch is not an answer gogpt can relay
        upstream.close()
        UPSTREAM_ERRORS.labels("upstream_error").inc()
        raise ApiError(502, "The upstream switched protocols instead of answering.", code="upstream_error")
    splice = held_body(upstream) if spliceable else None
    reason, answer_headers = answer_head(request, upstream)
    error = upstream.status >= 300  # read whole, decoded and checked for secrets
    if splice is not None and (error or "Content-Length" in upstream.headers):
        splice.release()
        splice = None
    if error:
        return await _whole_answer(request, upstream, reason, answer_headers, redact=True)
    body_watch = answer_watch.observe(upstream) if answer_watch is not None else None
    if on_chunk is None and _is_small_answer(upstream, method):  # one write, not a head and a body
        return await _whole_answer(request, upstream, reason, answer_headers, redact=False, watch=body_watch)
    response = web.StreamResponse(status=upstream.status, reason=reason, headers=answer_headers)
    if splice is not None:
        response.enable_chunked_encoding()  # the upstream's chunks go out as they came
    app = request.app
    settings = app[SETTINGS]
    keepalive = settings.sse_keepalive if upstream.content_type == "text/event-stream" else 0.0
    PENDING.streams_active += 1
    stall: StallWatch | None = None  # not to be confused with body_watch, which reads the body
    idle: KeepAlive | None = None
    try:
        await response.prepare(request)
        stall = StallWatch(request, settings.client_timeout, app[EVENT_LOOP])
        write = response.write
        if splice is not None:
            await splice.forward_to(request, keepalive=keepalive, watch=body_watch)
            await upstream.content.read()  # the terminal chunk, back with aiohttp's parser
        elif body_watch is not None:  # it may hold back or drop bytes: what it returns is sent
            idle = KeepAlive(request, response, keepalive) if keepalive else None
            async for chunk in upstream.content.iter_any():
                ready = body_watch.feed(chunk)
                if ready:
                    if idle is not None:
                        idle.tail = ready
                    await write(ready)
            ready = body_watch.end()
            if ready:
                await write(ready)
        elif keepalive and on_chunk is None:
            idle = KeepAlive(request, response, keepalive)
            async for chunk in upstream.content.iter_any():
                idle.tail = chunk  # before the write: while it waits on the client, the chunk is out
                await write(chunk)
        elif on_chunk is None:  # the ordinary path: nothing but the write per chunk
            async for chunk in upstream.content.iter_any():
                await write(chunk)
        else:
            idle = KeepAlive(request, response, keepalive) if keepalive else None
            async for chunk in upstream.content.iter_any():
                if idle is not None:
                    idle.tail = chunk
                await write(chunk)
                on_chunk(chunk)
    except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
        upstream.close()
        if isinstance(exc, ConnectionResetError):  # the client left mid-write: a hang-up (gateway.py)
            raise
        UPSTREAM_ERRORS.labels("upstream_broke_off").inc()
        log.warning("upstream %s %s broke off mid-answer: %s", method, _safe_url(url), type(exc).__name__)
        if request.transport is not None:  # the client is still there: cut it off
            request.transport.close()
    except BaseException:
        upstream.close()  # cancelled (the client left) or failed: stop paying for tokens now
        raise
    else:
        upstream.release()
        await response.write_eof()
    finally:
        if stall is not None:
            stall.cancel()
        if idle is not None:
            idle.cancel()
        PENDING.streams_active -= 1
        # counted by aiohttp, the splice and the watch, nothing per chunk here
        read = upstream.content.total_bytes + (splice.body_bytes if splice else 0)
        PENDING.relayed_bytes += read - (body_watch.dropped if body_watch is not None else 0)
    return response


def _is_small_answer(upstream: aiohttp.ClientResponse, method: str) -> bool:
    """A non-streamed answer of known, small length (a completion, a model list)."""
    length = upstream.content_length
    return (
        length is not None
        and length <= _SMALL_ANSWER_BYTES
        and method != "HEAD"  # its Content-Length describes a body that is not sent
        and upstream.content_type != "text/event-stream"
    )


async def _whole_answer(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    reason: str | None,
    headers: CIMultiDict[str],
    *,
    redact: bool,
    watch: BodyWatch | None = None,
) -> web.Response:
    """An answer read whole and sent with its head in one write.

    With `redact` (every error answer), the body is decoded and gogpt's own secrets are
    blanked out of it: upstreams quote credentials in their errors ("Incorrect API key
    provided: ..."), and the client must never learn a key that way. An error answer too
    large or in a coding gogpt cannot read is refused with 502 (answers.py).
    """
    async with upstream:
        if redact:
            body = request.app[REDACTOR].body(await read_decoded(upstream, ERROR_ANSWER_BYTES))
            headers.popall("Content-Encoding", None)  # sent back decoded, as every client accepts
        else:
            try:
                body = await upstream.read()
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise upstream_error(exc) from None
            if watch is not None:
                watch.whole(body)
    headers.popall("Content-Length", None)
    PENDING.relayed_bytes += len(body)
    answer = web.Response(status=upstream.status, reason=reason, body=body, headers=headers)
    # Sent now: what follows an answer (its usage, metrics, the access line) is not in the client's wait.
    await answer.prepare(request)
    await answer.write_eof()
    return answer


async def call_upstream(
    request: web.Request,
    method: str,
    url: str | URL,
    *,
    headers: Mapping[str, str],
    data: bytes | AsyncIterable[bytes] | None = None,
    params: Mapping[str, str] | None = None,
    splice: bool = False,
) -> aiohttp.ClientResponse:
    """Make the upstream call; a failure before its headers becomes a 502 or 504 `ApiError`.

    With `splice`, a chunked answer's body is held for `held_body` (see splice.py).
    """
    session = request.app[SPLICING_HTTP if splice else HTTP]
    try:
        return await session.request(
            method,
            url,
            headers=headers,
            data=data,
            params=params,
            allow_redirects=False,
            # only what the client itself accepts (upstream_headers sets it), never aiohttp's default
            skip_auto_headers=None if "Accept-Encoding" in headers else _ACCEPT_ENCODING,
        )
    except (TimeoutError, aiohttp.ClientError) as exc:
        if isinstance(exc.__cause__, ApiError):  # the upload outgrew the limit while streaming
            raise exc.__cause__ from None
        log.warning("upstream %s %s failed: %s", method, _safe_url(url), type(exc).__name__)
        error = upstream_error(exc)
        UPSTREAM_ERRORS.labels(error.code).inc()
        raise error from None


def _safe_url(url: str | URL) -> str:
    """The URL without credentials or query, fit for a log line."""
    parsed = URL(url) if isinstance(url, str) else url
    return str(parsed.with_user(None).with_query(None))
