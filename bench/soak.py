"""Soak: minutes of mixed streams, hang-ups and upstream faults through a real gogpt.

    python -m bench.soak --minutes 3 --concurrency 200

Starts a fake upstream (OpenAI and ChatGPT backend-api) in this process and `python -m gogpt
--multi` as a child on loopback, keeps `--concurrency` clients busy with a mix of whole streams,
clients hanging up mid-stream, upstreams cutting off, falling silent mid-stream or before their
first byte, refused /chat bodies, and /conv replies (some abandoned) on a small pool of
conversations, and prints gogpt's open file descriptors and RSS every few seconds. Both must
stay flat. At the end every /conv session must be free again, `/usage` must hold every /chat
call the way the README's Usage section says (whole streams exact from the usage chunk gogpt
asked for and took out again; the others estimated; refusals not counted), the token's budget
(`/me`) must have spent just that and hold nothing more, and SIGTERM must end gogpt with 0.
Not part of the test suite: it runs for minutes. Loopback only; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

from gogpt.redis_store import MAX_CONNECTIONS

SECRET_KEY = "soak-secret-key-0123456789abcdef0123456789"
ACCESS_TOKEN = "soak-access-token-0123456789"
UPSTREAM_TIMEOUT = 1.0  # seconds: gogpt gives up on a silent upstream after this
MODES = ("whole", "hang_up", "cut", "silent", "slow_start", "refused", "conv", "conv_hang_up")
CONVERSATIONS = [f"soak-conv-{n}" for n in range(20)]  # few, so replies contend for sessions
EVENTS = 20
MODEL = "soak-model"  # what /chat bodies name, so /usage rows of the soak's calls are told apart
UPSTREAM_USAGE = (11, EVENTS)  # the (prompt, completion) tokens a whole stream's usage chunk reports
EVENTS_BEFORE_FAULT = 6  # a cut or silent stream relays n = 0..5, then breaks off
BUDGET = 10**12  # the soak token's: held against by every /chat call, never reached


async def fake_openai(request: web.Request) -> web.StreamResponse:
    """Streams EVENTS events, or cuts off or falls silent after 5, or waits before answering; a
    whole stream ends with OpenAI's usage-only chunk when the body asks for it."""
    body = await request.json()
    mode = body["mode"]
    if mode == "slow_start":
        await asyncio.sleep(UPSTREAM_TIMEOUT * 3)  # gogpt answers 504 and closes this first
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    try:
        await response.prepare(request)
    except ConnectionResetError:  # gogpt gave up waiting (UPSTREAM_TIMEOUT) while we were busy
        return response
    for n in range(EVENTS):
        await response.write(f'data: {{"n": {n}, "pad": "{"x" * 64}"}}\n\n'.encode())
        await asyncio.sleep(0.01)
        if mode == "cut" and n == 5:
            assert request.transport is not None
            request.transport.close()
            return response
        if mode == "silent" and n == 5:
            await asyncio.sleep(3600)  # gogpt's UPSTREAM_TIMEOUT cuts it
    if (body.get("stream_options") or {}).get("include_usage"):
        prompt, completion = UPSTREAM_USAGE
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        chunk = {"model": MODEL, "choices": [], "usage": usage}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    return response


async def fake_backend_api(request: web.Request) -> web.StreamResponse:
    """A ChatGPT reply: EVENTS events carrying the message and conversation ids."""
    sent = await request.json()
    conversation_id = sent.get("conversation_id", "soak-new")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for n in range(EVENTS):
        event = {
            "message": {"id": f"m-{n}", "content": {"parts": ["x" * n]}},
            "conversation_id": conversation_id,
        }
        await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await asyncio.sleep(0.01)
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


def chat_body(mode: str) -> bytes:
    """A /chat stream's body: the fake upstream reads its mode; a refused one is no JSON object."""
    if mode == "refused":
        return b'["not", "an", "object"]'
    return json.dumps({"model": MODEL, "stream": True, "mode": mode, "messages": []}).encode()


def conv_message(conversation_id: str) -> dict[str, str]:
    return {"content": "hello", "conversation_id": conversation_id, "parent_message_id": "p"}


