"""The in-process store (`GOGPT_DB=:memory:`), for one worker; also the lockout's stand-in while
the shared store is down.

Everything lives in this process and dies with it; caches are LRU-bounded so they never grow
without limit. Several workers share state through the SQLite file (the default) or Redis.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from .store import (
    Admission,
    BudgetState,
    Revocation,
    UsageQuery,
    UsageRow,
    rate_steps,
    sorted_rows,
    wall_clock_us,
)

__all__ = ["MemoryStore"]

log = logging.getLogger("gogpt.store")


class MemoryStore:
    """The Store protocol (store.py) on dicts of this process."""

    def __init__(self, max_entries: int = 4096, max_usage_rows: int = 100_000) -> None:
        self._max_entries = max_entries
        self._cache: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._leases: dict[str, tuple[float, str]] = {}
        self._due: OrderedDict[str, int] = OrderedDict()  # rate-limit keys: the next hit's time, in us
        self._max_usage_rows = max_usage_rows
        self._usage: dict[tuple[str, str, str], UsageRow] = {}
        self._batches: OrderedDict[str, None] = OrderedDict()  # the last batch ids added
        self._minted: OrderedDict[str, float] = OrderedDict()
        self._revocations: dict[tuple[str, str], Revocation] = {}
        self._revocations_version = 0
        self._budgets: dict[str, _MemoryBudget] = {}

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

    async def admit(self, key: str, limit: int, period: float) -> Admission:
        interval, ahead = rate_steps(limit, period)
        now = wall_clock_us()
        due = max(self._due.get(key, now), now)
        if due - now > ahead:
            return Admission(False, (due - now - ahead) / 1e6)
        due += interval
        self._due[key] = due
        self._due.move_to_end(key)
        while len(self._due) > self._max_entries * 4:  # oldest callers first
            self._due.popitem(last=False)
        return Admission(True, max(0, due - now - ahead) / 1e6)

    async def add_usage(self, batch: str, rows: Sequence[UsageRow]) -> None:
        if batch in self._batches:
            return
        self._batches[batch] = None
        while len(self._batches) > 1024:
            self._batches.popitem(last=False)
        usage = self._usage
        for row in rows:
            key = (row.day, row.id, row.model)
            kept = usage.get(key)
            if kept is not None:
                sums = [a + b for a, b in zip(kept.counts, row.counts, strict=True)]
                row = UsageRow(row.id, row.day, row.model, *sums)
            usage[key] = row
        if len(usage) > self._max_usage_rows:  # the process's memory is not a ledger: oldest days go
            oldest = min(day for day, _, _ in usage)
            log.warning("usage kept in memory passed %d rows: %s is forgotten", self._max_usage_rows, oldest)
            for key in [key for key in usage if key[0] == oldest]:
                del usage[key]

    async def usage(self, query: UsageQuery) -> list[UsageRow]:
        return sorted_rows([row for row in self._usage.values() if query.matches(row)])

    async def close(self) -> None:
        self._cache.clear()
        self._leases.clear()
        self._due.clear()

    async def note_minted(self, identity: str, expires: float) -> None:
        self._minted[identity] = max(expires, self._minted.get(identity, expires))
        self._minted.move_to_end(identity)
        # Forgetting is safe: an id with no expiry noted is revoked for the longest a token may live.
        while len(self._minted) > self._max_entries * 4:
            self._minted.popitem(last=False)

    async def minted_until(self, identity: str) -> float | None:
        expires = self._minted.get(identity)
        return expires if expires is not None and expires > time.time() else None

    async def revoke(self, revocation: Revocation) -> Revocation:
        now = time.time()
        for subject in [subject for subject, kept in self._revocations.items() if kept.expires <= now]:
            del self._revocations[subject]
        subject = (revocation.id, revocation.tid)
        recorded = self._revocations[subject] = revocation.merged(self._revocations.get(subject))
        self._revocations_version += 1
        return recorded

    async def revocations(self) -> list[Revocation]:
        now = time.time()
        in_force = [kept for kept in self._revocations.values() if kept.expires > now]
        return sorted(in_force, key=lambda kept: kept.revoked_at)

    async def revocations_version(self) -> int:
        return self._revocations_version

    async def reserve_budget(
        self, key: str, hold: str, amount: int, budget: int, hold_ttl: float, expires: float
    ) -> tuple[bool, BudgetState]:
        now = time.time()
        kept = self._budget(key, now)
        state = kept.state(now)
        if state.used + state.held + amount > budget:
            return False, state
        kept.holds[hold] = (amount, now + hold_ttl)
        kept.expires = max(kept.expires, expires)
        return True, state

    async def settle_budget(self, key: str, hold: str, spent: int, hold_ttl: float, expires: float) -> None:
        now = time.time()
        kept = self._budget(key, now)
        kept.forget_settled(now)
        if hold in kept.settled:  # settled already
            return
        kept.holds.pop(hold, None)
        kept.settled[hold] = now + hold_ttl
        kept.used += spent
        kept.expires = max(kept.expires, expires)

    async def budget_state(self, key: str) -> BudgetState:
        now = time.time()
        kept = self._budgets.get(key)
        return BudgetState() if kept is None or kept.expires <= now else kept.state(now)

    def _budget(self, key: str, now: float) -> _MemoryBudget:
        kept = self._budgets.get(key)
        if kept is None or kept.expires <= now:
            if len(self._budgets) >= self._max_entries * 4:  # forget the budgets whose period is over
                self._budgets = {name: kept for name, kept in self._budgets.items() if kept.expires > now}
            kept = self._budgets[key] = _MemoryBudget()
        return kept


class _MemoryBudget:
    """A budget in the process: what is used, the holds of calls in flight by id, and the holds
    settled lately (kept apart, so that summing the holds reads the calls in flight only)."""

    __slots__ = ("expires", "holds", "settled", "used")

    def __init__(self) -> None:
        self.used = 0
        self.expires = 0.0
        self.holds: dict[str, tuple[int, float]] = {}  # hold id: (amount, expires)
        self.settled: dict[str, float] = {}  # hold id: expires, in the order settled (so, of expiry)

    def state(self, now: float) -> BudgetState:
        held = 0
        for hold, (amount, expires) in list(self.holds.items()):
            if expires <= now:
                del self.holds[hold]
            else:
                held += amount
        return BudgetState(self.used, held)

    def forget_settled(self, now: float) -> None:
        """Drop the settled holds that have expired: the first ones, as each lasts as long."""
        settled = self.settled
        while settled and next(iter(settled.values())) <= now:
            del settled[next(iter(settled))]
