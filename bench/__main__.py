"""The relay benchmark: direct, nginx, a bare pipe, a bare aiohttp relay and gogpt on one fake upstream.

    python -m bench                      # every profile and candidate, a table and bench/results/latest.json
    python -m bench --quick              # smaller counts, a smoke run of a minute
    python -m bench --profiles burst,wide --candidates direct,nginx,gogpt
    python -m bench --profiles json --candidates gogpt --gogpt-env RATE_LIMIT=1000000000
    python -m bench --profiles json,short,burst --candidates floor,gogpt   # gogpt over bare aiohttp
    python -m bench --profiles burst,short --candidates gogpt@main,gogpt  # this checkout against main's
    python -m bench --pin --rounds 3 --profiles short --candidates gogpt@main,gogpt  # steadier CPU figures
    python -m bench --pin --runs 10 --profiles short,burst --candidates gogpt-noaccounting,gogpt  # medians

Loopback only; every run is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import io
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import uvloop

from .client import Tally, run_load
from .summary import against_floor, over_runs

SECRET_KEY = "bench-secret-key-0123456789abcdef0123456789"
PATH = "/v1/chat/completions"
ROOT = Path(__file__).parent.parent
_LIBC = ctypes.CDLL(None)


@dataclass(frozen=True)
class Profile:
    streams: int
    count: int
    interval: float
    size: int = 64
    stream: bool = True
    repeat: int = 1
    # then this many requests in turn on one connection, outside the CPU count: one request's latency alone
    one_at_a_time: int = 0
    floats: int = 0  # JSON answers are embeddings of this many numbers, not completions
    path: str = PATH

    @property
    def spec(self) -> dict[str, float]:
        """What the fake upstream is asked for: its `"bench"` body field."""
        spec = {"count": self.count, "interval": self.interval, "size": self.size}
        return {**spec, "floats": self.floats} if self.floats else spec

    def events(self, repeat: int) -> int:
        """The events `repeat` rounds of this profile bring, a JSON answer counting as one."""
        return self.streams * repeat * (self.count if self.stream else 1)


async def warm_up(port: int, auth: str, profile: Profile) -> None:
    """A few requests first, so that connections and caches are in place before anything counts."""
    await run_load(
        port, profile.path, auth, 4, {**profile.spec, "count": min(profile.count, 10)}, profile.stream, 1
    )


PROFILES = {
    "burst": Profile(streams=32, count=3000, interval=0),
    "slow": Profile(streams=500, count=100, interval=0.02),
    "wide": Profile(streams=2000, count=40, interval=0.05),
    "json": Profile(streams=32, count=1, interval=0, size=512, stream=False, repeat=300, one_at_a_time=1000),
    # many short streams: CPU per stream is mostly each request's setup, not its events
    "short": Profile(streams=32, count=20, interval=0, repeat=100),
    # slow's streams, four times as long: with each request's cost spread over 400 events,
    # CPU per event here is mostly the cost of relaying an event
    "long": Profile(streams=500, count=400, interval=0.02),
    # embeddings of 26 inputs (850 KB of numbers): what reading a large JSON answer's usage costs
    "embed": Profile(
        streams=8,
        count=1,
        interval=0,
        stream=False,
        repeat=25,
        one_at_a_time=40,
        floats=40_000,
        path="/v1/embeddings",
    ),
}
QUICK = {
    "burst": Profile(streams=8, count=300, interval=0),
    "slow": Profile(streams=50, count=20, interval=0.02),
    "wide": Profile(streams=200, count=10, interval=0.05),
    "json": Profile(streams=8, count=1, interval=0, size=512, stream=False, repeat=30, one_at_a_time=100),
    "short": Profile(streams=8, count=20, interval=0, repeat=10),
    "long": Profile(streams=50, count=80, interval=0.02),
    "embed": replace(PROFILES["embed"], streams=2, repeat=5, one_at_a_time=5),
}
CANDIDATES = ("direct", "nginx", "pipe", "floor", "gogpt", "gogpt-2w")  # and gogpt@REF: gogpt as at a git ref
# gogpt with one part taken out, so that the part's cost shows in one run beside gogpt whole (any
# of them takes @REF too). Each is an exact edit of one line: a variant whose line is gone stops
# the run rather than measure gogpt whole under its name.
VARIANTS = {
    "gogpt-noaccounting": (  # the metered branch of /v1 never taken: no body parse, meter or watch
        "gogpt/openai_api.py",
        'if request.method == "POST" and path in METERED_PATHS and request.body_exists:',
        'if False and request.method == "POST" and path in METERED_PATHS and request.body_exists:',
    ),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [pid]
    with contextlib.suppress(OSError):
        for child in children.read_text().split():
            found += process_tree(int(child))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU of `pids` to the nanosecond, from their CPU clocks (/proc counts 10 ms ticks)."""
    total = 0.0
    for pid in pids:
        clock = ctypes.c_int()
        if _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
            with contextlib.suppress(OSError):  # it has exited
                total += time.clock_gettime(clock.value)
    return total


