"""Rendezvous placement and the directory shard: no Ray needed."""

from __future__ import annotations

import numpy as np

from kvstore.cluster.directory import DirectoryShard
from kvstore.cluster.placement import owners, replica_targets
from kvstore.vocab import Tier, TierBits, fastest_tier
import pytest

pytestmark = pytest.mark.unit

NODES = ["node-a", "node-b", "node-c"]


def _keys(n: int, seed: int = 0) -> list[bytes]:
    return [bytes(row) for row in np.random.default_rng(seed).integers(0, 256, (n, 16), dtype=np.uint8)]


def test_owners_are_deterministic_balanced_and_move_little_on_join():
    keys = _keys(6000)
    blob = b"".join(keys)
    before = owners(blob, NODES)
    assert np.array_equal(before, owners(blob, list(NODES)))  # every agent computes the same answer
    counts = np.bincount(before, minlength=3)
    assert counts.min() > 1500  # roughly a third each
    after = owners(blob, NODES + ["node-d"])
    moved = before != after
    assert (after[moved] == 3).all()  # keys only move to the new node, never between old ones
    assert 1000 < moved.sum() < 2000  # about a quarter of them


def test_replica_targets_exclude_the_writer_and_are_distinct():
    keys = _keys(500, seed=1)
    targets = replica_targets(b"".join(keys), NODES, "node-b", 2)
    assert all(len(t) == 2 and len(set(t)) == 2 and "node-b" not in t for t in targets)
    single = replica_targets(b"".join(keys), NODES, "node-b", 1)
    assert {t[0] for t in single} == {"node-a", "node-c"}  # spread over the others
    assert replica_targets(b"".join(keys), ["node-b"], "node-b", 1) == [[]] * 500


def test_directory_shard_apply_drop_and_keep_owned():
    shard = DirectoryShard()
    keys = _keys(300, seed=2)
    cpu, disk = TierBits.CPU, TierBits.DISK
    shard.apply("node-a", keys, [cpu] * 300)
    shard.apply("node-b", keys[:10], [disk] * 10)
    first = shard.lookup(keys[:1])[0]
    assert first == {"node-a": cpu, "node-b": disk}
    assert fastest_tier(cpu | disk) == Tier.CPU and fastest_tier(disk) == Tier.DISK
    shard.apply("node-a", keys[:5], [0] * 5)  # node a evicted 5 of them
    assert shard.lookup(keys[:5]) == [{"node-b": disk}] * 5
    assert shard.drop_node("node-b") == 10
    assert shard.lookup(keys[:5]) == [None] * 5
    assert len(shard) == 295
    mine = owners(b"".join(keys[5:]), NODES) == NODES.index("node-c")
    shard.keep_owned("node-c", NODES)
    assert len(shard) == int(mine.sum())
