"""ControlService end to end: a real agent, a real gRPC server on loopback, a real gRPC client."""

from __future__ import annotations

import socket
import threading
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvstore.client import AgentConnection
from kvstore.proto import kvstore_pb2 as pb
from ..support.control import ALICE, BOB, NS_A, NS_B, code_of, put
from ..support.data import SMALL, tokens

pytestmark = pytest.mark.integration

Code = grpc.StatusCode


def agent_lookup(agent, namespace, keys) -> None:
    """A lookup the agent answers over its socket (what its lookup counters count)."""
    conn = AgentConnection(agent.socket_path)
    conn.call("lookup", {"ns": namespace.digest, "keys": b"".join(keys)})
    conn.close()


def lookup(client, **query):
    return client.Lookup(pb.LookupRequest(query=pb.ChunkQuery(**query)))


def test_lookup_by_tokens_or_hashes_in_every_form(control):
    t, keys = put(control.agent, NS_A, 5)
    client = control.client()
    forms = [{"token_ids": t.tolist()}, {"token_ids_le32": t.astype("<u4").tobytes()},
             {"chunk_hashes": keys}, {"chunk_hashes_packed": b"".join(keys)}]
    for form in forms:
        reply = lookup(client, namespace=NS_A.digest, **form)
        assert (reply.query_chunks, reply.matched_chunks, reply.matched_tokens) == (8, 5, 5 * SMALL.tokens)
        (node,) = reply.nodes
        assert list(node.tiers) == [pb.TIER_CPU] * 5
        assert [(c.tier, c.chunks) for c in node.per_tier] == [(pb.TIER_CPU, 5)]
    # a trailing partial chunk is ignored; nothing stored: no node matches
    assert lookup(client, namespace=NS_A.digest, token_ids=t[:40].tolist()).matched_chunks == 2
    empty = lookup(client, namespace=NS_A.digest, token_ids=tokens(3, start=10_000).tolist())
    assert (empty.matched_chunks, list(empty.nodes)) == (0, [])


def test_score_is_matched_tokens_per_node(control):
    t, _ = put(control.agent, NS_A, 3)
    reply = control.client().Score(pb.ScoreRequest(query=pb.ChunkQuery(namespace=NS_A.digest,
                                                                         token_ids=t.tolist())))
    assert list(reply.matched_tokens_by_node.values()) == [3 * SMALL.tokens]


def test_stats_health_and_namespaces_by_scope(control):
    put(control.agent, NS_A, 4)
    put(control.agent, NS_B, 2, start=50_000)
    client = control.client()
    agent_lookup(control.agent, NS_A, put(control.agent, NS_A, 0, 8)[1])
    (node,) = client.Stats(pb.StatsRequest()).nodes
    cpu = next(t for t in node.tiers if t.tier == pb.TIER_CPU)
    assert cpu.chunks == 6 and cpu.capacity_bytes == 16 << 20 and 0 < cpu.used_bytes <= cpu.capacity_bytes
    assert node.counters["chunks_stored"] == 6
    assert node.hit_rate == pytest.approx(4 / 8)
    assert {ns.digest for ns in node.namespaces} == {NS_A.digest, NS_B.digest}
    (scoped,) = control.client(ALICE).Stats(pb.StatsRequest()).nodes
    assert [ns.digest for ns in scoped.namespaces] == [NS_A.digest]
    assert scoped.namespaces[0].description["tenant"] == "a"
    health = control.client(token=None).Health(pb.HealthRequest())  # no token needed for health
    assert health.status == pb.HealthResponse.SERVING


