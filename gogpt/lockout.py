"""Wrong keys at /token, counted per client address, so `SECRET_KEY` cannot be guessed at network speed.

An address may send `limit` wrong keys at once, then one every `window / limit` seconds (the
limiter of RATE_LIMIT, Store.admit: no count that resets at a minute's edge and lets twice the
limit through across it). Whenever it has used them up, it gets 429 until its next is due,
whatever key it sends, so a right guess then is not told apart from a wrong one. The limiter
lives in the shared store, so it holds across workers and instances. While the store is
unavailable, each process limits on its own: the limit then holds per process (at most
`limit` x processes guesses per window) rather than locking everyone out of /token or letting
guesses through unbounded.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from .errors import ApiError
from .memory_store import MemoryStore
from .store import Store, StoreUnavailable

__all__ = ["LOCKOUT", "Lockout", "client_address"]

T = TypeVar("T")

WINDOW = 60  # seconds: TOKEN_FAILURE_LIMIT is wrong keys per minute


def client_address(request: web.BaseRequest) -> str:
    """The peer's address as limits see it: X-Forwarded-For is anyone's to write, so it is not read.

    An IPv6 host is usually given a whole /64, so it is counted by that prefix: otherwise it
    could try 2^64 addresses in turn.
    """
    remote = request.remote or "unknown"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:  # a Unix socket, or a test transport
        return remote
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Lockout:
    """At most `limit` wrong /token keys per client address per window, as a rate; 0 turns it off."""

    def __init__(self, limit: int, window: int = WINDOW) -> None:
        self._limit = limit
        self._window = window
        self._local = MemoryStore()  # used only while the shared store is unavailable

    async def check(self, store: Store, client: str) -> None:
        """Raise 429 while `client` is locked out; called before its key is compared."""
        if not self._limit:
            return
        until = await self._on(store, lambda s: s.get_json(f"lockout:{client}"))
        wait = until - time.time() if isinstance(until, int | float) else 0.0
        if wait > 0:
            raise self._locked(wait)

    async def count_failure(self, store: Store, client: str) -> None:
        """Count a wrong key; lock `client` out while it has none left, and raise 429 past the limit.

        Past it means a guess that was in flight when the last one was used (from another worker,
        say): it is answered as the locked-out address it came from.
        """
        if not self._limit:
            return
        admitted, wait = await self._on(
            store, lambda s: s.admit(f"key-failures:{client}", self._limit, self._window)
        )
        if wait > 0:  # the exact time, so the lockout ends when the next guess is due, not before
            until = time.time() + wait
            await self._on(store, lambda s: s.set_json(f"lockout:{client}", until, math.ceil(wait)))
        if not admitted:
            raise self._locked(wait)

    async def _on(self, store: Store, operation: Callable[[Store], Awaitable[T]]) -> T:
        try:
            return await operation(store)
        except StoreUnavailable:
            return await operation(self._local)

    def _locked(self, wait: float) -> ApiError:
        seconds = math.ceil(wait)
        return ApiError(
            429,
            f"Too many wrong keys from this address; /token is closed to it for {seconds} s.",
            code="too_many_wrong_keys",
            headers={"Retry-After": str(seconds)},
        )


LOCKOUT = web.AppKey("gogpt.lockout", Lockout)
