"""Metrics of cluster agents: remote gets (pulled over the peer link) are timed and counted as `remote`,
pulled bytes move `kvstore_transfer_bytes_total{path="remote_to_cpu"}`, and `kvstore serve
--cluster` serves the agent's own endpoint (agent.metrics_address) from the actor process."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time

import torch

from kvstore.client import AgentConnection, LocalClient
from kvstore.metrics import AgentCollector

from ..support.agents import agent_settings, clean_env, write_config

from ..support.data import SMALL, small_chunks, SMALL_NS, tokens
from ..support.metrics import scrape, value
from ..support.cluster import store_only_on_a
import pytest

pytestmark = pytest.mark.integration


def samples(socket_path: str) -> dict[tuple[str, tuple], float]:
    """The agent's families as the controller would export them: its stats op, read over the socket."""
    conn = AgentConnection(socket_path)
    try:
        families = AgentCollector(lambda: conn.call("stats", {})).collect()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    finally:
        conn.close()


def test_remote_gets_are_timed_and_counted_as_remote(cluster):
    keys, data = store_only_on_a(cluster, tokens(5, start=77_000_000), small_chunks(5, seed=77))
    for name in ("b", "c"):  # each pulls from a over its peer link
        before = samples(cluster[name].socket_path)
        client = cluster[name].client()
        assert torch.equal(client.get(keys), data), name
        client.close()
        after = samples(cluster[name].socket_path)
        moved = {key: after[key] - before.get(key, 0) for key in after}
        assert moved[("kvstore_get_hit_tokens_total", (("tier", "remote"),))] == 5 * SMALL.tokens, name
        assert moved[("kvstore_get_hit_tokens_total", (("tier", "cpu"),))] == 0, name
        assert moved[("kvstore_agent_request_seconds_count", (("op", "acquire"), ("tier", "remote")))] == 1, name
        assert moved[("kvstore_transfer_bytes_total", (("path", "remote_to_cpu"),))] >= 5 * SMALL.nbytes, name


def test_serve_cluster_exposes_the_agents_own_metrics_endpoint(tmp_path):
    settings = agent_settings(tmp_path, **{"cluster.namespace": "kvstore-metrics-test",
                                           "cluster.object_store_bytes": "96MiB",
                                           "agent.metrics_address": "127.0.0.1:0"})
    env = clean_env(RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen([sys.executable, "-m", "kvstore.cli", "serve", "--cluster", "--config",
                             str(write_config(tmp_path, settings))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
        port, seen = None, []
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                seen.append(lines.get(timeout=1.0))
            except queue.Empty:
                continue
            match = re.search(r"agent ready on .* metrics on http://127\.0\.0\.1:(\d+)/metrics", seen[-1])
            port = int(match.group(1)) if match else None
        assert port, "".join(seen)
        before = scrape(port)
        assert value(before, "kvstore_agent_up") == 1
        assert ("kvstore_transfer_bytes_total", (("path", "remote_to_cpu"),)) in before
        client = LocalClient(SMALL_NS, SMALL, socket_path=settings["agent.socket_path"])
        keys = client.keys(tokens(3))
        client.put(keys, small_chunks(3))
        client.get(keys)  # in the arena: read in place, then a one-way touch
        assert client.conn.call("stats", {})["metrics_port"] == port  # after the touch, on one connection
        client.close()
        after = scrape(port)
        assert value(after, "kvstore_agent_request_seconds_count", op="touch", tier="cpu") == 1
        assert value(after, "kvstore_get_hit_tokens_total", tier="cpu") == 3 * SMALL.tokens
        assert value(after, "kvstore_tier_chunks", tier="cpu") == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0
