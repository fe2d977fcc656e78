"""The Store protocol on Redis, so any number of gogpt instances share limits, caches, leases and usage."""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import redis.asyncio as redis
from redis.exceptions import RedisError

from .store import (
    USAGE_COUNTS,
    Admission,
    BudgetState,
    Revocation,
    StoreUnavailable,
    UsageQuery,
    UsageRow,
    new_revocations_version,
    rate_steps,
    sorted_rows,
    wall_clock_us,
)

__all__ = ["RedisStore"]

log = logging.getLogger("gogpt.store")

# Connections to Redis per worker. A call holds one for a round trip, so a few dozen serve far
# more calls than a worker makes; redis-py's own pool has no bound, and a burst of calls opened
# one each (a file descriptor here, a client of Redis's 10,000 there, for every worker).
MAX_CONNECTIONS = 64

T = TypeVar("T")

# Only the holder of a lease may extend or drop it: compare the token and act in one step.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
# GCRA (see Store.admit), in microseconds of the caller's clock: ARGV = now, interval, how far
# ahead; the answer is {admitted, microseconds until the next hit would be}. The key lives as long
# as its due time is ahead. %d, not tostring: Lua would write 1.78e+15 and lose the microseconds.
_ADMIT = """
local now, interval, ahead = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local due = math.max(tonumber(redis.call('get', KEYS[1])) or now, now)
if due - now > ahead then return {0, due - now - ahead} end
due = due + interval
redis.call('set', KEYS[1], string.format('%d', due), 'PX', math.ceil((due - now) / 1000))
return {1, math.max(0, due - now - ahead)}
"""
# Usage: one hash per UTC day, a field per (id, model, count), and the set of days. The batch's
# marker makes a batch sent twice (its first answer lost) count once.
_ADD_USAGE = """
if not redis.call('set', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
for i = 3, #ARGV, 3 do
  redis.call('hincrby', ARGV[2] .. 'usage:' .. ARGV[i], ARGV[i + 1], ARGV[i + 2])
  redis.call('sadd', ARGV[2] .. 'usage:days', ARGV[i])
end
return 1
"""
# The latest expiry minted for an id, in a key that goes when it passes.
_NOTE_MINTED = """
local kept = redis.call('get', KEYS[1])
if not kept or tonumber(kept) < tonumber(ARGV[1]) then
  redis.call('set', KEYS[1], ARGV[1])
  redis.call('expireat', KEYS[1], ARGV[2])
end
"""
# Revocations: two hashes by subject (JSON [id, tid]), its time and its expiry, each kept at the
# later value; the expired ones are dropped here (revocations are few), and a new version set.
_REVOKE = """
for i = 1, 2 do
  local kept = redis.call('hget', KEYS[i], ARGV[1])
  if not kept or tonumber(kept) < tonumber(ARGV[i + 1]) then redis.call('hset', KEYS[i], ARGV[1], ARGV[i + 1]) end
end
local expiries = redis.call('hgetall', KEYS[2])
for i = 1, #expiries, 2 do
  if tonumber(expiries[i + 1]) <= tonumber(ARGV[4]) then
    redis.call('hdel', KEYS[1], expiries[i])
    redis.call('hdel', KEYS[2], expiries[i])
  end
end
redis.call('set', KEYS[3], ARGV[5])
return {redis.call('hget', KEYS[1], ARGV[1]), redis.call('hget', KEYS[2], ARGV[1])}
"""
# Budgets: a hash with `used`, a hash of the holds in flight, "amount expires_ms" by hold id, and
# a sorted set of the holds settled lately, by when each is forgotten, so a settle sent again
# counts once. Reserving reads, checks and holds in one script, so no other instance's call comes
# in between; it reads the holds in flight alone. (Settled holds used to stay in the hash, as
# amount -1, until they expired: every reservation read the last hour's calls of the token, and
# held Redis for longer the busier the token was. The script still passes over such entries.)
_RESERVE_BUDGET = """
local now = tonumber(ARGV[1])
local used = tonumber(redis.call('hget', KEYS[1], 'used') or '0')
local held = 0
local holds = redis.call('hgetall', KEYS[2])
for i = 1, #holds, 2 do
  local amount, expires = string.match(holds[i + 1], '^(%-?%d+) (%d+)$')
  if tonumber(expires) <= now then
    redis.call('hdel', KEYS[2], holds[i])
  elseif tonumber(amount) > 0 then
    held = held + tonumber(amount)
  end
end
if used + held + tonumber(ARGV[3]) > tonumber(ARGV[4]) then return {0, used, held} end
redis.call('hset', KEYS[2], ARGV[2], ARGV[3] .. ' ' .. ARGV[5])
redis.call('hsetnx', KEYS[1], 'used', 0)
redis.call('pexpireat', KEYS[1], ARGV[6])
redis.call('pexpireat', KEYS[2], ARGV[6])
return {1, used, held}
"""
_SETTLE_BUDGET = """
redis.call('zremrangebyscore', KEYS[3], '-inf', ARGV[5])
if redis.call('zscore', KEYS[3], ARGV[1]) then return 0 end
local kept = redis.call('hget', KEYS[2], ARGV[1])
if kept and string.sub(kept, 1, 3) == '-1 ' then return 0 end
redis.call('hdel', KEYS[2], ARGV[1])
redis.call('zadd', KEYS[3], ARGV[3], ARGV[1])
redis.call('hincrby', KEYS[1], 'used', ARGV[2])
redis.call('pexpireat', KEYS[3], ARGV[4])
redis.call('pexpireat', KEYS[1], ARGV[4])
redis.call('pexpireat', KEYS[2], ARGV[4])
return 1
"""
_BATCH_MEMORY = 7 * 86400  # seconds a batch id is remembered: far longer than any outage it outlives
_ROWS_PER_CALL = 500  # a script runs alone on the server: keep each short


