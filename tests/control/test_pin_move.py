"""Pin, Unpin, Move, Prefetch and ListChunks(pinned_only) end to end: a real agent, a real ControlServer
on loopback, real gRPC clients, and the `kvstore` CLI against a real `kvstore serve`."""

from __future__ import annotations

import json
import time

import grpc
import pytest
import torch

from kvstore.proto import kvstore_pb2 as pb
from ..support.data import SMALL, small_chunks, tokens

from ..support.control import ALICE, BOB, Control, kvstore, NS_A, NS_B
from ..support.control import code_of, put

pytestmark = pytest.mark.integration

Code = grpc.StatusCode
CHUNK_BYTES = 128 + SMALL.nbytes  # header + payload: what one SMALL chunk holds in the arena


def query(t, namespace=NS_A) -> pb.ChunkQuery:
    return pb.ChunkQuery(namespace=namespace.digest, token_ids=t.tolist())


def tiers_of(client, t, namespace=NS_A) -> list[int]:
    """The tier of every matched chunk of the prompt (prompt order)."""
    reply = client.Lookup(pb.LookupRequest(query=query(t, namespace)))
    return list(reply.nodes[0].tiers) if reply.nodes else []


def on_disk_only(control: Control):
    """A 6-chunk prompt whose first 4 chunks are stored, written to disk and evicted from the arena:
    (tokens, keys, a gRPC client)."""
    t, keys = put(control.agent, NS_A, 4, n_total=6)
    control.agent.store.flush(10)
    client = control.client()
    client.Evict(pb.EvictRequest(query=query(t), tiers=[pb.TIER_CPU]))
    assert tiers_of(client, t) == [pb.TIER_DISK] * 4
    return t, keys, client


def pinned_hashes(client) -> set[bytes]:
    return {c.hash for c in client.ListChunks(pb.ListChunksRequest(pinned_only=True)).chunks}


@pytest.fixture
def memory_only(start_agent, start_control, tmp_path) -> Control:
    """An agent without a disk tier (what leaves the arena is gone), on its own socket."""
    agent = start_agent(**{"disk.enabled": False, "agent.socket_path": str(tmp_path / "memory-only.sock")})
    return Control(agent, start_control(agent.socket_path))


def test_pin_survives_evict_and_arena_pressure_until_unpinned(memory_only):
    control = memory_only
    t, keys = put(control.agent, NS_A, 4)
    other_t, other_keys = put(control.agent, NS_A, 4, start=90_000)  # not pinned: pressure takes it
    client = control.client()
    reply = client.Pin(pb.PinRequest(query=query(t), ttl_s=3600))
    assert reply.pinned_chunks == 4 and reply.lease
    assert pinned_hashes(client) == set(keys[:4])
    evicted = client.Evict(pb.EvictRequest(query=query(t), tiers=[pb.TIER_CPU]))
    assert (evicted.cpu_chunks, evicted.pinned_chunks) == (0, 4)

    writer = control.agent.client(NS_A)  # twice the arena's worth of other chunks
    n = 2 * (16 << 20) // CHUNK_BYTES
    flood = [bytes(k) for k in writer.keys(tokens(n, start=200_000))]
    batch = small_chunks(64, seed=7)
    for i in range(0, n, 64):
        writer.put(flood[i:i + 64], batch[:len(flood[i:i + 64])])
    assert control.agent.store.cpu.evictions > 0
    assert tiers_of(client, other_t) == []  # what was not pinned is gone
    assert tiers_of(client, t) == [pb.TIER_CPU] * 4
    assert torch.equal(writer.get(keys[:4]), small_chunks(4))  # and the bytes are the ones stored

    client.Unpin(pb.UnpinRequest(lease=reply.lease))
    assert pinned_hashes(client) == set()
    evicted = client.Evict(pb.EvictRequest(query=query(t), tiers=[pb.TIER_CPU]))
    assert (evicted.cpu_chunks, evicted.pinned_chunks) == (4, 0)
    assert code_of(client.Unpin, pb.UnpinRequest(lease=reply.lease)) == Code.NOT_FOUND
    writer.close()


