"""What the agent records per request for its metrics: plain counts, no Prometheus (docs/metrics.md).

The socket server (`AgentServer`) calls `begin` and `end` once per request, around the handler: one
lock, a bisect and a few additions, never work per chunk. `snapshot()` is what the `stats` op returns
under `requests`; `kvstore.metrics.AgentCollector` turns it into Prometheus families at scrape time.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter

# Upper bounds (seconds) of the latency buckets, shared by the agent and the controller; a last,
# unbounded bucket follows. Prometheus buckets are inclusive ("le"), hence bisect_left.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class Histogram:
    """Observations counted in the fixed LATENCY_BUCKETS, plus their sum. Not thread-safe by itself."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds


class RequestRecorder:
    """Requests by op, their latency by (op, tier), tokens by kind and label, and requests in flight.

    Thread-safe: every connection thread records into it under one short lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self.requests: Counter = Counter()  # op -> requests answered (errors included)
        self.errors: Counter = Counter()  # op -> requests answered with an error
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.tokens: dict[str, dict[str, int]] = {}  # kind (lookup, get_hit, get_miss) -> label -> tokens

    def begin(self) -> None:
        with self._lock:
            self.in_flight += 1

    def end(self, op: str, seconds: float, tier: str | None, tokens: dict[str, dict[str, int]] | None = None,
            failed: bool = False) -> None:
        """A request finished: count it; with a tier, time it; add its tokens ({kind: {label: n}})."""
        with self._lock:
            self.in_flight -= 1
            self.requests[op] += 1
            if failed:
                self.errors[op] += 1
            if tier is not None:
                histogram = self.latency.get((op, tier))
                if histogram is None:
                    histogram = self.latency[(op, tier)] = Histogram()
                histogram.observe(seconds)
            if tokens:
                for kind, by_label in tokens.items():
                    totals = self.tokens.setdefault(kind, {})
                    for label, n in by_label.items():
                        if n:
                            totals[label] = totals.get(label, 0) + n

    def snapshot(self) -> dict:
        """Plain data (msgpack- and JSON-safe): the `requests` section of the agent's stats."""
        with self._lock:
            latency: dict[str, dict[str, dict]] = {}
            for (op, tier), h in self.latency.items():
                latency.setdefault(op, {})[tier] = {"counts": list(h.counts), "sum": h.sum}
            return {"in_flight": self.in_flight, "ops": dict(self.requests), "errors": dict(self.errors),
                    "latency_bounds": list(LATENCY_BUCKETS), "latency": latency,
                    "tokens": {kind: dict(totals) for kind, totals in self.tokens.items()}}
