"""Running a real `python -m gogpt` in a subprocess for tests that need the whole program."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def start_gogpt(
    env: Mapping[str, str], cwd: Path, *args: str, preexec_fn: Callable[[], object] | None = None
) -> asyncio.subprocess.Process:
    """Start gogpt with only `env` (plus PATH) set; the caller waits for it to listen.

    `preexec_fn` runs in the child before gogpt does (to set a resource limit, say). It starts a
    process group of its own, which `kill_leftovers` kills whole after the test."""
    process = await asyncio.create_subprocess_exec(
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
        preexec_fn=preexec_fn,
        start_new_session=True,
    )
    _started.append(process.pid)
    return process


_started: list[int] = []  # process groups start_gogpt made


def kill_leftovers() -> None:
    """Kill whatever start_gogpt started that is still running, workers included: a test that
    failed before stopping its gogpt would leave it running after the suite."""
    while _started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(_started.pop(), signal.SIGKILL)


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


async def refusing(port: int) -> None:
    """Return once the port refuses new connections (gogpt has begun to stop)."""
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.02)  # polling a socket's state: there is no event to await


def new_connections() -> aiohttp.ClientSession:
    """A client that opens a new connection per request, so the kernel spreads them over the workers."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


class Gateway:
    """A running `python -m gogpt` whose log is read as it comes, so a test can await a line."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log: list[str] = []
        self._new_line = asyncio.Condition()
        self._reader = asyncio.create_task(self._read_log())

    @classmethod
    async def start(
        cls,
        env: Mapping[str, str],
        cwd: Path,
        *args: str,
        workers: int = 1,
        preexec_fn: Callable[[], object] | None = None,
    ) -> Gateway:
        """Start gogpt on a free loopback port and return once each of its workers listens."""
        port = free_port()
        env = {**env, "HOST": "127.0.0.1", "PORT": str(port), "WORKERS": str(workers)}
        gateway = cls(await start_gogpt(env, cwd, *args, preexec_fn=preexec_fn), port)
        await gateway.wait_for_log("serving on", workers)
        return gateway

    async def _read_log(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            async with self._new_line:
                self.log.append(line.decode(errors="replace"))
                self._new_line.notify_all()
        async with self._new_line:
            self._new_line.notify_all()  # the process ended: nobody should wait for more

    async def wait_for_log(self, text: str, count: int = 1, within: float = 30) -> None:
        """Until `text` has appeared in `count` log lines; fails if gogpt exits first."""

        def seen() -> bool:
            return sum(text in line for line in self.log) >= count or self._reader.done()

        try:
            async with asyncio.timeout(within), self._new_line:
                await self._new_line.wait_for(seen)
        except TimeoutError:
            raise AssertionError(
                f"{text!r} not logged {count} times in {within} s:\n" + "".join(self.log)
            ) from None
        assert sum(text in line for line in self.log) >= count, "".join(self.log)

    def worker_pids(self) -> list[int]:
        """The worker processes of a `--workers N` gogpt: its children but multiprocessing's
        resource tracker."""
        pid = self.process.pid
        children = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return [child for child in children if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]

    async def stop(self) -> int:
        """SIGTERM, then its exit status (killed if it does not stop within 30 s)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        with contextlib.suppress(Exception):
            await self._reader
        return self.process.returncode if self.process.returncode is not None else -1
