"""A tier of chunks held in one byte region: the logic shared by the CPU arena and the GPU pool.

It keeps the index, each entry's slot, size, namespace id, pin count and flags in numpy arrays (a few
bytes per entry), a slab pool for space and an eviction policy for order. What backs the region
(shared memory, a device tensor) is the `backing` object's business.

The index (key -> entry id) is a CuckooIndex (index.py): numpy arrays, no Python object per key, so a
batch find costs the same at 10^3 and 10^6 entries.

It also keeps the keys being written: a writer that reserved a slot for a key claims it (`claim`)
until the slot is indexed or given back, so a second writer of the same key learns that it is on its
way instead of writing it twice.

Invariants:
- an entry with pins > 0 is never evicted or removed by eviction;
- a slot is in exactly one of: free in the pool, reserved by a caller (not indexed), or indexed;
- `used_bytes` counts slots handed out (indexed or reserved);
- a key is claimed only while it is not indexed.
"""

from __future__ import annotations

import threading
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np

from ..errors import CapacityExhausted, ChunkTooLarge
from ..vocab import KEY_HALVES, pack_keys
from .index import CuckooIndex
from .policy import make_policy
from .slab import SlabPool

FLAG_ON_DISK = 0x01  # a durable copy exists on the disk tier
FLAG_QUEUED = 0x02  # waiting for write-behind (and pinned for it)



class Entry(NamedTuple):
    """One indexed chunk."""

    key: bytes
    offset: int
    nbytes: int
    ns_id: int
    flags: int


_UNHELPFUL_EVICTIONS = 32  # evictions of other classes before freeing a whole slab instead


class Backing(Protocol):
    capacity: int

    def view(self, offset: int, nbytes: int): ...

    def close(self) -> None: ...