def test_a_lease_expires_after_its_ttl_and_the_chunks_become_evictable(control):
    t, keys = put(control.agent, NS_A, 3)
    client = control.client()
    lease = client.Pin(pb.PinRequest(query=query(t), ttl_s=3)).lease  # long enough for a loaded machine
    assert client.Evict(pb.EvictRequest(query=query(t), tiers=[pb.TIER_CPU])).pinned_chunks == 3
    deadline = time.monotonic() + 15  # the sweeper runs every 0.5 s
    while pinned_hashes(client) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pinned_hashes(client) == set()
    evicted = client.Evict(pb.EvictRequest(query=query(t), tiers=[pb.TIER_CPU]))
    assert (evicted.cpu_chunks, evicted.pinned_chunks) == (3, 0)
    assert code_of(client.Unpin, pb.UnpinRequest(lease=lease)) == Code.NOT_FOUND


def test_renewing_a_lease_sets_its_ttl_from_now(control):
    t, keys = put(control.agent, NS_A, 3)
    client = control.client()
    lease = client.Pin(pb.PinRequest(query=query(t), ttl_s=3600)).lease
    for ttl in (0, -1, 10**9):
        assert code_of(client.Pin, pb.PinRequest(lease=lease, ttl_s=ttl)) == Code.INVALID_ARGUMENT, ttl
    assert code_of(client.Pin, pb.PinRequest(lease="not-a-lease", ttl_s=60)) == Code.INVALID_ARGUMENT
    renewed = client.Pin(pb.PinRequest(lease=lease, ttl_s=1))  # from an hour to one second from now
    assert (renewed.lease, renewed.pinned_chunks) == (lease, 3)
    assert pinned_hashes(client) == set(keys[:3])
    deadline = time.monotonic() + 15  # the sweeper runs every 0.5 s
    while pinned_hashes(client) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pinned_hashes(client) == set()  # the renewed TTL, not the first one, ended it
    assert code_of(client.Pin, pb.PinRequest(lease=lease, ttl_s=60)) == Code.NOT_FOUND  # expired: nothing to renew


def test_pin_promotes_disk_chunks_and_clear_ends_the_lease(control):
    t, keys, client = on_disk_only(control)
    reply = client.Pin(pb.PinRequest(query=query(t), ttl_s=60))
    assert reply.pinned_chunks == 4  # the two chunks never stored are not counted
    assert tiers_of(client, t) == [pb.TIER_CPU] * 4
    assert client.Evict(pb.EvictRequest(query=query(t), tiers=[pb.TIER_CPU])).pinned_chunks == 4
    cleared = client.Clear(pb.ClearRequest(namespace=NS_A.digest))
    assert (cleared.cpu_chunks, cleared.disk_chunks) == (4, 4)  # clear is explicit: pins end first
    assert pinned_hashes(client) == set() and tiers_of(client, t) == []
    assert code_of(client.Unpin, pb.UnpinRequest(lease=reply.lease)) == Code.NOT_FOUND
    nothing = client.Pin(pb.PinRequest(query=query(t), ttl_s=60))
    assert (nothing.pinned_chunks, nothing.lease) == (0, "")


