"""The distributed cache on a real 3-node Ray cluster (one session-scoped cluster, loopback only).

Agents run with replication 2 (tests/cluster/conftest.py). Tests that kill an agent restart it first
thing in the tests that need every node (`all_alive`)."""

from __future__ import annotations

import threading
import time

import numpy as np
import psutil
import pytest
import torch

from kvstore.codec import HEADER_BYTES
from kvstore.errors import AgentUnavailable

from ..support.data import small_chunks, tokens
from ..support.cluster import is_loopback as _is_loopback
from ..support.cluster import link_call, store_only_on_a

pytestmark = pytest.mark.integration


def _prefix_tokens(n_chunks: int, base: int) -> np.ndarray:
    return tokens(n_chunks, start=base * 1_000_000)


def _holder_prefixes(cluster, keys) -> dict[str, int]:
    """Ground truth, node by node: how many chunks from the first each agent holds (its own store)."""
    out = {}
    for agent in cluster.agents.values():
        client = agent.client()
        held = client.contains(keys)
        run = held.index(False) if False in held else len(held)
        if run:
            out[agent.node_id] = run
        client.close()
    return out


def test_a_stores_and_c_gets_identical_bytes(cluster):
    a, c = cluster["a"].client(), cluster["c"].client()
    keys = a.keys(_prefix_tokens(8, base=1))
    data = small_chunks(8, seed=11)
    assert a.put(keys, data).stored == 8
    assert a.flush(timeout=30)  # on disk, replicated, and in the cluster directory
    before = c.lookup(keys)
    assert before.chunks == 8
    local_on_c = c.contains(keys)
    assert [t == "remote" for t in before.tiers] == [not held for held in local_on_c]
    assert not all(local_on_c)  # with r=2 over 3 nodes, C cannot hold every chunk of A's
    result = c.read(keys)
    assert torch.equal(result.chunks, data)  # identical bytes
    assert list(result.remote) == [i for i, held in enumerate(local_on_c) if not held]
    assert c.lookup(keys).tiers == ("cpu",) * 8  # pulled into C's arena: local now
    assert c.stats()["cluster"]["counters"]["remote_pulled_chunks"] >= 8 - sum(local_on_c)


def test_cluster_lookup_reports_every_holder(cluster):
    b = cluster["b"].client()
    keys = b.keys(_prefix_tokens(12, base=2))
    b.put(keys, small_chunks(12, seed=12))
    assert b.flush(timeout=30)
    expected = _holder_prefixes(cluster, keys)
    assert expected[cluster["b"].node_id] == 12
    assert len(expected) >= 2  # the replica holder(s) too
    for viewer in ("a", "b", "c"):
        result = cluster[viewer].client().cluster_lookup(keys)
        assert result.chunks == 12
        assert result.node == cluster[viewer].node_id
        reported = {node: chunks for node, chunks, _ in result.nodes}
        assert reported == expected, viewer
        tiers = {node: t for node, _, t in result.nodes}
        assert tiers[cluster["b"].node_id] == ("cpu",) * 12
    # A longer prompt than anyone holds: the prefix ends where the cluster's copies end.
    longer = b.keys(_prefix_tokens(14, base=2))
    assert cluster["c"].client().cluster_lookup(longer).chunks == 12


def test_prefetch_then_get_reads_remote_chunks(cluster):
    a, c = cluster["a"].client(), cluster["c"].client()
    keys = a.keys(_prefix_tokens(6, base=3))
    data = small_chunks(6, seed=13)
    a.put(keys, data)
    assert a.flush(timeout=30)
    missing = sum(1 for held in c.contains(keys) if not held)
    assert c.prefetch(keys) == missing
    assert torch.equal(c.get(keys), data)  # waits for the prefetch in progress, or it is done


