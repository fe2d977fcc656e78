"""The usage ledger: each worker adds up its calls' usage in memory and writes it to the store once a second.

Batching keeps the store off every call's path: one write a second per worker, whatever the
traffic. A call only notes its usage, under all it is counted by (one look-up); the notes are
added to the rows and to gogpt_tokens_total once a second and before each scrape. A batch the
store did not take is kept as it is, under its id, and sent again until it is taken, so it
counts once even when the store took it but the answer was lost. Meanwhile new usage adds up
beside it, up to a bound of distinct (id, day, model) rows; past the bound a call's usage is
dropped, counted in gogpt_usage_dropped_total and logged. At shutdown, the app's cleanup waits
for the calls still ending, then writes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from .background import every, running
from .keys import STORE
from .metrics import TOKENS, USAGE_DROPPED
from .store import Store, StoreUnavailable, UsageRow

__all__ = ["LEDGER", "MAX_MODELS_PER_DAY", "UsageLedger", "model_name", "usage_ledger"]

log = logging.getLogger("gogpt.usage")

FLUSH_INTERVAL = 1.0  # seconds between two writes of a worker's usage
_MAX_WAITING_ROWS = 10_000  # distinct (id, day, model) kept while the store is down
_MAX_MODEL_LABELS = 100  # gogpt_tokens_total's model values; the rest are counted as "other"
_CALLS_ENDING_WAIT = 5.0  # seconds the shutdown waits for cancelled calls to settle their usage
_MAX_MODEL_CHARS = 256
# Models an identity's calls are kept under per day in each worker, past which they are kept
# under "other": callers name models, and each name would be a row kept for ever.
MAX_MODELS_PER_DAY = 100

_Key = tuple[str, str, str]  # (id, day, model)
# (id, day, model, the model the upstream named, estimated)
_Note = tuple[str, str, str, str | None, bool]


class UsageLedger:
    def __init__(self, store: Store, *, max_waiting_rows: int = _MAX_WAITING_ROWS) -> None:
        self._store = store
        self._max_waiting_rows = max_waiting_rows
        self._noted: dict[_Note, list[int]] = {}  # requests, prompt, completion
        self._adding: dict[_Key, list[int]] = {}  # requests, prompt, completion, estimated
        self._unsent: tuple[str, list[UsageRow]] | None = None  # a batch the store has not taken yet
        self._lock = asyncio.Lock()
        self._open_calls = 0
        self._no_open_calls: asyncio.Event | None = None  # made when the shutdown waits on it
        self._store_down = False
        self._dropping = False
        self._model_labels: set[str] = set()
        self._models_of: dict[tuple[str, str], set[str]] = {}  # (id, day) → the models kept under
        self._latest_days: list[str] = []

    def call_started(self) -> None:
        self._open_calls += 1

    def call_ended(self) -> None:
        self._open_calls -= 1
        if not self._open_calls and self._no_open_calls is not None:
            self._no_open_calls.set()

    def record(
        self,
        identity: str,
        day: str,
        model: str,
        prompt: int,
        completion: int,
        estimated: bool,
        reported_model: str | None,
    ) -> None:
        """Note one call's usage. `reported_model`, the model as the upstream named it (None: it named
        none), labels the token metric: the model a client named (a call cut before its usage came)
        would let any caller fill gogpt_tokens_total's model values."""
        key = (identity, day, model, reported_model, estimated)
        counts = self._noted.get(key)
        if counts is None:
            unsent = len(self._unsent[1]) if self._unsent is not None else 0
            # each note adds one row at most
            if len(self._noted) + len(self._adding) + unsent >= self._max_waiting_rows:
                self._drop(1)
                return
            counts = self._noted[key] = [0, 0, 0]
        counts[0] += 1
        counts[1] += prompt
        counts[2] += completion

    def add_up(self) -> None:
        """Add the notes taken since to the rows waiting to be written and to gogpt_tokens_total: once
        a second and before each scrape, rather than in every call (a counter increment takes a lock)."""
        noted, self._noted = self._noted, {}
        tokens: dict[tuple[str | None, str], list[int]] = {}  # (reported model, source) → prompt, completion
        for note, (requests, prompt, completion) in noted.items():
            identity, day, model, reported_model, estimated = note
            if prompt or completion:
                added = tokens.setdefault((reported_model, "estimated" if estimated else "exact"), [0, 0])
                added[0] += prompt
                added[1] += completion
            row = self._adding.get((identity, day, model))
            if row is None:
                model = self._row_model(identity, day, model)
                row = self._adding.setdefault((identity, day, model), [0, 0, 0, 0])
            row[0] += requests
            row[1] += prompt
            row[2] += completion
            row[3] += requests if estimated else 0
        for (reported_model, source), (prompt, completion) in tokens.items():
            prompt_tokens, completion_tokens = _token_counters(self._model_label(reported_model), source)
            prompt_tokens.inc(prompt)
            completion_tokens.inc(completion)

    async def flush(self) -> bool:
        """Write what is waiting: the batch left by a failure, then what added up since. False if the
        store is down (everything stays waiting)."""
        self.add_up()
        async with self._lock:
            for _ in range(2):
                if self._unsent is None:
                    if not self._adding:
                        break
                    rows = [UsageRow(*key, *counts) for key, counts in self._adding.items()]
                    self._unsent, self._adding = (uuid.uuid4().hex, rows), {}
                batch, rows = self._unsent
                try:
                    await self._store.add_usage(batch, rows)
                except StoreUnavailable:
                    if not self._store_down:
                        log.error("usage cannot be written to the store: it is kept until the store is back")
                        self._store_down = True
                    return False
                self._unsent = None
            if self._store_down:
                log.warning("the store is back: the usage kept meanwhile is written")
                self._store_down = self._dropping = False
            return True

    async def run(self, interval: float = FLUSH_INTERVAL) -> None:
        """Write every `interval` seconds until cancelled (`close` writes the rest)."""
        await every(interval, self.flush, log, "writing usage failed")

    async def close(self) -> None:
        """Wait (a little) for calls still ending, then write what is left; what cannot be is lost and said so."""
        if self._open_calls:
            self._no_open_calls = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CALLS_ENDING_WAIT):
                    await self._no_open_calls.wait()
        if not await self.flush():
            lost = sum(counts[0] for counts in self._adding.values())
            lost += sum(row.requests for row in self._unsent[1]) if self._unsent else 0
            USAGE_DROPPED.inc(lost)
            log.error("the store is down at shutdown: the usage of %d calls is lost", lost)

    def _drop(self, calls: int) -> None:
        USAGE_DROPPED.inc(calls)
        if not self._dropping:
            log.error(
                "usage waiting for the store passed %d rows: new rows are dropped until it is back"
                " (counted in gogpt_usage_dropped_total)",
                self._max_waiting_rows,
            )
            self._dropping = True

    def _row_model(self, identity: str, day: str, model: str) -> str:
        """The model a row of `identity`'s on `day` is kept under: `model`, or "other" past the
        bound. Only the two latest days are remembered: a call is kept under the day it started."""
        models = self._models_of.get((identity, day))
        if models is None:
            if day not in self._latest_days:  # a new day: the day before yesterday is forgotten
                self._latest_days = sorted({*self._latest_days, day})[-2:]
                kept = self._latest_days
                self._models_of = {key: seen for key, seen in self._models_of.items() if key[1] in kept}
            models = self._models_of[identity, day] = set()
        return _kept_or_other(models, model, MAX_MODELS_PER_DAY)

    def _model_label(self, reported_model: str | None) -> str:
        """Checked here, once a second, not in every call."""
        if not reported_model:
            return "unreported"
        return _kept_or_other(self._model_labels, model_name(reported_model), _MAX_MODEL_LABELS)


def _kept_or_other(kept: set[str], model: str, bound: int) -> str:
    """`model`, noted in `kept`, or "other" once `kept` holds `bound` models and not this one."""
    if model not in kept:
        if len(kept) >= bound:
            return "other"
        kept.add(model)
    return model


def model_name(model: object) -> str:
    """`model` as usage is kept under it: a printable name of a sensible length, else "unknown"."""
    if isinstance(model, str) and 0 < len(model) <= _MAX_MODEL_CHARS and model.isprintable():
        return model
    return "unknown"


@functools.lru_cache(maxsize=2 * _MAX_MODEL_LABELS + 2)
def _token_counters(model: str, source: str) -> tuple[Any, Any]:
    """The labelled prompt and completion counters for a model and source, looked up once."""
    return TOKENS.labels(model, "prompt", source), TOKENS.labels(model, "completion", source)


LEDGER = web.AppKey("gogpt.ledger", UsageLedger)


async def usage_ledger(app: web.Application) -> AsyncIterator[None]:
    """The ledger and its writer, opened after the store and closed before it."""
    ledger = app[LEDGER] = UsageLedger(app[STORE])
    async with running(ledger.run()):
        yield
    await ledger.close()  # the rest, written once the writer has stopped
