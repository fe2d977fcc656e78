"""Usage per call: asked of the upstream, read from its answer, and written to the ledger when the call ends.

Exact when the upstream reports it (a JSON answer's `usage`, a stream's usage chunk or
`response.completed` event); estimated, and marked so, when it does not or the answer ends
early (client hang-up, upstream cut or timeout): completion tokens are the content deltas
relayed, prompt tokens the request body's bytes / 4. A call counts once the upstream has
accepted it (a 2xx head), or when it ended while the upstream was still working on it (the
client left, or the upstream did not answer in time); an upstream's refusal is not usage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, MutableMapping
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import hdrs, web

from .answers import content_codings
from .errors import UPSTREAM_TIMEOUT, ApiError
from .json_watch import JsonWatch
from .keys import CALLER
from .ledger import LEDGER, UsageLedger, model_name
from .usage_reports import event_report
from .usage_request import REQUEST_FIELDS, with_usage_asked
from .usage_watch import EventWatch

__all__ = ["METERED_PATHS", "REQUEST_FIELDS", "Meter", "meter_conv_call", "meter_openai_call"]

# The OpenAI API paths (under /v1) whose answers report usage.
METERED_PATHS = frozenset({"chat/completions", "completions", "responses", "embeddings"})


def meter_openai_call(
    ledger: UsageLedger,
    identity: str,
    path: str,
    body: bytes,
    fields: dict[str, Any],
    headers: MutableMapping[str, str],
    spent: Callable[[int], None] | None = None,
) -> tuple[bytes, Meter]:
    """The body to send for `identity`'s call to `/v1/{path}` (one of METERED_PATHS) and the meter
    of its usage. `fields` are the body's REQUEST_FIELDS; `spent`, when given, is told the tokens
    the call used.

    A streamed chat completion whose client did not ask for usage asks for it here, and the
    usage-only chunk it brings is taken out of the answer again. A stream is asked for without
    compression (`headers` are changed), so its events can be read as they pass.
    """
    chat = path == "chat/completions"
    sent = body
    if fields.get("stream") is True:
        headers[hdrs.ACCEPT_ENCODING] = "identity"  # hdrs' names are looked up without being case-folded
        if chat:
            sent = with_usage_asked(body, fields)
    # positional, as a call with keywords costs twice one without; what gogpt asked for is taken out
    model = model_name(fields.get("model"))
    return sent, Meter(ledger, identity, model, spent, len(body) // 4, chat, sent is not body)


def meter_conv_call(request: web.Request, model: str) -> Meter:
    """The meter of a /conv reply: the backend-api reports no tokens, so the call alone is counted."""
    return Meter(request.app[LEDGER], request[CALLER].identity, model, requests_only=True)


class Meter:
    """One call's usage. Used as a context manager around the relay, which it watches (AnswerWatch);
    on exit it writes the usage to the ledger, exact if the answer reported it, else estimated, and
    tells `spent` (a budget's settlement) how many tokens that was, 0 when the call made no usage."""

    # What the call finds out, from nothing: class defaults, so a meter is made without them.
    _answered = False
    _watch: EventWatch | JsonWatch | None = None

    def __init__(
        self,
        ledger: UsageLedger,
        identity: str,
        model: str,
        spent: Callable[[int], None] | None = None,
        prompt_estimate: int = 0,
        chat: bool = False,
        strip: bool = False,
        *,
        requests_only: bool = False,
    ) -> None:
        """`prompt_estimate`: tokens, the request body's bytes / 4. `chat`: a chat completion (its
        stream starts with a role and ends with a finish). `strip`: gogpt asked for the stream's
        usage chunk, so it is taken out. `requests_only`: the call is counted, its tokens not (/conv)."""
        self._ledger = ledger
        self._identity = identity
        self._model = model
        self._day = utc_day()
        self._spent = spent
        self._prompt_estimate = prompt_estimate
        self._chat = chat
        self._strip = strip
        self._requests_only = requests_only

    def __enter__(self) -> Meter:
        self._ledger.call_started()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        tokens = 0
        try:
            if self._answered or _left_early(kind, error):
                tokens = self._settle()
        finally:
            self._ledger.call_ended()
            if self._spent is not None:
                self._spent(tokens)

    def observe(self, upstream: aiohttp.ClientResponse) -> EventWatch | JsonWatch | None:
        self._answered = True
        if self._requests_only or upstream.method == "HEAD":
            return None
        headers = upstream.headers
        codings = content_codings(headers) if hdrs.CONTENT_ENCODING in headers else []
        content_type = upstream.content_type
        if content_type == "text/event-stream":
            if codings:  # compressed although asked not to be: read nothing, estimate
                return None
            # A length sent with the answer would no longer be true without the usage chunk.
            strip = self._strip and hdrs.CONTENT_LENGTH not in headers
            self._watch = EventWatch(event_report, strip)
        elif content_type == "application/json":
            self._watch = JsonWatch(codings)
        return self._watch

    def _settle(self) -> int:
        """Record the call's usage; the tokens it used."""
        if self._requests_only:
            self._ledger.record(self._identity, self._day, self._model, 0, 0, False, self._model)
            return 0
        watch = self._watch
        usage = model = None
        if type(watch) is EventWatch:
            usage, model = watch.usage, watch.model
        elif isinstance(watch, JsonWatch) and (report := watch.report()) is not None:
            usage, model = report
        if usage is None:
            prompt = self._prompt_estimate
            completion = _content_deltas(watch, chat=self._chat) if type(watch) is EventWatch else 0
        else:
            prompt, completion = usage
        self._ledger.record(self._identity, self._day, self._model, prompt, completion, usage is None, model)
        return prompt + completion


def _left_early(kind: type[BaseException] | None, error: BaseException | None) -> bool:
    """Whether a call ended, unanswered, while the upstream was still working on it: the client
    left (the handler was cancelled), or the upstream had the call and did not answer in time (a
    504, but not one for a connection that could not be made: that call never reached it)."""
    return kind is asyncio.CancelledError or (isinstance(error, ApiError) and error.code == UPSTREAM_TIMEOUT)


def _content_deltas(watch: EventWatch, *, chat: bool) -> int:
    """The content deltas relayed: the events, less those that carry none where OpenAI puts them
    (the role at the start of a chat stream; its finish and `[DONE]` at the end)."""
    deltas = watch.events
    if bytes(watch.last).rstrip().endswith(b"data: [DONE]"):
        deltas -= 2 if chat else 1
    if chat:
        first = watch.first
        deltas -= b'"role"' in first[: first.find(b"\n\n")]
    return max(deltas, 0)


_today = ""
_today_spans = (0.0, -1.0)  # time.time() from the start of `_today` to its end


def utc_day() -> str:
    """Today in UTC as YYYY-MM-DD, formatted once a day."""
    global _today, _today_spans
    now = time.time()
    starts, ends = _today_spans
    if not starts <= now < ends:  # a new day, or the clock was set back
        day = now // 86400 * 86400
        _today, _today_spans = time.strftime("%Y-%m-%d", time.gmtime(day)), (day, day + 86400)
    return _today
