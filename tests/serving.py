"""Running a real `python -m gogpt` in a subprocess for tests that need the whole program."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def start_gogpt(env: Mapping[str, str], cwd: Path, *args: str) -> asyncio.subprocess.Process:
    """Start gogpt with only `env` (plus PATH) set; the caller waits for it to listen."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gogpt",
        *args,
        cwd=cwd,
        env={
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(Path(__file__).parent.parent),
            **({"SPLICE": os.environ["SPLICE"]} if "SPLICE" in os.environ else {}),  # CI runs both ways
            **env,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def wait_until_listening(port: int, process: asyncio.subprocess.Process, within: float = 15) -> None:
    """Poll the port until it accepts, failing early if the process exits."""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        if process.returncode is not None:
            raise AssertionError(f"gogpt exited with {process.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)  # polling a port: there is no event to await
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError(f"gogpt did not listen on {port} within {within} s")