async def one_request(session: aiohttp.ClientSession, base: str, token: str, outcomes: Counter[str]) -> None:
    mode = random.choice(MODES)
    headers = {"Authorization": token, "Content-Type": "application/json"}
    if mode.startswith("conv"):
        url, body = f"{base}/conv", json.dumps(conv_message(random.choice(CONVERSATIONS))).encode()
        headers["Chat-Type"] = "conversation"
    else:
        url, body = f"{base}/chat", chat_body(mode)
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if mode.startswith("conv") and resp.status == 409:
                outcomes["conv_busy"] += 1  # another client is replying in that conversation: expected
                return
            if mode.endswith("hang_up") and resp.status == 200:
                await resp.content.readline()
                outcomes[mode] += 1
                return  # leaving the block closes the connection mid-stream
            data = await resp.read()
            expected = {"refused": 400, "slow_start": 504}.get(mode, 200)
            ok = resp.status == expected and (resp.status != 200 or data.endswith(b"data: [DONE]\n\n"))
            ok = ok and not (mode == "whole" and b'"usage"' in data)  # the chunk gogpt asked for is taken out
            outcomes[mode if ok else f"{mode}:unexpected {resp.status}"] += 1
    except aiohttp.ClientPayloadError:
        outcomes[mode if mode in ("cut", "silent") else f"{mode}:cut"] += 1