def peak_rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, StopIteration):
            status = Path(f"/proc/{pid}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return total / 1024


def wait_for_port(port: int, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {within} s")


NGINX_CONF = """
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream fake {{ server 127.0.0.1:{upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


@contextlib.contextmanager
def candidate(
    name: str,
    upstream_port: int,
    gogpt_env: Mapping[str, str] | None = None,
    cpus: set[int] | None = None,
    *,
    under: Sequence[str] = (),
) -> Iterator[tuple[int, list[int]]]:
    """Start a proxy (or none, for direct) on `cpus` (None: any); yield its port and the pids whose
    CPU and memory count. `under`: a command the proxy runs under (valgrind, for bench.instructions)."""
    if name == "direct":
        yield upstream_port, []
        return
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gogpt-bench-") as workdir:
        if name == "nginx":
            conf = Path(workdir, "nginx.conf")
            conf.write_text(NGINX_CONF.format(dir=workdir, upstream=upstream_port, port=port))
            command = [shutil.which("nginx") or "nginx", "-p", workdir, "-c", str(conf)]
            env = dict(os.environ)
        elif name in ("pipe", "floor"):
            command = [sys.executable, "-m", f"bench.{name}", str(port), str(upstream_port)]
            env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
        else:
            command = [sys.executable, "-m", "gogpt"]
            kind, at, ref = name.partition("@")
            env = {
                "PATH": os.environ.get("PATH", ""),
                "PYTHONPATH": source_tree(kind, ref if at else None, Path(workdir)),
                "SECRET_KEY": SECRET_KEY,
                "API_PROXY": f"127.0.0.1:{upstream_port}",
                "HOST": "127.0.0.1",
                "PORT": str(port),
                "WORKERS": "2" if kind == "gogpt-2w" else "1",
                **(gogpt_env or {}),
            }
        if under:  # runs that repeat exactly: hashing seeded alike, no bytecode written by the first
            env.update(PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
        process = subprocess.Popen(
            [*under, *command],
            env=env,
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # before exec: every thread and worker process of the proxy inherits it
            preexec_fn=None if cpus is None else functools.partial(os.sched_setaffinity, 0, cpus),
        )
        try:
            wait_for_port(port, 300 if under else 20)
            time.sleep(0.5 if name.startswith("gogpt-2w") else 0)  # let the second worker bind too
            yield port, process_tree(process.pid)
        finally:
            process.send_signal(signal.SIGTERM if name != "nginx" else signal.SIGQUIT)
            try:
                process.wait(120 if under else 30)
            except subprocess.TimeoutExpired:
                process.kill()


def source_tree(kind: str, ref: str | None, into: Path) -> str:
    """Where a gogpt candidate imports gogpt from: this checkout, or git `ref`'s, with the edit of
    its variant (VARIANTS) made in a copy under `into`."""
    if kind not in VARIANTS:
        return str(ROOT) if ref is None else checkout(ref, into)
    if ref is not None:
        tree = checkout(ref, into)
    else:  # uncommitted changes too, as the plain `gogpt` row runs them
        tree = str(into / "checkout")
        shutil.copytree(ROOT / "gogpt", Path(tree, "gogpt"), ignore=shutil.ignore_patterns("__pycache__"))
    path, line, edited = VARIANTS[kind]
    source = Path(tree, path)
    text = source.read_text()
    if text.count(line) != 1:
        raise RuntimeError(f"{kind}: {path} no longer has the line it edits, once: {line!r}")
    source.write_text(text.replace(line, edited))
    return tree


def checkout(ref: str, into: Path) -> str:
    """gogpt's package as it is at git `ref`, written under `into`: the directory to import it from."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "gogpt"],  # noqa: S607 - git from PATH
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into / "checkout", filter="data")
    return str(into / "checkout")


def percentile(values: list[int], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] / 1000 if ordered else float("nan")


async def measure(
    name: str,
    profile: Profile,
    upstream_port: int,
    token: str,
    gogpt_env: Mapping[str, str] | None = None,
    cpus: set[int] | None = None,
) -> dict:
    spec = profile.spec
    with candidate(name, upstream_port, gogpt_env, cpus) as (port, pids):
        auth = token if name.startswith("gogpt") else ""
        await warm_up(port, auth, profile)
        pids = sorted({pid for root in pids for pid in process_tree(root)})
        cpu_before = cpu_seconds(pids)
        started = time.perf_counter()
        tally: Tally = await asyncio.wait_for(
            run_load(port, profile.path, auth, profile.streams, spec, profile.stream, profile.repeat), 600
        )
        wall = time.perf_counter() - started
        cpu = cpu_seconds(pids) - cpu_before
        rss = peak_rss_mb(pids)
        alone = Tally()
        if profile.one_at_a_time:
            alone = await asyncio.wait_for(
                run_load(port, profile.path, auth, 1, spec, profile.stream, profile.one_at_a_time), 600
            )
    expected = profile.events(profile.repeat)
    return {
        "candidate": name,
        "events": tally.events,
        "expected_events": expected,
        "errors": len(tally.errors) + len(alone.errors),
        "first_errors": (tally.errors + alone.errors)[:3],
        "wall_s": round(wall, 3),
        "events_per_s": round(tally.events / wall, 1),
        "streams_per_s": round(tally.streams / wall, 1),
        "latency_ms": {
            "p50": percentile(tally.latencies_us, 0.5),
            "p99": percentile(tally.latencies_us, 0.99),
            "max": percentile(tally.latencies_us, 1.0),
        },
        "ttfb_ms_p50": round(statistics.median(tally.first_byte_ms), 2) if tally.first_byte_ms else None,
        "cpu_s_per_10k_events": round(cpu / tally.events * 10_000, 3) if pids and tally.events else None,
        "cpu_ms_per_request": round(cpu / tally.streams * 1000, 4) if pids and tally.streams else None,
        "one_at_a_time_ms_p50": percentile(alone.round_trips_us, 0.5) if alone.round_trips_us else None,
        "peak_rss_mb": round(rss, 1) if pids else None,
    }


def print_table(title: str, rows: list[dict]) -> None:
    direct = next((row for row in rows if row["candidate"] == "direct"), None)
    nginx = next((row for row in rows if row["candidate"] == "nginx"), None)
    width = max(10, *(len(row["candidate"]) for row in rows))
    print(f"\n{title}")
    print(
        f"{'candidate':<{width}} {'events/s':>10} {'vs nginx':>8} {'streams/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'added p50':>9} {'added p99':>9} {'ttfb ms':>7} {'cpu/10k':>8} {'cpu ms/req':>10} "
        f"{'RSS MB':>7} {'ok':>4}"
    )
    for row in rows:
        latency = row["latency_ms"]
        added50 = latency["p50"] - direct["latency_ms"]["p50"] if direct else float("nan")
        added99 = latency["p99"] - direct["latency_ms"]["p99"] if direct else float("nan")
        ratio = row["events_per_s"] / nginx["events_per_s"] if nginx else float("nan")
        ok = "yes" if row["errors"] == 0 and row["events"] == row["expected_events"] else "NO"
        cpu, per_request = row["cpu_s_per_10k_events"], row["cpu_ms_per_request"]
        rss = row["peak_rss_mb"]
        print(
            f"{row['candidate']:<{width}} {row['events_per_s']:>10.0f} {ratio:>8.2f} {row['streams_per_s']:>9.1f} "
            f"{latency['p50']:>7.2f} {latency['p99']:>7.2f} {latency['max']:>7.1f} {added50:>9.2f} {added99:>9.2f} "
            f"{row['ttfb_ms_p50'] or 0:>7.2f} {cpu if cpu is not None else '-':>8} "
            f"{per_request if per_request is not None else '-':>10} {rss if rss is not None else '-':>7} {ok:>4}"
        )


async def main_async(args: argparse.Namespace) -> int:
    from gogpt import mint_token

    profiles = QUICK if args.quick else PROFILES
    if args.rounds > 1:
        profiles = {name: replace(p, repeat=p.repeat * args.rounds) for name, p in profiles.items()}
    proxy_cpus = None
    if args.pin:  # the proxy alone on the last CPU; the load client and the upstream on the others
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            print("--pin needs two CPUs: not pinned", file=sys.stderr)
        else:
            proxy_cpus = {cpus[-1]}
            os.sched_setaffinity(0, set(cpus[:-1]))  # the upstream, started next, inherits it
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "bench.upstream", str(upstream_port)], cwd=ROOT)
    token = mint_token(SECRET_KEY, "bench", 1)
    runs: list[dict[str, list[dict]]] = [{} for _ in range(args.runs)]
    failed = False
    try:
        wait_for_port(upstream_port)
        for profile_name in args.profiles.split(","):
            for run, results in enumerate(runs):
                named = list(enumerate(args.candidates))
                rows: list[dict] = [{}] * len(named)
                for position, name in named if run % 2 == 0 else named[::-1]:  # each in turn goes first
                    if name == "nginx" and shutil.which("nginx") is None:
                        print(
                            "nginx is not installed (apt-get install nginx-light): skipping its row",
                            file=sys.stderr,
                        )
                        continue
                    row = await measure(
                        name, profiles[profile_name], upstream_port, token, dict(args.gogpt_env), proxy_cpus
                    )
                    failed |= row["errors"] > 0 or row["events"] != row["expected_events"]
                    rows[position] = row
                results[profile_name] = [row for row in rows if row]
                title = f"{profile_name}: run {run + 1} of {args.runs}" if args.runs > 1 else profile_name
                print_table(title, results[profile_name])
    finally:
        upstream.terminate()
        upstream.wait(10)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "quick": args.quick,
        "pinned": proxy_cpus is not None,
        "cpus": os.cpu_count(),
        "gogpt_env": dict(args.gogpt_env),
        "results": runs[0],
        "runs": runs,
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {out}")
    floor = against_floor(runs[0])
    if floor and args.runs == 1:
        print(f"\nAgainst the bare aiohttp relay (floor):\n{floor}")
    if args.runs > 1:
        print(f"\nRatios to the first candidate over {args.runs} runs, median (range):\n{over_runs(runs)}")
    return 1 if failed else 0


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("must be a whole number of at least 1")
    return int(text)