class MemoryTier:
    """put / get / contains / evict over slab slots in `backing`. Thread-safe behind one lock."""

    def __init__(self, name: str, backing: Backing, slab_bytes: int, policy: str = "lru",
                 on_evict: Callable[[list[bytes]], None] | None = None):
        self.name = name
        self.backing = backing
        self.pool = SlabPool(backing.capacity, slab_bytes)
        self.policy = make_policy(policy)
        self.on_evict = on_evict
        self.lock = threading.RLock()
        self._index = CuckooIndex()
        self._n_eids = 0  # entry ids handed out so far (ids below this may be live or free)
        self._free_eids: list[int] = []
        self._live = np.zeros(1024, dtype=bool)
        self._lo = np.zeros(1024, dtype=np.uint64)  # key halves
        self._hi = np.zeros(1024, dtype=np.uint64)
        self._offset = np.zeros(1024, dtype=np.int64)
        self._nbytes = np.zeros(1024, dtype=np.int64)
        self._pins = np.zeros(1024, dtype=np.int32)
        self._ns = np.zeros(1024, dtype=np.uint32)
        self._flags = np.zeros(1024, dtype=np.uint8)
        self._claims: set[bytes] = set()  # keys reserved a slot for, not indexed yet
        self.stored_bytes = 0  # bytes of indexed chunks (not slots)
        self.evictions = 0

    # ---- space -----------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.pool.capacity

    def allocate(self, nbytes: int) -> int:
        """Reserve a slot for `nbytes`, evicting unpinned entries as needed; returns its offset."""
        if nbytes > self.pool.max_alloc or nbytes <= 0:
            raise ChunkTooLarge(f"{self.name}: a {nbytes}-byte chunk exceeds the largest slot "
                                f"({self.pool.max_alloc} bytes; raise the tier's slab_bytes)")
        with self.lock:
            unhelpful = 0
            while (offset := self.pool.alloc(nbytes)) is None:
                victim = self.policy.next_victim(self._evictable)
                if victim is None:
                    raise CapacityExhausted(f"{self.name}: no space for {nbytes} bytes: every entry is "
                                            f"pinned, reserved or queued for disk")
                if unhelpful >= _UNHELPFUL_EVICTIONS:
                    self._evict_slab(self.pool.slab_of(int(self._offset[victim])))
                    unhelpful = 0
                else:
                    self._evict([victim])
                    unhelpful += 1
            return offset

    def release_slot(self, offset: int) -> None:
        """Give back a slot from `allocate` that was never indexed."""
        with self.lock:
            self.pool.free(offset)

    def _evictable(self, eid: int) -> bool:
        return bool(self._live[eid]) and self._pins[eid] == 0

    def _evict_slab(self, slab: int) -> None:
        n = self._n_eids
        live = np.flatnonzero((self._offset[:n] // self.pool.slab_bytes == slab) & (self._pins[:n] == 0)
                              & self._live[:n])
        self._evict(live.tolist())

    def _evict(self, eids: Sequence[int]) -> None:
        keys = [self._remove(eid) for eid in eids]
        self.evictions += len(keys)
        if keys and self.on_evict:
            self.on_evict(keys)

    # ---- index -----------------------------------------------------------------------------------
    def _grow(self, eid: int) -> None:
        if eid < self._offset.size:
            return
        size = self._offset.size * 2
        for name in ("_live", "_lo", "_hi", "_offset", "_nbytes", "_pins", "_ns", "_flags"):
            old = getattr(self, name)
            new = np.zeros(size, dtype=old.dtype)
            new[: old.size] = old
            setattr(self, name, new)

    def insert(self, key: bytes, offset: int, nbytes: int, ns_id: int, flags: int = 0) -> bool:
        """Index an allocated slot under `key`. If `key` is already indexed the slot is freed and False
        is returned (first writer wins: both wrote the same prefix)."""
        if len(key) != 16:
            raise ValueError(f"keys are 16 bytes, got {len(key)}")
        low, high = KEY_HALVES.unpack(key)
        with self.lock:
            eid = self._free_eids.pop() if self._free_eids else self._n_eids
            if not self._index.insert(low, high, eid):  # already stored
                if eid != self._n_eids:
                    self._free_eids.append(eid)
                self.pool.free(offset)
                return False
            if eid == self._n_eids:
                self._n_eids += 1
                self._grow(eid)
            self._live[eid] = True
            self._lo[eid], self._hi[eid] = low, high
            self._offset[eid] = offset
            self._nbytes[eid] = nbytes
            self._pins[eid] = 0
            self._ns[eid] = ns_id
            self._flags[eid] = flags
            self.stored_bytes += nbytes
            self.policy.inserted(eid, key)
            return True

    def key_of(self, eid: int) -> bytes:
        return KEY_HALVES.pack(int(self._lo[eid]), int(self._hi[eid]))

    def _remove(self, eid: int) -> bytes:
        assert self._live[eid] and self._pins[eid] == 0
        key = self.key_of(eid)
        self._index.remove(int(self._lo[eid]), int(self._hi[eid]))
        self._live[eid] = False
        self._free_eids.append(eid)
        self.pool.free(int(self._offset[eid]))
        self.stored_bytes -= int(self._nbytes[eid])
        self.policy.removed(eid)
        return key

    def find(self, keys: bytes | Sequence[bytes]) -> np.ndarray:
        """Entry ids of `keys` (a blob of 16-byte keys or a sequence of them), -1 where absent."""
        return self.find_packed(pack_keys(keys))

    def find_packed(self, packed: np.ndarray) -> np.ndarray:
        """Entry ids for [n, 2] uint64 keys from `pack_keys` (-1 where absent), vectorised."""
        with self.lock:
            eids = self._index.lookup(packed)
            # the index matches a key on 96 of its bits; the entry's own record confirms the rest
            eids[self._hi[np.maximum(eids, 0)] != packed[:, 1]] = -1
            return eids

    def contains(self, keys: bytes | Sequence[bytes]) -> np.ndarray:
        return self.find(keys) >= 0

    def __len__(self) -> int:
        return len(self._index)

    def entry(self, eid: int) -> Entry:
        """A live entry's record."""
        return Entry(self.key_of(eid), int(self._offset[eid]), int(self._nbytes[eid]), int(self._ns[eid]),
                     int(self._flags[eid]))

    # ---- keys being written ------------------------------------------------------------------------
    def claim(self, key: bytes) -> bool:
        """Note that `key` is being written into a reserved slot; False if it is claimed already (the
        other writer's copy is on its way: nothing to write). Callers check first that it is not
        stored, under the tier's lock."""
        with self.lock:
            if key in self._claims:
                return False
            self._claims.add(key)
            return True

    def claimed(self, key: bytes) -> bool:
        return key in self._claims

    def unclaim(self, key: bytes) -> None:
        """The write of `key` ended (indexed, refused or abandoned)."""
        with self.lock:
            self._claims.discard(key)

    def namespace_ids(self, eids: np.ndarray) -> np.ndarray:
        """Namespace id of each entry id (anything for -1: callers mask misses)."""
        return self._ns[np.maximum(eids, 0)]

    def slots(self, eids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(offsets, nbytes, namespace ids) for live entries, vectorised."""
        return self._offset[eids], self._nbytes[eids], self._ns[eids]

    def flags(self, eids: np.ndarray) -> np.ndarray:
        """Flags of live entries, vectorised."""
        return self._flags[eids]

    def pin_counts(self, eids: np.ndarray) -> np.ndarray:
        """Pin counts of live entries, vectorised."""
        return self._pins[eids]

    def touch(self, eids: np.ndarray) -> None:
        with self.lock:
            self.policy.touched(eids)

    def pin(self, eids: np.ndarray) -> None:
        with self.lock:
            np.add.at(self._pins, eids, 1)

    def unpin(self, eids: np.ndarray) -> None:
        with self.lock:
            np.add.at(self._pins, eids, -1)
            if (self._pins[eids] < 0).any():
                np.maximum(self._pins, 0, out=self._pins)  # keep the entries usable, then report the bug
                raise AssertionError(f"{self.name}: pin count below zero")

    def set_flags(self, eid: int, set_bits: int = 0, clear_bits: int = 0) -> None:
        with self.lock:
            self._flags[eid] = (int(self._flags[eid]) | set_bits) & ~clear_bits

    def remove(self, keys: Sequence[bytes]) -> tuple[int, int]:
        """Remove unpinned `keys`; returns (removed, skipped because pinned)."""
        removed = skipped = 0
        with self.lock:
            for eid in self.find(list(dict.fromkeys(keys))):  # a key listed twice is removed once
                if eid < 0:
                    continue
                if self._pins[eid]:
                    skipped += 1
                else:
                    self._remove(int(eid))
                    removed += 1
        return removed, skipped

    def keys_in_namespaces(self, ns_ids: Sequence[int]) -> list[bytes]:
        with self.lock:
            n = self._n_eids
            hit = np.flatnonzero(np.isin(self._ns[:n], np.asarray(ns_ids, dtype=np.uint32)) & self._live[:n])
            return [self.key_of(e) for e in hit.tolist() if self._live[e]]

    def live_entries(self) -> list[int]:
        with self.lock:
            return np.flatnonzero(self._live[:self._n_eids]).tolist()

    def stats(self) -> dict[str, int]:
        with self.lock:
            n = self._n_eids
            pinned = self._pins[:n] > 0
            return {
                "chunks": len(self._index),
                "stored_bytes": self.stored_bytes,
                "used_bytes": self.pool.used_bytes,
                "capacity_bytes": self.capacity,
                "pinned_bytes": int(self._nbytes[:n][pinned].sum()),
                "evictions": self.evictions,
            }

    def view(self, offset: int, nbytes: int):
        return self.backing.view(offset, nbytes)

    def close(self) -> None:
        self.backing.close()
