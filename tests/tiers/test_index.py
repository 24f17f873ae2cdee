"""CuckooIndex against a plain dict model: inserts, removals, growth with kicks, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.shm import EMPTY, MAX_VALUE, WAYS
from kvstore.tiers.index import CuckooIndex

pytestmark = pytest.mark.unit


def random_keys(rng, n: int) -> np.ndarray:
    return rng.integers(1, 2**63, size=(n, 2), dtype=np.int64).astype(np.uint64) | np.uint64(1 << 63)


def test_matches_a_dict_through_inserts_removals_and_growth():
    rng = np.random.default_rng(7)
    index = CuckooIndex(8)  # tiny on purpose: many doublings, kicks along the way
    keys = random_keys(rng, 20_000)
    model: dict[tuple[int, int], int] = {}
    for step, (low, high) in enumerate(keys.tolist()):
        assert index.insert(low, high, step)
        model[(low, high)] = step
        if step % 3 == 0:  # remove an earlier key now and then
            victim = keys[rng.integers(0, step + 1)].tolist()
            assert index.remove(*victim) == model.pop(tuple(victim), EMPTY)
    assert len(index) == len(model)
    expected = np.array([model.get(tuple(k), EMPTY) for k in keys.tolist()])
    assert np.array_equal(index.lookup(keys), expected)
    assert index.capacity >= len(model) and index.capacity * 0.85 >= len(model)
    assert (index.lookup(random_keys(rng, 1000)) == EMPTY).all()


def test_duplicate_and_shared_low_half_and_zero_low_half_are_refused():
    index = CuckooIndex()
    assert index.insert(5, 6 << 32, 1)
    assert not index.insert(5, 6 << 32, 2)  # the same key
    assert not index.insert(5, 7 << 32, 3)  # shares the low half
    assert not index.insert(0, 9 << 32, 4)  # low half 0 is what a free slot holds
    found = index.lookup(np.array([[5, 6 << 32], [5, 7 << 32], [0, 9 << 32], [0, 0]], dtype=np.uint64))
    assert found.tolist() == [1, EMPTY, EMPTY, EMPTY]
    for bad in (-1, MAX_VALUE + 1):
        with pytest.raises(ValueError):
            index.insert(8, 8, bad)
    index.insert(8, 8, MAX_VALUE)
    assert index.lookup(np.array([[8, 8]], dtype=np.uint64)).tolist() == [MAX_VALUE]


def test_set_inserts_or_changes_a_value_and_leaves_a_low_half_collision_alone():
    rng = np.random.default_rng(3)
    index = CuckooIndex(8)  # grows through the sets
    keys = random_keys(rng, 5_000).tolist()
    model = {}
    for step, (low, high) in enumerate(keys):
        index.set(low, high, step)
        model[low, high] = step
        if step % 4 == 0:  # change an earlier key's value in place
            old = tuple(keys[rng.integers(0, step + 1)])
            index.set(*old, step + 1)
            model[old] = step + 1
    assert len(index) == len(model)
    assert index.lookup(np.array(keys, dtype=np.uint64)).tolist() == [model[tuple(k)] for k in keys]
    index.set(keys[0][0], keys[0][1] ^ (1 << 40), 9)  # another key with keys[0]'s low half: refused
    index.set(0, 1 << 40, 9)  # low half 0: refused
    assert len(index) == len(model) and index.get(*keys[0]) == model[tuple(keys[0])]
    assert index.get(0, 1 << 40) == EMPTY


def test_a_key_is_matched_on_its_low_half_and_the_top_of_its_high_half():
    """96 bits: the low 32 bits of the high half are not kept (MemoryTier confirms them from its records)."""
    index = CuckooIndex()
    assert index.insert(5, (6 << 32) | 1, 1)
    found = index.lookup(np.array([[5, (6 << 32) | 2], [5, (7 << 32) | 1], [6, (6 << 32) | 1]], dtype=np.uint64))
    assert found.tolist() == [1, EMPTY, EMPTY]


def test_most_keys_sit_in_their_first_choice_bucket():
    """Inserts fill the first choice before the second, so a key looked up on its own (find_slot: a put's
    few keys) mostly costs one row read."""
    rng = np.random.default_rng(11)
    index = CuckooIndex(8)
    keys = random_keys(rng, 50_000)
    for i, (low, high) in enumerate(keys.tolist()):
        index.insert(low, high, i)
    first = index._table[(keys[:, 0] & np.uint64(index._mask)).astype(np.intp), :WAYS]
    in_first = (first == keys[:, :1]).any(axis=1).mean()
    assert in_first > 0.8, in_first
    assert np.array_equal(index.lookup(keys), np.arange(len(keys)))


def test_removed_keys_never_match_and_slots_are_reused():
    index = CuckooIndex(16)
    for i in range(1, 100):
        assert index.insert(i * 0x9E3779B97F4A7C15 % 2**64, i, i)
    for i in range(1, 100, 2):
        assert index.remove(i * 0x9E3779B97F4A7C15 % 2**64, i) == i
    assert index.remove(1 * 0x9E3779B97F4A7C15 % 2**64, 1) == EMPTY  # already gone
    keys = np.array([[i * 0x9E3779B97F4A7C15 % 2**64, i] for i in range(1, 100)], dtype=np.uint64)
    assert index.lookup(keys).tolist() == [EMPTY if i % 2 else i for i in range(1, 100)]
    capacity = index.capacity
    for i in range(1, 100, 2):  # reinsert into the freed slots: no growth needed
        assert index.insert(i * 0x9E3779B97F4A7C15 % 2**64, i, 1000 + i)
    assert index.capacity == capacity
    assert index.lookup(keys[:1]).tolist() == [1001]


def test_shared_index_is_read_by_another_mapping_and_followed_through_growth(tmp_path):
    from kvstore.shm import SharedIndexReader

    rng = np.random.default_rng(3)
    writer = CuckooIndex(8, shm_dir=str(tmp_path))
    keys = random_keys(rng, 2000)
    writer.insert(*keys[0].tolist(), 42)
    reader = SharedIndexReader(writer.path, resolve=lambda: writer.path)  # what a client maps
    assert reader.lookup(keys[:2]).tolist() == [42, EMPTY]
    first_path = writer.path
    for i, (low, high) in enumerate(keys.tolist()[1:], start=1):  # forces several doublings
        writer.insert(low, high, i)
    assert writer.path != first_path and not (tmp_path / first_path.rsplit("/", 1)[1]).exists()
    expected = np.arange(2000)
    expected[0] = 42
    assert np.array_equal(reader.lookup(keys), expected)  # followed the moves
    writer.set(*keys[5].tolist(), 7)
    writer.remove(*keys[6].tolist())
    assert reader.lookup(keys[5:7]).tolist() == [7, EMPTY]
    writer.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):  # a stopped writer's table is never answered from
        reader.lookup(keys[:1])
