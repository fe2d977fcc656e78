"""The benchmark's load client and fake upstream still agree on every byte (no timing asserted)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path

import pytest

from bench import __main__ as bench_main
from bench import floor, instructions
from bench.__main__ import SECRET_KEY, Profile, candidate, source_tree
from bench.client import run_load
from bench.pipe import ClientSide
from bench.summary import against_floor, markdown, over_runs
from bench.upstream import UpstreamProtocol
from gogpt import mint_token


async def test_the_load_client_verifies_streams_and_json_from_the_fake_upstream():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        streamed = await run_load(
            port, "/v1/chat/completions", "", 4, {"count": 50, "interval": 0, "size": 100}, True, 2
        )
        answered = await run_load(
            port, "/v1/chat/completions", "", 2, {"count": 1, "interval": 0, "size": 30}, False, 5
        )
        embedded = await run_load(
            port, "/v1/embeddings", "", 2, {"count": 1, "interval": 0, "size": 30, "floats": 3072}, False, 2
        )
    assert (streamed.errors, streamed.events, streamed.streams) == ([], 4 * 2 * 50, 8)
    assert (answered.errors, answered.events) == ([], 10)
    assert (embedded.errors, embedded.events) == ([], 4)


async def test_the_load_client_notices_a_stream_cut_short():
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        event = b"data: 0 1 xx\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))  # one event of the three asked for
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        tally = await run_load(port, "/", "", 1, {"count": 3, "interval": 0, "size": 2}, True, 1)
    assert tally.errors == ["stream ended after 1 of 3 events"]


async def test_the_bare_pipe_row_relays_every_byte():
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(UpstreamProtocol, "127.0.0.1", 0)
    upstream_port = upstream.sockets[0].getsockname()[1]
    pipe = await loop.create_server(lambda: ClientSide(upstream_port), "127.0.0.1", 0)
    async with upstream, pipe:
        tally = await run_load(
            pipe.sockets[0].getsockname()[1],
            "/v1/chat/completions",
            "",
            3,
            {"count": 200, "interval": 0, "size": 500},
            True,
            2,
        )
    assert (tally.errors, tally.events) == ([], 3 * 2 * 200)


async def test_the_bare_aiohttp_floor_relays_streams_and_json_answers_byte_for_byte(aiohttp_server):
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(UpstreamProtocol, "127.0.0.1", 0)
    async with upstream:
        relay = await aiohttp_server(floor.create_app(upstream.sockets[0].getsockname()[1]))
        streamed = await run_load(
            relay.port, "/v1/chat/completions", "", 3, {"count": 200, "interval": 0, "size": 500}, True, 2
        )
        answered = await run_load(
            relay.port, "/v1/chat/completions", "", 2, {"count": 1, "interval": 0, "size": 30}, False, 5
        )
    assert (streamed.errors, streamed.events) == ([], 3 * 2 * 200)
    assert (answered.errors, answered.events, len(answered.round_trips_us)) == ([], 10, 10)


def test_the_summary_gives_ratios_to_the_nginx_row_of_each_profile():
    def row(name: str, events_per_s: float, cpu: float | None) -> dict:
        return {
            "candidate": name,
            "events_per_s": events_per_s,
            "latency_ms": {"p50": 1.0, "p99": 2.0, "max": 3.0},
            "ttfb_ms_p50": 5.0,
            "cpu_s_per_10k_events": cpu,
            "peak_rss_mb": None if cpu is None else 50.0,
        }

    table = markdown({"wide": [row("direct", 3000, None), row("nginx", 2000, 0.2), row("gogpt", 1000, 0.5)]})
    assert "| wide | gogpt | 1,000 | 0.50 | 0.0 | 5 | 0.5 | 2.50 | 50.0 |" in table.splitlines()


def test_the_summary_gives_ratios_to_the_floor_row_where_a_profile_has_one():
    def row(name: str, cpu_ms: float, alone_ms: float | None) -> dict:
        return {
            "candidate": name,
            "events_per_s": 1000 / cpu_ms,
            "cpu_ms_per_request": cpu_ms,
            "cpu_s_per_10k_events": cpu_ms * 10,
            "one_at_a_time_ms_p50": alone_ms,
        }

    table = against_floor(
        {"json": [row("floor", 0.2, 0.25), row("gogpt", 0.3, 0.3)], "wide": [row("gogpt", 1.0, None)]}
    )
    assert table.splitlines()[2:] == [
        "| json | floor | 5,000 | 1.00 | 0.200 | 1.00 | 2.000 | 1.00 | 0.250 | 1.00 |",
        "| json | gogpt | 3,333 | 0.67 | 0.300 | 1.50 | 3.000 | 1.50 | 0.300 | 1.20 |",
    ]


async def test_the_bombs_bench_sends_each_attack_and_reports_what_it_cost():
    bombs = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bench.bombs", "--max-body", "200000", "--token", "2", "--uploads", "3"),
        *("--quiet", "0", "--within", "60"),
        cwd=Path(__file__).parent.parent,
        stdout=asyncio.subprocess.PIPE,
    )
    report = (await asyncio.wait_for(bombs.communicate(), 120))[0].decode()
    assert bombs.returncode == 0, report
    token, uploads = report.splitlines()[1:]
    assert "'statuses': {'413': 2}" in token
    assert "peak RSS MB" in uploads and "longest loop step" in uploads


async def test_a_pinned_candidate_runs_on_the_cpus_it_was_given_and_relays():
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(UpstreamProtocol, "127.0.0.1", 0)
    last = max(os.sched_getaffinity(0))  # with two CPUs or more, a proper subset of this process's
    async with upstream:
        with candidate("floor", upstream.sockets[0].getsockname()[1], cpus={last}) as (port, pids):
            assert {cpu for pid in pids for cpu in os.sched_getaffinity(pid)} == {last}
            tally = await run_load(
                port, "/v1/chat/completions", "", 2, {"count": 20, "interval": 0, "size": 50}, True, 2
            )
    assert (tally.errors, tally.events) == ([], 2 * 2 * 20)


async def test_instruction_counts_give_what_one_request_costs_start_up_left_out():
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(UpstreamProtocol, "127.0.0.1", 0)
    tiny = Profile(streams=2, count=1, interval=0, size=30, stream=False, repeat=10)
    async with upstream:
        cost = await instructions.per_request("floor", tiny, upstream.sockets[0].getsockname()[1], "")
    # aiohttp's server and client take some 0.5 million instructions a request; start-up, over
    # a hundred million, would show through if the two runs' difference did not cancel it
    assert 100_000 < cost < 5_000_000


@pytest.mark.parametrize("name", ["gogpt", "gogpt-noaccounting"])
async def test_the_no_accounting_variant_relays_without_counting_usage(name: str, tmp_path: Path):
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(UpstreamProtocol, "127.0.0.1", 0)
    store = tmp_path / "gogpt.db"
    async with upstream:
        with candidate(name, upstream.sockets[0].getsockname()[1], {"GOGPT_DB": str(store)}) as (port, _):
            tally = await run_load(
                port,
                "/v1/chat/completions",
                mint_token(SECRET_KEY, "bench", 1),
                2,
                {"count": 5, "interval": 0, "size": 20},
                True,
                2,
            )
    assert (tally.errors, tally.events) == ([], 2 * 2 * 5)
    with sqlite3.connect(store) as db:  # the usage a SIGTERM wrote on its way out
        requests = db.execute("SELECT sum(requests) FROM usage").fetchone()[0]
    assert requests == (4 if name == "gogpt" else None)


def test_a_variant_whose_line_is_gone_stops_the_run_rather_than_measure_gogpt_whole(
    tmp_path: Path, monkeypatch
):
    edited = Path(
        source_tree("gogpt-noaccounting", None, tmp_path / "now"), "gogpt", "openai_api.py"
    ).read_text()
    assert 'if False and request.method == "POST" and path in METERED_PATHS' in edited
    monkeypatch.setitem(
        bench_main.VARIANTS, "gogpt-noaccounting", ("gogpt/openai_api.py", "no such line", "x")
    )
    with pytest.raises(RuntimeError, match="no longer has the line it edits"):
        source_tree("gogpt-noaccounting", None, tmp_path / "gone")


def test_runs_give_the_median_and_range_of_each_run_s_ratio_to_its_first_row():
    def run(base_cpu: float, cpu: float) -> dict[str, list[dict]]:
        return {
            "short": [
                {"candidate": "base", "cpu_ms_per_request": base_cpu},
                {"candidate": "x", "cpu_ms_per_request": cpu},
            ]
        }

    # the machine slows down between runs: each run's own ratio is what is kept
    table = over_runs([run(0.2, 0.22), run(0.4, 0.4), run(0.3, 0.36)])
    assert table.splitlines()[0].startswith("| profile | candidate | CPU ms/request vs base |")
    assert table.splitlines()[2].startswith("| short | x | 1.100 (1.00-1.20) | - |")
