"""Shared state behind one small interface: caches, session leases and rate-limit counters.

`MemoryStore` keeps everything in the process (the default, nothing to install); the Redis
store (gogpt.redis_store) implements the same protocol so several instances act as one.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from typing import Any, Protocol

__all__ = ["MemoryStore", "Store", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """The shared store cannot be reached; the error middleware answers 503 rather than serve
    unlimited or unlocked."""


class Store(Protocol):
    async def get_json(self, key: str) -> Any | None:
        """The cached value, or None when absent or expired."""

    async def set_json(self, key: str, value: Any, ttl: float) -> None: ...

    async def acquire(self, key: str, ttl: float) -> str | None:
        """Take the lease `key` for `ttl` seconds: a token to renew and release it, or None if held."""

    async def renew(self, key: str, token: str, ttl: float) -> bool:
        """Extend a lease we hold; False if it expired and someone else may have it."""

    async def release(self, key: str, token: str) -> None:
        """Give a lease back, only if we still hold it."""

    async def is_held(self, key: str) -> bool: ...

    async def count_hit(self, key: str, window: int) -> tuple[int, int]:
        """Count one hit in the current `window`-second window: (hits so far, seconds until it resets)."""

    async def close(self) -> None: ...


class MemoryStore:
    """The in-process store. Caches are LRU-bounded so they never grow without limit."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._max_entries = max_entries
        self._cache: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._leases: dict[str, tuple[float, str]] = {}
        self._hits: OrderedDict[str, tuple[int, int]] = OrderedDict()

    async def get_json(self, key: str) -> Any | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, text = entry
        if expires <= time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return json.loads(text)  # stored as text so callers never share a mutable value

    async def set_json(self, key: str, value: Any, ttl: float) -> None:
        self._cache[key] = (time.monotonic() + ttl, json.dumps(value))
        self._cache.move_to_end(key)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    async def acquire(self, key: str, ttl: float) -> str | None:
        if await self.is_held(key):
            return None
        token = secrets.token_hex(8)
        self._leases[key] = (time.monotonic() + ttl, token)
        return token

    async def renew(self, key: str, token: str, ttl: float) -> bool:
        held = self._leases.get(key)
        if held is None or held[1] != token or held[0] <= time.monotonic():
            return False
        self._leases[key] = (time.monotonic() + ttl, token)
        return True

    async def release(self, key: str, token: str) -> None:
        held = self._leases.get(key)
        if held is not None and held[1] == token:
            del self._leases[key]

    async def is_held(self, key: str) -> bool:
        held = self._leases.get(key)
        if held is None:
            return False
        if held[0] <= time.monotonic():
            del self._leases[key]
            return False
        return True

    async def count_hit(self, key: str, window: int) -> tuple[int, int]:
        now = int(time.time())
        window_start = now - now % window
        start, count = self._hits.get(key, (window_start, 0))
        count = count + 1 if start == window_start else 1
        self._hits[key] = (window_start, count)
        self._hits.move_to_end(key)
        while len(self._hits) > self._max_entries * 4:  # oldest callers first
            self._hits.popitem(last=False)
        return count, window_start + window - now

    async def close(self) -> None:
        self._cache.clear()
        self._leases.clear()
        self._hits.clear()
