"""Store calls under contention: P processes x C concurrent callers on one GOGPT_DB file.

    python -m bench.store                        # 2 processes x 200 callers, 1000 requests/s each
    python -m bench.store --store memory         # the in-process store, for comparison
    python -m bench.store --rate 0               # no pause between requests: every core saturated

Each caller plays requests: a pause (exponential, so that the process sees `--rate` requests a
second), `--work-us` of CPU for the rest of the request (500 us: what a small JSON request costs
gogpt, docs/performance.md), a rate-limit check (`admit`, a write, always admitted) and, every other request,
what `/conv` does (a cache read, `is_held`, then `acquire` and `release` of a session lease).
Every call is timed from `await` to result, so a call that waited for another process's lock
shows its whole wait, including the turn it waited for in a busy event loop. Prints latency
percentiles per operation and the CPU one uncontended call costs. Bounded: callers x rounds
requests per process, in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import tempfile
import time
from collections import defaultdict
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import uvloop

IDENTITIES = 50  # callers share a few token ids, as many requests of one client would
LIMIT = 1_000_000  # requests a minute per id (the largest `rpm`): every check is admitted


def _open_store(kind: str, path: str) -> Any:
    from gogpt.memory_store import MemoryStore
    from gogpt.sqlite_store import SqliteStore

    return MemoryStore() if kind == "memory" else SqliteStore(path)


def _work(seconds: float) -> None:
    """The rest of a request: CPU spent on the loop, as parsing and relaying would."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


async def _play(
    store: Any, caller: str, rounds: int, pause: float, work: float, timings: dict[str, list[int]]
) -> None:
    async def timed(name: str, call: Any) -> Any:
        started = time.perf_counter_ns()
        result = await call
        timings[name].append((time.perf_counter_ns() - started) // 1000)
        return result

    identity = f"rate:id{random.randrange(IDENTITIES)}"
    for round_ in range(rounds):
        await asyncio.sleep(random.expovariate(1 / pause) if pause else 0)
        _work(work)
        await timed("admit", store.admit(identity, LIMIT, 60))
        if round_ % 2:
            await timed("get_json", store.get_json("conv:list:0:5"))
            await timed("is_held", store.is_held(f"conv:session:{caller}"))
            token = await timed("acquire", store.acquire(f"conv:session:{caller}", 30))
            await asyncio.sleep(0)
            if token is not None:
                await timed("release", store.release(f"conv:session:{caller}", token))


async def _contend(
    kind: str, path: str, number: int, args: argparse.Namespace, barrier: Barrier
) -> dict[str, list[int]]:
    store = _open_store(kind, path)
    if kind == "sqlite":
        await store.open()
    await store.set_json("conv:list:0:5", {"items": [{"id": "c"}] * 5, "total": 5}, 300)
    timings: dict[str, list[int]] = defaultdict(list)
    pause = args.callers / args.rate if args.rate else 0.0
    barrier.wait()  # every process starts its callers at once
    await asyncio.gather(
        *(
            _play(store, f"{number}-{caller}", args.rounds, pause, args.work_us / 1e6, timings)
            for caller in range(args.callers)
        )
    )
    await store.close()
    return dict(timings)


def _worker(
    kind: str, path: str, number: int, args: argparse.Namespace, barrier: Barrier, results: Any
) -> None:
    results.put(uvloop.run(_contend(kind, path, number, args, barrier)))


async def _cost(kind: str, path: str, calls: int = 20000) -> float:
    """CPU of one admitted rate-limit check with nobody else on the file, in microseconds."""
    store = _open_store(kind, path)
    if kind == "sqlite":
        await store.open()
    for n in range(1000):
        await store.admit(f"rate:warm{n % IDENTITIES}", LIMIT, 60)
    started = time.process_time()
    for n in range(calls):
        await store.admit(f"rate:id{n % IDENTITIES}", LIMIT, 60)
    cost = (time.process_time() - started) / calls * 1e6
    await store.close()
    return cost


def _percentile(values: list[int], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] / 1000


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=("sqlite", "memory"), default="sqlite")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--callers", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=50, help="requests per caller")
    parser.add_argument(
        "--rate", type=float, default=1000, help="requests a second per process (0: no pause)"
    )
    parser.add_argument("--work-us", type=float, default=500, help="CPU per request outside the store")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="gogpt-store-bench-") as directory:
        cost = uvloop.run(_cost(args.store, str(Path(directory, "cost.db"))))
        path = str(Path(directory, "gogpt.db"))
        barrier = context.Barrier(args.processes)
        results = context.Queue()
        workers = [
            context.Process(target=_worker, args=(args.store, path, number, args, barrier, results))
            for number in range(args.processes)
        ]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        reports = [results.get(timeout=300) for _ in workers]  # queue.Empty if a worker died
        for worker in workers:
            worker.join(60)
        wall = time.perf_counter() - started
    timings: dict[str, list[int]] = defaultdict(list)
    for report in reports:
        for name, values in report.items():
            timings[name] += values
    everything = [value for values in timings.values() for value in values]
    requests = len(timings["admit"])
    print(
        f"{args.store}: {args.processes} processes x {args.callers} callers, {requests} requests"
        f" ({requests / wall:.0f}/s) making {len(everything)} store calls in {wall:.1f} s"
    )
    print(f"{'operation':<10} {'calls':>7} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8}")
    for name, values in [*sorted(timings.items()), ("all", everything)]:
        print(
            f"{name:<10} {len(values):>7} {_percentile(values, 0.5):>8.3f} {_percentile(values, 0.99):>8.3f}"
            f" {_percentile(values, 0.999):>9.3f} {_percentile(values, 1.0):>8.3f}"
        )
    slow = sum(value > 1000 for value in everything)
    print(f"calls over 1 ms: {slow} ({slow / len(everything):.2%})")
    print(f"CPU of one rate-limit check (admit), uncontended: {cost:.1f} us")


if __name__ == "__main__":
    main()
