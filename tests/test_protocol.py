"""The local protocol, spoken raw over the agent's Unix socket: malformed input never hurts the agent."""

from __future__ import annotations

import socket
import struct
import time

import msgpack
import pytest

from kvstore.codec import HEADER_BYTES, ChunkHeader
from kvstore.wire.framing import PROTOCOL_VERSION, FrameReader, pack, raise_for_reply
from kvstore.errors import NotFound

from .support.data import SMALL, small_chunks, SMALL_NS

pytestmark = pytest.mark.integration


class Raw:
    """A bare protocol connection."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.frames = FrameReader(self.sock, 1 << 24)

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self):
        return self.frames.read()

    def call(self, op, args):
        self.sock.sendall(pack([op, args]))
        return self.reply()

    def close(self):
        self.sock.close()


def register(raw: Raw) -> None:
    g = SMALL
    assert raw.call("register", {"ns": SMALL_NS.digest, "geometry": [g.layers, g.heads, g.head_dim,
                                                                      g.tokens, g.planes, g.dtype]})[0] == "ok"


def test_malformed_frames_get_error_frames_and_the_connection_survives(agent):
    raw = Raw(agent.socket_path)
    body = b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    raw.send_bytes(struct.pack("<I", len(body)) + body)
    assert raw.reply()[:2] == ["err", "protocol_error"]
    for bad in (msgpack.packb({"op": "x"}), msgpack.packb(["hello"]), msgpack.packb([1, {}])):
        raw.send_bytes(struct.pack("<I", len(bad)) + bad)
        assert raw.reply()[:2] == ["err", "protocol_error"]
    assert raw.call("nope", {})[:2] == ["err", "invalid_argument"]
    assert raw.call("hello", {"version": "1"})[:2] == ["err", "invalid_argument"]
    assert raw.call("hello", {"version": 99})[:2] == ["err", "invalid_argument"]
    assert raw.call("lookup", {"ns": SMALL_NS.digest, "keys": b"\x00" * 15})[:2] == ["err", "invalid_argument"]
    assert raw.call("lookup", {"ns": b"\x00" * 16, "keys": b""})[:2] == ["err", "not_found"]
    assert raw.call("reserve", {"ns": SMALL_NS.digest})[:2] in (["err", "not_found"], ["err", "invalid_argument"])
    # after all that, the same connection still works
    assert raw.call("hello", {"version": PROTOCOL_VERSION})[0] == "ok"
    raw.close()


def test_oversize_frame_closes_only_that_connection(agent):
    raw = Raw(agent.socket_path)
    raw.send_bytes(struct.pack("<I", 1 << 30))
    assert raw.reply()[:2] == ["err", "protocol_error"]
    with pytest.raises((EOFError, ConnectionError, OSError)):
        raw.call("hello", {"version": PROTOCOL_VERSION})
    client = agent.client()
    assert client.lookup(client.keys(range(16))).chunks == 0


def test_disconnect_mid_frame_and_mid_request_leaves_agent_serving(agent):
    client = agent.client()
    keys = client.keys(range(32))
    client.put(keys, small_chunks(2))
    client.flush(timeout=30)  # write-behind pins queued chunks until they are on disk
    raw = Raw(agent.socket_path)
    raw.send_bytes(struct.pack("<I", 100) + b"\x92\xa5")  # promises 100 bytes, sends 2, hangs up
    raw.close()
    raw = Raw(agent.socket_path)
    register(raw)
    raw.send_bytes(pack(["acquire", {"ns": SMALL_NS.digest, "keys": b"".join(keys)}]))
    raw.close()  # gone before reading the reply: its pins must be dropped
    deadline = time.monotonic() + 5
    while client.stats()["counters"].get("get_hit_chunks", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # the agent has served the acquire
    while client.stats()["leases"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = client.stats()
    assert stats["leases"] == 0 and stats["tiers"]["cpu"]["pinned_bytes"] == 0
    assert client.get(keys).shape[0] == 2


def test_commit_rejects_bad_chunks_individually(agent):
    client = agent.client()
    raw = Raw(agent.socket_path)
    register(raw)
    keys = client.keys(range(48))
    size = HEADER_BYTES + SMALL.nbytes
    reply = raw_result(raw.call("reserve", {"ns": SMALL_NS.digest, "keys": b"".join(keys), "sizes": [size] * 3}))
    arena = client.conn.arena
    for i, offset in enumerate(reply["offsets"]):
        key = keys[i] if i != 1 else keys[0]  # chunk 1's header names another key
        header = ChunkHeader(codec="raw", geometry=SMALL, payload_len=SMALL.nbytes, namespace=SMALL_NS.digest, key=key)
        arena[offset:offset + HEADER_BYTES].numpy()[:] = memoryview(header.pack())
    arena[reply["offsets"][2]] = 0  # chunk 2: header torn (magic broken)
    result = raw_result(raw.call("commit", {"rid": reply["rid"]}))
    assert result["stored"] == 1
    assert sorted(e[0] for e in result["errors"]) == [1, 2]
    assert {e[1] for e in result["errors"]} == {"invalid_argument", "corrupt_chunk"}
    assert client.contains(keys) == [True, False, False]
    with pytest.raises(NotFound):
        raise_for_reply(raw.call("commit", {"rid": reply["rid"]}))  # a reservation commits once


def raw_result(reply):
    return raise_for_reply(reply)


def test_abandoned_reservation_is_freed_on_disconnect(agent):
    client = agent.client()
    before = client.stats()["tiers"]["cpu"]["used_bytes"]
    raw = Raw(agent.socket_path)
    register(raw)
    keys = client.keys(range(64))
    raw_result(raw.call("reserve", {"ns": SMALL_NS.digest, "keys": b"".join(keys),
                                    "sizes": [HEADER_BYTES + SMALL.nbytes] * 4}))
    assert client.stats()["tiers"]["cpu"]["used_bytes"] > before
    assert client.put(keys[:1], small_chunks(1)).existing == 1  # in flight elsewhere: not written twice
    raw.close()
    deadline = time.monotonic() + 5
    while client.stats()["reservations"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.stats()["tiers"]["cpu"]["used_bytes"] == before
    assert client.put(keys, small_chunks(4)).stored == 4


def test_leases_and_reservations_expire_for_stuck_clients(start_agent):
    agent = start_agent(**{"agent.lease_ttl_s": 1.0})
    client = agent.client()
    keys = client.keys(range(32))
    client.put(keys, small_chunks(2))
    client.flush(timeout=30)
    raw = Raw(agent.socket_path)
    register(raw)
    raw_result(raw.call("acquire", {"ns": SMALL_NS.digest, "keys": b"".join(keys)}))
    raw_result(raw.call("reserve", {"ns": SMALL_NS.digest, "keys": b"".join(client.keys(range(100, 116))),
                                    "sizes": [HEADER_BYTES + SMALL.nbytes]}))
    assert client.stats()["tiers"]["cpu"]["pinned_bytes"] > 0
    time.sleep(2.0)  # stuck but connected: the TTL reclaims both
    stats = client.stats()
    assert stats["leases"] == 0 and stats["reservations"] == 0
    assert stats["tiers"]["cpu"]["pinned_bytes"] == 0
    assert stats["counters"]["leases_expired"] >= 1 and stats["counters"]["reservations_expired"] >= 1
    raw.close()


def test_commit_rejects_malformed_credit_arguments(agent):
    raw = Raw(agent.socket_path)
    register(raw)
    reply = raw_result(raw.call("reserve", {"ns": SMALL_NS.digest, "sizes": [HEADER_BYTES + SMALL.nbytes]}))
    assert raw.call("commit", {"rid": reply["rid"], "named": {"0": b"x" * 16}})[:2] == ["err", "invalid_argument"]
    assert raw.call("commit", {"rid": reply["rid"], "renew": 5})[:2] == ["err", "invalid_argument"]
    done = raw_result(raw.call("commit", {"rid": reply["rid"], "named": {0: b"short"}}))
    assert (done["stored"], done["existing"]) == (0, 0)  # an unnamed/badly named slot is just freed
    raw.close()


def test_commit_with_keep_publishes_named_slots_and_keeps_the_rest_reserved(agent):
    client = agent.client()
    raw = Raw(agent.socket_path)
    register(raw)
    size = HEADER_BYTES + SMALL.nbytes
    keys = client.keys(range(16 * 3))
    keyed = raw_result(raw.call("reserve", {"ns": SMALL_NS.digest, "keys": keys[2], "sizes": [size]}))
    assert raw.call("commit", {"rid": keyed["rid"], "keep": True})[:2] == ["err", "invalid_argument"]
    credit = raw_result(raw.call("reserve", {"ns": SMALL_NS.digest, "sizes": [size] * 2}))
    arena = client.conn.arena
    for slot, key in enumerate(keys[:2]):
        header = ChunkHeader(codec="raw", geometry=SMALL, payload_len=SMALL.nbytes, namespace=SMALL_NS.digest, key=key)
        arena[credit["offsets"][slot]:credit["offsets"][slot] + HEADER_BYTES].numpy()[:] = memoryview(header.pack())
    part = raw_result(raw.call("commit", {"rid": credit["rid"], "named": {0: keys[0]}, "keep": True,
                                          "renew": [size] * 3}))
    assert part["stored"] == 1 and client.contains(keys[:2]) == [True, False]
    assert len(part["next"]["offsets"]) == 3 and part["next"]["rid"] != credit["rid"]
    assert client.stats()["reservations"] == 3  # slot 1 still reserved, the new credit, the keyed one
    rest = raw_result(raw.call("commit", {"rid": credit["rid"], "named": {1: keys[1]}}))
    assert rest["stored"] == 1 and client.contains(keys[:2]) == [True, True]
    with pytest.raises(NotFound):
        raise_for_reply(raw.call("commit", {"rid": credit["rid"], "named": {1: keys[1]}}))
    raw.close()
