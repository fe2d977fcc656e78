"""Budgets: a token's tokens per period, held at admission and settled to the real usage.

A call with a budgeted token holds its worst case before anything goes upstream (the body's
`max_completion_tokens`, `max_tokens` or `max_output_tokens`, else BUDGET_RESERVE, plus the
prompt estimate, body bytes / 4) in one atomic step of the shared store, which refuses when
used + held + this would pass the budget. So calls on any worker or instance, however many at
once, pass the budget by at most what the calls in flight together spend beyond their holds
(an estimate is no bound: a prompt may be denser than 4 bytes a token). When the call ends
the hold becomes the Meter's count of it (usage.py), or nothing when no usage was made (the
call failed before the upstream accepted it).

A hold lapses after HOLD_TTL, an hour: a worker that dies mid-call never settles, so its hold
must go by itself, but a hold that lapses while its call still runs frees room for others. An
hour outlasts calls in practice (OpenAI's SDKs give up after ten minutes), and a dead worker's
hold can only refuse calls for that long, never let one through; a call that outlives its hold
is still counted when it ends.

The Meter ends a call synchronously, after the answer: settlements are queued, and one task per
application writes them in order. While the store is down they wait (up to _MAX_WAITING) and
are tried again every second, since a spend never written would let the budget be passed; the
application's cleanup writes what is left at shutdown.
"""

from __future__ import annotations

import asyncio
import calendar
import functools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from .background import running
from .errors import ApiError
from .keys import CALLER, SETTINGS, STORE, Caller
from .metrics import BUDGET_REFUSALS
from .store import Store, StoreUnavailable

__all__ = ["BUDGETS", "HOLD_TTL", "BudgetKeeper", "admit", "budget_keeper", "budget_key", "refuse_uncounted"]

log = logging.getLogger("gogpt.budget")

HOLD_TTL = 3600.0  # seconds a hold lasts if its call never settles it
_RETRY_INTERVAL = 1.0  # seconds between tries while the store is down
_MAX_WAITING = 10_000  # settlements kept while the store is down
_WORST_CASE_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_MAX_LIMIT = 1 << 62  # a limit past any budget (an infinite one included) is held as this

Settle = Callable[[int], None]  # called with the tokens a call spent (0: none)


async def admit(
    request: web.Request, fields: dict[str, Any], body_bytes: int, *, completes: bool
) -> Settle | None:
    """Hold a budgeted call's worst case, or refuse it (429) before anything goes upstream.

    Returns what settles the hold, or None for a token without a budget. `fields` are the body's
    REQUEST_FIELDS; `completes` is False for calls that generate no tokens (embeddings).
    """
    caller = request[CALLER]
    budget = caller.policy.budget
    if budget is None:
        return None
    completion = _worst_completion(fields, request.app[SETTINGS].budget_reserve) if completes else 0
    amount = completion + body_bytes // 4
    key, expires = budget_key(caller)
    hold = secrets.token_hex(8)
    taken, state = await request.app[STORE].reserve_budget(key, hold, amount, budget, HOLD_TTL, expires)
    if not taken:
        BUDGET_REFUSALS.inc()
        in_flight = f", {state.held} held by calls in flight" if state.held else ""
        raise ApiError(
            429,
            f"This token's budget is {budget} tokens {_PERIOD_WORDS[caller.policy.period]}:"
            f" {state.used} used{in_flight}, and this call may need up to {amount}."
            " Ask for fewer (max_tokens) or wait for the next period.",
            code="budget_exceeded",
            error_type="insufficient_quota",
            # OpenAI's SDKs retry every 429; with nothing held in flight, none can pass before the
            # period ends, so they are told not to (they obey x-should-retry)
            headers=None if state.held else {"x-should-retry": "false"},
        )
    return functools.partial(request.app[BUDGETS].settle, key, hold, expires)


def refuse_uncounted(request: web.Request) -> None:
    """Refuse a budgeted token a call whose tokens gogpt cannot count (images, audio, files...)."""
    if request[CALLER].policy.budget is not None:
        raise ApiError(
            403,
            "This token has a budget, and the tokens this call spends cannot be counted: it may call"
            " chat completions, completions, responses and embeddings only.",
            code="budget_uncounted",
        )