def test_list_chunks_pages_and_filters(control):
    _, keys_a = put(control.agent, NS_A, 7)
    _, keys_b = put(control.agent, NS_B, 2, start=50_000)
    client = control.client()
    seen, token = [], ""
    while True:
        page = client.ListChunks(pb.ListChunksRequest(namespace=NS_A.digest, page_size=3, page_token=token))
        assert len(page.chunks) <= 3
        seen += page.chunks
        token = page.next_page_token
        if not token:
            break
    assert sorted(c.hash for c in seen) == sorted(keys_a[:7])
    assert all(c.namespace == NS_A.digest and pb.TIER_CPU in c.tiers for c in seen)
    everything = client.ListChunks(pb.ListChunksRequest(page_size=100)).chunks
    assert len(everything) == 9
    assert {c.hash for c in control.client(BOB).ListChunks(pb.ListChunksRequest()).chunks} == set(keys_b[:2])
    control.agent.store.flush(10)
    on_disk = client.ListChunks(pb.ListChunksRequest(tier=pb.TIER_DISK)).chunks
    assert len(on_disk) == 9 and all(pb.TIER_DISK in c.tiers for c in on_disk)
    here = everything[0].node
    assert len(client.ListChunks(pb.ListChunksRequest(node=here, page_size=100)).chunks) == 9
    assert code_of(client.ListChunks, pb.ListChunksRequest(node="some-other-node")) == grpc.StatusCode.NOT_FOUND
    for bad in ("7", f"{here}:x", "other:0"):
        assert code_of(client.ListChunks, pb.ListChunksRequest(page_token=bad)) == grpc.StatusCode.INVALID_ARGUMENT


def test_evict_then_clear_namespace_and_tenant(control):
    t, keys = put(control.agent, NS_A, 6)
    put(control.agent, NS_B, 3, start=50_000)
    control.agent.store.flush(10)
    client = control.client()
    query = pb.ChunkQuery(namespace=NS_A.digest, token_ids=t.tolist())
    evicted = client.Evict(pb.EvictRequest(query=query, tiers=[pb.TIER_CPU]))
    assert (evicted.cpu_chunks, evicted.disk_chunks) == (6, 0)
    reply = client.Lookup(pb.LookupRequest(query=query))
    assert reply.matched_chunks == 6 and set(reply.nodes[0].tiers) == {pb.TIER_DISK}
    cleared = client.Clear(pb.ClearRequest(namespace=NS_A.digest))
    assert (cleared.namespaces, cleared.disk_chunks) == (1, 6)
    assert client.Lookup(pb.LookupRequest(query=query)).matched_chunks == 0
    by_tenant = control.client(BOB).Clear(pb.ClearRequest(tenant="b"))
    assert (by_tenant.namespaces, by_tenant.cpu_chunks) == (1, 3)
    assert control.agent.store.stats()["tiers"]["cpu"]["chunks"] == 0


def test_pin_unpin_move_prefetch_check_their_input(control):
    """Served now (tests/control/test_pin_move.py); bad input is refused with the RPC's name."""
    put(control.agent, NS_A, 1)
    client = control.client()
    query = pb.ChunkQuery(namespace=NS_A.digest, token_ids=[1] * 16)
    unknown = pb.ChunkQuery(namespace=b"\x01" * 16, token_ids=[1] * 16)
    for name, request, code in [("Pin", pb.PinRequest(query=query), Code.INVALID_ARGUMENT),  # no ttl_s
                                ("Pin", pb.PinRequest(query=unknown, ttl_s=60), Code.NOT_FOUND),
                                ("Unpin", pb.UnpinRequest(lease="x"), Code.INVALID_ARGUMENT),
                                ("Move", pb.MoveRequest(query=query), Code.INVALID_ARGUMENT),  # no to_tier
                                ("Move", pb.MoveRequest(query=unknown, to_tier=pb.TIER_CPU), Code.NOT_FOUND),
                                ("Prefetch", pb.PrefetchRequest(query=pb.ChunkQuery(namespace=b"abc")),
                                 Code.INVALID_ARGUMENT)]:
        with pytest.raises(grpc.RpcError) as info:
            getattr(client, name)(request)
        assert info.value.code() == code and info.value.details().startswith(f"{name}: "), (name, request)


def test_auth_missing_bad_and_other_tenant(control):
    t, _ = put(control.agent, NS_B, 2, start=50_000)
    query = pb.ChunkQuery(namespace=NS_B.digest, token_ids=t.tolist())
    assert code_of(control.client(token=None).Stats, pb.StatsRequest()) == Code.UNAUTHENTICATED
    assert code_of(control.client(token="wrong").Stats, pb.StatsRequest()) == Code.UNAUTHENTICATED
    alice = control.client(ALICE)
    assert code_of(alice.Lookup, pb.LookupRequest(query=query)) == Code.PERMISSION_DENIED
    assert code_of(alice.Evict, pb.EvictRequest(query=query)) == Code.PERMISSION_DENIED
    assert code_of(alice.Clear, pb.ClearRequest(namespace=NS_B.digest)) == Code.PERMISSION_DENIED
    assert code_of(alice.Clear, pb.ClearRequest(tenant="b")) == Code.PERMISSION_DENIED
    stream = alice.watch(pb.WatchEventsRequest(namespace=NS_B.digest))
    assert code_of(next, stream) == Code.PERMISSION_DENIED
    assert alice.ListChunks(pb.ListChunksRequest()).chunks == []
    assert control.client(BOB).Lookup(pb.LookupRequest(query=query)).matched_chunks == 2  # still there


