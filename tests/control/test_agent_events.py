"""The agent's event feed and chunk listing (local-protocol ops `events` and `chunks`)."""

from __future__ import annotations

import pytest

from kvstore.client import AgentConnection
from kvstore.errors import InvalidArgument
from kvstore.vocab import Tier
from ..support.data import small_chunks, tokens

from ..support.control import NS_A, NS_B

pytestmark = pytest.mark.integration


def test_events_follow_put_evict_and_clear(agent):
    conn = AgentConnection(agent.socket_path)
    start = conn.call("events", {"since": 0, "limit": 1})["last"]
    client = agent.client(NS_A)
    keys = [bytes(k) for k in client.keys(tokens(3))]
    client.put(keys, small_chunks(3))
    agent.store.flush(10)
    agent.store.evict(NS_A.digest, keys[:1], ("cpu",))
    agent.store.clear(NS_A.digest)
    reply = conn.call("events", {"since": start})
    events = reply["events"]
    assert reply["dropped"] == 0 and reply["next"] == events[-1]["seq"] == reply["last"]
    assert [e["seq"] for e in events] == list(range(start + 1, start + 1 + len(events)))
    assert all(e["ns"] == NS_A.digest for e in events)
    stored_cpu = b"".join(e["keys"] for e in events if e["kind"] == "stored" and e["tier"] == Tier.CPU)
    stored_disk = b"".join(e["keys"] for e in events if e["kind"] == "stored" and e["tier"] == Tier.DISK)
    assert stored_cpu == b"".join(keys) and sorted(stored_disk[i:i + 16] for i in range(0, 48, 16)) == sorted(keys)
    removed = [e for e in events if e["kind"] == "removed"]
    assert removed[0]["keys"] == keys[0] and removed[0]["tier"] == Tier.CPU
    assert events[-1]["kind"] == "cleared"
    # paging: at most `limit`, and `next` continues
    first = conn.call("events", {"since": start, "limit": 2})
    assert len(first["events"]) == 2 and first["next"] == start + 2
    assert conn.call("events", {"since": reply["last"]})["events"] == []
    conn.close()


def test_events_report_what_fell_out_of_the_buffer(agent):
    client = agent.client(NS_A)
    keys = [bytes(k) for k in client.keys(tokens(4))]
    for i, key in enumerate(keys):  # one commit (one event) each
        client.put([key], small_chunks(1, seed=i))
    feed = agent.store.directory.events
    with feed._lock:
        feed._events = type(feed._events)(list(feed._events)[-2:], maxlen=2)
    reply = agent.store.events(0)
    assert len(reply.events) == 2 and reply.dropped == reply.events[0]["seq"] - 1 > 0


def test_chunks_lists_pages_by_namespace_and_tier(agent):
    a, b = agent.client(NS_A), agent.client(NS_B)
    keys_a = [bytes(k) for k in a.keys(tokens(5))]
    keys_b = [bytes(k) for k in b.keys(tokens(2, start=50_000))]
    a.put(keys_a, small_chunks(5))
    b.put(keys_b, small_chunks(2))
    conn = AgentConnection(agent.socket_path)
    rows, start = [], 0
    while True:
        page = conn.call("chunks", {"ns": NS_A.digest, "start": start, "limit": 2})
        rows += page["chunks"]
        start = page["next"]
        if not start:
            break
    assert sorted(r[0] for r in rows) == sorted(keys_a) and all(r[1] == NS_A.digest for r in rows)
    assert len(conn.call("chunks", {})["chunks"]) == 7
    agent.store.flush(10)
    assert len(conn.call("chunks", {"tier": Tier.DISK})["chunks"]) == 7
    with pytest.raises(InvalidArgument):
        conn.call("chunks", {"tier": 9})
    with pytest.raises(InvalidArgument):
        conn.call("events", {"since": -1})
    conn.close()
