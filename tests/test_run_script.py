"""scripts/run.sh: start, status, stop and logs of the nohup background server, in a temporary home.

GOGPT_PYTHON points the script at the interpreter running these tests, so nothing is installed.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving import free_port

RUN = Path(__file__).parent.parent / "scripts" / "run.sh"


def run(home: Path, *args: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
    """run.sh with a bare environment, from another directory than the repository or the home."""
    env = {
        "PATH": os.environ["PATH"],
        "GOGPT_HOME": str(home),
        "GOGPT_PYTHON": sys.executable,
        "HOST": "127.0.0.1",
        "SHUTDOWN_GRACE": "2",
    }
    if port is not None:
        env["PORT"] = str(port)
    return subprocess.run(
        ["bash", str(RUN), *args], cwd="/", env=env, capture_output=True, text=True, timeout=60, check=False
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for whoever adopted it to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


Started = tuple[Path, int, subprocess.CompletedProcess[str]]


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Started]:
    """A gogpt started by run.sh in `tmp_path`: (home, port, result of start); stopped afterwards."""
    port = free_port()
    result = run(tmp_path, port=port)
    yield tmp_path, port, result
    run(tmp_path, "stop", port=port)


def test_start_writes_env_with_a_fresh_secret_key_readable_only_by_its_owner(started: Started) -> None:
    home, _, result = started
    assert result.returncode == 0, output(result)
    env = (home / ".env").read_text()
    assert re.search(r"^SECRET_KEY=[0-9a-f]{64}$", env, re.MULTILINE)
    assert (home / ".env").stat().st_mode & 0o777 == 0o600
    assert "CHAT_API_KEY=" in env  # the rest of .env.example came along


def test_the_state_file_sits_in_gogpt_home_beside_env_and_server_log(started: Started) -> None:
    home, _, result = started
    assert result.returncode == 0, output(result)
    assert {".env", "server.log", "gogpt.db"} <= {path.name for path in home.iterdir()}


def test_start_writes_the_pid_file_and_prints_the_url(started: Started) -> None:
    home, port, result = started
    assert result.returncode == 0, output(result)
    pid = int((home / "gogpt.pid").read_text())
    assert alive(pid)
    assert f"gogpt is running (pid {pid}) at http://127.0.0.1:{port}" in result.stdout


def test_the_printed_token_command_works_as_pasted(started: Started) -> None:
    *_, result = started
    assert result.returncode == 0, output(result)
    [command] = [
        line.split(":", 1)[1] for line in result.stdout.splitlines() if line.startswith("mint a token:")
    ]
    minted = subprocess.run(["bash", "-c", command], cwd="/", capture_output=True, text=True, timeout=30)
    assert json.loads(minted.stdout)["id"] == "me", minted.stdout + minted.stderr


def test_the_started_server_answers_with_the_key_from_env(started: Started) -> None:
    home, port, result = started
    assert result.returncode == 0, output(result)
    assert get(port, "/token")[0] == 400  # up, and asking for its parameters
    key = re.search(r"^SECRET_KEY=(\w+)$", (home / ".env").read_text(), re.MULTILINE)
    assert key
    status, body = get(port, f"/token?id=me&hour=1&key={key[1]}")
    assert status == 200
    assert json.loads(body)["token"]


def test_start_again_says_already_running(started: Started) -> None:
    home, port, _ = started
    pid = (home / "gogpt.pid").read_text().strip()
    again = run(home, "start", port=port)
    assert again.returncode == 1
    assert f"already running (pid {pid})" in output(again)
    assert (home / "gogpt.pid").read_text().strip() == pid


def test_start_refuses_a_port_another_server_answers_on(
    started: Started, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _, port, _ = started
    other = tmp_path_factory.mktemp("other")
    result = run(other, port=port)
    assert result.returncode == 1
    assert f"something else already answers at http://127.0.0.1:{port}" in output(result)
    assert not (other / "gogpt.pid").exists()


def test_status_says_running_with_the_pid_and_url(started: Started) -> None:
    home, port, _ = started
    pid = (home / "gogpt.pid").read_text().strip()
    status = run(home, "status", port=port)
    assert status.returncode == 0
    assert f"running (pid {pid}) at http://127.0.0.1:{port}" in status.stdout


def test_logs_n_shows_the_end_of_server_log(started: Started) -> None:
    home, port, _ = started
    logs = run(home, "logs", "-n", port=port)
    assert logs.returncode == 0
    assert f"serving on http://127.0.0.1:{port}" in logs.stdout


def test_stop_ends_the_process_and_removes_the_pid_file(started: Started) -> None:
    home, port, _ = started
    pid = int((home / "gogpt.pid").read_text())
    stopped = run(home, "stop", port=port)
    assert stopped.returncode == 0, output(stopped)
    assert "gogpt stopped" in stopped.stdout
    assert not alive(pid)
    assert not (home / "gogpt.pid").exists()
    status = run(home, "status", port=port)
    assert (status.returncode, status.stdout) == (3, "gogpt is not running\n")


def test_start_keeps_an_existing_env_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SECRET_KEY=mine-0123456789abcdef0123456789abcdef\n")
    port = free_port()
    try:
        assert run(tmp_path, port=port).returncode == 0
    finally:
        run(tmp_path, "stop", port=port)
    assert (tmp_path / ".env").read_text() == "SECRET_KEY=mine-0123456789abcdef0123456789abcdef\n"


def test_host_and_port_come_from_env_file_when_not_in_the_environment(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / ".env").write_text(f"SECRET_KEY=mine\nexport PORT='{port}'  # quoted, exported\n")
    try:
        result = run(tmp_path)
        assert result.returncode == 0, output(result)
        assert f"at http://127.0.0.1:{port}" in result.stdout
        assert get(port, "/healthz")[0] == 200
    finally:
        run(tmp_path, "stop")


def test_a_broken_setting_fails_the_start_and_shows_the_end_of_the_log(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SECRET_KEY=x\nPORT=abc\n")
    result = run(tmp_path)
    assert result.returncode == 1
    assert "failed to start" in output(result)
    assert "PORT: Not a valid integer" in output(result)  # gogpt's own line, from server.log
    assert not (tmp_path / "gogpt.pid").exists()


def test_a_stale_pid_file_of_another_process_is_not_gogpt(tmp_path: Path) -> None:
    """A pid reused by another program after a crash: not reported as gogpt, and never signalled."""
    (tmp_path / "gogpt.pid").write_text(f"{os.getpid()}\n")
    status = run(tmp_path, "status", port=free_port())
    assert status.returncode == 3
    stopped = run(tmp_path, "stop", port=free_port())
    assert stopped.returncode == 0
    assert "not running" in stopped.stdout
    assert not (tmp_path / "gogpt.pid").exists()


def test_stop_when_not_running_says_so(tmp_path: Path) -> None:
    result = run(tmp_path, "stop", port=free_port())
    assert result.returncode == 0
    assert "not running" in result.stdout
