"""Operations through a real `python -m gogpt`: JSON access logs and supervised workers."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
from conftest import SECRET_KEY
from prometheus_client.parser import text_string_to_metric_families
from serving import free_port, start_gogpt, wait_until_listening


async def _stop(process: asyncio.subprocess.Process) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    log = stderr.decode()
    assert process.returncode == 0, log
    return log


async def test_json_access_log_has_identity_status_bytes_duration_and_no_secret(tmp_path: Path):
    port = free_port()
    env = {
        "SECRET_KEY": SECRET_KEY,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_FORMAT": "json",
        "API_PROXY": f"127.0.0.1:{free_port()}",
    }
    process = await start_gogpt(env, tmp_path)
    await wait_until_listening(port, process)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        async with session.post("/token", json={"id": "carol", "hour": 1, "key": SECRET_KEY}) as resp:
            token = (await resp.json())["token"]
        async with session.post(
            "/chat", json={"secret": "body-text"}, headers={"Authorization": token}
        ) as resp:
            assert resp.status == 502
    log = await _stop(process)
    entries = [json.loads(line) for line in log.splitlines()]
    [chat] = [entry for entry in entries if entry.get("path") == "/chat"]
    assert (chat["method"], chat["status"], chat["identity"]) == ("POST", 502, "carol")
    assert chat["bytes"] > 0
    assert chat["duration"] >= 0
    for secret in (SECRET_KEY, token, "body-text"):
        assert secret not in log


async def test_workers_share_the_port_report_metrics_together_and_stop_on_sigterm(tmp_path: Path):
    port = free_port()
    env = {"SECRET_KEY": SECRET_KEY, "HOST": "127.0.0.1", "PORT": str(port)}
    process = await start_gogpt(env, tmp_path, "--workers", "2")
    assert process.stderr is not None
    async with asyncio.timeout(30):  # both workers say so once they listen
        started = 0
        while started < 2:
            started += b"serving on" in await process.stderr.readline()
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        for _ in range(20):  # new connections, spread over both workers by the kernel
            async with session.get("/healthz", headers={"Connection": "close"}) as resp:
                assert resp.status == 200
        # each worker adds its counts to the shared files once a second: the other's come within one
        for _ in range(25):  # no event crosses the processes: looked at again, five seconds at most
            counted = await _healthz_requests_counted(session)
            if counted >= 20:
                break
            await asyncio.sleep(0.2)
        assert counted == 20
    await _stop(process)


async def _healthz_requests_counted(session: aiohttp.ClientSession) -> float:
    async with session.get("/metrics", headers={"Authorization": f"Bearer {SECRET_KEY}"}) as resp:
        text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gogpt_requests_total" and sample.labels["route"] == "/healthz"
    )