def test_pin_bounds_ttl_and_pinned_bytes(start_agent, start_control):
    agent = start_agent(**{"agent.max_pin_ttl_s": 100, "agent.max_pinned_fraction": 1.5 * CHUNK_BYTES / (16 << 20)})
    control = Control(agent, start_control(agent.socket_path))
    t, keys = put(agent, NS_A, 3)
    client = control.client()

    def hashes(*indexes) -> pb.ChunkQuery:
        return pb.ChunkQuery(namespace=NS_A.digest, chunk_hashes=[keys[i] for i in indexes])

    for ttl in (0, -1, 101, float("inf"), float("nan")):
        with pytest.raises(grpc.RpcError) as info:
            client.Pin(pb.PinRequest(query=query(t), ttl_s=ttl))
        assert info.value.code() == Code.INVALID_ARGUMENT and "max_pin_ttl_s" in info.value.details(), ttl
    with pytest.raises(grpc.RpcError) as info:
        client.Pin(pb.PinRequest(query=hashes(0, 1), ttl_s=100))
    assert info.value.code() == Code.RESOURCE_EXHAUSTED and "max_pinned_fraction" in info.value.details()
    assert pinned_hashes(client) == set()  # refused whole: nothing stays pinned
    first = client.Pin(pb.PinRequest(query=hashes(0), ttl_s=100))
    assert first.pinned_chunks == 1
    assert code_of(client.Pin, pb.PinRequest(query=hashes(1), ttl_s=100)) == Code.RESOURCE_EXHAUSTED  # all leases count
    client.Unpin(pb.UnpinRequest(lease=first.lease))
    assert client.Pin(pb.PinRequest(query=hashes(1), ttl_s=100)).pinned_chunks == 1


def test_a_lease_from_before_an_agent_restart_never_names_a_new_pin(start_agent, start_control, tmp_path):
    """Pins end with the agent. The restarted agent, asked the same things in the same order, must not
    hand out the old lease's id again: the old token is NOT_FOUND, and the new pin stays."""
    leases = []
    for run in ("first", "second"):
        agent = start_agent(**{"disk.path": str(tmp_path / f"disk-{run}")})
        control = Control(agent, start_control(agent.socket_path))
        t, _ = put(agent, NS_A, 2)
        client = control.client()
        reply = client.Pin(pb.PinRequest(query=query(t), ttl_s=3600))
        assert reply.pinned_chunks == 2
        leases.append(reply.lease)
        if run == "first":
            agent.stop()
    old, new = leases
    assert old != new
    assert code_of(client.Unpin, pb.UnpinRequest(lease=old)) == Code.NOT_FOUND
    assert code_of(client.Pin, pb.PinRequest(lease=old, ttl_s=60)) == Code.NOT_FOUND
    assert len(pinned_hashes(client)) == 2  # the new pin was not touched
    client.Unpin(pb.UnpinRequest(lease=new))
    assert pinned_hashes(client) == set()


def test_unpin_needs_a_live_lease_of_a_visible_namespace(control):
    t, _ = put(control.agent, NS_A, 2)
    client = control.client()
    lease = client.Pin(pb.PinRequest(query=query(t), ttl_s=60)).lease
    ns_hex, _, lid = lease.partition("-")
    assert ns_hex == NS_A.digest.hex()
    for bad in ("", "x", "nope-1", f"{ns_hex}-", f"{ns_hex}-x", f"{ns_hex[:30]}-{lid}"):
        assert code_of(client.Unpin, pb.UnpinRequest(lease=bad)) == Code.INVALID_ARGUMENT, bad
    assert code_of(client.Unpin, pb.UnpinRequest(lease=f"{ns_hex}-{int(lid) + 1000}")) == Code.NOT_FOUND
    assert code_of(client.Unpin, pb.UnpinRequest(lease=f"{'00' * 16}-{lid}")) == Code.NOT_FOUND  # unknown namespace
    assert pinned_hashes(client)  # none of that released it
    client.Unpin(pb.UnpinRequest(lease=lease))
    assert pinned_hashes(client) == set()