def test_remote_chunk_failing_its_checksum_is_a_miss_never_data(cluster):
    a = cluster["a"].client()
    keys = a.keys(_prefix_tokens(1, base=4))
    data = small_chunks(1, seed=14)
    a.put(keys, data)
    assert a.flush(timeout=30)
    holders = _holder_prefixes(cluster, keys)
    replica = next(x for x in cluster.agents.values() if x.node_id in holders and x.name != "a")
    reader = next(x for x in cluster.agents.values() if x.node_id not in holders)
    # The replica's header carries the payload checksum it arrived with; flip a payload byte there,
    # and remove A's own copy, so the corrupt replica is the only one left.
    victim = replica.client()
    with victim._reader._pinned_slots(keys, prefix=True) as slots:
        (_, offset, _), = slots
        victim.conn.arena_np[offset + HEADER_BYTES + 100] ^= 0xFF
    a.evict(keys, tiers=("cpu", "disk"))
    assert a.flush(timeout=30)
    client = reader.client()
    result = client.read(keys)
    assert result.chunks.shape[0] == 0
    assert result.misses == {0: "remote_checksum"}
    assert client.stats()["cluster"]["counters"]["miss_remote_checksum"] >= 1
    assert client.lookup(keys).tiers == ("remote",)  # the directory still names the holder: advice only


def test_a_stale_directory_entry_is_a_miss_with_its_reason(cluster):
    """The directory says A holds a chunk A never had (as after an eviction whose update was lost)."""
    from kvstore.cluster.placement import owners
    from kvstore.vocab import TierBits

    c = cluster["c"].client()
    keys = c.keys(_prefix_tokens(1, base=7))
    members = sorted(agent.node_id for agent in cluster.agents.values())
    owner = next(a for a in cluster.agents.values() if a.node_id == members[int(owners(keys[0], members)[0])])
    assert link_call(owner, "apply", {"node": cluster["a"].node_id, "keys": keys[0],
                                      "bits": bytes([TierBits.CPU])}) == ["ok", {"applied": 1}]
    assert c.lookup(keys).tiers == ("remote",)  # advice: the directory believes A
    result = c.read(keys)
    assert result.chunks.shape[0] == 0  # never data
    assert result.misses == {0: "remote_evicted"}
    assert c.stats()["cluster"]["counters"]["miss_remote_evicted"] >= 1


def test_b_and_c_pull_over_the_peer_link(cluster):
    """Only a holds the chunks: b and c each pull them from a over their peer links."""
    keys, data = store_only_on_a(cluster, _prefix_tokens(6, base=8), small_chunks(6, seed=18))
    for name in ("b", "c"):
        client = cluster[name].client()
        before = client.stats()["cluster"]["counters"]
        assert torch.equal(client.get(keys), data), name
        after = client.stats()["cluster"]["counters"]
        assert after.get("link_pulled_chunks", 0) - before.get("link_pulled_chunks", 0) == 6, (name, after)


def test_peer_link_needs_the_secret_and_stays_in_step_after_bad_requests(cluster):
    import socket

    import ray

    from kvstore.wire.framing import FrameReader, pack

    _, (host, port, secret) = ray.get(cluster["a"].handle.ping.remote(), timeout=30)
    assert _is_loopback(host)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(pack(["hello", {"secret": "not-" + secret}]))
        assert FrameReader(sock, 1 << 20).read()[:2] == ["err", "unauthenticated"]
        assert sock.recv(1) == b""  # and the connection is closed
    with socket.create_connection((host, port), timeout=10) as sock:
        frames = FrameReader(sock, 1 << 20)
        sock.sendall(pack(["hello", {"secret": secret}]))
        assert frames.read()[0] == "ok"
        sock.sendall(pack(["nonsense", {}]))
        assert frames.read()[:2] == ["err", "invalid_argument"]
        sock.sendall(pack(["holders", {"keys": b"x" * 15}]))
        assert frames.read()[:2] == ["err", "invalid_argument"]
        sock.sendall(pack(["import", {"sizes": [200], "keys": b"x" * 15}]))  # refused, its stream read past
        sock.sendall(bytes(200))
        assert frames.read()[:2] == ["err", "invalid_argument"]
        sock.sendall(pack(["holders", {"keys": b"k" * 32}]))  # the same connection still answers
        status, answers = frames.read()
        assert status == "ok" and answers == [None, None]