def candidate_names(text: str) -> list[str]:
    names = text.split(",")
    for name in names:
        kind, at, ref = name.partition("@")
        gogpt = kind in ("gogpt", "gogpt-2w") or kind in VARIANTS
        if not (gogpt or (kind in CANDIDATES and not at)) or (at and not ref):
            known = ", ".join((*CANDIDATES, *VARIANTS))
            raise argparse.ArgumentTypeError(f"{name!r}: candidates are {known}, and gogpt ones @REF")
    return names


def _variable(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not (name and equals):
        raise argparse.ArgumentTypeError("expected NAME=VALUE")
    return name, value


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument(
        "--candidates",
        type=candidate_names,
        default=",".join(CANDIDATES),
        help="comma-separated; gogpt@REF is gogpt as at a git ref (gogpt@main), to compare in one run;"
        f" {', '.join(VARIANTS)} is gogpt with that part taken out",
    )
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run the proxy alone on one CPU and the load on the others: steadier CPU figures,"
        " while events/s then shows the load's ceiling more than the proxy's",
    )
    parser.add_argument(
        "--rounds",
        type=_positive,
        default=1,
        metavar="N",
        help="N times each profile's rounds: a longer run, whose CPU figures spread less",
    )
    parser.add_argument(
        "--runs",
        type=_positive,
        default=1,
        metavar="N",
        help="measure every candidate N times, taking turns to go first, and give the median of each"
        " run's ratios to the first candidate: single runs of a 2-core machine spread 5-10%%",
    )
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "latest.json"))
    parser.add_argument(
        "--gogpt-env",
        type=_variable,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the gogpt candidates (RATE_LIMIT=1000000000 counts every request in the store)",
    )
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 2000 streams need 4000+ descriptors
    sys.exit(uvloop.run(main_async(args)))


if __name__ == "__main__":
    main()
