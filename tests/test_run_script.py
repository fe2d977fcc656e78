"""scripts/run.sh: start, status and stop of the nohup background server, in a temporary home."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from serving import free_port

RUN = Path(__file__).parent.parent / "scripts" / "run.sh"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A GOGPT_HOME whose .venv is the one running the tests, so nothing is installed."""
    (tmp_path / ".venv").symlink_to(sys.prefix)
    (tmp_path / ".venv" / ".gogpt-installed").touch()
    return tmp_path


def run(home: Path, *args: str, port: int) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "GOGPT_HOME": str(home),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "SHUTDOWN_GRACE": "2",
    }
    return subprocess.run(
        ["bash", str(RUN), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_start_status_stop(home: Path):
    port = free_port()
    started = run(home, port=port)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"http://127.0.0.1:{port}" in started.stdout
        assert re.search(r"^SECRET_KEY=[0-9a-f]{64}$", (home / ".env").read_text(), re.MULTILINE)
        assert (home / ".env").stat().st_mode & 0o077 == 0
        pid = int((home / "gogpt.pid").read_text())

        again = run(home, "start", port=port)
        assert again.returncode == 1
        assert "already running" in again.stdout

        status = run(home, "status", port=port)
        assert status.returncode == 0
        assert f"running (pid {pid})" in status.stdout
    finally:
        stopped = run(home, "stop", port=port)
    assert stopped.returncode == 0
    assert "stopped" in stopped.stdout
    assert not (home / "gogpt.pid").exists()
    assert not Path(f"/proc/{pid}").exists()
    assert run(home, "status", port=port).returncode == 3
    assert "serving on" in (home / "server.log").read_text()


def test_start_keeps_an_existing_env_file(home: Path):
    (home / ".env").write_text("SECRET_KEY=mine-0123456789abcdef0123456789abcdef\n")
    port = free_port()
    try:
        assert run(home, port=port).returncode == 0
    finally:
        run(home, "stop", port=port)
    assert (home / ".env").read_text() == "SECRET_KEY=mine-0123456789abcdef0123456789abcdef\n"


def test_a_failed_start_shows_the_end_of_the_log(home: Path):
    (home / ".env").write_text("SECRET_KEY=x\nMAX_BODY_BYTES=lots\n")
    result = run(home, port=free_port())
    assert result.returncode == 1
    assert "failed to start" in result.stdout
    assert "MAX_BODY_BYTES" in result.stdout
    assert not (home / "gogpt.pid").exists()


def test_stop_when_not_running_says_so(home: Path):
    result = run(home, "stop", port=free_port())
    assert result.returncode == 0
    assert "not running" in result.stdout
