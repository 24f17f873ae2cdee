"""LocalClient against a real agent: round trips, prefix lookup, namespaces, codecs, bad input."""

from __future__ import annotations

import time

import pytest
import torch

from kvstore.codec import KEY_AT
from kvstore.errors import AgentUnavailable, ChunkTooLarge, GeometryMismatch, InvalidArgument, UnknownCodec
from kvstore.keys import Namespace
from kvstore.layout import Geometry

from kvstore.client import LocalClient
from kvstore.vocab import pack_keys

from .support.agents import agent_subprocess

from .support.data import SMALL, small_chunks, SMALL_NS, tokens

pytestmark = pytest.mark.integration


def test_put_get_round_trip_is_byte_identical(agent):
    client = agent.client()
    keys = client.keys(tokens(6))
    data = small_chunks(6)
    assert client.put(keys, data).stored == 6
    got = client.get(keys)
    assert got.shape == (6, *SMALL.shape)
    assert torch.equal(got.view(torch.int16), data.view(torch.int16))


def test_get_into_out_and_strided_put(agent):
    client = agent.client()
    whole = small_chunks(1, seed=3, geometry=Geometry(layers=2, heads=2, head_dim=32, tokens=32))
    # chunks as token slices of a longer sequence: non-contiguous views gathered straight into the arena
    chunks = [whole[0][:, :, i * 16:(i + 1) * 16] for i in range(2)]
    assert not chunks[1].is_contiguous()
    keys = client.keys(tokens(2))
    assert client.put(keys, chunks).stored == 2
    out = torch.full((3, *SMALL.shape), 7.0, dtype=torch.bfloat16)
    got = client.get(keys, out=out)
    assert got.shape[0] == 2 and got.data_ptr() == out.data_ptr()
    assert torch.equal(out[0], chunks[0]) and torch.equal(out[1], chunks[1])
    assert (out[2] == 7.0).all()  # untouched beyond the hits


def test_lookup_reports_longest_stored_prefix(agent):
    client = agent.client()
    prompt = tokens(6)
    keys = client.keys(prompt)
    client.put(keys[:4], small_chunks(4))
    hit = client.lookup(prompt)
    assert (hit.chunks, hit.tokens, hit.tiers) == (4, 64, ("cpu",) * 4)
    # a gap ends the prefix even if later chunks are stored
    client.put(keys[5:], small_chunks(1))
    client.evict(keys[1:2])
    assert client.lookup(prompt).chunks == 1
    assert client.contains(keys) == [True, False, True, True, False, True]
    # a prompt that diverges inside chunk 2 shares exactly 2 chunks
    other = prompt.copy()
    other[2 * 16 + 3] += 1
    client.put(keys[1:2], small_chunks(1, seed=1))
    assert client.lookup(other).chunks == 2
    # a partial trailing chunk has no key
    assert client.lookup(prompt[:40]).chunks == 2


def test_get_stops_at_first_miss(agent):
    client = agent.client()
    keys = client.keys(tokens(4))
    data = small_chunks(4)
    client.put([keys[0], keys[1], keys[3]], data[[0, 1, 3]])
    got = client.get(keys)
    assert got.shape[0] == 2 and torch.equal(got, data[:2])


def test_second_put_of_same_chunks_writes_nothing(agent):
    client = agent.client()
    keys = client.keys(tokens(3))
    assert client.put(keys, small_chunks(3)).stored == 3
    again = client.put(keys, small_chunks(3, seed=9))
    assert (again.stored, again.existing) == (0, 3)
    assert torch.equal(client.get(keys), small_chunks(3))  # first writer wins


def test_namespaces_are_isolated(agent):
    a = agent.client()
    b = agent.client(Namespace(model="test-model", chunk_tokens=16, tenant="other"))
    a.put(a.keys(tokens(2)), small_chunks(2))
    assert b.lookup(tokens(2)).chunks == 0
    assert b.get(b.keys(tokens(2))).shape[0] == 0
    # even a's exact keys, asked for under b's namespace, are a miss (never another namespace's data)
    assert b.get(a.keys(tokens(2))).shape[0] == 0
    assert b.lookup(a.keys(tokens(2))).chunks == 0


def test_geometry_is_fixed_per_namespace(agent):
    agent.client()
    with pytest.raises(GeometryMismatch):
        agent.client(geometry=Geometry(layers=3, heads=2, head_dim=32, tokens=16))


@pytest.mark.parametrize("codec", ["lz4", "int8", "int4"])
def test_codecs_through_the_store(agent, codec):
    client = agent.client(Namespace(model=f"test-{codec}", chunk_tokens=16), codec_name=codec)
    keys = client.keys(tokens(3))
    data = small_chunks(3, seed=5)
    assert client.put(keys, data).stored == 3
    got = client.get(keys)
    if codec == "lz4":
        assert torch.equal(got, data)
    else:  # quantised: close, and within the coarse int4 bound (range/15 per group)
        err = (got.float() - data.float()).abs().max().item()
        spread = (data.float().max() - data.float().min()).item()
        assert 0 < err <= spread / (255 if codec == "int8" else 15)


