"""A pool of OpenAI keys: calls spread over them, failed calls tried again on another, and keys that
are rate-limited rest while keys that are refused are set aside.

One key behaves exactly as a single `CHAT_API_KEY` always has: no retry, no rest. The state is per
process; a key's in-flight count lasts from the call to the end of its answer.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import logging
import math
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .errors import ApiError
from .metrics import UPSTREAM_KEY_CALLS

__all__ = ["KEY_POOL", "Key", "KeyPool", "Send", "describe_keys", "fingerprint"]

Send = Callable[
    [Mapping[str, str]], Awaitable[aiohttp.ClientResponse]
]  # one upstream call, given its headers

log = logging.getLogger("gogpt.relay")

# Answers that say "this key, now" rather than "this request": another key may do. A 401 says the
# key itself is refused, which is the gateway's trouble, not the caller's: it is tried again too.
_RETRYABLE = frozenset({401, 429, 500, 502, 503, 504})
_RETRYABLE_BODY_BYTES = 1 << 20  # larger uploads are streamed, so they cannot be sent twice
_DEFAULT_REST = 10.0  # seconds a key rests after a 429 that says nothing of how long
_MAX_REST = 3600.0


def fingerprint(key: str) -> str:
    """How a key appears in logs and metrics: its first three and last four characters."""
    return f"{key[:3]}…{key[-4:]}" if len(key) >= 12 else "…"


def describe_keys(keys: tuple[str, ...]) -> str:
    """The pool in a few words for the start-up line: "3 upstream keys (sk-…abcd, ...)"."""
    listed = f" ({', '.join(fingerprint(key) for key in keys)})" if keys else ""
    return f"{len(keys)} upstream key{'' if len(keys) == 1 else 's'}{listed}"


@dataclass(eq=False)
class Key:
    secret: str
    fingerprint: str
    in_flight: int = 0
    rests_until: float = 0.0  # monotonic time; resting keys get no calls
    refused: bool = False  # answered 401 (logged once)
    set_aside: bool = False  # refused in a pool: not used again until restart


class KeyPool:
    def __init__(self, secrets: tuple[str, ...], retries: int) -> None:
        self.keys = [Key(secret, fingerprint(secret)) for secret in secrets]
        self.retries = retries if len(self.keys) > 1 else 0

    def pick(self, tried: set[Key]) -> Key | None:
        """The usable key with the fewest calls in flight that this call has not tried yet."""
        now = time.monotonic()
        usable = [
            key for key in self.keys if key not in tried and not key.set_aside and key.rests_until <= now
        ]
        return min(usable, key=lambda key: key.in_flight) if usable else None

    def refusal(self) -> ApiError:
        """Why no key can take a call: all resting (429 until the first wakes) or all set aside."""
        resting = [key.rests_until for key in self.keys if not key.set_aside]
        if not resting:
            return ApiError(503, "No upstream key is accepted by the upstream.", code="no_upstream_key")
        wait = max(1, math.ceil(min(resting) - time.monotonic()))
        return ApiError(
            429,
            f"Every upstream key is rate-limited; retry in {wait} s.",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(wait)},
        )

    def observe(self, key: Key, status: int, headers: Mapping[str, str]) -> None:
        """Count the answer and rest or set aside its key as it says; a refusal is logged once."""
        _key_calls(key.fingerprint, status).inc()
        if status == 401 and not key.refused:
            key.refused = True
            if len(self.keys) > 1:
                key.set_aside = True
                log.error("upstream key %s was refused (401): set aside until restart", key.fingerprint)
            else:  # the only key: calls go on to it, as they always have
                log.error("the upstream key %s was refused (401): check CHAT_API_KEY", key.fingerprint)
        elif status == 429 and len(self.keys) > 1:
            wait = _rest_seconds(headers.get("retry-after-ms"), headers.get("Retry-After"))
            key.rests_until = time.monotonic() + wait

    async def call(
        self, send: Send, headers: Mapping[str, str], data: bytes | AsyncIterable[bytes] | None
    ) -> tuple[aiohttp.ClientResponse, Key]:
        """`send` on the best key, and again on others while the failure says another may do.

        The key's in-flight count is raised for the caller, who lowers it when the answer ends.
        """
        small = data is None or (isinstance(data, bytes) and len(data) <= _RETRYABLE_BODY_BYTES)
        retries = self.retries if small else 0
        outgoing = headers if isinstance(headers, CIMultiDict) else CIMultiDict(headers)  # made for this call
        tried: set[Key] = set()
        while True:
            key = self.pick(tried)
            if key is None:
                raise self.refusal()
            tried.add(key)
            outgoing["Authorization"] = f"Bearer {key.secret}"
            key.in_flight += 1
            may_retry = len(tried) <= retries
            try:
                upstream = await send(outgoing)
            except ApiError as exc:  # unreachable, reset, or no headers in time
                key.in_flight -= 1
                _key_calls(key.fingerprint, exc.status).inc()
                if exc.status in (502, 504) and may_retry and self.pick(tried) is not None:
                    continue
                raise
            self.observe(key, upstream.status, upstream.headers)
            if upstream.status in _RETRYABLE and may_retry and self.pick(tried) is not None:
                key.in_flight -= 1
                upstream.close()
                continue
            return upstream, key


@functools.lru_cache(maxsize=1024)  # keys x statuses: few, and each labelled child is looked up once
def _key_calls(fingerprint: str, status: int) -> Any:
    return UPSTREAM_KEY_CALLS.labels(fingerprint, str(status))


def _rest_seconds(retry_after_ms: str | None, retry_after: str | None) -> float:
    """How long a key rests after a 429, within bounds: `retry-after-ms` (Azure OpenAI sends it, and
    the OpenAI SDKs read it first), else Retry-After; 10 s when neither is there or makes sense."""
    seconds = math.nan
    if retry_after_ms:
        with contextlib.suppress(ValueError):
            seconds = float(retry_after_ms) / 1000
    if not math.isfinite(seconds) and retry_after:
        seconds = _retry_after_seconds(retry_after)
    return min(max(seconds, 1.0), _MAX_REST) if math.isfinite(seconds) else _DEFAULT_REST


def _retry_after_seconds(value: str) -> float:
    """Retry-After's seconds, from a number or an HTTP date; NaN when it is neither."""
    with contextlib.suppress(ValueError):
        return float(value)
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError):
        return math.nan


KEY_POOL = web.AppKey("gogpt.key_pool", KeyPool)
