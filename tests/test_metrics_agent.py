"""The agent's own Prometheus endpoint (agent.metrics_address): a real agent, real puts and gets through
LocalClient, real scrapes over HTTP; the names are the ones docs/metrics.md lists."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from kvstore.client import AgentConnection
from kvstore.config import load_config
from kvstore.errors import ConfigError, NotFound
from kvstore.keys import Namespace
from kvstore.metrics import AgentCollector

from .support.agents import agent_settings
from .support.data import SMALL, SMALL_NS, small_chunks, tokens
from .support.metrics import scrape, value

pytestmark = pytest.mark.integration

TOKENS = SMALL.tokens  # per chunk


def count(samples: dict, op: str, tier: str) -> float:
    return value(samples, "kvstore_agent_request_seconds_count", op=op, tier=tier)


@pytest.fixture
def served(start_agent):
    agent = start_agent(**{"agent.metrics_address": "127.0.0.1:0"})
    assert agent.server.metrics_port > 0
    return agent


def test_put_get_lookup_move_the_documented_names(served):
    before = scrape(served.server.metrics_port)
    assert value(before, "kvstore_agent_up") == 1
    assert value(before, "kvstore_agent_connections") == 0
    client = served.client()
    keys = [bytes(k) for k in client.keys(tokens(6))]
    client.put(keys[:4], small_chunks(4))
    got = client.get(keys[:4])  # all 4 in the arena: read in place, then one `touch`
    assert got.shape[0] == 4
    client.stats()  # a round trip on the same connection: the one-way touch has been served
    with client.acquire(keys[:2]):  # a pinned read
        pass
    conn = AgentConnection(served.socket_path)
    conn.call("lookup", {"ns": SMALL_NS.digest, "keys": b"".join(keys)})  # 4 stored, 2 not
    after = scrape(served.server.metrics_port)

    assert count(after, "commit", "cpu") >= count(before, "commit", "cpu") + 1
    assert count(after, "touch", "cpu") == count(before, "touch", "cpu") + 1
    assert count(after, "acquire", "cpu") == count(before, "acquire", "cpu") + 1
    assert count(after, "lookup", "cpu") == count(before, "lookup", "cpu") + 1
    assert value(after, "kvstore_agent_request_seconds_bucket", op="acquire", tier="cpu", le="+Inf") == \
        count(after, "acquire", "cpu")
    assert value(after, "kvstore_agent_request_seconds_sum", op="acquire", tier="cpu") > 0
    assert value(after, "kvstore_get_hit_tokens_total", tier="cpu") == (4 + 2) * TOKENS
    assert value(after, "kvstore_get_hit_chunks_total") == 4 + 2
    assert value(after, "kvstore_lookup_tokens_total", tier="cpu") == 4 * TOKENS
    assert value(after, "kvstore_lookup_tokens_total", tier="none") == 2 * TOKENS
    assert value(after, "kvstore_agent_requests_total", op="acquire") == 1
    assert value(after, "kvstore_agent_requests_total", op="touch") == 1
    assert value(after, "kvstore_agent_connections") == 2  # the client and the raw connection
    assert value(after, "kvstore_tier_bytes", tier="cpu", kind="used") > value(before, "kvstore_tier_bytes",
                                                                                tier="cpu", kind="used")
    assert value(after, "kvstore_tier_chunks", tier="cpu") == 4
    conn.close()
    client.close()


def test_a_get_from_disk_is_timed_as_disk_and_moves_transfer_bytes(served):
    client = served.client()
    keys = [bytes(k) for k in client.keys(tokens(3))]
    client.put(keys, small_chunks(3))
    assert client.flush(timeout=30)
    written = scrape(served.server.metrics_port)
    assert value(written, "kvstore_transfer_bytes_total", path="cpu_to_disk") >= 3 * SMALL.nbytes
    assert value(written, "kvstore_transfer_bytes_total", path="disk_to_cpu") == 0
    served.store.evict(SMALL_NS.digest, keys, ("cpu",))
    client.get(keys)
    after = scrape(served.server.metrics_port)
    assert count(after, "acquire", "disk") == 1 and count(after, "acquire", "cpu") == 0
    assert value(after, "kvstore_transfer_bytes_total", path="disk_to_cpu") >= 3 * SMALL.nbytes
    assert value(after, "kvstore_get_hit_tokens_total", tier="disk") == 3 * TOKENS
    assert value(after, "kvstore_get_hit_tokens_total", tier="cpu") == 0
    assert value(after, "kvstore_transfer_bytes_total", path="remote_to_cpu") == 0
    client.close()


def test_missed_tokens_by_reason(served):
    client = served.client()
    keys = [bytes(k) for k in client.keys(tokens(4))]
    client.put(keys[:1], small_chunks(1))
    other = Namespace(model="other-model", chunk_tokens=TOKENS)
    conn = AgentConnection(served.socket_path)
    conn.call("register", {"ns": other.digest, "geometry": [SMALL.layers, SMALL.heads, SMALL.head_dim,
                                                             SMALL.tokens, SMALL.planes, SMALL.dtype]})
    # a prefix read of 4: 1 hit, then the first miss ends it; its reason covers the 2 chunks after it
    reply = conn.call("acquire", {"ns": SMALL_NS.digest, "keys": b"".join(keys), "prefix": True})
    conn.call("acquire", {"ns": other.digest, "keys": keys[0], "prefix": False})  # another namespace's key
    with pytest.raises(NotFound):
        conn.call("acquire", {"ns": b"\0" * 16, "keys": keys[0]})  # unregistered namespace: an error
    samples = scrape(served.server.metrics_port)
    assert reply["reasons"] == {1: "not_found"}
    assert value(samples, "kvstore_get_hit_tokens_total", tier="cpu") == TOKENS
    assert value(samples, "kvstore_get_miss_tokens_total", reason="not_found") == 3 * TOKENS
    assert value(samples, "kvstore_get_miss_tokens_total", reason="namespace") == TOKENS
    assert count(samples, "acquire", "none") == 1  # served nothing
    assert value(samples, "kvstore_agent_request_errors_total", op="acquire") == 1
    assert value(samples, "kvstore_agent_requests_total", op="acquire") == 3
    conn.close()
    client.close()


def test_requests_in_flight_is_the_queue_depth(served):
    """A lookup waiting for the store's lock is in flight until it gets it."""
    collector = AgentCollector(served.server.ops.stats)
    conn = AgentConnection(served.socket_path)
    conn.call("register", {"ns": SMALL_NS.digest, "geometry": [SMALL.layers, SMALL.heads, SMALL.head_dim,
                                                                SMALL.tokens, SMALL.planes, SMALL.dtype]})
    done = threading.Event()
    with served.store.cpu.lock:  # the arena lock, which a lookup takes; reentrant: this thread may still read the stats
        thread = threading.Thread(target=lambda: (conn.call("lookup", {"ns": SMALL_NS.digest, "keys": b"k" * 16}),
                                                  done.set()))
        thread.start()
        deadline = time.monotonic() + 10
        while served.server.ops.stats()["requests"]["in_flight"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        families = {f.name: f for f in collector.collect()}
        assert families["kvstore_agent_requests_in_flight"].samples[0].value == 1
        assert not done.is_set()
    thread.join(10)
    assert done.is_set()
    families = {f.name: f for f in collector.collect()}
    assert families["kvstore_agent_requests_in_flight"].samples[0].value == 0
    conn.close()


def test_metrics_address_off_by_default_taken_port_is_a_warning(start_agent, tmp_path, caplog):
    assert start_agent().server.metrics_port == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = start_agent(**{"agent.metrics_address": f"127.0.0.1:{port}", "agent.socket_path":
                               str(tmp_path / "second.sock"), "disk.path": str(tmp_path / "disk2")})
    assert agent.server.metrics_port == 0
    assert "agent metrics endpoint not started" in caplog.text
    assert agent.client().conn.call("stats", {})["metrics_port"] == 0  # the agent itself serves on
    with pytest.raises(ConfigError, match="agent.metrics_address"):
        load_config(env={}, overrides=agent_settings(tmp_path, **{"agent.metrics_address": "9400"}))