def test_bad_input_is_invalid_argument_with_a_message(start_agent, start_control):
    agent = start_agent()
    server = start_control(agent.socket_path, **{"control.max_request_chunks": 4})
    from kvstore.control.client import ControlClient

    client = ControlClient(server.address, "admin-token")
    put(agent, NS_A, 1)
    ns = NS_A.digest
    bad = [dict(namespace=b"abc", token_ids=[1]),
           dict(namespace=ns),
           dict(namespace=ns, token_ids=[1], chunk_hashes=[b"x" * 16]),
           dict(namespace=ns, chunk_hashes=[b"x" * 15]),
           dict(namespace=ns, chunk_hashes_packed=b"x" * 17),
           dict(namespace=ns, token_ids_le32=b"12345"),
           dict(namespace=ns, token_ids=list(range(5 * 16))),  # 5 chunks > max_request_chunks
           dict(namespace=ns, chunk_hashes_packed=b"x" * 16 * 5)]
    for query in bad:
        with pytest.raises(grpc.RpcError) as info:
            lookup(client, **query)
        assert info.value.code() == Code.INVALID_ARGUMENT, query
        assert info.value.details().startswith("Lookup: ")
    assert code_of(client.ListChunks, pb.ListChunksRequest(page_token="nope")) == Code.INVALID_ARGUMENT
    assert code_of(client.ListChunks, pb.ListChunksRequest(page_size=10 ** 6)) == Code.INVALID_ARGUMENT
    assert code_of(client.Clear, pb.ClearRequest()) == Code.INVALID_ARGUMENT
    assert code_of(client.Evict, pb.EvictRequest(query=pb.ChunkQuery(namespace=ns, token_ids=[1] * 16),
                                                 tiers=[pb.TIER_GPU])) == Code.INVALID_ARGUMENT
    unknown = pb.ChunkQuery(namespace=b"\x01" * 16, token_ids=[1] * 16)
    assert code_of(client.Lookup, pb.LookupRequest(query=unknown)) == Code.NOT_FOUND
    client.close()


def test_agent_down_is_unavailable_and_hung_agent_is_deadline_exceeded(start_agent, start_control, tmp_path):
    agent = start_agent()
    server = start_control(agent.socket_path, **{"control.call_timeout_s": 0.3})
    from kvstore.control.client import ControlClient

    client = ControlClient(server.address, "admin-token")
    assert client.Stats(pb.StatsRequest()).nodes
    agent.stop()
    assert code_of(client.Stats, pb.StatsRequest()) == Code.UNAVAILABLE
    assert client.Health(pb.HealthRequest()).status == pb.HealthResponse.NOT_SERVING
    # an agent that accepts connections and never answers
    hung_path = str(tmp_path / "hung.sock")
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(hung_path)
    hung.listen(8)
    try:
        hung_server = start_control(hung_path, **{"control.call_timeout_s": 0.3})
        hung_client = ControlClient(hung_server.address, "admin-token")
        assert code_of(hung_client.Stats, pb.StatsRequest()) == Code.DEADLINE_EXCEEDED
        hung_client.close()
    finally:
        hung.close()
    client.close()


