"""Wrong keys at /token, counted per client address, so `SECRET_KEY` cannot be guessed at network speed.

After `limit` wrong keys in a window an address gets 429 for the rest of that window, whatever
key it sends, so a right guess past the limit is not told apart from a wrong one. The counts
live in the shared store, so the limit holds across workers and instances. While the store is
unavailable, each process counts on its own: the limit then holds per process (at most
`limit` x processes guesses per window) rather than locking everyone out of /token or letting
guesses through unbounded.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from .errors import ApiError
from .store import MemoryStore, Store, StoreUnavailable

__all__ = ["LOCKOUT", "Lockout", "client_address"]

T = TypeVar("T")

WINDOW = 60  # seconds: wrong keys are counted per minute


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
    """At most `limit` wrong /token keys per client address per window; 0 turns it off."""

    def __init__(self, limit: int, window: int = WINDOW) -> None:
        self._limit = limit
        self._window = window
        self._local = MemoryStore()  # used only while the shared store is unavailable

    async def check(self, store: Store, client: str) -> None:
        """Raise 429 while `client` is locked out; called before its key is compared."""
        if not self._limit:
            return
        until = await self._on(store, lambda s: s.get_json(f"lockout:{client}"))
        wait = until - int(time.time()) if isinstance(until, int) else 0
        if wait > 0:
            raise self._locked(wait)

    async def count_failure(self, store: Store, client: str) -> None:
        """Count a wrong key; lock `client` out once it reaches the limit, and raise 429 past it.

        Past it means a guess that was in flight when the limit was reached (from another worker,
        say): it is answered as the locked-out address it came from.
        """
        if not self._limit:
            return
        failures, reset_in = await self._on(
            store, lambda s: s.count_hit(f"key-failures:{client}", self._window)
        )
        if failures >= self._limit:
            until = int(time.time()) + reset_in
            await self._on(store, lambda s: s.set_json(f"lockout:{client}", until, reset_in))
        if failures > self._limit:
            raise self._locked(reset_in)

    async def _on(self, store: Store, operation: Callable[[Store], Awaitable[T]]) -> T:
        try:
            return await operation(store)
        except StoreUnavailable:
            return await operation(self._local)

    def _locked(self, wait: int) -> ApiError:
        return ApiError(
            429,
            f"Too many wrong keys from this address; /token is closed to it for {wait} s.",
            code="too_many_wrong_keys",
            headers={"Retry-After": str(wait)},
        )


LOCKOUT = web.AppKey("gogpt.lockout", Lockout)