def test_with_r2_killing_b_mid_workload_loses_no_chunk_and_never_hangs(cluster):
    b, c = cluster["b"].client(), cluster["c"].client()
    prompts = 24
    keys = [b.keys(_prefix_tokens(4, base=100 + p)) for p in range(prompts)]
    data = [small_chunks(4, seed=200 + p) for p in range(prompts)]
    for p in range(prompts):
        assert b.put(keys[p], data[p]).stored == 4
    assert b.flush(timeout=60)  # every chunk has its second copy on A or C
    b.close()
    progress = threading.Semaphore(0)
    outcomes: list[tuple[int, int]] = []  # (prompt, chunks got)
    failures: list[BaseException] = []

    def workload() -> None:
        for p in range(prompts):
            try:
                got = c.get(keys[p])
                assert torch.equal(got, data[p][: got.shape[0]]), f"wrong bytes for prompt {p}"
                lookup = c.lookup(keys[p])
                assert lookup.chunks >= got.shape[0]  # what was just got is in C's arena now
                outcomes.append((p, got.shape[0]))
            except BaseException as exc:  # AgentUnavailable here = a call that did not return in time
                failures.append(exc)
            progress.release()

    reader = threading.Thread(target=workload)
    reader.start()
    for _ in range(6):
        progress.acquire()
    cluster["b"].kill()  # mid-workload
    reader.join(timeout=300)
    assert not reader.is_alive()
    assert not failures, failures
    assert len(outcomes) == prompts
    cluster.wait_members(2)
    # No chunk lost: once the survivors have rebuilt the directory, every prompt is whole from C.
    for p in range(prompts):
        deadline = time.monotonic() + 30
        while c.lookup(keys[p]).chunks < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        result = c.read(keys[p])
        assert torch.equal(result.chunks, data[p]), f"prompt {p}: {result.chunks.shape[0]} of 4 chunks, {result.misses}"
    assert c.stats()["cluster"]["counters"]["peers_departed"] >= 1