def test_other_tenants_token_is_permission_denied(control):
    t_b, keys_b = put(control.agent, NS_B, 2, start=50_000)
    t_a, _ = put(control.agent, NS_A, 2)
    bob, alice = control.client(BOB), control.client(ALICE)
    lease = bob.Pin(pb.PinRequest(query=query(t_b, NS_B), ttl_s=60)).lease
    assert code_of(alice.Pin, pb.PinRequest(query=query(t_b, NS_B), ttl_s=60)) == Code.PERMISSION_DENIED
    assert code_of(alice.Unpin, pb.UnpinRequest(lease=lease)) == Code.PERMISSION_DENIED
    assert code_of(alice.Move, pb.MoveRequest(query=query(t_b, NS_B), to_tier=pb.TIER_DISK)) == Code.PERMISSION_DENIED
    assert code_of(alice.Prefetch, pb.PrefetchRequest(query=query(t_b, NS_B))) == Code.PERMISSION_DENIED
    # Bob's lease id under Alice's own namespace is not Bob's lease
    forged = f"{NS_A.digest.hex()}-{lease.partition('-')[2]}"
    assert code_of(alice.Unpin, pb.UnpinRequest(lease=forged)) == Code.NOT_FOUND
    assert alice.ListChunks(pb.ListChunksRequest(pinned_only=True)).chunks == []
    assert pinned_hashes(bob) == set(keys_b[:2])  # still pinned
    alice_lease = alice.Pin(pb.PinRequest(query=query(t_a), ttl_s=60)).lease
    assert code_of(bob.Unpin, pb.UnpinRequest(lease=alice_lease)) == Code.PERMISSION_DENIED


def test_move_to_disk_drops_the_arena_copy_and_move_to_cpu_promotes(start_agent, start_control):
    agent = start_agent(**{"disk.admission": "second_use"})  # nothing is written to disk by itself
    control = Control(agent, start_control(agent.socket_path))
    t, keys = put(agent, NS_A, 5, n_total=6)
    client = control.client()
    assert client.ListChunks(pb.ListChunksRequest(tier=pb.TIER_DISK)).chunks == []
    pin = client.Pin(pb.PinRequest(query=pb.ChunkQuery(namespace=NS_A.digest, chunk_hashes=keys[4:5]), ttl_s=60))

    moved = client.Move(pb.MoveRequest(query=query(t), to_tier=pb.TIER_DISK))
    assert moved.moved_chunks == 5
    assert tiers_of(client, t) == [pb.TIER_DISK] * 4 + [pb.TIER_CPU]  # the pinned one stays in the arena too
    assert {c.hash for c in client.ListChunks(pb.ListChunksRequest(tier=pb.TIER_DISK)).chunks} == set(keys[:5])
    evicted = client.Evict(pb.EvictRequest(query=query(t), tiers=[pb.TIER_CPU]))
    assert (evicted.cpu_chunks, evicted.pinned_chunks) == (0, 1)
    assert tiers_of(client, t)[:4] == [pb.TIER_DISK] * 4  # still found, on disk

    assert client.Move(pb.MoveRequest(query=query(t), to_tier=pb.TIER_CPU)).moved_chunks == 5
    assert tiers_of(client, t) == [pb.TIER_CPU] * 5
    assert agent.store.stats()["counters"]["promoted_chunks"] == 4
    reader = agent.client(NS_A)
    assert torch.equal(reader.get(keys[:5]), small_chunks(5))
    reader.close()
    client.Unpin(pb.UnpinRequest(lease=pin.lease))


def test_move_refuses_other_tiers_nodes_and_a_node_without_disk(control, memory_only):
    t, _ = put(control.agent, NS_A, 2)
    client = control.client()
    for tier in (pb.TIER_UNSPECIFIED, pb.TIER_GPU, pb.TIER_REMOTE, 42):
        assert code_of(client.Move, pb.MoveRequest(query=query(t), to_tier=tier)) == Code.INVALID_ARGUMENT, tier
    with pytest.raises(grpc.RpcError) as info:
        client.Move(pb.MoveRequest(query=query(t), to_tier=pb.TIER_CPU, to_node="some-other-node"))
    assert info.value.code() == Code.NOT_FOUND and "some-other-node" in info.value.details()
    here = client.Stats(pb.StatsRequest()).nodes[0].node
    assert client.Move(pb.MoveRequest(query=query(t), to_tier=pb.TIER_CPU, to_node=here)).moved_chunks == 2
    t, _ = put(memory_only.agent, NS_A, 2)
    with pytest.raises(grpc.RpcError) as info:
        memory_only.client().Move(pb.MoveRequest(query=query(t), to_tier=pb.TIER_DISK))
    assert info.value.code() == Code.INVALID_ARGUMENT and "disk" in info.value.details()