class RedisStore:
    """Every call fails fast (2 s) with `StoreUnavailable` when Redis is down, which callers turn into 503.
    At most MAX_CONNECTIONS calls are in flight; the others wait their turn (2 s at most too)."""

    def __init__(self, url: str, *, prefix: str = "gogpt:") -> None:
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=2,  # waiting for a free connection: fails fast too
            decode_responses=True,
            socket_timeout=2,
            socket_connect_timeout=2,
            health_check_interval=15,
        )
        self._redis = redis.Redis.from_pool(pool)  # closed with it
        self._prefix = prefix
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._add_usage = self._redis.register_script(_ADD_USAGE)
        self._admit = self._redis.register_script(_ADMIT)
        self._note_minted = self._redis.register_script(_NOTE_MINTED)
        self._revoke = self._redis.register_script(_REVOKE)
        self._revocation_keys = [
            f"{prefix}revoked:at",
            f"{prefix}revoked:expires",
            f"{prefix}revoked:version",
        ]
        self._reserve_budget = self._redis.register_script(_RESERVE_BUDGET)
        self._settle_budget = self._redis.register_script(_SETTLE_BUDGET)
        self._down = False

    async def _call(self, operation: Awaitable[T]) -> T:
        try:
            result = await operation
        except (RedisError, OSError) as exc:
            if not self._down:  # say it once per outage, not once per request
                log.error("Redis is unavailable (%s): answering 503 until it returns", type(exc).__name__)
                self._down = True
            raise StoreUnavailable() from None
        if self._down:
            log.warning("Redis is available again")
            self._down = False
        return result

    async def ping(self) -> bool:
        try:
            await self._call(self._redis.ping())
        except StoreUnavailable:
            return False
        return True

    async def get_json(self, key: str) -> Any | None:
        text = await self._call(self._redis.get(self._prefix + key))
        return None if text is None else json.loads(text)

    async def set_json(self, key: str, value: Any, ttl: float) -> None:
        await self._call(self._redis.set(self._prefix + key, json.dumps(value), px=int(ttl * 1000)))

    async def acquire(self, key: str, ttl: float) -> str | None:
        token = secrets.token_hex(8)
        taken = await self._call(self._redis.set(self._prefix + key, token, nx=True, px=int(ttl * 1000)))
        return token if taken else None

    async def renew(self, key: str, token: str, ttl: float) -> bool:
        return bool(await self._call(self._renew(keys=[self._prefix + key], args=[token, int(ttl * 1000)])))

    async def release(self, key: str, token: str) -> None:
        await self._call(self._release(keys=[self._prefix + key], args=[token]))

    async def is_held(self, key: str) -> bool:
        return bool(await self._call(self._redis.exists(self._prefix + key)))

    async def admit(self, key: str, limit: int, period: float) -> Admission:
        """With the caller's clock, like the other stores (and so a test's): instances whose clocks
        differ by d seconds admit up to d x limit / period hits more or fewer than one would."""
        interval, ahead = rate_steps(limit, period)
        admitted, wait = await self._call(
            self._admit(keys=[self._prefix + key], args=[wall_clock_us(), interval, ahead])
        )
        return Admission(bool(admitted), int(wait) / 1e6)

    async def add_usage(self, batch: str, rows: Sequence[UsageRow]) -> None:
        for part in range(0, len(rows), _ROWS_PER_CALL):
            args: list[str | int] = [_BATCH_MEMORY, self._prefix]
            for row in rows[part : part + _ROWS_PER_CALL]:
                for name, amount in zip(USAGE_COUNTS, row.counts, strict=True):
                    if amount:
                        args += [row.day, json.dumps([row.id, row.model, name]), amount]
            marker = f"{self._prefix}usage:batch:{batch}:{part}"
            await self._call(self._add_usage(keys=[marker], args=args))

    async def usage(self, query: UsageQuery) -> list[UsageRow]:
        known = await self._call(self._redis.smembers(self._prefix + "usage:days"))
        days = sorted(day for day in map(str, known) if query.day_matches(day))
        async with self._redis.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(f"{self._prefix}usage:{day}")
            tables = await self._call(pipe.execute()) if days else []
        rows = []
        for day, table in zip(days, tables, strict=True):
            counts: dict[tuple[str, str], dict[str, int]] = {}
            for field, value in table.items():
                identity, model, name = json.loads(field)
                counts.setdefault((identity, model), {})[name] = int(value)
            rows += [
                UsageRow(identity, day, model, **named)
                for (identity, model), named in counts.items()
                if query.matches(UsageRow(identity, day, model))
            ]
        return sorted_rows(rows)

    async def close(self) -> None:
        await self._redis.aclose()

    async def note_minted(self, identity: str, expires: float) -> None:
        key = f"{self._prefix}minted:{identity}"
        await self._call(self._note_minted(keys=[key], args=[expires, math.ceil(expires) + 1]))

    async def minted_until(self, identity: str) -> float | None:
        kept = await self._call(self._redis.get(f"{self._prefix}minted:{identity}"))
        return None if kept is None or float(kept) <= time.time() else float(kept)

    async def revoke(self, revocation: Revocation) -> Revocation:
        subject = json.dumps([revocation.id, revocation.tid])
        args: list[str | float] = [
            subject,
            revocation.revoked_at,
            revocation.expires,
            time.time(),
            new_revocations_version(),
        ]
        revoked_at, expires = await self._call(self._revoke(keys=self._revocation_keys, args=args))
        return Revocation(revocation.id, revocation.tid, float(revoked_at), float(expires))

    async def revocations(self) -> list[Revocation]:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._revocation_keys[0])
            pipe.hgetall(self._revocation_keys[1])
            times, expiries = await self._call(pipe.execute())
        now = time.time()
        in_force = []
        for subject, revoked_at in times.items():
            identity, tid = json.loads(subject)
            expires = float(expiries.get(subject, 0))
            if expires > now:
                in_force.append(Revocation(identity, tid, float(revoked_at), expires))
        return sorted(in_force, key=lambda kept: kept.revoked_at)

    async def revocations_version(self) -> int:
        return int(await self._call(self._redis.get(self._revocation_keys[2])) or 0)

    async def reserve_budget(
        self, key: str, hold: str, amount: int, budget: int, hold_ttl: float, expires: float
    ) -> tuple[bool, BudgetState]:
        now = wall_clock_us() // 1000
        args: list[str | int] = [
            now,
            hold,
            amount,
            budget,
            now + _ms(hold_ttl),
            max(_ms(expires), now + _ms(hold_ttl)),
        ]
        taken, used, held = await self._call(self._reserve_budget(keys=self._budget_keys(key), args=args))
        return bool(taken), BudgetState(int(used), int(held))

    async def settle_budget(self, key: str, hold: str, spent: int, hold_ttl: float, expires: float) -> None:
        now = wall_clock_us() // 1000
        forgotten = now + _ms(hold_ttl)  # when the settled hold is dropped from the settled set
        args: list[str | int] = [hold, spent, forgotten, max(_ms(expires), forgotten), now]
        await self._call(self._settle_budget(keys=self._budget_keys(key), args=args))

    async def budget_state(self, key: str) -> BudgetState:
        budget, holds, _ = self._budget_keys(key)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(budget, "used")
            pipe.hgetall(holds)
            used, kept = await self._call(pipe.execute())
        now = wall_clock_us() // 1000
        held = 0
        for value in kept.values():
            amount, expires = map(int, value.split())
            held += amount if amount > 0 and expires > now else 0
        return BudgetState(int(used or 0), held)

    def _budget_keys(self, key: str) -> list[str]:
        """The budget's hash, its holds in flight and its holds settled lately, as the scripts take them."""
        return [self._prefix + key, f"{self._prefix}{key}:holds", f"{self._prefix}{key}:settled"]


def _ms(seconds: float) -> int:
    return int(seconds * 1000)