def test_watch_sees_a_real_put_evict_and_clear(control):
    _, keys_b = put(control.agent, NS_B, 2, start=50_000)  # another tenant's, before ours
    received: list[pb.Event] = []
    done = threading.Event()
    client = control.client(ALICE)
    stream = client.stub.WatchEvents(pb.WatchEventsRequest(since=1), metadata=client.metadata, timeout=20)

    def consume() -> None:
        try:
            for event in stream:
                received.append(event)
                if event.WhichOneof("kind") == "cleared":
                    break
        except grpc.RpcError:
            pass
        finally:
            done.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    t, keys = put(control.agent, NS_A, 3)
    admin = control.client()
    admin.Evict(pb.EvictRequest(query=pb.ChunkQuery(namespace=NS_A.digest, chunk_hashes=keys[:1]),
                                tiers=[pb.TIER_CPU]))
    admin.Clear(pb.ClearRequest(namespace=NS_A.digest))
    assert done.wait(20)
    stream.cancel()
    assert received and all(e.namespace == NS_A.digest for e in received)  # never tenant b's
    stored = [h for e in received if e.WhichOneof("kind") == "stored" and e.stored.medium == "CPU"
              for h in e.stored.block_hashes]
    assert sorted(stored) == sorted(keys[:3])
    assert all(e.stored.block_size == SMALL.tokens for e in received if e.WhichOneof("kind") == "stored")
    removed_cpu = [h for e in received if e.WhichOneof("kind") == "removed" and e.removed.medium == "CPU"
                   for h in e.removed.block_hashes]
    assert removed_cpu[0] == keys[0] and sorted(removed_cpu) == sorted(keys[:3])
    assert received[-1].WhichOneof("kind") == "cleared"
    seqs = [e.seq for e in received]
    assert seqs == sorted(seqs)


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint_shows_the_documented_names_moving(control):
    before = _scrape(control.server.metrics_port)
    assert before[("kvstore_agent_up", ())] == 1
    t, keys = put(control.agent, NS_A, 4)
    client = control.client()
    lookup(client, namespace=NS_A.digest, token_ids=t.tolist())
    agent_lookup(control.agent, NS_A, keys)
    code_of(client.Lookup, pb.LookupRequest(query=pb.ChunkQuery(namespace=b"bad")))
    after = _scrape(control.server.metrics_port)
    assert after[("kvstore_control_lookup_chunks_total", (("tier", "cpu"),))] == 4
    assert after[("kvstore_control_lookup_chunks_total", (("tier", "none"),))] == 4
    assert after[("kvstore_lookup_chunks_total", (("result", "hit"),))] == 4
    assert after[("kvstore_lookup_chunks_total", (("result", "miss"),))] == 4
    assert after[("kvstore_lookups_total", ())] == before[("kvstore_lookups_total", ())] + 1
    assert after[("kvstore_tier_chunks", (("tier", "cpu"),))] == 4
    assert after[("kvstore_tier_bytes", (("kind", "capacity"), ("tier", "cpu")))] == 16 << 20
    assert after[("kvstore_control_rpc_seconds_count", (("code", "OK"), ("method", "Lookup")))] == 1
    assert after[("kvstore_control_rpc_seconds_count", (("code", "INVALID_ARGUMENT"), ("method", "Lookup")))] == 1
    assert after[("kvstore_agent_counter_total", (("counter", "chunks_stored"),))] == 4
    assert ("kvstore_evicted_chunks_total", (("tier", "cpu"),)) in after
    control.agent.stop()
    assert _scrape(control.server.metrics_port)[("kvstore_agent_up", ())] == 0


def test_lookup_after_the_agent_restarts_with_other_namespace_ids(start_agent, start_control, tmp_path):
    first = start_agent()
    server = start_control(first.socket_path)
    from kvstore.control.client import ControlClient

    client = ControlClient(server.address, "admin-token")
    put(first, NS_B, 1, start=50_000)  # NS_B gets id 1 and NS_A id 2 on this agent
    _, keys = put(first, NS_A, 3)
    assert lookup(client, namespace=NS_A.digest, chunk_hashes=keys).matched_chunks == 3
    first.stop()
    assert code_of(client.Lookup, pb.LookupRequest(query=pb.ChunkQuery(namespace=NS_A.digest, chunk_hashes=keys))) \
        in (Code.UNAVAILABLE, Code.NOT_FOUND)
    second = start_agent(**{"disk.path": str(tmp_path / "disk2")})  # same socket, NS_A now id 1
    _, keys = put(second, NS_A, 2)
    put(second, NS_B, 1, start=50_000)
    reply = lookup(client, namespace=NS_A.digest, chunk_hashes=keys)
    assert reply.matched_chunks == 2 and list(reply.nodes[0].tiers) == [pb.TIER_CPU] * 2
    client.close()
