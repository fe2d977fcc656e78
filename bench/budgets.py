"""What one budgeted call costs the store, as its token's settled calls pile up.

    python -m bench.budgets                                   # the GOGPT_DB file and the in-process store
    python -m bench.budgets --redis-url redis://127.0.0.1:6379/0   # and Redis (a loopback one: its data is used)

A budgeted call reserves its worst case and settles it when it ends; a settled hold is kept for
an hour, so a settlement sent again counts once. For one token, this settles 0, 10,000 and 50,000
calls, and after each prints the time a reservation and its settlement take, averaged over 200.
That time must not grow with the calls settled: a token making 30 calls a second settles
100,000 an hour. Bounded: one key, in a temporary directory or under a `bench-budgets:` prefix.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

SETTLED = (0, 10_000, 50_000)
TIMED = 200
HOLD_TTL = 3600.0


async def _one_call(store: Any, key: str, hold: str, expires: float) -> None:
    taken, _ = await store.reserve_budget(key, hold, 100, 10**15, HOLD_TTL, expires)
    assert taken
    await store.settle_budget(key, hold, 50, HOLD_TTL, expires)


async def _measure(name: str, store: Any) -> None:
    key, expires = f"budget:bench-{time.time_ns()}:total", time.time() + 86400
    settled = 0
    for target in SETTLED:
        while settled < target:
            await _one_call(store, key, f"pile-{settled}", expires)
            settled += 1
        started = time.perf_counter()
        for n in range(TIMED):
            await _one_call(store, key, f"timed-{target}-{n}", expires)
        settled += TIMED
        per_call = (time.perf_counter() - started) / TIMED * 1e6
        print(
            f"{name:<7} {target:>7,} settled: {per_call:7.0f} us a reservation and its settlement", flush=True
        )


async def main(redis_url: str | None) -> None:
    from gogpt.memory_store import MemoryStore
    from gogpt.sqlite_store import SqliteStore

    await _measure("memory", MemoryStore())
    with tempfile.TemporaryDirectory(prefix="gogpt-bench-budgets-") as workdir:
        sqlite = SqliteStore(str(Path(workdir, "gogpt.db")))
        await sqlite.open()
        try:
            await _measure("sqlite", sqlite)
        finally:
            await sqlite.close()
    if redis_url:
        from gogpt.redis_store import RedisStore

        redis = RedisStore(redis_url, prefix="bench-budgets:")
        try:
            await _measure("redis", redis)
        finally:
            await redis.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.budgets", description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", help="a loopback Redis to measure too")
    asyncio.run(main(parser.parse_args().redis_url))