def test_bad_input_gets_typed_errors_and_agent_keeps_serving(agent):
    client = agent.client()
    keys = client.keys(tokens(2))
    with pytest.raises(InvalidArgument):
        client.put(keys, small_chunks(1))  # count mismatch
    with pytest.raises(InvalidArgument):
        client.put(keys[:1], torch.zeros((1, 2, 2, 16, 2, 16), dtype=torch.bfloat16))  # wrong shape
    with pytest.raises(InvalidArgument):
        client.put(keys[:1], small_chunks(1).float())  # wrong dtype
    with pytest.raises(UnknownCodec):
        agent.client(codec_name="zstd")
    with pytest.raises(InvalidArgument):
        client.keys([1, -5])
    big = Geometry(layers=64, heads=8, head_dim=128, tokens=16)  # 4 MiB chunk > 1 MiB slab
    big_client = agent.client(Namespace(model="big", chunk_tokens=16), big)
    with pytest.raises(ChunkTooLarge):
        big_client.put(big_client.keys(tokens(1)), torch.zeros((1, *big.shape), dtype=torch.bfloat16))
    assert client.put(keys, small_chunks(2)).stored == 2  # still serving, nothing lost


def test_no_agent_is_a_clear_error(tmp_path):
    from kvstore.client import LocalClient

    with pytest.raises(AgentUnavailable, match="kvstore serve"):
        LocalClient(SMALL_NS, SMALL, socket_path=str(tmp_path / "none.sock"))


def test_agent_gone_mid_session_is_unavailable_not_a_hang(start_agent):
    agent = start_agent()
    client = agent.client()
    keys = client.keys(tokens(1))
    client.put(keys, small_chunks(1))
    agent.stop()
    with pytest.raises(AgentUnavailable):
        client.lookup(keys)


def record_requests(client) -> list[tuple[str, dict]]:
    """Record (op, args) of every request a client sends, pipelined ones included (wraps its
    connection's _send, which every call and pipeline goes through)."""
    sent: list[tuple[str, dict]] = []
    send = client.conn._send

    def recording(op, args):
        sent.append((op, args))
        send(op, args)

    client.conn._send = recording
    return sent


def ops_of(sent: list[tuple[str, dict]]) -> list[str]:
    return [op for op, _ in sent]


def test_puts_after_the_first_cost_one_round_trip(agent):
    client = agent.client()
    sent = record_requests(client)
    for i in range(4):
        keys = client.keys(tokens(2, start=i * 1000))
        assert client.put(keys, small_chunks(2, seed=i)).stored == 2
    assert ops_of(sent) == ["reserve", "commit", "commit", "commit", "commit"]  # later puts use the credit
    for i in range(4):
        assert torch.equal(client.get(client.keys(tokens(2, start=i * 1000))), small_chunks(2, seed=i))
    sent.clear()
    again = client.put(client.keys(tokens(2, start=0)), small_chunks(2))
    assert (again.stored, again.existing) == (0, 2) and sent == []  # the shared directory says: stored


