"""Compressed-body bombs against a real gogpt: how long its loop is blocked, and its peak memory.

    python -m bench.bombs                      # issue 17's attacks at the default MAX_BODY_BYTES
    python -m bench.bombs --tree /tmp/before   # the same against another copy of the code

Each attack runs on a fresh `python -m gogpt`: `--token` unauthenticated POST /token at once,
then `--uploads` token holders posting to /chat, /conv and /v1/chat/completions at once, every
body a gzip of `[{},{},...]` (or of an object holding one) of about 32 KB that decodes to
MAX_BODY_BYTES; first, `--quiet` seconds without requests give the machine's own noise.

gogpt runs on the standard asyncio loop here, not uvloop, so that each callback can be timed:
the longest, in CPU time and in wall time (which adds whatever else the machine ran meanwhile),
is the longest its event loop was blocked. What gogpt's imports made is frozen out of the
garbage collector first; else its first full collection (~0.1 s, whatever the requests) comes
with the first requests. Meanwhile a client in a process of its own asks /healthz back to back;
its slowest answer also counts the queue of other work. Peak memory is VmHWM of gogpt and its
child processes. Loopback only; an attack ends when every request is answered (or after
--within seconds), the /healthz client when its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

from gogpt import mint_token

SECRET_KEY = "bombs-secret-key-0123456789abcdef0123456789"
# `python -c` this to run gogpt on the standard loop with every callback timed
TIMED_GOGPT = """
import asyncio.events, sys, time
sys.modules["uvloop"] = None
longest = {"cpu": 0.0, "wall": 0.0}
run = asyncio.events.Handle._run
def timed(handle):
    cpu, wall = time.thread_time(), time.perf_counter()
    run(handle)
    longest["cpu"] = max(longest["cpu"], time.thread_time() - cpu)
    longest["wall"] = max(longest["wall"], time.perf_counter() - wall)
asyncio.events.Handle._run = timed
import gc
from gogpt.__main__ import main
gc.collect()
gc.freeze()  # else the first full collection of what imports made (~0.1 s) comes with the first requests
try:
    main([])
finally:
    print(f"longest loop step: {longest['cpu']:.4f} {longest['wall']:.4f}", file=sys.stderr, flush=True)
"""
ROOT = Path(__file__).parent.parent
Request = tuple[str, dict[str, str], bytes]  # path, headers, body


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of `pid` plus that of its child processes, in MiB."""
    total_kb = 0
    for entry in os.listdir("/proc"):
        try:
            status = Path(f"/proc/{entry}/status").read_text() if entry.isdigit() else ""
        except OSError:  # gone meanwhile
            continue
        if entry == str(pid) or f"\nPPid:\t{pid}\n" in status:
            total_kb += next(
                int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")
            )
    return total_kb / 1024


def bomb(size: int, prefix: bytes, suffix: bytes) -> bytes:
    count = (size - len(prefix) - len(suffix) - 2) // 3
    return gzip.compress(prefix + b"{}," * count + b"{}" + suffix, compresslevel=9)


async def upstream_app(port: int) -> web.AppRunner:
    async def answer(request: web.Request) -> web.Response:
        async for _ in request.content.iter_any():  # read and drop: what /v1 streams through
            pass
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def attack(tree: Path, max_body: int, requests: list[Request], within: float, quiet: float = 0) -> dict:
    """Send `requests` at once to a fresh gogpt while /healthz is probed; what it cost gogpt."""
    upstream_port, port = free_port(), free_port()
    upstream = await upstream_app(upstream_port)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(tree),
        "PYTHONDONTWRITEBYTECODE": "1",
        "SECRET_KEY": SECRET_KEY,
        "API_PROXY": f"http://127.0.0.1:{upstream_port}",
        "UNOFFICIAL_PROXY": f"http://127.0.0.1:{upstream_port}/backend-api",
        "ACCESS_TOKEN": "bombs-access-token",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MAX_BODY_BYTES": str(max_body),
    }
    with tempfile.TemporaryFile() as log:
        gogpt = await asyncio.create_subprocess_exec(
            sys.executable, "-c", TIMED_GOGPT, cwd=tempfile.gettempdir(), env=env, stderr=log
        )
        try:
            result = await measure(f"http://127.0.0.1:{port}", gogpt.pid, requests, within, quiet)
        finally:
            gogpt.terminate()
            await gogpt.wait()
            await upstream.cleanup()
        log.seek(0)
        last = log.read().decode(errors="replace").strip().splitlines()[-1]
    cpu, wall = last.rpartition(": ")[2].split()
    return {"longest loop step s (CPU, wall)": (float(cpu), float(wall)), **result}


