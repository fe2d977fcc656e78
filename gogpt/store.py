"""Shared state behind one small interface: caches, session leases, rate limits and usage.

Three backends implement the protocol: in the process (gogpt.memory_store, nothing to install),
in a SQLite file shared by a machine's workers (gogpt.sqlite_store), and in Redis
(gogpt.redis_store).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

__all__ = [
    "USAGE_COUNTS",
    "Admission",
    "BudgetState",
    "Revocation",
    "Store",
    "StoreUnavailable",
    "UsageQuery",
    "UsageRow",
    "new_revocations_version",
    "rate_steps",
    "sorted_rows",
    "wall_clock_us",
]


class StoreUnavailable(Exception):
    """The shared store cannot be reached; the error middleware answers 503 rather than serve
    unlimited or unlocked."""


@dataclass(frozen=True, slots=True)
class UsageRow:
    """What one identity used of one model on one UTC day (`YYYY-MM-DD`), or an addition to it."""

    id: str
    day: str
    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_requests: int = 0

    @property
    def counts(self) -> tuple[int, int, int, int]:
        return self.requests, self.prompt_tokens, self.completion_tokens, self.estimated_requests


USAGE_COUNTS = ("requests", "prompt_tokens", "completion_tokens", "estimated_requests")


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """Which usage rows to read: every filter left None matches everything; days are inclusive."""

    id: str | None = None
    model: str | None = None
    since: str | None = None
    until: str | None = None

    def matches(self, row: UsageRow) -> bool:
        return (
            (self.id is None or row.id == self.id)
            and (self.model is None or row.model == self.model)
            and self.day_matches(row.day)
        )

    def day_matches(self, day: str) -> bool:
        return (self.since is None or day >= self.since) and (self.until is None or day <= self.until)


class Admission(NamedTuple):
    """One hit's verdict, and the seconds until the next hit of its key would be admitted (0: now).

    Refused, `wait` is the exact Retry-After; admitted, a `wait` above 0 says the limit is reached.
    """

    admitted: bool
    wait: float


def rate_steps(limit: int, period: float) -> tuple[int, int]:
    """GCRA's two numbers for `limit` hits per `period` seconds, in whole microseconds, so Python,
    SQL and Lua do the same exact integer arithmetic: the interval between hits (rounded up: at
    most 60 million a minute), and how far ahead of now a key's next time may run (limit - 1
    intervals, so `limit` hits may come at once)."""
    interval = -(-round(period * 1_000_000) // limit)
    return interval, (limit - 1) * interval


def new_revocations_version() -> int:
    """A version for the revocations just recorded: at random, so no store repeats one (see
    Store.revocations_version); 62 bits, an integer Redis and SQLite both keep as it is."""
    return secrets.randbits(62)


def wall_clock_us() -> int:
    """Now, in microseconds of the wall clock: limits are shared with other processes and machines."""
    return int(time.time() * 1_000_000)


@dataclass(frozen=True, slots=True)
class Revocation:
    """Tokens refused until `expires` (wall-clock seconds): with no `tid`, every token of `id`
    issued at or before `revoked_at`; with one, that token only."""

    id: str
    tid: str
    revoked_at: float
    expires: float

    def merged(self, kept: Revocation | None) -> Revocation:
        """This revocation recorded over `kept` (the same subject's): the later time and expiry of each."""
        if kept is None:
            return self
        revoked_at, expires = max(self.revoked_at, kept.revoked_at), max(self.expires, kept.expires)
        return Revocation(self.id, self.tid, revoked_at, expires)


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A budget's tokens: `used` settled, `held` by the calls in flight."""

    used: int = 0
    held: int = 0


def sorted_rows(rows: Sequence[UsageRow]) -> list[UsageRow]:
    """The order /usage answers in: by day, then id, then model."""
    return sorted(rows, key=lambda row: (row.day, row.id, row.model))


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

    async def admit(self, key: str, limit: int, period: float) -> Admission:
        """Count one hit on `key` if it is within `limit` per `period` seconds, atomically.

        The generic cell rate algorithm: a key keeps one time, when its next hit is due if hits
        came evenly (`limit` per `period`); a hit is admitted unless that time runs more than
        `limit - 1` intervals ahead of now, and an admitted hit moves it one interval on. So
        `limit` hits may come at once, then one every `period / limit` seconds, and nothing ever
        resets at a boundary: in any span of t seconds at most `limit * (1 + t / period)` are
        admitted (a fixed window let 2 x `limit` through in two seconds across its edge). Chosen
        over a sliding-window counter because it is exact (that one weighs the previous window
        as if its hits were even), keeps one number per key, and knows its Retry-After exactly.
        """

    async def add_usage(self, batch: str, rows: Sequence[UsageRow]) -> None:
        """Add `rows` to the usage kept per (id, day, model), all or none. A batch id already added
        is not added again, so a batch whose answer was lost can be sent again safely."""

    async def usage(self, query: UsageQuery) -> list[UsageRow]:
        """The usage rows `query` matches, by day, id and model."""

    async def close(self) -> None: ...

    async def note_minted(self, identity: str, expires: float) -> None:
        """Remember `expires` if it is the latest expiry of a token minted for `identity` so far."""

    async def minted_until(self, identity: str) -> float | None:
        """The latest expiry noted for `identity`, or None when none is (or it has passed)."""

    async def revoke(self, revocation: Revocation) -> Revocation:
        """Record `revocation`, merged with the one already kept for its subject; the one recorded."""

    async def revocations(self) -> list[Revocation]:
        """The revocations in force (not yet expired), oldest first."""

    async def revocations_version(self) -> int:
        """A number that changes whenever a revocation is recorded: a copy read at the same number
        is still current. Shared stores draw it at random (new_revocations_version): counted up, a
        Redis that lost its data would count to a number a worker holds, and it would miss the
        revocations recorded since."""

    async def reserve_budget(
        self, key: str, hold: str, amount: int, budget: int, hold_ttl: float, expires: float
    ) -> tuple[bool, BudgetState]:
        """Hold `amount` of budget `key` for `hold_ttl` seconds, in one atomic step, unless used +
        held + amount would pass `budget`: whether it was held, and the state before.
        `expires` (wall clock) is when the budget's row may be forgotten."""

    async def settle_budget(self, key: str, hold: str, spent: int, hold_ttl: float, expires: float) -> None:
        """Move a hold into what is used, as `spent`; a hold settled already is not counted again
        (for `hold_ttl` seconds), one that expired meanwhile is counted all the same."""

    async def budget_state(self, key: str) -> BudgetState:
        """What budget `key` has used and holds now (zero for a budget never reserved)."""
