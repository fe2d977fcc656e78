"""One reply at a time per ChatGPT session, across workers and instances: a lease in the store.

The Go server's rule, kept: a session (the account, or a conversation in multi mode) streams
one reply at a time. A reply holds its session's lease while it streams, renewed in the
background, so a worker that dies frees the session within `_LEASE_TTL`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .errors import ApiError
from .store import Store, StoreUnavailable

__all__ = ["session_key", "session_lease"]

log = logging.getLogger("gogpt.conv")

_LEASE_TTL = 30.0  # a session lease outlives a dead instance by at most this long


def session_key(multi: bool, conversation_id: str) -> str:
    """The whole account is one session in single mode; each conversation is one in multi mode."""
    return f"conv:session:{conversation_id}" if multi else "conv:session:account"


@asynccontextmanager
async def session_lease(store: Store, key: str) -> AsyncIterator[None]:
    """Hold the session for one reply; freed when the reply ends, fails or the client leaves."""
    token = await store.acquire(key, _LEASE_TTL)
    if token is None:
        raise ApiError(
            409,
            "This ChatGPT session is busy with another reply; try again when it ends.",
            code="session_busy",
        )
    renewing = asyncio.create_task(_keep_renewing(store, key, token))
    try:
        yield
    finally:
        renewing.cancel()
        await store.release(key, token)


async def _keep_renewing(store: Store, key: str, token: str) -> None:
    while True:
        await asyncio.sleep(_LEASE_TTL / 3)
        try:
            if not await store.renew(key, token, _LEASE_TTL):
                log.warning("lost the lease on a ChatGPT session while replying")
                return
        except StoreUnavailable:
            log.warning("could not renew a ChatGPT session lease: the store is unavailable")