async def measure(base: str, pid: int, requests: list[Request], within: float, quiet: float) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=within)) as session:
        for _ in range(200):  # up to 10 s for it to listen
            try:
                async with session.get(base + "/healthz"):
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        start_rss = peak_rss_mb(pid)

        async def send(path: str, headers: dict[str, str], body: bytes) -> str:
            try:
                async with session.post(base + path, data=body, headers=headers) as resp:
                    await resp.read()
                    return str(resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                return type(exc).__name__

        prober = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bench.bombs", "--probe", base),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert prober.stdin is not None and prober.stdout is not None
        await prober.stdout.readline()  # its first /healthz is answered
        started = time.perf_counter()
        sent = await asyncio.gather(*(send(*request) for request in requests))
        if not requests:  # the quiet baseline: what the machine itself adds
            await asyncio.sleep(5)
        answered = time.perf_counter() - started
        prober.stdin.close()
        worst, probes = (await prober.stdout.read()).split()
    return {
        "answered in s": round(answered, 1),
        "worst /healthz s": round(float(worst), 3),
        "/healthz answers": int(probes),
        "peak RSS MB": round(peak_rss_mb(pid)),
        "RSS at start MB": round(start_rss),
        "statuses": dict(Counter(sent)),
    }


async def probe(base: str) -> None:
    """Ask /healthz back to back until stdin closes; print the slowest answer's seconds and the count."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    closed = asyncio.ensure_future(stdin.read())
    worst, count = 0.0, 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        while not closed.done():
            asked = time.perf_counter()
            async with session.get(base + "/healthz") as resp:
                await resp.read()
            worst, count = max(worst, time.perf_counter() - asked), count + 1
            if count == 1:
                print("ready", flush=True)
    print(worst, count, flush=True)


async def run(args: argparse.Namespace) -> None:
    auth = {"Authorization": f"Bearer {mint_token(SECRET_KEY, 'bench', 1)}"}
    gzipped = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    array = bomb(args.max_body, b"[", b"]")
    token = [("/token", gzipped, array)] * args.token
    routes = [
        ("/chat", {**auth, **gzipped}, bomb(args.max_body, b'{"messages":[', b"]}")),
        (
            "/conv",
            {**auth, **gzipped, "Chat-Type": "conversation"},
            bomb(args.max_body, b'{"content":[', b"]}"),
        ),
        ("/v1/chat/completions", {**auth, **gzipped}, bomb(args.max_body, b'{"messages":[', b"]}")),
    ]
    uploads = [routes[number % len(routes)] for number in range(args.uploads)]
    print(f"tree {args.tree}, MAX_BODY_BYTES {args.max_body}, each body {len(array)} bytes on the wire")
    if args.quiet:
        print(
            f"quiet    {args.quiet} s: {await attack(args.tree, args.max_body, [], args.within, args.quiet)}"
        )
    for name, requests in (("token", token), ("uploads", uploads)):
        if requests:
            print(
                f"{name:8} x{len(requests)}: {await attack(args.tree, args.max_body, requests, args.within)}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bombs", description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose gogpt runs (this one)")
    parser.add_argument("--max-body", type=int, default=32 << 20, help="MAX_BODY_BYTES (32 MiB)")
    parser.add_argument("--token", type=int, default=24, help="POST /token bombs at once (24)")
    parser.add_argument("--uploads", type=int, default=50, help="/chat, /conv and /v1 bombs at once (50)")
    parser.add_argument(
        "--quiet", type=float, default=5, help="seconds of the noise floor first; 0: none (5)"
    )
    parser.add_argument("--within", type=float, default=300, help="give up on an attack after this (300 s)")
    parser.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)  # the /healthz client's own process
    args = parser.parse_args()
    asyncio.run(probe(args.probe) if args.probe else run(args))


if __name__ == "__main__":
    main()
