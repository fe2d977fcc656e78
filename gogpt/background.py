"""Work an application runs beside its requests (writers of usage and budgets, the revocation reader)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

__all__ = ["every", "running"]


@contextlib.asynccontextmanager
async def running(work: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run `work` as a task while the block runs, then cancel it and wait until it has ended."""
    task = asyncio.create_task(work)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def every(
    interval: float, step: Callable[[], Awaitable[object]], log: logging.Logger, failed: str
) -> None:
    """Await `step()` every `interval` seconds until cancelled; a fault of its own is logged as
    `failed` and does not stop the steps for good.

    Each step is shielded: redis-py can take a cancellation that lands inside a command for a
    failed call and swallow it, which would leave this loop running and the app's cleanup
    waiting on it for ever. Shielded, the cancellation always ends the loop (the step itself
    finishes on its own).
    """
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.shield(step())
        except Exception:
            log.exception(failed)
