"""Revoked tokens refused: the check every call meets, on a copy of the revocations kept fresh.

Revocations are recorded in the shared store (revocation_api.py has the routes). Each worker
keeps a copy of those in force in memory (a dict id → the time up to which its tokens were
issued, a set of single tokens' tids), so the check costs a set and a dict look-up. A
background task reads the store's revocation version every REFRESH_INTERVAL seconds, and the
revocations themselves only when it changed, so every worker of every instance refuses a
revoked token within a second for one small read.

When the store cannot be read, a worker keeps its last copy and logs the outage once. Refusing
every token instead would turn an outage of the store into an outage of every call, those that
need no store included, while the copy already refuses every token revoked before the outage
(and no revocation can be recorded during it). A worker that has never read the store has no copy
to keep: it tries the store on each token call, and answers 503, as any call that needs the store
does, rather than let a revoked token through.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

from .background import every, running
from .errors import ApiError
from .keys import STORE, Caller
from .metrics import REVOKED_REFUSALS
from .store import Revocation, Store, StoreUnavailable

__all__ = ["REVOCATIONS", "Revocations", "revocation_watch"]

log = logging.getLogger("gogpt.revocation")

REFRESH_INTERVAL = 0.25  # seconds between two reads of the store's revocation version
_MAX_UNNOTED = 10_000  # ids whose minted expiry waits for the store; past it /token answers 503


class Revocations:
    """This worker's copy of the revocations in force, refreshed from the store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._issued_up_to: dict[str, float] = {}  # id → its tokens issued up to then are refused
        self._tids: frozenset[str] = frozenset()
        self._version: int | None = None  # None until the store has been read once
        self._unnoted: dict[str, float] = {}  # id → latest expiry minted while the store was down
        self._store_down = False

    async def check(self, caller: Caller) -> None:
        """Refuse (401) a revoked token; the admin credential is never revoked."""
        if caller.is_admin:
            return
        if self._version is None:  # the store could not be read yet: try it now, or answer 503
            await self.refresh()
            if self._version is None:
                raise StoreUnavailable()
        if caller.tid in self._tids or caller.issued <= self._issued_up_to.get(caller.identity, -1.0):
            REVOKED_REFUSALS.inc()
            raise ApiError(401, "The token has been revoked.", code="invalid_api_key")

    async def note_minted(self, identity: str, expires: float) -> None:
        """Note a token's expiry (or an upper bound of it) before /token mints it. While the store is
        down the note waits here, written by the next refresh that reaches the store, so /token keeps
        serving as it does without a store."""
        try:
            await self._store.note_minted(identity, expires)
        except StoreUnavailable:
            if identity not in self._unnoted and len(self._unnoted) >= _MAX_UNNOTED:
                raise
            self._unnoted[identity] = max(expires, self._unnoted.get(identity, expires))

    async def refresh(self) -> None:
        """Read the revocations again if the store's version moved; keep the copy if the store is down."""
        try:
            while self._unnoted:
                identity, expires = next(iter(self._unnoted.items()))
                await self._store.note_minted(identity, expires)
                if self._unnoted.get(identity) == expires:  # not noted again meanwhile
                    del self._unnoted[identity]
            version = await self._store.revocations_version()
            if version != self._version:
                self._load(await self._store.revocations())
                self._version = version  # read first: a revocation recorded meanwhile moves it again
        except StoreUnavailable:
            if not self._store_down:
                log.error("revocations cannot be read from the store: the last ones read are enforced")
                self._store_down = True
            return
        if self._store_down:
            log.warning("revocations are read from the store again")
            self._store_down = False

    async def run(self, interval: float = REFRESH_INTERVAL) -> None:
        """Refresh every `interval` seconds until cancelled."""
        await every(interval, self.refresh, log, "refreshing revocations failed")

    def _load(self, in_force: Sequence[Revocation]) -> None:
        self._issued_up_to = {kept.id: kept.revoked_at for kept in in_force if not kept.tid}
        self._tids = frozenset(kept.tid for kept in in_force if kept.tid)


REVOCATIONS = web.AppKey("gogpt.revocations", Revocations)


async def revocation_watch(app: web.Application) -> AsyncIterator[None]:
    """The worker's copy, read before the first request (when the store answers), and its refresher."""
    revocations = app[REVOCATIONS] = Revocations(app[STORE])
    await revocations.refresh()
    async with running(revocations.run()):
        yield
