"""Instructions per request, counted by valgrind's callgrind: a cost figure that holds still.

    python -m bench.instructions --profiles json,short --candidates floor,gogpt@main,gogpt

CPU seconds per request spread 5-10% between runs on a 2-core machine, more than most single
changes to gogpt are worth. Instructions do not: each candidate serves a profile's load twice
under callgrind, a short run and a five times longer one, and the difference of the two totals
over the difference in requests is what one request costs, start-up and shut-down cancelled
(hashing is seeded alike; how reads coalesce still moves a run by up to about 1%). Only
user-space instructions are counted: the kernel's share (the sockets) is left out, so ratios
come out a little larger than CPU-time ratios, and a cache miss costs nothing here. Use it to compare versions; quote CPU
figures from `python -m bench`. Needs valgrind (Debian: apt-get install valgrind). Loopback
only; every run is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import uvloop

from .__main__ import ROOT, SECRET_KEY, Profile, candidate, candidate_names, free_port, wait_for_port, warm_up
from .client import run_load

# The bench's profiles, shortened: under callgrind a proxy runs about fifty times slower.
# `repeat` is the long run's; the short run is a fifth of it.
PROFILES = {
    "json": Profile(streams=32, count=1, interval=0, size=512, stream=False, repeat=40),
    "short": Profile(streams=32, count=20, interval=0, repeat=20),
    "burst": Profile(streams=32, count=500, interval=0, repeat=5),
    "embed": Profile(
        streams=8, count=1, interval=0, stream=False, repeat=10, floats=40_000, path="/v1/embeddings"
    ),
}
CANDIDATES = ("floor", "gogpt")  # and pipe, and gogpt@REF: gogpt as at a git ref
_TOTAL = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def instructions_in(callgrind_out: Path) -> int:
    """The instructions a callgrind output file counted in all."""
    found = _TOTAL.search(callgrind_out.read_bytes())
    if found is None:
        raise ValueError(f"{callgrind_out} holds no total")
    return int(found[1])


async def count_run(
    name: str, profile: Profile, repeat: int, upstream_port: int, token: str
) -> tuple[int, int]:
    """(instructions, requests) of one candidate started, serving `repeat` rounds of the profile, and stopped."""
    with tempfile.TemporaryDirectory(prefix="gogpt-instructions-") as workdir:
        out = Path(workdir, "callgrind.out")
        under = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        with candidate(name, upstream_port, under=under) as (port, _):
            auth = token if name.startswith("gogpt") else ""
            await warm_up(port, auth, profile)
            tally = await asyncio.wait_for(
                run_load(port, profile.path, auth, profile.streams, profile.spec, profile.stream, repeat),
                1800,
            )
        expected = profile.events(repeat)
        if tally.errors or tally.events != expected:
            raise RuntimeError(f"{name}: {tally.events} of {expected} events; {tally.errors[:3]}")
        return instructions_in(out), tally.streams


async def per_request(name: str, profile: Profile, upstream_port: int, token: str) -> float:
    """Instructions one request costs the candidate: the long run less the short one."""
    short_total, short_requests = await count_run(name, profile, profile.repeat // 5, upstream_port, token)
    long_total, long_requests = await count_run(name, profile, profile.repeat, upstream_port, token)
    return (long_total - short_total) / (long_requests - short_requests)


async def main_async(args: argparse.Namespace) -> int:
    from gogpt import mint_token

    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "bench.upstream", str(upstream_port)], cwd=ROOT)
    token = mint_token(SECRET_KEY, "bench", 1)
    try:
        wait_for_port(upstream_port)
        for profile_name in args.profiles.split(","):
            profile = PROFILES[profile_name]
            print(
                f"\n{profile_name}\n{'candidate':<24} {'instructions/request':>20} {'per event':>10} {'ratio':>6}"
            )
            base = None
            for name in args.candidates:
                cost = await per_request(name, profile, upstream_port, token)
                base = base or cost  # ratios to the first candidate
                per_event = cost / profile.count if profile.stream else cost
                print(f"{name:<24} {cost:>20,.0f} {per_event:>10,.0f} {cost / base:>6.3f}", flush=True)
    finally:
        upstream.terminate()
        upstream.wait(10)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", default="json,short", help=f"of {', '.join(PROFILES)}")
    parser.add_argument(
        "--candidates",
        type=candidate_names,
        default=",".join(CANDIDATES),
        help="comma-separated, the first the base of the ratios; gogpt@REF is gogpt as at a git ref;"
        " gogpt-noaccounting is gogpt with usage accounting taken out",
    )
    sys.exit(uvloop.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