def test_prefetch_brings_disk_chunks_into_the_arena(control):
    t, keys, client = on_disk_only(control)
    assert client.Prefetch(pb.PrefetchRequest(query=query(t))).missing_chunks == 2  # never stored
    assert tiers_of(client, t) == [pb.TIER_CPU] * 4
    assert pinned_hashes(client) == set()  # brought up, not pinned
    assert client.Evict(pb.EvictRequest(query=query(t), tiers=[pb.TIER_CPU])).cpu_chunks == 4


def test_cli_pin_ls_unpin_move_prefetch(served):  # noqa: F811
    from kvstore.client import LocalClient

    socket_path, address = served
    client = LocalClient(NS_A, SMALL, socket_path=socket_path)
    t = tokens(4)
    keys = [bytes(k) for k in client.keys(t)]
    client.put(keys[:3], small_chunks(3))
    ids = [str(i) for i in t.tolist()]
    at = ["--address", address]

    pinned = kvstore("pin", *at, "--ttl", "600", *ids)
    assert pinned.returncode == 0, pinned.stderr
    assert "pinned 3 chunks for 600 s: lease " in pinned.stdout
    lease = pinned.stdout.split("lease ")[1].split()[0]
    listing = json.loads(kvstore("ls", *at, "--pinned", "--output", "json").stdout)
    assert sorted(c["hash"] for c in listing["chunks"]) == sorted(k.hex() for k in keys[:3])
    evict = kvstore("evict", *at, "--tier", "cpu", *ids)
    assert "evicted 0 chunks from cpu" in evict.stdout and "3 pinned" in evict.stdout
    renewed = kvstore("pin", *at, "--renew", lease, "--ttl", "60")
    assert renewed.returncode == 0 and f"renewed 3 pinned chunks for 60 s: lease {lease}" in renewed.stdout
    node = listing["chunks"][0]["node"]
    assert len(json.loads(kvstore("ls", *at, "--node", node, "--output", "json").stdout)["chunks"]) == 3
    assert kvstore("ls", *at, "--node", "elsewhere").returncode == 1  # NOT_FOUND
    assert kvstore("unpin", *at, lease).returncode == 0
    again = kvstore("unpin", *at, lease)
    assert again.returncode == 1 and "NOT_FOUND" in again.stderr
    assert kvstore("unpin", *at, "garbage").returncode == 2
    assert json.loads(kvstore("ls", *at, "--pinned", "--output", "json").stdout) == {}

    moved = json.loads(kvstore("move", *at, "--to", "disk", "--output", "json", *ids).stdout)
    assert moved["moved_chunks"] == 3
    lookup = json.loads(kvstore("lookup", *at, "--output", "json", *ids).stdout)
    assert lookup["nodes"][0]["per_tier"] == [{"tier": "TIER_DISK", "chunks": 3}]
    prefetch = kvstore("prefetch", *at, *ids)
    assert prefetch.returncode == 0 and "1 chunks of the prompt are not in the arena" in prefetch.stdout
    lookup = json.loads(kvstore("lookup", *at, "--output", "json", *ids).stdout)
    assert lookup["nodes"][0]["per_tier"] == [{"tier": "TIER_CPU", "chunks": 3}]
    assert kvstore("move", *at, "--to", "gpu", *ids).returncode == 2
    elsewhere = kvstore("move", *at, "--to", "cpu", "--node", "elsewhere", *ids)
    assert elsewhere.returncode == 1 and "NOT_FOUND" in elsewhere.stderr
    bad_ttl = kvstore("pin", *at, "--ttl", "0", *ids)
    assert bad_ttl.returncode == 2 and "INVALID_ARGUMENT" in bad_ttl.stderr
    client.close()
