"""Prometheus metrics (names: docs/metrics.md).

Agent figures are read from the agent's stats at scrape time (`AgentCollector`): over its socket (the
`stats` op) on the controller's endpoint, in process on the agent's own endpoint (`agent.metrics_address`).
Either way the agent's hot path keeps its plain counters and fixed-bucket histograms (kvstore/recorder.py)
and pays nothing for Prometheus; the controller's own figures (RPC latency, lookup hits by tier) are
ordinary prometheus-client metrics. Each endpoint has its own registry, so several can live in one process.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .recorder import LATENCY_BUCKETS

log = logging.getLogger("kvstore.metrics")

# Agent counters with a reason or tier in their name, exported as one labelled family each.
MISS_PREFIX = "miss_"
EVICTED = {"cpu_evicted_chunks": "cpu", "disk_evicted_chunks": "disk"}
# Bytes moved between tiers, by path: (section of the stats, counter name). Their rate is throughput.
TRANSFERS = {"disk_to_cpu": ("counters", "promoted_bytes"), "cpu_to_disk": ("counters", "writebehind_bytes"),
             "remote_to_cpu": ("cluster", "remote_pulled_bytes")}
# Token families of the agent's request recorder, with the labels always exported (0 until seen).
TOKENS = {
    "lookup": ("kvstore_lookup_tokens", "tokens asked for by agent lookups, by the tier holding them "
               "(none: past the matched prefix)", "tier", ("cpu", "disk", "remote", "none")),
    "get_hit": ("kvstore_get_hit_tokens", "tokens served by acquire/get, by the tier that served them",
                "tier", ("cpu", "disk", "remote")),
    "get_miss": ("kvstore_get_miss_tokens", "tokens asked for by acquire/get and not served, by reason",
                 "reason", ("not_found", "namespace", "checksum", "evicted", "no_space")),
}


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
        transfer = CounterMetricFamily("kvstore_transfer_bytes", "bytes moved between tiers, by path "
                                       "(the rate is the throughput)", labels=["path"])
        for path, (section, name) in TRANSFERS.items():
            source = counters if section == "counters" else stats.get(section, {}).get("counters", {})
            transfer.add_metric([path], source.get(name, 0))
        yield transfer
        yield from self._requests(stats.get("requests", {}))

    @staticmethod
    def _requests(requests: dict) -> Iterator:
        """The agent's request recorder (kvstore/recorder.py): latency, requests, tokens, queue depth."""
        in_flight = GaugeMetricFamily("kvstore_agent_requests_in_flight", "local-protocol requests being "
                                      "handled by the agent right now (its queue depth)")
        in_flight.add_metric([], requests.get("in_flight", 0))
        yield in_flight
        connections = GaugeMetricFamily("kvstore_agent_connections", "open local-protocol connections")
        connections.add_metric([], requests.get("connections", 0))
        yield connections
        ops = CounterMetricFamily("kvstore_agent_requests", "local-protocol requests answered, by op",
                                  labels=["op"])
        errors = CounterMetricFamily("kvstore_agent_request_errors", "local-protocol requests answered with "
                                     "an error, by op", labels=["op"])
        for op, n in sorted(requests.get("ops", {}).items()):
            ops.add_metric([op], n)
            errors.add_metric([op], requests.get("errors", {}).get(op, 0))
        yield ops
        yield errors
        bounds = requests.get("latency_bounds", LATENCY_BUCKETS)
        seconds = HistogramMetricFamily("kvstore_agent_request_seconds", "time the agent spent on a request, "
                                        "by op and the tier that served it", labels=["op", "tier"])
        for op, by_tier in sorted(requests.get("latency", {}).items()):
            for tier, h in sorted(by_tier.items()):
                cumulative, buckets = 0, []
                for bound, count in zip([*map(str, bounds), "+Inf"], h["counts"]):
                    cumulative += count
                    buckets.append((bound, cumulative))
                seconds.add_metric([op, tier], buckets, h["sum"])
        yield seconds
        tokens = requests.get("tokens", {})
        for kind, (name, doc, label, always) in TOKENS.items():
            family = CounterMetricFamily(name, doc, labels=[label])
            seen = tokens.get(kind, {})
            for value in dict.fromkeys([*always, *sorted(seen)]):
                family.add_metric([value], seen.get(value, 0))
            yield family


class AgentMetrics:
    """A registry holding one agent's figures (read when scraped), and its HTTP endpoint once served."""

    def __init__(self, read_stats: Callable[[], dict]):
        self.registry = CollectorRegistry()
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


class ControllerMetrics(AgentMetrics):
    """The controller's registry: its RPCs plus the agent behind it."""

    def __init__(self, read_stats: Callable[[], dict]):
        super().__init__(read_stats)
        self.rpc_seconds = Histogram("kvstore_control_rpc_seconds", "controller RPC latency, by method and code",
                                     ["method", "code"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.lookup_chunks = Counter("kvstore_control_lookup_chunks", "chunks asked for by Lookup RPCs, by the "
                                     "tier that held them (tier=none: a miss)", ["tier"], registry=self.registry)
