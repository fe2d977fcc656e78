"""Prometheus metrics: a leaf that imports nothing of gogpt, so every layer may count.

They live in prometheus-client's default registry, or, when `PROMETHEUS_MULTIPROC_DIR` is set
(serve.py does it for `--workers N`), in its multiprocess files so any worker's scrape reports
all of them.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess

__all__ = [
    "BUDGET_REFUSALS",
    "DURATION",
    "PENDING",
    "RELAYED_BYTES",
    "REQUESTS",
    "REVOKED_REFUSALS",
    "STREAMS_ACTIVE",
    "TOKENS",
    "UPSTREAM_ERRORS",
    "UPSTREAM_KEY_CALLS",
    "USAGE_DROPPED",
    "exposition",
]

REQUESTS = Counter("gogpt_requests_total", "Requests answered.", ["route", "method", "status"])
DURATION = Histogram(
    "gogpt_request_duration_seconds",
    "Time from request to the end of its answer (whole streams included).",
    ["route"],
    buckets=(0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
STREAMS_ACTIVE = Gauge(
    "gogpt_streams_active",
    "Upstream answers being relayed now (as of the last second).",
    multiprocess_mode="livesum",
)
UPSTREAM_ERRORS = Counter("gogpt_upstream_errors_total", "Failed upstream calls.", ["kind"])
RELAYED_BYTES = Counter("gogpt_relayed_bytes_total", "Bytes of upstream answers relayed to clients.")
UPSTREAM_KEY_CALLS = Counter(
    "gogpt_upstream_key_calls_total",
    "Upstream calls per OpenAI key (by fingerprint) and answer status.",
    ["key", "status"],
)

TOKENS = Counter(
    "gogpt_tokens_total",
    "Tokens used, by the model the upstream named, prompt or completion, and exact or estimated.",
    ["model", "kind", "source"],
)
USAGE_DROPPED = Counter(
    "gogpt_usage_dropped_total",
    "Calls whose usage was lost: the store was down and the usage kept waiting for it was full.",
)

REVOKED_REFUSALS = Counter("gogpt_revoked_refusals_total", "Calls refused because their token was revoked.")
BUDGET_REFUSALS = Counter(
    "gogpt_budget_refusals_total", "Calls refused (429) because they could pass their token's budget."
)


class PendingCounts:
    """What every request adds to the metrics, kept as plain numbers until `add_up` adds it to
    them, once a second and before each scrape (ops.py): an `inc()` of prometheus-client takes
    four Python calls and a lock, and each request made four, and an `observe()` walks the
    buckets in Python and takes two locks. One event loop adds to these; what waits is a
    second's requests at most."""

    def __init__(self) -> None:
        self.relayed_bytes = 0  # RELAYED_BYTES
        self.streams_active = 0  # STREAMS_ACTIVE is set to it
        self._counts: dict[Any, list[int]] = {}  # a labelled counter → [its count not yet added]
        self._observations: dict[Any, list[float]] = {}  # a labelled histogram → values not yet observed

    def counter(self, child: Any) -> list[int]:
        """The one-item list whose count `add_up` adds to `child`, a counter's labelled child."""
        return self._counts.setdefault(child, [0])

    def observations(self, child: Any) -> list[float]:
        """The list whose values `add_up` observes in `child`, a histogram's labelled child."""
        return self._observations.setdefault(child, [])

    def add_up(self) -> None:
        if self.relayed_bytes:
            RELAYED_BYTES.inc(self.relayed_bytes)
            self.relayed_bytes = 0
        STREAMS_ACTIVE.set(self.streams_active)
        for child, count in self._counts.items():
            if count[0]:
                child.inc(count[0])
                count[0] = 0
        for child, values in self._observations.items():
            for value in values:
                child.observe(value)
            values.clear()


PENDING = PendingCounts()


def exposition() -> bytes:
    """Every metric in Prometheus's text format, all workers' when there are several."""
    registry = REGISTRY
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