def usage_expected(outcomes: Counter[str]) -> dict[str, tuple[int, int]]:
    """The /usage sums the soak's /chat calls must add up to, as (least, most): a hang-up's
    completion is the events relayed before gogpt saw the client go, anything up to the whole."""
    estimated_modes = ("hang_up", "cut", "silent", "slow_start")  # their prompt: the body's bytes / 4
    estimated = sum(outcomes[mode] for mode in estimated_modes)
    requests = outcomes["whole"] + estimated
    prompt = outcomes["whole"] * UPSTREAM_USAGE[0]
    prompt += sum(outcomes[mode] * (len(chat_body(mode)) // 4) for mode in estimated_modes)
    completion = outcomes["whole"] * UPSTREAM_USAGE[1]
    completion += (outcomes["cut"] + outcomes["silent"]) * EVENTS_BEFORE_FAULT
    return {
        "requests": (requests, requests),
        "estimated_requests": (estimated, estimated),
        "prompt_tokens": (prompt, prompt),
        "completion_tokens": (completion, completion + outcomes["hang_up"] * EVENTS),
    }


async def usage_counted(session: aiohttp.ClientSession, base: str, requests: int) -> dict[str, int]:
    """The soak's /chat usage as `/usage` has it, once every call is in (each worker writes its
    calls once a second), or after 10 s."""
    headers = {"Authorization": SECRET_KEY}
    sums: dict[str, int] = {}
    for _ in range(100):
        async with session.get(
            f"{base}/usage", params={"id": "soak", "model": MODEL}, headers=headers
        ) as resp:
            rows = (await resp.json())["usage"]
        fields = ("requests", "estimated_requests", "prompt_tokens", "completion_tokens")
        sums = {field: sum(row[field] for row in rows) for field in fields}
        if sums["requests"] >= requests:
            break
        await asyncio.sleep(0.1)
    return sums


async def budget_kept(session: aiohttp.ClientSession, base: str, token: str, used: int) -> dict[str, int]:
    """The soak token's budget as `/me` tells it, once it has spent `used` (its calls' usage), or
    after 10 s: what it spent, and what its calls still hold (none once they have all ended)."""
    me: dict[str, int] = {}
    for _ in range(100):
        async with session.get(f"{base}/me", headers={"Authorization": token}) as resp:
            me = await resp.json()
        if me["used"] >= used:
            break
        await asyncio.sleep(0.1)
    return {"used": me["used"], "held": me["budget"] - me["used"] - me["remaining"]}


async def sessions_free(session: aiohttp.ClientSession, base: str, token: str) -> bool:
    """Every conversation takes a new reply: no /conv lease was left behind."""
    headers = {"Authorization": token, "Chat-Type": "conversation"}
    for conversation_id in CONVERSATIONS:
        async with session.post(f"{base}/conv", json=conv_message(conversation_id), headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                return False
    return True


async def soak(minutes: float, concurrency: int, every: float, redis_url: str | None) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    upstream_app = web.Application()
    upstream_app.router.add_post("/v1/chat/completions", fake_openai)
    upstream_app.router.add_post("/backend-api/conversation", fake_backend_api)
    runner = web.AppRunner(upstream_app, handler_cancellation=True, access_log=None)
    await runner.setup()
    upstream_port, gogpt_port = free_port(), free_port()
    # a backlog as gogpt's: with aiohttp's 128, connections from gogpt's workers overflowed it
    # under load, their handshakes were dropped, and calls failed as connect timeouts (504)
    await web.TCPSite(runner, "127.0.0.1", upstream_port, backlog=4096).start()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(Path(__file__).parent.parent),
        "SECRET_KEY": SECRET_KEY,
        "API_PROXY": f"127.0.0.1:{upstream_port}",
        "UNOFFICIAL_PROXY": f"127.0.0.1:{upstream_port}/backend-api",
        "ACCESS_TOKEN": ACCESS_TOKEN,
        "HOST": "127.0.0.1",
        "PORT": str(gogpt_port),
        "UPSTREAM_TIMEOUT": str(UPSTREAM_TIMEOUT),
        "SHUTDOWN_GRACE": "5",
        **({"REDIS_URL": redis_url} if redis_url else {}),
    }
    workdir = tempfile.TemporaryDirectory(prefix="gogpt-soak-")  # for its GOGPT_DB file
    gogpt = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gogpt", "--multi", env=env, cwd=workdir.name, stderr=asyncio.subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{gogpt_port}"
    outcomes: Counter[str] = Counter()
    samples: list[tuple[int, float]] = []
    locks_free = False
    usage_ok, usage_report = False, {}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for _ in range(200):  # up to 10 s for gogpt to listen
                try:
                    async with session.get(f"{base}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            from gogpt import mint_token
            from gogpt.policy import Policy

            # a budget never reached: every call holds its worst case, and gives back what it did not use
            token = mint_token(SECRET_KEY, "soak", 1, policy=Policy(budget=BUDGET, period="total"))
            before = sample(gogpt.pid)
            deadline = time.monotonic() + minutes * 60

            async def client_loop() -> None:
                while time.monotonic() < deadline:
                    await one_request(session, base, token, outcomes)

            clients = [asyncio.create_task(client_loop()) for _ in range(concurrency)]
            print(f"{'t (s)':>6} {'requests':>9} {'fds':>5} {'RSS MB':>7}")
            started = time.monotonic()
            while not all(task.done() for task in clients):
                await asyncio.wait(clients, timeout=every)
                fds, rss = sample(gogpt.pid)
                samples.append((fds, rss))
                print(
                    f"{time.monotonic() - started:6.0f} {sum(outcomes.values()):9d} {fds:5d} {rss:7.1f}",
                    flush=True,
                )
            await asyncio.gather(*clients)
            locks_free = await sessions_free(session, base, token)
            expected = usage_expected(outcomes)
            counted = await usage_counted(session, base, expected["requests"][0])
            usage_ok = all(low <= counted.get(field, -1) <= high for field, (low, high) in expected.items())
            spent = counted.get("prompt_tokens", 0) + counted.get("completion_tokens", 0)  # /conv uses none
            budget = await budget_kept(session, base, token, spent)
            usage_ok = usage_ok and budget == {"used": spent, "held": 0}
            usage_report = {"expected (least, most)": expected, "counted": counted, "budget": budget}
        settle_started = time.monotonic()
        for _ in range(
            120
        ):  # up to 60 s: idle upstream connections close on keep-alive timers (15 s, checked every 15 s)
            fds, rss = sample(gogpt.pid)
            if fds <= before[0] + 2 + (MAX_CONNECTIONS if redis_url else 0):  # Redis's pool stays open
                break
            await asyncio.sleep(0.5)
        settled_in = time.monotonic() - settle_started
    finally:
        gogpt.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(gogpt.wait(), 30)
        except TimeoutError:
            gogpt.kill()
            await gogpt.wait()
        await runner.cleanup()
        workdir.cleanup()
    warm = samples[len(samples) // 4 :] or samples
    print(
        json.dumps(
            {
                "requests": sum(outcomes.values()),
                "outcomes": dict(sorted(outcomes.items())),
                "fds": {
                    "before_load": before[0],
                    "first": samples[0][0],
                    "max": max(s[0] for s in samples),
                    "after_load": fds,
                    "settled_in_s": round(settled_in, 1),
                },
                "rss_mb": {
                    "before_load": round(before[1], 1),
                    "first": round(samples[0][1], 1),
                    "after_warm_up": round(warm[0][1], 1),
                    "last": round(samples[-1][1], 1),
                    "max": round(max(s[1] for s in samples), 1),
                    "after_load": round(rss, 1),
                },
                "conv_sessions_free_after_load": locks_free,
                "chat_usage": usage_report,
                "chat_usage_as_expected": usage_ok,
                "exit_status_after_sigterm": gogpt.returncode,
            },
            indent=2,
        )
    )
    unexpected = sum(count for name, count in outcomes.items() if ":" in name)
    return 1 if unexpected or not locks_free or not usage_ok or gogpt.returncode != 0 else 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--every", type=float, default=10, help="seconds between samples")
    parser.add_argument(
        "--redis-url", help="gogpt's state in this Redis (a loopback one), not its SQLite file"
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(soak(args.minutes, args.concurrency, args.every, args.redis_url)))


if __name__ == "__main__":
    main()
