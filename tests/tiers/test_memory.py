"""Memory tiers: the slab pool, the LRU and S3-FIFO policies, MemoryTier through a real shared-memory
CpuTier (an arena file in tmp_path), the ShmArena mapping itself, and the GPU pool logic on a CPU tensor."""

from __future__ import annotations

import os
import random
import time
import zlib

import numpy as np
import xxhash
import pytest

from kvstore.codec import HEADER_BYTES, SERIAL_AT
from kvstore.config import CpuConfig
from kvstore.errors import CapacityExhausted, ChunkTooLarge, ConfigError, InvalidArgument
from kvstore.shm import LOCATION_UNIT, map_arena
from kvstore.tiers.cpu import CpuTier, ShmArena
from kvstore.vocab import KEY_HALVES
from kvstore.tiers.policy import LRUPolicy, S3FIFOPolicy, make_policy
from kvstore.tiers.slab import SlabPool, size_class

pytestmark = pytest.mark.unit

KiB, MiB = 1 << 10, 1 << 20
ARENA = 8 * MiB
SLAB = 1 * MiB
CHUNK = 256 * KiB  # exactly one size class: 4 slots per slab, 32 in the arena


def key(i: int) -> bytes:
    """A 16-byte key that reads as its number: the high half names it, the low half is a hash of it
    (the tier indexes by the low half, which real keys, xxh3-128 digests, spread uniformly)."""
    return xxhash.xxh64_digest(b"%d" % i)[::-1] + b"key-%04d" % i


def payload(k: bytes, nbytes: int) -> bytes:
    """Deterministic in the key, so any surviving chunk can be checked byte for byte."""
    return np.random.default_rng(zlib.crc32(k)).bytes(nbytes)


def alignment(nbytes: int) -> int:
    return 64 if nbytes < 4096 else 4096


# ---- size_class ------------------------------------------------------------------------------------

def sweep_sizes() -> list[int]:
    """Every size up to 9 KiB, then a few thousand spread log-uniformly up to 64 MiB, plus the edges
    around every power of two."""
    rng = np.random.default_rng(1)
    spread = np.unique(np.exp(rng.uniform(np.log(9 * KiB), np.log(64 * MiB), 3000)).astype(np.int64))
    edges = [(1 << p) + d for p in range(1, 27) for d in (-1, 0, 1)]
    return sorted({*range(1, 9 * KiB), *map(int, spread), *edges})


def test_size_class_holds_the_request_and_is_aligned():
    sizes = sweep_sizes()
    classes = [size_class(n) for n in sizes]
    for n, cls in zip(sizes, classes):
        assert cls >= n, n
        assert cls % alignment(n) == 0, (n, cls)
    assert classes == sorted(classes), "a larger request never gets a smaller slot"
    assert size_class(4096) == 4096 and size_class(64) == 64 and size_class(1) == 64
    for bad in (0, -1):
        with pytest.raises(ValueError):
            size_class(bad)


def test_size_class_wastes_at_most_a_sixteenth():
    for n in sweep_sizes():
        cls = size_class(n)
        assert cls - n <= n // 16 + alignment(n), (n, cls)


# ---- SlabPool --------------------------------------------------------------------------------------

def assert_disjoint(slots: dict[int, int], pool: SlabPool) -> None:
    """Slots (offset -> slot bytes) lie in bounds, inside one slab each, aligned to their class, and
    do not overlap."""
    end = 0
    for offset in sorted(slots):
        cls = slots[offset]
        assert offset >= end, "slots overlap"
        end = offset + cls
        assert end <= pool.capacity
        within = offset % pool.slab_bytes
        assert within % cls == 0 and within + cls <= pool.slab_bytes
        assert offset % alignment(cls) == 0