def test_credit_put_first_writer_wins_and_credit_is_freed_on_disconnect(agent):
    a, b = agent.client(), agent.client()
    warm = agent.client().stats()["tiers"]["cpu"]["used_bytes"]
    a.put(a.keys(tokens(2, start=50_000)), small_chunks(2))  # now each holds a credit
    b.put(b.keys(tokens(2, start=60_000)), small_chunks(2))
    keys = a.keys(tokens(2, start=70_000))
    # b writes the same chunks through its credit while a's are being committed: the first commit wins
    first = a.put(keys, small_chunks(2, seed=1))
    second = b.put(keys, small_chunks(2, seed=2))
    assert first.stored == 2 and second.stored == 0 and second.existing == 2
    assert torch.equal(b.get(keys), small_chunks(2, seed=1))
    a.close()
    b.close()
    from kvstore.tiers.slab import size_class

    stored = 6 * size_class(SMALL.nbytes + 128)  # six chunks, in their slots
    observer = agent.client()
    deadline = time.monotonic() + 5
    while observer.stats()["reservations"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert observer.stats()["reservations"] == 0
    used = observer.stats()["tiers"]["cpu"]["used_bytes"]
    assert used == warm + stored  # no credit slot left behind


def test_lookup_notices_a_killed_agent_although_its_directory_stays_mapped(tmp_path):
    with agent_subprocess(tmp_path) as (agent, socket_path):
        client = LocalClient(SMALL_NS, SMALL, socket_path=socket_path, timeout=5)
        keys = client.keys(tokens(2))
        client.put(keys, small_chunks(2))
        assert client.lookup(keys).chunks == 2
        agent.kill()
        agent.wait()
        assert client.lookup(keys).chunks == 2  # within a second the mapped directory still answers
        time.sleep(1.1)
        with pytest.raises(AgentUnavailable):
            client.lookup(keys)


def test_a_big_credit_put_commits_its_chunks_but_the_last_while_it_writes_the_last(agent, monkeypatch):
    import kvstore.client.puts

    monkeypatch.setattr(kvstore.client.puts, "PIPELINE_MIN_BYTES", 0)  # these chunks are small; real ones are MBs
    client = agent.client()
    first = client.keys(tokens(6, start=0))
    assert client.put(first, small_chunks(6)).stored == 6  # leaves a credit of 6 slots
    sent = record_requests(client)
    keys = client.keys(tokens(6, start=10_000))
    result = client.put(keys, small_chunks(6, seed=4))
    assert (result.stored, result.existing, result.errors) == (6, 0, ())
    assert ops_of(sent) == ["commit", "commit"]
    assert sent[0][1]["keep"] and len(sent[0][1]["named"]) == 5 and sent[0][1]["renew"]  # the next credit
    assert "keep" not in sent[1][1] and len(sent[1][1]["named"]) == 1 and "renew" not in sent[1][1]
    assert torch.equal(client.get(keys), small_chunks(6, seed=4))
    assert torch.equal(client.get(first), small_chunks(6))
    # half already stored by someone else: counted as existing, the rest stored, the credit renewed
    sent.clear()
    mixed = client.keys(tokens(6, start=20_000))
    with agent.client() as other:
        other.put(mixed[3:], small_chunks(3, seed=5))
    again = client.put(mixed, small_chunks(6, seed=6))
    assert (again.stored, again.existing) == (3, 3) and ops_of(sent) == ["commit", "commit"]
    assert torch.equal(client.get(mixed)[3:], small_chunks(3, seed=5))  # first writer wins
    observer = agent.client()
    deadline = time.monotonic() + 5
    while observer.stats()["reservations"] > 1 and time.monotonic() < deadline:  # `other` left: its credit goes
        time.sleep(0.05)
    assert observer.stats()["reservations"] == 1  # only client's renewed credit is held


def test_a_stream_of_put_async_is_stored_in_order_and_holds_at_most_two_credits(agent):
    client = agent.client()
    streams = [client.keys(tokens(3, start=i * 1000)) for i in range(6)]
    handles = [client.put_async(keys, small_chunks(3, seed=i)) for i, keys in enumerate(streams)]
    # the get's acquire (or its in-place read, once the agent published them) comes after the commits
    assert torch.equal(client.get(streams[5]), small_chunks(3, seed=5))
    assert [handle.result().stored for handle in handles] == [3] * 6
    assert [client.lookup(keys).chunks for keys in streams] == [3] * 6
    for i, keys in enumerate(streams):
        assert torch.equal(client.get(keys), small_chunks(3, seed=i))
    again = client.put_async(streams[0], small_chunks(3, seed=0)).result()
    assert (again.stored, again.existing) == (0, 3)
    assert client.stats()["reservations"] <= 2  # credits for at most two puts in flight


def test_put_async_reports_a_rejected_chunk_by_its_index_in_the_whole_put(agent, monkeypatch):
    client = agent.client()
    keys = client.keys(tokens(3))
    write_headers = client._puts._write_headers

    def one_bad_header(pending, slots):
        write_headers(pending, slots)
        for i, offset in slots:
            if pending.keys[i] == keys[2]:
                client.conn.arena_np[offset + KEY_AT:offset + KEY_AT + 16] = 0  # its key: the header checksum fails

    monkeypatch.setattr(client._puts, "_write_headers", one_bad_header)
    monkeypatch.setattr(client.conn, "max_batch", 2)  # keys[2] goes in the put's second batch
    result = client.put_async(keys, small_chunks(3)).result()
    assert result.stored == 2 and [(i, code) for i, code, _ in result.errors] == [(2, "corrupt_chunk")]
    monkeypatch.undo()
    assert client.contains(keys) == [True, True, False]
    assert client.put(keys, small_chunks(3)).stored == 1  # the agent kept serving; nothing lost


def test_put_async_returns_before_the_agent_answers_and_fails_cleanly_if_it_dies(tmp_path):
    import signal

    with agent_subprocess(tmp_path) as (agent, socket_path):
        client = LocalClient(SMALL_NS, SMALL, socket_path=socket_path, timeout=5)
        client.put(client.keys(tokens(2)), small_chunks(2))  # a credit: the next put needs no reply
        agent.send_signal(signal.SIGSTOP)  # from here the agent answers nothing until SIGCONT
        keys = client.keys(tokens(2, start=5000))
        handle = client.put_async(keys, small_chunks(2, seed=1))
        assert not handle.done()
        agent.send_signal(signal.SIGCONT)
        assert handle.result().stored == 2
        assert torch.equal(client.get(keys), small_chunks(2, seed=1))

        agent.send_signal(signal.SIGSTOP)
        handle = client.put_async(client.keys(tokens(2, start=9000)), small_chunks(2))
        assert not handle.done()
        agent.kill()  # the commit sent is never answered
        agent.wait()
        with pytest.raises(AgentUnavailable):
            handle.result()


def test_close_waits_for_the_commits_of_puts_in_flight(agent):
    client = agent.client()
    keys = client.keys(tokens(4))
    client.put_async(keys, small_chunks(4))
    client.close()
    with agent.client() as other:
        assert torch.equal(other.get(keys), small_chunks(4))


def test_a_short_put_keeps_a_credit_big_enough_for_the_next_full_one(agent):
    client = agent.client()
    sent = record_requests(client)
    for i, n in enumerate((6, 2, 6, 1, 6)):  # full prompts with short tails between them
        keys = client.keys(tokens(n, start=i * 10_000))
        assert client.put(keys, small_chunks(n, seed=i)).stored == n
    assert ops_of(sent) == ["reserve", "commit", "commit", "commit", "commit", "commit"]  # no reserve after the first
    assert torch.equal(client.get(client.keys(tokens(6, start=40_000))), small_chunks(6, seed=4))


def test_a_get_of_chunks_in_the_arena_reads_them_in_place_and_only_tells_the_agent(agent):
    client = agent.client()
    keys = client.keys(tokens(4))
    client.put(keys, small_chunks(4))
    hits_before = client.stats()["counters"].get("get_hit_chunks", 0)
    sent = record_requests(client)
    assert torch.equal(client.get(keys), small_chunks(4))
    out = torch.zeros((4, *SMALL.shape), dtype=SMALL.torch_dtype)
    assert torch.equal(client.get(keys, out=out), small_chunks(4)) and torch.equal(out, small_chunks(4))
    assert ops_of(sent) == ["touch", "touch"]  # one-way: no round trip
    assert sent[0][1]["keys"] == b"".join(keys)
    assert client.stats()["counters"]["get_hit_chunks"] == hits_before + 8  # the touches were counted


def test_a_get_reads_the_arena_part_of_a_prefix_in_place_and_pins_the_rest(agent):
    """Chunks 0-1 in the arena, 2 only on disk (promoted by the acquire), 3 in the arena, 4 nowhere."""
    client = agent.client()
    keys = client.keys(tokens(5))
    client.put(keys[:4], small_chunks(4))
    assert client.flush(timeout=30)
    client.evict(keys[2:3], tiers=("cpu",))
    sent = record_requests(client)
    result = client.read(keys)
    assert torch.equal(result.chunks, small_chunks(4))
    assert ops_of(sent) == ["touch", "acquire", "release"]
    assert sent[0][1]["keys"] == b"".join(keys[:2]) and sent[1][1]["keys"] == b"".join(keys[2:])
    assert result.misses == {4: "not_found"}  # by index in the request, not in the acquire


def test_a_chunk_evicted_and_its_slot_rewritten_during_an_in_place_copy_is_not_returned(agent, monkeypatch):
    """The race a pin would have prevented: between the reader's checks and the end of its copy the
    chunk is evicted and another chunk written into its slot. The serial check must catch it; the
    chunk then goes through acquire, which finds it gone: a miss, never the other chunk's bytes."""
    import numpy as np

    client, writer = agent.client(), agent.client()
    keys, other = client.keys(tokens(1)), client.keys(tokens(1, start=5000))
    client.put(keys, small_chunks(1, seed=1))
    assert client.flush(timeout=30)  # written behind and unpinned, so it can be evicted
    place = client.conn.locations.lookup(pack_keys(keys)).tolist()
    real_copyto = np.copyto
    raced: list[bool] = []

    def copyto(dst, src, **kw):
        if not raced:  # the reader's copy of keys[0] (its checks are done): race it once
            raced.append(True)
            assert agent.store.evict(SMALL_NS.digest, keys, ("cpu", "disk")).cpu == 1
            writer.put(other, small_chunks(1, seed=2))
            assert writer.conn.locations.lookup(pack_keys(other)).tolist() == place  # the very slot
        return real_copyto(dst, src, **kw)

    monkeypatch.setattr(np, "copyto", copyto)
    sent = record_requests(client)
    result = client.read(keys)
    assert raced and result.chunks.shape[0] == 0
    assert ops_of(sent) == ["acquire", "release"]  # no touch: nothing was read in place
    assert result.misses == {0: "not_found"}
    monkeypatch.undo()
    assert torch.equal(writer.get(other), small_chunks(1, seed=2))
