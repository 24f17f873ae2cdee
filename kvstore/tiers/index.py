"""The memory tiers' chunk index: a bucketized cuckoo hash table of 16-byte keys in numpy arrays.

A key lives in one of two buckets of WAYS slots: bucket `low & mask` or `high & mask`, where low and
high are the key's two 64-bit halves (keys are xxh3-128 digests, so both are uniform). A batch lookup
is therefore a fixed number of vectorised gathers (one cache line per bucket per array): no probe loop,
and no Python object per key, so it costs the same at 10^3 and at 10^6 entries and the garbage
collector never walks the index. Each slot costs 24 bytes (two key halves and an int64 value). A lookup
compares low halves across both buckets (one 64-byte gather each), then checks the high half and the
value at the one candidate slot. So a key is refused on insert when a live key in its buckets shares its
low half (odds ~2^-64 for digests; the lookup would only ever see the first). A freed slot's key is
zeroed, so a stale slot never matches (a key whose low half is 0 is refused for the same reason).

Inserts take a free slot in either bucket, else move ("kick") a resident entry to its other bucket,
up to MAX_KICKS moves; the table doubles when it passes MAX_LOAD or a kick chain fails. Doubling
re-places every entry with vectorised passes (only the rare overflow goes through kicks).
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
from pathlib import Path

import numpy as np

WAYS = 8
MAX_LOAD = 0.85
MAX_KICKS = 256
EMPTY = -1


# A shared index file: this header, then the low, high and value arrays. `moved` is MOVED (and `next`
# names the replacement file) when the writer grows the table, and readers then map the new file; it is
# CLOSED when the writer stops, and readers then raise instead of answering from a dead table.
_HEADER = struct.Struct("<4sIQQ256s")  # magic, moved, buckets, generation, next path
HEADER_BYTES = 4096
MAGIC = b"KVIX"
MOVED, CLOSED = 1, 2


def lookup_arrays(lo: np.ndarray, hi: np.ndarray, values: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """The batch lookup over a table's arrays (shared by the writer and by read-only mappings).

    Per key: one gather of the low halves of both candidate buckets (two cache lines), then the high
    half and the value of the first slot whose low half matched: four memory reads, which is what a
    lookup costs once the table outgrows the caches. (Two live keys share a low half with odds ~2^-64;
    then the one in the first bucket answers, and the other reads as absent: a miss, never wrong data.)"""
    n = len(packed)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    mask = np.uint64(values.shape[0] - 1)
    buckets = (packed & mask).astype(np.intp)  # [n, 2]: first and second choice
    same_low = (lo[buckets] == packed[:, :1, None]).reshape(n, 2 * WAYS)
    first = same_low.argmax(axis=1)  # the matching slot of either bucket (0 when none matched)
    rows = np.arange(n)
    bucket, way = buckets[rows, first // WAYS], first % WAYS
    ok = same_low[rows, first] & (hi[bucket, way] == packed[:, 1])
    return np.where(ok, values[bucket, way], EMPTY)


def _map_arrays(buf, buckets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    size = buckets * WAYS * 8
    lo = np.frombuffer(buf, dtype=np.uint64, count=buckets * WAYS, offset=HEADER_BYTES).reshape(buckets, WAYS)
    hi = np.frombuffer(buf, dtype=np.uint64, count=buckets * WAYS, offset=HEADER_BYTES + size).reshape(buckets, WAYS)
    values = np.frombuffer(buf, dtype=np.int64, count=buckets * WAYS,
                           offset=HEADER_BYTES + 2 * size).reshape(buckets, WAYS)
    return lo, hi, values


class CuckooIndex:
    """16-byte key -> non-negative int64 value. Private memory by default; with `shm_dir`, the table
    lives in a shared-memory file (`path`) that other processes read with SharedIndexReader."""

    def __init__(self, capacity: int = 1024, shm_dir: str | None = None, name: str = "kvstore-index"):
        self.shm_dir = shm_dir
        self.name = name
        self.path: str | None = None
        self._mmap: mmap.mmap | None = None
        self._generation = 0
        buckets = 1
        while buckets * WAYS * MAX_LOAD < capacity:
            buckets *= 2
        self._alloc(buckets)
        self.count = 0
        self._kick_slot = 0

    def _alloc(self, buckets: int) -> None:
        self._mask = np.uint64(buckets - 1)
        if self.shm_dir is None:
            self._lo = np.zeros((buckets, WAYS), dtype=np.uint64)
            self._hi = np.zeros((buckets, WAYS), dtype=np.uint64)
            self._values = np.full((buckets, WAYS), EMPTY, dtype=np.int64)
            return
        old_path, old_mmap = self.path, self._mmap
        self._generation += 1
        path = str(Path(self.shm_dir) / f"{self.name}-{os.getpid()}-{secrets.token_hex(4)}")
        size = HEADER_BYTES + 3 * buckets * WAYS * 8
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._lo, self._hi, self._values = _map_arrays(self._mmap, buckets)
        self._values.fill(EMPTY)
        _HEADER.pack_into(self._mmap, 0, MAGIC, 0, buckets, self._generation, b"")
        self.path = path
        self._previous = (old_path, old_mmap) if old_mmap is not None else None

    def _retire_previous(self) -> None:
        """Point readers of the previous file at this one (once it is filled) and unlink it."""
        previous, self._previous = getattr(self, "_previous", None), None
        if previous is not None:
            old_path, old_mmap = previous
            _HEADER.pack_into(old_mmap, 0, MAGIC, MOVED, 0, self._generation - 1, self.path.encode())
            os.unlink(old_path)

    def close(self) -> None:
        if self.path is not None:
            _HEADER.pack_into(self._mmap, 0, MAGIC, CLOSED, 0, self._generation, b"")
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None

    @property
    def capacity(self) -> int:
        return self._values.size

    @property
    def nbytes(self) -> int:
        return self._lo.nbytes + self._hi.nbytes + self._values.nbytes

    def __len__(self) -> int:
        return self.count

    # ---- batch lookup ---------------------------------------------------------------------------
    def lookup(self, packed: np.ndarray) -> np.ndarray:
        """Values for [n, 2] uint64 keys (low, high halves); EMPTY where absent."""
        return lookup_arrays(self._lo, self._hi, self._values, packed)

    # ---- single-key updates -----------------------------------------------------------------------
    def _buckets(self, low: int, high: int) -> tuple[int, int]:
        mask = int(self._mask)
        return low & mask, high & mask

    def _slot(self, low: int, high: int, any_high: bool = False) -> tuple[int, int] | None:
        """(bucket, way) of the live key (low, high), or of any live key with this low half."""
        for bucket in self._buckets(low, high):
            for way, lo in enumerate(self._lo[bucket].tolist()):
                if lo == low and self._values[bucket, way] >= 0 and (any_high or int(self._hi[bucket, way]) == high):
                    return bucket, way
        return None

    def get(self, low: int, high: int) -> int:
        slot = self._slot(low, high)
        return EMPTY if slot is None else int(self._values[slot])

    def insert(self, low: int, high: int, value: int) -> bool:
        """Add a key; False (and no change) if it, or a key sharing its low half, is present."""
        if value < 0:
            raise ValueError("index values must be non-negative")
        if low == 0:
            return False  # indistinguishable from a free slot (odds 2^-64 for a digest): not indexed
        if self._slot(low, high, any_high=True) is not None:
            return False
        if (self.count + 1) > MAX_LOAD * self.capacity:
            self._grow()
        if not self._place(low, high, value):
            self._grow()  # the new key is in; the entry it finally displaced is re-placed by growing
        self.count += 1
        return True

    def set(self, low: int, high: int, value: int) -> None:
        """Insert the key with `value`, or change the value of a present key."""
        slot = self._slot(low, high)
        if slot is None:
            self.insert(low, high, value)
        else:
            self._values[slot] = value

    def remove(self, low: int, high: int) -> int:
        """Drop a key; returns its value, or EMPTY if it was absent."""
        slot = self._slot(low, high)
        if slot is None:
            return EMPTY
        value = int(self._values[slot])
        self._values[slot] = EMPTY
        self._lo[slot] = self._hi[slot] = 0  # a stale key must never match a lookup
        self.count -= 1
        return value

    def _place(self, low: int, high: int, value: int) -> bool:
        """Put an absent key into a free slot, kicking residents to their other bucket as needed.
        False if MAX_KICKS moves did not end in a free slot: the key is in the table then, and the
        last displaced entry waits in `_pending` for `_grow` to re-place it."""
        bucket = self._buckets(low, high)[0]
        for _ in range(MAX_KICKS):
            for b in self._buckets(low, high):
                free = np.flatnonzero(self._values[b] < 0)
                if free.size:
                    way = int(free[0])
                    self._lo[b, way], self._hi[b, way], self._values[b, way] = low, high, value
                    return True
            # both buckets full: swap with a resident of `bucket`, which then goes to its other bucket
            way = self._kick_slot = (self._kick_slot + 1) % WAYS
            old = int(self._lo[bucket, way]), int(self._hi[bucket, way]), int(self._values[bucket, way])
            self._lo[bucket, way], self._hi[bucket, way], self._values[bucket, way] = low, high, value
            low, high, value = old
            first, second = self._buckets(low, high)
            bucket = second if first == bucket else first
        self._pending = (low, high, value)  # homeless after MAX_KICKS: _grow re-places it
        return False

    # ---- growth -----------------------------------------------------------------------------------
    def _grow(self) -> None:
        """Double the table and re-place every entry: two vectorised passes, then kicks for the rest."""
        live = self._values >= 0
        lows, highs, values = self._lo[live], self._hi[live], self._values[live]
        pending = getattr(self, "_pending", None)
        if pending is not None:
            lows = np.append(lows, np.uint64(pending[0]))
            highs = np.append(highs, np.uint64(pending[1]))
            values = np.append(values, pending[2])
            self._pending = None
        self._alloc(2 * self._values.shape[0])
        rest = np.arange(len(values))
        for halves in (lows, highs):  # first choice, then second choice, for whoever is left
            if rest.size == 0:
                break
            buckets = (halves[rest] & self._mask).astype(np.intp)
            order = np.argsort(buckets, kind="stable")
            sorted_buckets = buckets[order]
            starts = np.searchsorted(sorted_buckets, sorted_buckets, side="left")
            used = (self._values[sorted_buckets] >= 0).sum(axis=1)
            way = used + np.arange(len(order)) - starts  # next free way in the bucket, in arrival order
            fits = way < WAYS
            chosen = rest[order[fits]]
            b, w = sorted_buckets[fits], way[fits]
            self._lo[b, w], self._hi[b, w], self._values[b, w] = lows[chosen], highs[chosen], values[chosen]
            rest = rest[order[~fits]]
        for i in rest.tolist():  # rare: both buckets full
            if not self._place(int(lows[i]), int(highs[i]), int(values[i])):
                raise RuntimeError("cuckoo index could not re-place an entry after doubling")
        self._retire_previous()


class SharedIndexReader:
    """A read-only view of another process's shared CuckooIndex; follows it when the writer grows it.

    Reads race with the writer's updates: a lookup may miss a key being moved or see a value being
    changed. Callers treat results as advice (a later read of the chunk itself is verified)."""

    def __init__(self, path: str, resolve=None):
        self.resolve = resolve  # () -> the current path, for a reader that fell behind several moves
        self._open(path)

    def _open(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        magic, moved, buckets, _, _ = _HEADER.unpack_from(self._mmap, 0)
        if magic != MAGIC:
            raise ValueError(f"{path} is not a kvstore index")
        self._lo, self._hi, self._values = _map_arrays(self._mmap, buckets)
        self.path = path

    def lookup(self, packed: np.ndarray) -> np.ndarray:
        for _ in range(8):  # follow growth: each step names its successor
            magic, moved, _, _, successor = _HEADER.unpack_from(self._mmap, 0)
            if not moved:
                return lookup_arrays(self._lo, self._hi, self._values, packed)
            if moved == CLOSED:
                raise OSError("the index's writer has stopped")
            try:
                self._open(successor.rstrip(b"\0").decode())
            except FileNotFoundError:  # moved again since: only the writer knows where it is now
                if self.resolve is None:
                    raise
                self._open(self.resolve())
        raise OSError("shared index kept moving")