@pytest.mark.parametrize("nbytes", [100, 5000, 12288, 300_000, SLAB])
def test_alloc_until_full_gives_disjoint_aligned_slots(nbytes):
    pool = SlabPool(4 * MiB + 12345, SLAB)  # a partial slab at the end is not used
    assert pool.capacity == 4 * MiB
    cls = size_class(nbytes)
    slots = {}
    while pool.can_alloc(nbytes):
        offset = pool.alloc(nbytes)
        assert offset is not None and offset not in slots
        slots[offset] = cls
    assert len(slots) == 4 * (SLAB // cls)
    assert pool.alloc(nbytes) is None and not pool.can_alloc(nbytes)
    assert pool.used_bytes == len(slots) * cls
    assert_disjoint(slots, pool)


def test_freed_slot_is_reused():
    pool = SlabPool(2 * MiB, SLAB)
    offsets = [pool.alloc(64 * KiB) for _ in range(32)]
    assert pool.alloc(64 * KiB) is None
    pool.free(offsets[7])
    assert pool.used_bytes == 31 * 64 * KiB and pool.can_alloc(64 * KiB)
    assert pool.alloc(64 * KiB) == offsets[7]
    assert pool.alloc(64 * KiB) is None


def test_fully_freed_slab_serves_another_size_class():
    pool = SlabPool(2 * MiB, SLAB)
    small = [pool.alloc(4096) for _ in range(512)]
    assert None not in small and pool.alloc(4096) is None
    assert not pool.can_alloc(512 * KiB) and pool.alloc(512 * KiB) is None
    for offset in small[:256]:  # every slot of the first slab
        pool.free(offset)
    assert pool.can_alloc(512 * KiB)
    big = pool.alloc(512 * KiB)
    assert big is not None and big // SLAB == small[0] // SLAB
    assert pool.used_bytes == 256 * 4096 + 512 * KiB
    assert pool.alloc(4096) is None, "the freed slab now belongs to the 512 KiB class"
    pool.free(big)
    assert pool.used_bytes == 256 * 4096
    assert pool.alloc(4096) is not None, "and comes back once its last slot is freed"


def test_random_alloc_free_keeps_slots_disjoint_and_counts_exact():
    pool = SlabPool(8 * MiB, SLAB)
    rng = random.Random(7)
    sizes = [64, 1000, 4096, 9000, 70_000, 200_000, 600_000]
    live: dict[int, int] = {}
    for _ in range(4000):
        if live and rng.random() < 0.45:
            offset = rng.choice(list(live))
            pool.free(offset)
            del live[offset]
        else:
            nbytes = rng.choice(sizes)
            expect = pool.can_alloc(nbytes)
            offset = pool.alloc(nbytes)
            assert (offset is not None) == expect, "can_alloc agrees with alloc"
            if offset is not None:
                assert offset not in live
                live[offset] = size_class(nbytes)
        assert pool.used_bytes == sum(live.values())
    assert_disjoint(live, pool)
    for offset in list(live):
        pool.free(offset)
    assert pool.used_bytes == 0
    assert [pool.alloc(SLAB) is not None for _ in range(9)] == [True] * 8 + [False]


def test_free_rejects_offsets_of_free_slabs_and_misaligned_offsets():
    pool = SlabPool(2 * MiB, SLAB)
    offset = pool.alloc(8192)
    for bad in (SLAB, SLAB + 8192, offset + 1, offset + 4096):
        with pytest.raises(ValueError):
            pool.free(bad)
    assert pool.used_bytes == 8192
    pool.free(offset)
    with pytest.raises(ValueError):
        pool.free(offset)  # its slab went back to the free list


def test_free_rejects_slots_that_are_not_handed_out():
    pool = SlabPool(2 * MiB, SLAB)
    pool.alloc(12288)  # stays allocated: slab 0 is in use
    b = pool.alloc(12288)
    pool.free(b)
    bad = [b, 2 * 12288, (SLAB // 12288) * 12288, pool.capacity, pool.capacity + 12288, -12288]
    for offset in bad:
        with pytest.raises(ValueError):
            pool.free(offset)
        assert pool.used_bytes == 12288
    assert pool.alloc(SLAB) is not None and pool.alloc(SLAB) is None, "slab of `a` must stay in use"


def test_a_chunk_of_max_alloc_bytes_always_fits():
    for slab in (100 * MiB, 25 * 4096, 3 * MiB + 4096):
        pool = SlabPool(2 * slab, slab)
        assert pool.can_alloc(pool.max_alloc)
        assert pool.alloc(pool.max_alloc) is not None


# ---- eviction policies -----------------------------------------------------------------------------

def drain(policy, evictable=lambda eid: True, limit: int | None = None) -> list[int]:
    """Victims in the order the policy gives them, removing each as the tier does."""
    out = []
    while limit is None or len(out) < limit:
        victim = policy.next_victim(evictable)
        if victim is None:
            break
        policy.removed(victim)
        out.append(victim)
    return out


def lru_with(n: int) -> LRUPolicy:
    policy = make_policy("lru")
    assert isinstance(policy, LRUPolicy)
    for eid in range(n):
        policy.inserted(eid, key(eid))
    return policy


def test_lru_gives_oldest_first():
    assert drain(lru_with(300)) == list(range(300))


def test_lru_touch_moves_an_entry_to_the_back():
    policy = lru_with(10)
    policy.touched(np.array([3]))
    policy.touched(np.array([0, 0]))
    assert drain(policy) == [1, 2, 4, 5, 6, 7, 8, 9, 3, 0]


def test_lru_touch_after_the_victim_batch_was_taken_still_counts():
    policy = lru_with(10)
    assert drain(policy, limit=1) == [0]
    policy.touched(np.array([1]))
    assert drain(policy) == [2, 3, 4, 5, 6, 7, 8, 9, 1]


def test_lru_never_returns_removed_entries():
    policy = lru_with(100)
    assert drain(policy, limit=1) == [0]  # the next victims are batched now
    for eid in range(1, 100, 2):
        policy.removed(eid)
    assert drain(policy) == list(range(2, 100, 2))


def test_lru_reused_entry_id_counts_as_new():
    policy = lru_with(5)
    policy.removed(0)
    policy.inserted(0, b"other")
    assert drain(policy) == [1, 2, 3, 4, 0]


def test_lru_skips_entries_the_tier_will_not_evict():
    policy = lru_with(20)
    pinned = {0, 2, 5, 19}
    assert drain(policy, lambda eid: eid not in pinned) == [e for e in range(20) if e not in pinned]
    assert policy.next_victim(lambda eid: False) is None
    assert drain(policy) == sorted(pinned), "skipped entries stay tracked"
    assert policy.next_victim(lambda eid: True) is None


def test_lru_skips_a_long_run_of_unevictable_oldest_entries():
    policy = lru_with(100)
    assert drain(policy, lambda eid: eid >= 64) == list(range(64, 100))


def test_lru_at_100k_entries_is_fast():
    n = 100_000
    start = time.perf_counter()
    policy = lru_with(n)
    hot = np.random.default_rng(3).choice(n, 1000, replace=False)
    policy.touched(hot)
    victims = drain(policy, limit=10_000)
    elapsed = time.perf_counter() - start
    cold = np.setdiff1d(np.arange(n), hot)
    assert victims == cold[:10_000].tolist()
    assert elapsed < 2.0, f"{elapsed:.2f} s for 100k inserts and 10k victims"


class PolicyCache:
    """A fixed-capacity cache driven only by a policy, the way MemoryTier drives it."""

    def __init__(self, policy, capacity: int):
        self.policy = policy
        self.eids: dict[bytes, int] = {}
        self.keys: dict[int, bytes] = {}
        self.free = list(range(capacity))
        self.evicted: list[bytes] = []

    def insert(self, k: bytes) -> None:
        if not self.free:
            victim = self.policy.next_victim(lambda eid: True)
            assert victim is not None
            self.policy.removed(victim)
            self.evicted.append(self.keys.pop(victim))
            del self.eids[self.evicted[-1]]
            self.free.append(victim)
        eid = self.free.pop()
        self.eids[k], self.keys[eid] = eid, k
        self.policy.inserted(eid, k)

    def touch(self, keys) -> None:
        self.policy.touched(np.array([self.eids[k] for k in keys]))


@pytest.mark.parametrize("policy", ["s3fifo", "lru"])
def test_s3fifo_evicts_a_one_hit_scan_before_hot_entries(policy):
    cache = PolicyCache(make_policy(policy), capacity=100)
    hot = [b"hot-%d" % i for i in range(10)]
    for k in hot:
        cache.insert(k)
    for _ in range(3):
        cache.touch(hot)
    for i in range(2000):
        cache.insert(b"scan-%d" % i)
    survived = set(hot) <= cache.eids.keys()
    if policy == "s3fifo":
        assert survived and not set(hot) & set(cache.evicted)
        assert len(cache.evicted) == 2000 - 90
    else:  # the control: plain LRU loses the hot set to the scan, so the test can tell them apart
        assert not survived


def test_s3fifo_ghost_hit_goes_to_main():
    cache = PolicyCache(S3FIFOPolicy(), capacity=12)
    for k in [b"A"] + [b"x-%d" % i for i in range(12)]:
        cache.insert(k)
    assert cache.evicted == [b"A"], "an untouched entry leaves the small queue first"
    cache.insert(b"A")  # ghost hit: straight to main
    cache.insert(b"B")  # a new key: the small queue
    for i in range(20):
        cache.insert(b"y-%d" % i)
    assert b"A" in cache.eids, "the ghost-hit key is in main, which the small queue protects"
    assert b"B" in cache.evicted, "the fresh key went through the small queue and out"


def test_s3fifo_skips_pinned_and_returns_none_when_nothing_is_evictable():
    policy = S3FIFOPolicy()
    assert policy.next_victim(lambda eid: True) is None
    for eid in range(40):
        policy.inserted(eid, key(eid))
    policy.touched(np.arange(0, 40, 3))
    pinned = {0, 5, 17, 30}
    start = time.perf_counter()
    victims = drain(policy, lambda eid: eid not in pinned)
    assert sorted(victims) == [e for e in range(40) if e not in pinned]
    assert policy.next_victim(lambda eid: False) is None
    assert time.perf_counter() - start < 1.0
    assert sorted(drain(policy)) == sorted(pinned), "pinned entries stay tracked"


def test_s3fifo_finds_an_evictable_small_entry_behind_a_pinned_main_queue():
    policy = S3FIFOPolicy()
    for eid in range(40):
        policy.inserted(eid, key(eid))
    policy.touched(np.arange(0, 40, 3))
    pinned = set(range(0, 40, 2))
    assert sorted(drain(policy, lambda eid: eid not in pinned)) == list(range(1, 40, 2))


def test_s3fifo_finds_a_victim_when_all_entries_are_hot():
    policy = S3FIFOPolicy()
    for eid in range(10):
        policy.inserted(eid, key(eid))
    policy.touched(np.arange(10))
    first = drain(policy, limit=1)  # promotes all ten to main, then evicts one
    live = np.setdiff1d(np.arange(10), first)
    for _ in range(3):
        policy.touched(live)
    assert policy.next_victim(lambda eid: True) is not None


def test_make_policy_rejects_unknown_names():
    assert isinstance(make_policy("s3fifo"), S3FIFOPolicy)
    with pytest.raises(ValueError):
        make_policy("arc")


# ---- MemoryTier through CpuTier --------------------------------------------------------------------

@pytest.fixture
def cpu_tier(tmp_path):
    """Factory of CpuTiers whose arena is a real file in tmp_path; returns (tier, evicted keys)."""
    tiers = []

    def make(policy: str = "lru", capacity: int = ARENA, slab_bytes: int = SLAB):
        evicted: list[bytes] = []
        cfg = CpuConfig(shm_dir=str(tmp_path), slab_bytes=slab_bytes, policy=policy, prefault=False)
        tier = CpuTier(cfg, capacity, on_evict=evicted.extend)
        tiers.append(tier)
        return tier, evicted

    yield make
    for tier in tiers:
        tier.close()


def put(tier, k: bytes, nbytes: int = CHUNK, ns: int = 0) -> int:
    """Allocate, write the key's payload through the arena view, index; returns the offset."""
    offset = tier.allocate(nbytes)
    tier.view(offset, nbytes)[:] = payload(k, nbytes)
    assert tier.insert(k, offset, nbytes, ns)
    return offset


def eids(tier, keys) -> np.ndarray:
    found = tier.find(list(keys))
    assert (found >= 0).all()
    return found


def assert_intact(tier, keys) -> None:
    """Each key's bytes are as written, but for the serial the CPU tier stamps where a chunk header
    has it (in every slot big enough for a header), which must be set."""
    for k in keys:
        eid = int(tier.find([k])[0])
        assert eid >= 0, k
        stored, offset, nbytes, _, _ = tier.entry(eid)
        held, written = bytearray(tier.view(offset, nbytes)), bytearray(payload(k, nbytes))
        if isinstance(tier, CpuTier) and nbytes >= HEADER_BYTES:
            assert held[SERIAL_AT:SERIAL_AT + 8] != bytes(8), k
            held[SERIAL_AT:SERIAL_AT + 8] = written[SERIAL_AT:SERIAL_AT + 8]
        assert stored == k and held == written


def test_insert_find_contains_and_read_back(cpu_tier):
    tier, _ = cpu_tier()
    sizes = {b"a_______________": 1000, b"b_______________": 70_000, b"c_______________": SLAB}
    offsets = {k: put(tier, k, n, ns=i) for i, (k, n) in enumerate(sizes.items())}
    found = tier.find([b"c_______________", b"zz______________", b"a_______________"])
    assert found[1] == -1 and found[0] >= 0 and found[2] >= 0
    assert tier.contains([b"a_______________", b"b_______________", b"c_______________", b"zz______________"]).tolist() == [True, True, True, False]
    assert len(tier) == 3
    for i, (k, n) in enumerate(sizes.items()):
        assert tier.entry(int(tier.find([k])[0])) == (k, offsets[k], n, i, 0)
    assert_intact(tier, sizes)
    assert tier.find([]).tolist() == []


def test_a_key_differing_only_where_the_index_does_not_look_is_not_found(cpu_tier):
    """The index matches 96 bits of a key (its low half and the top of its high half); the tier checks
    the whole key, so a key differing in the other 32 bits never finds a stored chunk."""
    tier, _ = cpu_tier()
    stored = b"\x01" * 8 + b"\x00\x00\x00\x00" + b"\x02" * 4  # little-endian: low 32 bits of high are 0
    near = b"\x01" * 8 + b"\x09\x00\x00\x00" + b"\x02" * 4
    put(tier, stored)
    assert tier.find([stored, near]).tolist()[1] == -1 and tier.find([stored]).tolist()[0] >= 0
    assert tier.contains([near]).tolist() == [False]


def test_allocation_under_pressure_evicts_lru_and_reports_keys(cpu_tier):
    tier, evicted = cpu_tier()
    for i in range(32):
        put(tier, key(i))
    assert tier.stats()["used_bytes"] == ARENA and evicted == []
    tier.touch(eids(tier, [key(0)]))
    for i in range(32, 36):
        put(tier, key(i))
    assert evicted == [key(1), key(2), key(3), key(4)]
    assert not tier.contains(evicted).any()
    assert_intact(tier, [key(0)] + [key(i) for i in range(5, 36)])
    assert tier.stats()["evictions"] == 4


def test_pinned_entries_survive_eviction(cpu_tier):
    tier, evicted = cpu_tier()
    for i in range(32):
        put(tier, key(i))
    pinned = [key(i) for i in range(4)]  # the oldest
    tier.pin(eids(tier, pinned))
    tier.pin(eids(tier, pinned[:1]))  # pins count
    for i in range(32, 60):
        put(tier, key(i))
    assert not set(pinned) & set(evicted)
    assert_intact(tier, pinned)
    assert tier.stats()["pinned_bytes"] == 4 * CHUNK
    tier.unpin(eids(tier, pinned))
    put(tier, key(60))
    assert evicted[-1] == key(1), "key(0) is still pinned once; key(1) is now the oldest evictable"
    tier.unpin(eids(tier, pinned[:1]))
    assert tier.stats()["pinned_bytes"] == 0


def test_allocate_evicts_past_many_pinned_old_entries(cpu_tier):
    tier, evicted = cpu_tier()
    keys = [key(i) for i in range(128)]
    for k in keys:
        put(tier, k, 64 * KiB)
    tier.pin(eids(tier, keys[:64]))
    put(tier, b"new_____________", 64 * KiB)
    assert evicted == [keys[64]]


def test_capacity_exhausted_when_everything_is_pinned_or_reserved(cpu_tier):
    tier, evicted = cpu_tier()
    keys = [key(i) for i in range(32)]
    for k in keys:
        put(tier, k)
    tier.pin(eids(tier, keys))
    before = tier.stats()
    with pytest.raises(CapacityExhausted):
        tier.allocate(CHUNK)
    with pytest.raises(CapacityExhausted):
        tier.allocate(4096)  # another class needs a slab: none can be freed either
    assert tier.stats() == before and evicted == []
    assert_intact(tier, keys)

    tier.unpin(eids(tier, keys))
    tier.remove(keys)
    reserved = [tier.allocate(CHUNK) for _ in range(32)]  # slots handed out, not indexed: not evictable
    with pytest.raises(CapacityExhausted):
        tier.allocate(CHUNK)
    tier.release_slot(reserved[0])
    assert tier.allocate(CHUNK) == reserved[0]


def test_chunk_larger_than_a_slab_is_refused(cpu_tier):
    tier, evicted = cpu_tier()
    put(tier, b"a_______________")
    with pytest.raises(ChunkTooLarge) as info:
        tier.allocate(SLAB + 1)
    assert isinstance(info.value, InvalidArgument)
    assert tier.contains([b"a_______________"]).all() and evicted == []
    put(tier, b"whole-slab______", SLAB)


def test_max_alloc_chunk_fits_without_flushing_the_cache(cpu_tier):
    tier, evicted = cpu_tier(capacity=1 * MiB, slab_bytes=25 * 4096)
    for i in range(5):
        put(tier, key(i), 4096)
    put(tier, b"big_____________", tier.pool.max_alloc)
    assert evicted == [] and len(tier) == 6


def test_duplicate_insert_frees_the_new_slot(cpu_tier):
    tier, _ = cpu_tier()
    first = put(tier, b"k_______________", 5000)
    before = tier.stats()
    second = tier.allocate(5000)
    assert tier.stats()["used_bytes"] == before["used_bytes"] + size_class(5000)
    assert tier.insert(b"k_______________", second, 5000, 0) is False
    assert tier.stats() == before
    assert tier.entry(int(tier.find([b"k_______________"])[0]))[1] == first
    assert_intact(tier, [b"k_______________"])


def test_remove_skips_pinned_and_reports_it(cpu_tier):
    tier, evicted = cpu_tier()
    for k in (b"a_______________", b"b_______________", b"c_______________"):
        put(tier, k)
    tier.pin(eids(tier, [b"b_______________"]))
    assert tier.remove([b"a_______________", b"b_______________", b"c_______________", b"missing_________"]) == (2, 1)
    assert tier.contains([b"a_______________", b"b_______________", b"c_______________"]).tolist() == [False, True, False]
    assert tier.stats()["used_bytes"] == CHUNK
    assert evicted == [] and tier.stats()["evictions"] == 0, "removal is not eviction"
    tier.unpin(eids(tier, [b"b_______________"]))
    assert tier.remove([b"b_______________"]) == (1, 0)
    assert tier.stats()["used_bytes"] == 0 and len(tier) == 0


def test_remove_with_a_key_listed_twice(cpu_tier):
    tier, _ = cpu_tier()
    put(tier, b"a_______________")
    assert tier.remove([b"a_______________", b"a_______________"]) == (1, 0)
    assert len(tier) == 0


def test_unpin_below_zero_raises_and_keeps_the_entry_usable(cpu_tier):
    tier, _ = cpu_tier()
    put(tier, b"a_______________")
    with pytest.raises(AssertionError):
        tier.unpin(eids(tier, [b"a_______________"]))
    assert tier.remove([b"a_______________"]) == (1, 0)


def test_stats_are_exact(cpu_tier):
    tier, evicted = cpu_tier()
    sizes = {b"a_______________": 1000, b"b_______________": 5000, b"c_______________": 70_000, b"d_______________": CHUNK}
    for k, n in sizes.items():
        put(tier, k, n)
    tier.pin(eids(tier, [b"b_______________", b"d_______________"]))
    assert tier.stats() == {
        "chunks": 4,
        "stored_bytes": sum(sizes.values()),
        "used_bytes": sum(map(size_class, sizes.values())),
        "capacity_bytes": ARENA,
        "pinned_bytes": 5000 + CHUNK,
        "evictions": 0,
    }
    tier.remove([b"a_______________"])
    filler = [key(i) for i in range(40)]
    for k in filler:
        put(tier, k)
    stats = tier.stats()
    assert stats["evictions"] == len(evicted) > 0
    live = [k for k in [b"b_______________", b"c_______________", b"d_______________"] + filler if k not in evicted]
    assert stats["chunks"] == len(tier) == len(live)
    assert stats["stored_bytes"] == sum(sizes.get(k, CHUNK) for k in live)
    assert stats["used_bytes"] == sum(size_class(sizes.get(k, CHUNK)) for k in live)
    assert stats["pinned_bytes"] == 5000 + CHUNK


def test_keys_in_namespaces(cpu_tier):
    tier, _ = cpu_tier()
    for i in range(12):
        put(tier, key(i), 4096, ns=i % 3 + 1)
    tier.remove([key(0)])
    assert sorted(tier.keys_in_namespaces([1, 3])) == sorted(key(i) for i in range(1, 12) if i % 3 != 1)
    assert sorted(tier.keys_in_namespaces([2])) == sorted(key(i) for i in range(1, 12, 3))
    assert tier.keys_in_namespaces([9]) == [] and tier.keys_in_namespaces([]) == []


@pytest.mark.parametrize("first_slab", [3, 0])
def test_mixed_sizes_under_pressure_free_a_whole_slab(cpu_tier, first_slab):
    """All slabs hold 64 KiB chunks and the LRU order interleaves them, so evicting single victims
    frees no slab for a 600 KiB chunk: the tier must free a whole slab instead of flushing the cache."""
    tier, evicted = cpu_tier()
    small = [key(i) for i in range(128)]
    for k in small:
        put(tier, k, 64 * KiB)
    slab_of = {k: tier.entry(int(tier.find([k])[0]))[1] // SLAB for k in small}
    # LRU order: one entry of each slab in turn, starting from `first_slab`
    rank = {k: (i % 16, (slab_of[k] - first_slab) % 8) for i, k in enumerate(small)}
    for k in sorted(small, key=rank.get):
        tier.touch(eids(tier, [k]))

    offset = put(tier, b"big_____________", 600 * KiB)
    assert len(evicted) < 64, "whole slabs go, not the whole cache"
    assert set(evicted) == {k for k in small if not tier.contains([k])[0]}
    assert offset // SLAB in {slab_of[k] for k in evicted}
    survivors = [k for k in small if k not in evicted]
    assert_intact(tier, survivors + [b"big_____________"])
    assert tier.stats()["used_bytes"] == len(survivors) * 64 * KiB + size_class(600 * KiB)




@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_mixed_sizes_back_and_forth_under_pressure(cpu_tier, policy):
    tier, evicted = cpu_tier(policy=policy)
    rng = random.Random(11)
    stored = []
    for i in range(600):
        nbytes = 16 * KiB if (i // 100) % 2 == 0 or rng.random() < 0.2 else 700 * KiB
        stored.append(key(i))
        put(tier, stored[-1], nbytes + rng.randrange(4096))
    live = set(tier.keys_in_namespaces([0]))
    assert live | set(evicted) == set(stored) and not live & set(evicted)
    assert tier.stats()["evictions"] == len(evicted)
    assert_intact(tier, live)


def test_s3fifo_tier_keeps_hot_entries_through_a_scan(cpu_tier):
    tier, evicted = cpu_tier(policy="s3fifo")
    hot = [key(1000 + i) for i in range(4)]
    for k in hot:
        put(tier, k)
    for _ in range(2):
        tier.touch(eids(tier, hot))
    pinned = b"pinned__________"
    put(tier, pinned)
    tier.pin(eids(tier, [pinned]))
    scan = [key(i) for i in range(200)]
    for k in scan:
        put(tier, k)
    assert len(evicted) == 200 + 5 - 32 and set(evicted) <= set(scan)
    assert_intact(tier, hot + [pinned] + scan[-27:])
    assert tier.stats()["evictions"] == len(evicted)

    tier.pin(eids(tier, [k for k in tier.keys_in_namespaces([0]) if k != pinned]))
    with pytest.raises(CapacityExhausted):
        tier.allocate(CHUNK)
    assert len(tier) == 32


# ---- ShmArena --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefault", [False, True])
def test_arena_is_shared_memory_and_unlinked_on_close(tmp_path, prefault):
    arena = ShmArena(1 * MiB, str(tmp_path), prefault=prefault)
    assert os.path.dirname(arena.path) == str(tmp_path)
    assert os.path.getsize(arena.path) == 1 * MiB
    other = map_arena(arena.path, 1 * MiB, populate=False)  # what a client process does
    try:
        arena.view(4096, 5)[:] = b"hello"
        assert other[4096:4101] == b"hello"
        other[SLAB - 3:SLAB] = b"xyz"
        assert bytes(arena.view(SLAB - 3, 3)) == b"xyz"
        assert bytes(arena.array[4096:4101]) == b"hello"
    finally:
        other.close()
    live_view = arena.view(0, 16)  # a reader still holding a view must not keep the file around
    arena.close()
    assert not os.path.exists(arena.path)
    arena.close()
    del live_view


def test_arena_rejects_bad_config(tmp_path):
    with pytest.raises(ConfigError):
        ShmArena(100, str(tmp_path), prefault=False)
    with pytest.raises(ConfigError):
        ShmArena(1 * MiB, str(tmp_path / "missing"), prefault=False)
    assert os.listdir(tmp_path) == []


def test_cpu_tier_arena_file_lives_while_open(cpu_tier, tmp_path):
    tier, _ = cpu_tier()
    assert os.path.dirname(tier.arena_path) == str(tmp_path) and os.path.exists(tier.arena_path)
    put(tier, b"a_______________")
    other = map_arena(tier.arena_path, ARENA, populate=False)
    try:
        offset = tier.entry(int(tier.find([b"a_______________"])[0]))[1]
        assert other[offset:offset + CHUNK] == bytes(tier.view(offset, CHUNK))  # one memory, serial and all
        assert_intact(tier, {b"a_______________": CHUNK})
    finally:
        other.close()
    tier.close()
    assert not os.path.exists(tier.arena_path)


def test_keys_sharing_a_low_half_never_alias(cpu_tier):
    """The index probes by the low 64 bits; the high half is verified, so a second key with the same low
    half is refused on insert and is a miss on find — never the first key's chunk."""
    tier, _ = cpu_tier()
    first, second = b"\x01" * 8 + b"A" * 8, b"\x01" * 8 + b"B" * 8
    put(tier, first)
    offset = tier.allocate(CHUNK)
    assert tier.insert(second, offset, CHUNK, 0) is False
    assert tier.find([second, first]).tolist()[0] == -1
    assert tier.contains([first, second]).tolist() == [True, False]
    assert_intact(tier, [first])


def test_cpu_tier_stamps_and_publishes_each_chunk_and_unstamps_it_before_the_slot_is_freed(cpu_tier):
    """What a client's get without a pin relies on (client.py, _copy_published): a published slot has
    a serial of its own and a location readers can see; a removed or evicted one has neither."""
    from kvstore.shm import SharedIndexReader
    from kvstore.vocab import pack_keys

    tier, evicted = cpu_tier()
    locations = SharedIndexReader(tier.locations.path)  # as a client process maps it

    def serial(offset: int) -> int:
        return int.from_bytes(bytes(tier.view(offset + SERIAL_AT, 8)), "little")

    a, b = key(1), key(2)
    first_a, at_b = put(tier, a), put(tier, b)
    assert serial(first_a) and serial(at_b) and serial(first_a) != serial(at_b)
    assert locations.lookup(pack_keys([a, b])).tolist() == [first_a // LOCATION_UNIT, at_b // LOCATION_UNIT]
    stamp = serial(first_a)
    assert tier.remove([a]) == (1, 0)
    assert serial(first_a) == 0 and locations.lookup(pack_keys([a])).tolist() == [-1]
    again = put(tier, a)  # the same key again, in the slot just freed: a new serial all the same
    assert again == first_a and serial(again) not in (0, stamp)
    for i in range(3, 3 + ARENA // CHUNK):  # fill the arena: a and b are evicted (LRU)
        put(tier, key(i))
    assert {a, b} <= set(evicted)
    assert locations.lookup(pack_keys([a, b])).tolist() == [-1, -1]
    live = [k for k in map(key, range(3, 3 + ARENA // CHUNK)) if tier.find([k])[0] >= 0]
    stamps = [serial(tier.entry(int(tier.find([k])[0]))[1]) for k in live]
    assert 0 not in stamps and len(set(stamps)) == len(stamps) == len(tier)
    assert_intact(tier, {k: CHUNK for k in live})


def test_cpu_tier_does_not_stamp_a_slot_too_small_for_a_chunk_header(cpu_tier):
    tier, _ = cpu_tier()
    put(tier, key(1), HEADER_BYTES - 8)  # its last 8 bytes are where a header's serial would be
    assert tier.locations.get(*KEY_HALVES.unpack(key(1))) == -1  # read pinned only
    assert_intact(tier, {key(1): HEADER_BYTES - 8})  # no stamp written into its last 8 bytes