_PERIOD_WORDS = {"day": "a day (UTC)", "month": "a month (UTC)", "total": "in total"}


def budget_key(caller: Caller, now: float | None = None) -> tuple[str, float]:
    """The store key of the caller's budget in the period `now` falls in, and when it may be
    forgotten: after its period (a `total` budget: its token) and the holds made in it."""
    policy = caller.policy
    now = time.time() if now is None else now
    if policy.period == "total":
        end = caller.expires
    else:
        day = time.gmtime(now)
        if policy.period == "day":
            end = calendar.timegm((day.tm_year, day.tm_mon, day.tm_mday + 1, 0, 0, 0))
        else:
            end = calendar.timegm((day.tm_year + day.tm_mon // 12, day.tm_mon % 12 + 1, 1, 0, 0, 0))
    return f"budget:{caller.tid}:{policy.period_key(now)}", end + HOLD_TTL


def _worst_completion(fields: dict[str, Any], default: int) -> int:
    """The most tokens the body lets the answer have: the largest limit it names, else `default`."""
    # a float too: an integer beyond 64 bits is read as one (json_text.py), and is no smaller
    limits = [fields.get(name) for name in _WORST_CASE_FIELDS]
    given = [
        limit for limit in limits if isinstance(limit, int | float) and type(limit) is not bool and limit > 0
    ]
    return math.ceil(min(max(given), _MAX_LIMIT)) if given else default


class BudgetKeeper:
    """Writes settlements to the store in order, keeping them while it is down."""

    def __init__(self, store: Store, *, max_waiting: int = _MAX_WAITING) -> None:
        self._store = store
        self._max_waiting = max_waiting
        self._waiting: deque[tuple[str, str, float, int]] = deque()
        self._work = asyncio.Event()
        self._lock = asyncio.Lock()
        self._store_down = False
        self._dropping = False

    def settle(self, key: str, hold: str, expires: float, spent: int) -> None:
        """Queue a hold's settlement to `spent` tokens (0 releases it)."""
        if len(self._waiting) >= self._max_waiting:
            if not self._dropping:
                log.error(
                    "budget settlements waiting for the store passed %d: new ones are dropped (their"
                    " holds lapse within %g s, their spending is not counted)",
                    self._max_waiting,
                    HOLD_TTL,
                )
                self._dropping = True
            return
        self._waiting.append((key, hold, expires, spent))
        self._work.set()

    async def flush(self) -> bool:
        """Write every settlement waiting; False if the store is down (they keep waiting)."""
        async with self._lock:
            waiting = self._waiting
            while waiting:
                key, hold, expires, spent = waiting[0]
                try:
                    await self._store.settle_budget(key, hold, spent, HOLD_TTL, expires)
                except StoreUnavailable:
                    if not self._store_down:
                        log.error(
                            "budget spending cannot be written to the store: it is kept until it is back"
                        )
                        self._store_down = True
                    return False
                except Exception:  # a fault of its own: this one is dropped, not tried for ever
                    log.exception("settling a budget failed")
                waiting.popleft()
            if self._store_down:
                log.warning("the store is back: the budget spending kept meanwhile is written")
                self._store_down = self._dropping = False
            return True

    async def run(self) -> None:
        """Write settlements as they come, until cancelled.

        Each write is shielded: a cancellation landing inside the Redis client can be taken for a
        failed call and swallowed, which left this loop running and the shutdown waiting on it
        for ever. Shielded, the cancellation ends the loop, and `close` waits for the write.
        """
        while True:
            await self._work.wait()
            self._work.clear()
            if not await asyncio.shield(self.flush()):
                await asyncio.sleep(_RETRY_INTERVAL)
                self._work.set()

    async def close(self) -> None:
        if not await self.flush():
            log.error("the store is down at shutdown: %d budget settlements are lost", len(self._waiting))


BUDGETS = web.AppKey("gogpt.budgets", BudgetKeeper)


async def budget_keeper(app: web.Application) -> AsyncIterator[None]:
    """The settlements' writer: opened after the store, closed after the calls have ended."""
    keeper = app[BUDGETS] = BudgetKeeper(app[STORE])
    async with running(keeper.run()):
        yield
    await keeper.close()  # the rest, written once the writer has stopped