def test_a_restarted_agent_is_found_again_with_its_ssd_contents(cluster):
    b = cluster["b"].client()
    keys = b.keys(_prefix_tokens(5, base=5))
    data = small_chunks(5, seed=15)
    b.put(keys, data)
    assert b.flush(timeout=30)  # on B's SSD
    b.close()
    cluster["b"].kill()
    cluster.wait_members(2)
    c = cluster["c"].client()
    assert cluster["b"].node_id not in {n for n, _, _ in c.cluster_lookup(keys).nodes}
    cluster["b"].start()  # same node, same disk directory
    cluster.wait_members(3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the survivors hear of it within a heartbeat or two
        holders = {node: tiers for node, _, tiers in c.cluster_lookup(keys).nodes}
        if len(holders.get(cluster["b"].node_id, ())) == 5:
            break
        time.sleep(0.2)
    assert holders.get(cluster["b"].node_id) == ("disk",) * 5  # re-registered from its SSD tier
    fresh = cluster["b"].client()
    assert torch.equal(fresh.get(keys), data)


def test_dead_directory_owner_or_peer_is_a_miss_within_the_deadline(cluster):
    a, c = cluster["a"].client(), cluster["c"].client()
    keys = a.keys(_prefix_tokens(10, base=6))
    data = small_chunks(10, seed=16)
    a.put(keys, data)
    assert a.flush(timeout=30)
    cluster["a"].kill()  # the writer and some directory owners are gone at once
    got = c.get(keys)  # whatever it returns, it returns (the client's own timeout would raise)
    assert torch.equal(got, data[: got.shape[0]])
    result = c.cluster_lookup(keys)
    assert result.chunks >= got.shape[0] and result.node == cluster["c"].node_id  # got = in C's arena
    with pytest.raises(AgentUnavailable):
        a.lookup(keys[:1]) if not a.conn.directory else a.get(keys[:1])


def test_loopback_check_rejects_other_addresses():
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("::ffff:127.0.0.1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("::") and not _is_loopback("10.1.2.3")


def test_ray_listens_only_on_loopback(cluster):
    import os

    me = psutil.Process(os.getpid())
    listening = []
    for proc in me.children(recursive=True):
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [(proc.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 3, listening  # GCS, raylets, object managers, workers: there are some
    outside = [entry for entry in listening if not _is_loopback(entry[1])]
    assert not outside, outside


def test_controller_in_front_of_one_agent_answers_for_every_node(cluster, control_a):
    """A real ControlServer on loopback in front of agent a: Lookup, Score, Stats and Health speak for
    the whole cluster (the holders as each node's own store knows them, every member's tiers)."""
    from kvstore.proto import kvstore_pb2 as pb

    from ..support.data import SMALL_NS

    control = control_a
    b = cluster["b"].client()
    keys = b.keys(_prefix_tokens(5, base=9))
    b.put(keys, small_chunks(5, seed=19))
    assert b.flush(timeout=30)
    expected = _holder_prefixes(cluster, keys)
    query = pb.ChunkQuery(namespace=SMALL_NS.digest, chunk_hashes_packed=b"".join(keys))
    reply = control.Lookup(pb.LookupRequest(query=query))
    assert reply.matched_chunks == 5
    assert {n.node: n.matched_chunks for n in reply.nodes} == expected
    assert list(next(n for n in reply.nodes if n.node == cluster["b"].node_id).tiers) == [pb.TIER_CPU] * 5
    score = control.Score(pb.ScoreRequest(query=query))
    assert dict(score.matched_tokens_by_node) == {n: c * SMALL_NS.chunk_tokens for n, c in expected.items()}
    stats = control.Stats(pb.StatsRequest())
    assert sorted(n.node for n in stats.nodes) == sorted(a.node_id for a in cluster.agents.values())
    assert all(any(t.tier == pb.TIER_CPU and t.capacity_bytes > 0 for t in n.tiers) for n in stats.nodes)
    health = control.Health(pb.HealthRequest())
    assert health.status == pb.HealthResponse.SERVING
    assert dict(health.nodes) == {a.node_id: "serving" for a in cluster.agents.values()}


def _holdings(cluster, keys) -> dict[str, set[bytes]]:
    """Ground truth: the keys among `keys` each node's own store holds (nodes holding none left out)."""
    out = {}
    for agent in cluster.agents.values():
        client = agent.client()
        held = {k for k, has in zip(keys, client.contains(keys)) if has}
        client.close()
        if held:
            out[agent.node_id] = held
    return out


def test_controller_lists_pins_evicts_and_moves_on_every_node(cluster, control_a):
    """ListChunks pages through every member, Pin leases chunks on every holder (and renews and ends
    them there), Move to another node leaves the target the only holder, Evict drops every copy."""
    import grpc

    from kvstore.proto import kvstore_pb2 as pb

    from ..support.data import SMALL_NS

    control = control_a
    b = cluster["b"].client()
    keys = b.keys(_prefix_tokens(4, base=10))
    assert b.put(keys, small_chunks(4, seed=20)).stored == 4
    assert b.flush(timeout=30)  # replicated (r=2): every chunk on b and one more node
    holdings = _holdings(cluster, keys)
    assert sum(map(len, holdings.values())) == 8
    query = pb.ChunkQuery(namespace=SMALL_NS.digest, chunk_hashes_packed=b"".join(keys))

    listed, token = [], ""
    for _ in range(2000):  # earlier tests' chunks are listed too
        page = control.ListChunks(pb.ListChunksRequest(namespace=SMALL_NS.digest, page_size=7, page_token=token))
        assert len(page.chunks) <= 7
        listed += [(c.node, c.hash) for c in page.chunks]
        token = page.next_page_token
        if not token:
            break
    assert not token and len(set(listed)) == len(listed)  # to the end, nothing listed twice
    assert {(n, k) for n, k in listed if k in keys} == {(n, k) for n, held in holdings.items() for k in held}
    c_id = cluster["c"].node_id
    only_c = control.ListChunks(pb.ListChunksRequest(namespace=SMALL_NS.digest, node=c_id, page_size=10000))
    assert {(c.node, c.hash) for c in only_c.chunks} == {(n, k) for n, k in listed if n == c_id}
    with pytest.raises(grpc.RpcError) as info:
        control.ListChunks(pb.ListChunksRequest(node="not-a-member"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    pin = control.Pin(pb.PinRequest(query=query, ttl_s=600))
    assert pin.pinned_chunks == 8 and pin.lease.count("@") == len(holdings)
    pinned = control.ListChunks(pb.ListChunksRequest(namespace=SMALL_NS.digest, pinned_only=True, page_size=10000))
    assert {(c.node, c.hash) for c in pinned.chunks} == {(n, k) for n, held in holdings.items() for k in held}
    assert control.Evict(pb.EvictRequest(query=query, tiers=[pb.TIER_CPU])).pinned_chunks == 8
    renewed = control.Pin(pb.PinRequest(lease=pin.lease, ttl_s=300))
    assert (renewed.lease, renewed.pinned_chunks) == (pin.lease, 8)
    control.Unpin(pb.UnpinRequest(lease=pin.lease))
    assert not control.ListChunks(pb.ListChunksRequest(namespace=SMALL_NS.digest, pinned_only=True)).chunks
    with pytest.raises(grpc.RpcError) as info:
        control.Unpin(pb.UnpinRequest(lease=pin.lease))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    moved = control.Move(pb.MoveRequest(query=query, to_tier=pb.TIER_CPU, to_node=c_id))
    assert moved.moved_chunks == 4
    assert _holdings(cluster, keys) == {c_id: set(keys)}  # the target holds all, nobody else any
    c = cluster["c"].client()
    assert torch.equal(c.get(keys), small_chunks(4, seed=20))
    with pytest.raises(grpc.RpcError) as info:
        control.Move(pb.MoveRequest(query=query, to_tier=pb.TIER_CPU, to_node="not-a-member"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    evicted = control.Evict(pb.EvictRequest(query=query))
    assert evicted.cpu_chunks == 4 and evicted.pinned_chunks == 0
    assert _holdings(cluster, keys) == {}


def test_controller_with_a_member_down_answers_for_the_rest_and_names_it(cluster, control_a):
    """Agent c killed. Until the others' next heartbeat (cluster.heartbeat_s) c is still a member that
    does not answer, after it a departed node; either way: Health does not call it serving, a listing of
    every node answers without it, a listing of c is UNAVAILABLE (member) or NOT_FOUND (departed)
    naming it, and Evict reaches the members that answer. Nothing hangs: every call has its deadline."""
    import grpc

    from kvstore.proto import kvstore_pb2 as pb

    from ..support.data import SMALL_NS

    b = cluster["b"].client()
    keys = b.keys(_prefix_tokens(2, base=11))
    assert b.put(keys, small_chunks(2, seed=21)).stored == 2
    assert b.flush(timeout=30)
    c_id = cluster["c"].node_id
    cluster["c"].kill()  # the fixture restarts it for the next test
    health = control_a.Health(pb.HealthRequest())
    assert health.status == pb.HealthResponse.SERVING and dict(health.nodes).get(c_id, "departed") != "serving"
    assert all(state == "serving" for node, state in health.nodes.items() if node != c_id)
    listed = control_a.ListChunks(pb.ListChunksRequest(namespace=SMALL_NS.digest, page_size=10000)).chunks
    assert c_id not in {c.node for c in listed} and {c.hash for c in listed} >= set(keys)
    with pytest.raises(grpc.RpcError) as info:
        control_a.ListChunks(pb.ListChunksRequest(node=c_id))
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
    assert c_id in info.value.details()
    query = pb.ChunkQuery(namespace=SMALL_NS.digest, chunk_hashes_packed=b"".join(keys))
    try:
        control_a.Evict(pb.EvictRequest(query=query))
    except grpc.RpcError as exc:  # c still a member: named as the one that did not answer
        assert exc.code() == grpc.StatusCode.UNAVAILABLE and c_id in exc.details()
    assert not any(b.contains(keys))  # the Evict did reach the members that answer
