"""Markdown tables of a benchmark run, for docs and notes: `python -m bench.summary [results.json]`.

Reads what `python -m bench` wrote (bench/results/latest.json unless told otherwise). The first
table's ratios are to the nginx row of the same profile, as the run's own table shows them; when
the run has a `floor` row (bare aiohttp), a second table gives every row's ratios to it. With
`--runs N`, a third gives each row's ratios to the first candidate, as the median of the runs'.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

DEFAULT = Path(__file__).parent / "results" / "latest.json"


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value is not None and base else "-"


def markdown(results: dict[str, list[dict]]) -> str:
    lines = [
        "| profile | candidate | events/s | vs nginx | added p99 ms | ttfb ms | CPU s/10k ev | vs nginx | RSS MB |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for profile, rows in results.items():
        nginx = next((row for row in rows if row["candidate"] == "nginx"), None)
        direct = next((row for row in rows if row["candidate"] == "direct"), None)
        for row in rows:
            added = row["latency_ms"]["p99"] - direct["latency_ms"]["p99"] if direct else None
            cpu, rss = row["cpu_s_per_10k_events"], row["peak_rss_mb"]
            lines.append(
                f"| {profile} | {row['candidate']} | {row['events_per_s']:,.0f} "
                f"| {_ratio(row['events_per_s'], nginx and nginx['events_per_s'])} "
                f"| {'-' if added is None or row is direct else f'{added:.1f}'} | {row['ttfb_ms_p50'] or 0:.0f} "
                f"| {'-' if cpu is None else cpu} | {_ratio(cpu, nginx and nginx['cpu_s_per_10k_events'])} "
                f"| {'-' if rss is None else rss} |"
            )
    return "\n".join(lines)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def against_floor(results: dict[str, list[dict]]) -> str:
    """Each profile with a floor row: what every row costs next to bare aiohttp, per request and per event."""
    columns = (
        ("events/s", "events_per_s", 0),
        ("CPU ms/request", "cpu_ms_per_request", 3),
        ("CPU s/10k ev", "cpu_s_per_10k_events", 3),
        ("one at a time p50 ms", "one_at_a_time_ms_p50", 3),
    )
    lines = [
        "| profile | candidate | " + " | ".join(f"{title} | vs floor" for title, _, _ in columns) + " |",
        "|---|---|" + "--:|--:|" * len(columns),
    ]
    for profile, rows in results.items():
        floor = next((row for row in rows if row["candidate"] == "floor"), None)
        if floor is None:
            continue
        for row in rows:
            cells = [
                f"{_number(row.get(key), digits)} | {_ratio(row.get(key), floor.get(key))}"
                for _, key, digits in columns
            ]
            lines.append(f"| {profile} | {row['candidate']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


_RATIOS = (
    ("CPU ms/request", "cpu_ms_per_request"),
    ("CPU s/10k ev", "cpu_s_per_10k_events"),
    ("one at a time p50", "one_at_a_time_ms_p50"),
    ("events/s", "events_per_s"),
)


def over_runs(runs: list[dict[str, list[dict]]]) -> str:
    """Each row's ratios to the first row of its run (the candidates measured back to back, so
    the machine's drift between runs cancels), as the median and range over the runs."""
    base = next(iter(runs[0].values()))[0]["candidate"]  # every profile runs the same candidates
    lines = [
        "| profile | candidate | " + " | ".join(f"{title} vs {base}" for title, _ in _RATIOS) + " |",
        "|---|---|" + "--:|" * len(_RATIOS),
    ]
    for profile, rows in runs[0].items():
        for position, row in enumerate(rows[1:], start=1):
            cells = []
            for _, key in _RATIOS:
                ratios = [
                    run[profile][position][key] / run[profile][0][key]
                    for run in runs
                    if run[profile][position].get(key) and run[profile][0].get(key)
                ]
                cells.append(
                    f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})"
                    if ratios
                    else "-"
                )
            lines.append(f"| {profile} | {row['candidate']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    report = json.loads(path.read_text())
    results = report["results"]
    print(markdown(results))
    floor = against_floor(results)
    if floor:
        print(f"\n{floor}")
    if len(report.get("runs", ())) > 1:
        print(f"\n{over_runs(report['runs'])}")


if __name__ == "__main__":
    main()
