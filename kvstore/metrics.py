"""Prometheus metrics (names: docs/metrics.md).

Agent figures are read from the agent's `stats` op at scrape time (`AgentCollector`), so the agent's hot
path keeps its plain counters and pays nothing for Prometheus; the controller's own figures (RPC latency,
lookup hits by tier) are ordinary prometheus-client metrics. Each controller has its own registry, so
several can live in one process.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("kvstore.metrics")

# Agent counters with a reason or tier in their name, exported as one labelled family each.
MISS_PREFIX = "miss_"
EVICTED = {"cpu_evicted_chunks": "cpu", "disk_evicted_chunks": "disk"}
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class AgentCollector(Collector):
    """Reads one agent's stats when scraped; `kvstore_agent_up` is 0 (and nothing else) if it is down."""

    def __init__(self, read_stats: Callable[[], dict]):
        self.read_stats = read_stats

    def collect(self) -> Iterator:
        up = GaugeMetricFamily("kvstore_agent_up", "1 if the node agent answered the scrape")
        try:
            stats = self.read_stats()
        except Exception as exc:  # a scrape must not fail because the agent is down
            log.warning("agent stats failed during scrape: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        counters = stats.get("counters", {})
        lookups = CounterMetricFamily("kvstore_lookups", "lookup requests answered by the agent")
        lookups.add_metric([], counters.get("lookups", 0))
        yield lookups
        chunks = CounterMetricFamily("kvstore_lookup_chunks", "chunks asked for by agent lookups, by result",
                                     labels=["result"])
        chunks.add_metric(["hit"], counters.get("lookup_hit_chunks", 0))
        chunks.add_metric(["miss"], counters.get("lookup_miss_chunks", 0))
        yield chunks
        gets = CounterMetricFamily("kvstore_get_hit_chunks", "chunks served to clients")
        gets.add_metric([], counters.get("get_hit_chunks", 0))
        yield gets
        misses = CounterMetricFamily("kvstore_miss_chunks", "chunks not served, by reason", labels=["reason"])
        for name, value in counters.items():
            if name.startswith(MISS_PREFIX):
                misses.add_metric([name[len(MISS_PREFIX):]], value)
        yield misses
        evicted = CounterMetricFamily("kvstore_evicted_chunks", "chunks evicted by capacity, by tier",
                                      labels=["tier"])
        for name, tier in EVICTED.items():
            evicted.add_metric([tier], counters.get(name, 0))
        yield evicted
        every = CounterMetricFamily("kvstore_agent_counter", "every agent counter by name "
                                    "(docs/local-protocol.md)", labels=["counter"])
        for name, value in sorted(counters.items()):
            every.add_metric([name], value)
        yield every
        tier_chunks = GaugeMetricFamily("kvstore_tier_chunks", "chunks held, by tier", labels=["tier"])
        tier_bytes = GaugeMetricFamily("kvstore_tier_bytes", "bytes by tier and kind (used, capacity, pinned)",
                                       labels=["tier", "kind"])
        for tier, t in stats.get("tiers", {}).items():
            tier_chunks.add_metric([tier], t.get("chunks", 0))
            tier_bytes.add_metric([tier, "used"], t.get("used_bytes", t.get("bytes_used", 0)))
            tier_bytes.add_metric([tier, "capacity"], t.get("capacity_bytes", 0))
            tier_bytes.add_metric([tier, "pinned"], t.get("pinned_bytes", 0))
        yield tier_chunks
        yield tier_bytes
        queue = GaugeMetricFamily("kvstore_writebehind_queue_bytes", "bytes waiting to be written to disk")
        queue.add_metric([], stats.get("writebehind_queue_bytes", 0))
        yield queue


class ControllerMetrics:
    """The controller's registry: its RPCs plus the agent behind it."""

    def __init__(self, read_stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.rpc_seconds = Histogram("kvstore_control_rpc_seconds", "controller RPC latency, by method and code",
                                     ["method", "code"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.lookup_chunks = Counter("kvstore_control_lookup_chunks", "chunks asked for by Lookup RPCs, by the "
                                     "tier that held them (tier=none: a miss)", ["tier"], registry=self.registry)
        self.registry.register(AgentCollector(read_stats))
        self._http = None

    def serve(self, address: str) -> int:
        """Start the HTTP endpoint on host:port (port 0: any free one); returns the port."""
        host, _, port = address.rpartition(":")
        self._http, _ = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
