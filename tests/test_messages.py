"""The local protocol's typed messages: what goes on the wire, and how bad arguments are refused."""

from __future__ import annotations

import msgpack
import pytest

from kvstore.errors import InvalidArgument
from kvstore.vocab import MissReason, Op, Tier, TierBits, fastest_tier, pack_keys, pick_keys, split_keys, stored_prefix
from kvstore.wire.messages import (REQUESTS, Acquire, AcquireReply, Commit, CommitReply, Evict, Flush, LookupReply,
                                   PinReply, Reserve, ReserveReply)

pytestmark = pytest.mark.unit


def test_every_op_has_one_request_class():
    assert set(REQUESTS) == set(Op)
    assert all(cls.OP == op for op, cls in REQUESTS.items())


def test_requests_send_only_what_differs_from_the_defaults():
    assert Reserve(b"n" * 16, [200]).to_wire() == {"ns": b"n" * 16, "sizes": [200]}  # no keys: a credit
    assert Commit(7, {0: b"k" * 16}).to_wire() == {"rid": 7, "named": {0: b"k" * 16}}
    assert Commit(7, None, [100], keep=True).to_wire() == {"rid": 7, "renew": [100], "keep": True}
    assert Evict(b"n" * 16, b"").to_wire() == {"ns": b"n" * 16, "keys": b"", "tiers": ["cpu", "disk"]}


def test_decoding_fills_defaults_and_refuses_wrong_types_by_name():
    assert Acquire.decode({"ns": b"n" * 16, "keys": b""}) == Acquire(b"n" * 16, b"", True)
    assert Flush.decode({"timeout": 3}).timeout == 3.0 and isinstance(Flush.decode({"timeout": 3}).timeout, float)
    for args, name in (({"ns": b"n" * 16}, "keys"), ({"ns": "text", "keys": b""}, "ns"),
                       ({"ns": b"n" * 16, "keys": b"", "prefix": 1}, "prefix"), ({"ns": None, "keys": b""}, "ns")):
        with pytest.raises(InvalidArgument, match=repr(name)):
            Acquire.decode(args)
    with pytest.raises(InvalidArgument, match="lid"):
        REQUESTS[Op.RELEASE].decode({"lid": True})  # a bool is not an id
    with pytest.raises(InvalidArgument):
        Acquire.decode(["not", "a", "map"])
    assert Acquire.decode({"ns": b"n" * 16, "keys": b"", "unknown": 1}).keys == b""  # extra keys are ignored


def test_replies_round_trip_through_msgpack_with_their_wire_names():
    commit = CommitReply(2, 1, [[0, "corrupt_chunk", "bad"]], ReserveReply(9, [64, 128], 30.0))
    wire = msgpack.unpackb(msgpack.packb(commit.to_wire()), strict_map_key=False)
    assert wire["next"] == {"rid": 9, "offsets": [64, 128], "ttl": 30.0}
    assert CommitReply.decode(wire) == commit
    assert LookupReply(3, b"\x02\x02\x03", {}, "node-a").to_wire()["self"] == "node-a"
    assert PinReply.decode({"lease": 5, "pinned": 2, "bytes": 100, "ttl": 1.0}).nbytes == 100
    acquire = AcquireReply(1, [64, -1], [200, 0], 30.0, {1: MissReason.NOT_FOUND})
    wire = msgpack.unpackb(msgpack.packb(acquire.to_wire()), strict_map_key=False)
    assert wire["reasons"] == {1: "not_found"} and "remote" not in wire and wire["promoted"] == []


def test_tiers_bits_and_prefixes():
    assert fastest_tier(TierBits.CPU | TierBits.DISK) == Tier.CPU and fastest_tier(0) == Tier.NONE
    assert stored_prefix(__import__("numpy").array([2, 6, 4, 0, 2])) == (3, bytes([Tier.CPU, Tier.CPU, Tier.DISK]))
    assert Tier.named("disk") == Tier.DISK and Tier.REMOTE.label == "remote"
    with pytest.raises(InvalidArgument):
        Tier.named("tape")
    assert MissReason("remote_timeout").counter == "miss_remote_timeout" and {MissReason.EVICTED: 1}["evicted"] == 1


def test_key_blobs():
    keys = [bytes([i]) * 16 for i in range(4)]
    blob = b"".join(keys)
    assert split_keys(blob) == keys and pick_keys(blob, [3, 1]) == keys[3] + keys[1]
    assert pack_keys(blob).shape == (4, 2)
    with pytest.raises(InvalidArgument):
        split_keys(blob[:-1])
