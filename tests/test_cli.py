"""The command line: `python -m gogpt` refuses bad settings clearly and stops gracefully."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest
from conftest import SECRET_KEY
from serving import free_port, start_gogpt, wait_until_listening


async def _run_to_exit(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, list[str]]:
    process = await start_gogpt(env, cwd, *args)
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, stderr.decode().splitlines()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "SECRET_KEY"),
        ({"SECRET_KEY": SECRET_KEY, "PORT": "eighty"}, "PORT"),
        ({"SECRET_KEY": SECRET_KEY, "API_PROXY": "ftp://x"}, "API_PROXY"),
        ({"SECRET_KEY": SECRET_KEY, "UPSTREAM_TIMEOUT": "soon"}, "UPSTREAM_TIMEOUT"),
    ],
)
async def test_bad_or_missing_setting_exits_1_with_one_line_naming_it(
    tmp_path: Path, env: dict[str, str], named: str
):
    code, lines = await _run_to_exit(env, tmp_path)
    assert code == 1
    assert len(lines) == 1
    assert named in lines[0]
    assert "Traceback" not in lines[0]


async def test_a_bad_setting_in_the_env_file_is_refused_too(tmp_path: Path):
    (tmp_path / ".env").write_text(f"SECRET_KEY={SECRET_KEY}\nMAX_BODY_BYTES=-5\n")
    code, lines = await _run_to_exit({}, tmp_path)
    assert (code, len(lines)) == (1, 1)
    assert "MAX_BODY_BYTES" in lines[0]


async def test_missing_env_file_option_is_refused(tmp_path: Path):
    code, lines = await _run_to_exit({"SECRET_KEY": SECRET_KEY}, tmp_path, "--env-file", "nope.env")
    assert code == 1
    assert "--env-file" in lines[-1]


async def test_serves_on_the_given_port_logs_no_secrets_and_exits_0_on_sigterm(tmp_path: Path):
    port, closed = free_port(), free_port()
    (tmp_path / ".env").write_text(
        f"SECRET_KEY={SECRET_KEY}\nPORT=1\nCHAT_API_KEY=sk-never-logged\nAPI_PROXY=127.0.0.1:{closed}\n"
    )
    process = await start_gogpt({}, tmp_path, "--host", "127.0.0.1", "--port", str(port))
    await wait_until_listening(port, process)
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}"
        async with session.get(f"{url}/token", params={"id": "u", "hour": "1", "key": SECRET_KEY}) as resp:
            assert resp.status == 200
            token = (await resp.json())["token"]
        async with session.get(f"{url}/v1/models", headers={"Authorization": token}) as resp:
            assert resp.status == 502  # nothing listens on API_PROXY
    process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    log = stderr.decode()
    assert "GET /token" in log
    assert "id=u" in log
    for secret in (SECRET_KEY, token, "sk-never-logged"):
        assert secret not in log
