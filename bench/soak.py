"""Soak: minutes of mixed streams, hang-ups and upstream faults through a real gogpt.

    python -m bench.soak --minutes 3 --concurrency 200

Starts a fake upstream in this process and `python -m gogpt` as a child on loopback, keeps
`--concurrency` clients busy with a mix of whole streams, clients hanging up mid-stream,
upstreams cutting off or falling silent mid-stream, and refused /chat bodies, and prints
gogpt's open file descriptors and RSS every few seconds. Both must stay flat.
Not part of the test suite: it runs for minutes. Loopback only; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

SECRET_KEY = "soak-secret-key-0123456789abcdef0123456789"
MODES = ("whole", "hang_up", "cut", "silent", "refused")


async def fake_upstream(request: web.Request) -> web.StreamResponse:
    """Streams 20 events, or cuts off or falls silent after 5, as the request's `mode` says."""
    body = await request.json()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    try:
        await response.prepare(request)
    except ConnectionResetError:  # gogpt gave up waiting (UPSTREAM_TIMEOUT) while we were busy
        return response
    for n in range(body.get("events", 20)):
        await response.write(f'data: {{"n": {n}, "pad": "{"x" * 64}"}}\n\n'.encode())
        await asyncio.sleep(0.01)
        if body["mode"] == "cut" and n == 5:
            assert request.transport is not None
            request.transport.close()
            return response
        if body["mode"] == "silent" and n == 5:
            await asyncio.sleep(3600)  # gogpt's UPSTREAM_TIMEOUT (1 s here) cuts it
    await response.write(b"data: [DONE]\n\n")
    return response


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def sample(pid: int) -> tuple[int, float]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return fds, rss_kb / 1024


async def one_request(session: aiohttp.ClientSession, base: str, token: str, outcomes: Counter[str]) -> None:
    mode = random.choice(MODES)
    headers = {"Authorization": token}
    body = {"mode": mode, "events": 20} if mode != "refused" else ["not", "an", "object"]
    try:
        async with session.post(f"{base}/chat", json=body, headers=headers) as resp:
            if mode == "hang_up":
                await resp.content.readline()
                outcomes["hang_up"] += 1
                return  # leaving the block closes the connection mid-stream
            data = await resp.read()
            ok = (mode == "whole" and data.endswith(b"data: [DONE]\n\n")) or (
                mode == "refused" and resp.status == 400
            )
            outcomes[mode if ok else f"{mode}:unexpected {resp.status}"] += 1
    except aiohttp.ClientPayloadError:
        outcomes[mode if mode in ("cut", "silent") else f"{mode}:cut"] += 1


async def soak(minutes: float, concurrency: int, every: float) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", fake_upstream)
    runner = web.AppRunner(upstream_app, handler_cancellation=True, access_log=None)
    await runner.setup()
    upstream_port, gogpt_port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(Path(__file__).parent.parent),
        "SECRET_KEY": SECRET_KEY,
        "API_PROXY": f"127.0.0.1:{upstream_port}",
        "HOST": "127.0.0.1",
        "PORT": str(gogpt_port),
        "UPSTREAM_TIMEOUT": "1",
    }
    gogpt = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gogpt", env=env, stderr=asyncio.subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{gogpt_port}"
    outcomes: Counter[str] = Counter()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for _ in range(200):
                try:
                    async with session.get(f"{base}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            from gogpt import mint_token

            token = mint_token(SECRET_KEY, "soak", 1)
            deadline = time.monotonic() + minutes * 60

            async def client_loop() -> None:
                while time.monotonic() < deadline:
                    await one_request(session, base, token, outcomes)

            clients = [asyncio.create_task(client_loop()) for _ in range(concurrency)]
            print(f"{'t (s)':>6} {'requests':>9} {'fds':>5} {'RSS MB':>7}")
            started = time.monotonic()
            samples = []
            while not all(task.done() for task in clients):
                await asyncio.sleep(every)
                fds, rss = sample(gogpt.pid)
                samples.append((fds, rss))
                print(
                    f"{time.monotonic() - started:6.0f} {sum(outcomes.values()):9d} {fds:5d} {rss:7.1f}",
                    flush=True,
                )
            await asyncio.gather(*clients)
        await asyncio.sleep(2)  # let the last sockets close before the final reading
        fds, rss = sample(gogpt.pid)
    finally:
        gogpt.terminate()
        await gogpt.wait()
        await runner.cleanup()
    warm = samples[len(samples) // 4 :] or samples
    print(
        json.dumps(
            {
                "requests": sum(outcomes.values()),
                "outcomes": dict(sorted(outcomes.items())),
                "fds": {"first": samples[0][0], "max": max(s[0] for s in samples), "after_load": fds},
                "rss_mb": {
                    "first": round(samples[0][1], 1),
                    "after_warm_up": round(warm[0][1], 1),
                    "last": round(samples[-1][1], 1),
                    "max": round(max(s[1] for s in samples), 1),
                    "after_load": round(rss, 1),
                },
                "exit": gogpt.returncode,
            },
            indent=2,
        )
    )
    unexpected = sum(count for name, count in outcomes.items() if ":" in name)
    return 1 if unexpected else 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--every", type=float, default=10, help="seconds between samples")
    args = parser.parse_args()
    sys.exit(asyncio.run(soak(args.minutes, args.concurrency, args.every)))


if __name__ == "__main__":
    main()
