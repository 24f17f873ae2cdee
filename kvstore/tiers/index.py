"""The memory tiers' chunk index: a bucketized cuckoo hash table of 16-byte keys in one numpy array.

A key (low, high: its two 64-bit halves; keys are xxh3-128 digests, so both are uniform) lives in one of
two buckets: its first choice `low & mask` or its second `(high >> 32) & mask`. A bucket is one 64-byte
cache line of WAYS slots: the slots' low halves, then their tags, where a tag is the top 32 bits of the
key's high half over (value + 1) in the low 32 bits (0 there: a free slot). So a slot costs 16 bytes,
and a key is matched on 96 bits: all of its low half and the top of its high half (two distinct
digests agree on those with odds 2^-96).

A batch lookup reads both buckets of every key in one vectorised gather (two cache lines per key),
so it costs the same whatever the table's load. No probe loop and no Python object per key, so the
garbage collector never walks the index.

A key is refused on insert when a live key in its buckets shares its low half, or when its low half is
0 (the low half of a free slot). A freed slot is zeroed, so a stale slot never matches. Inserts take a
free slot in the first bucket, else the second, else move ("kick") a resident to its other bucket, up
to MAX_KICKS moves; the table doubles when it passes MAX_LOAD or a kick chain fails. Doubling re-places
every entry with vectorised passes (only the rare overflow goes through kicks).
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
from pathlib import Path

import numpy as np

WAYS = 4  # slots per bucket: WAYS low halves + WAYS tags = 64 bytes, one cache line
MAX_LOAD = 0.85
MAX_KICKS = 256
EMPTY = -1
MAX_VALUE = 2**32 - 2  # values are stored as value + 1 in a tag's low 32 bits
SCALAR_LOOKUP_MAX = 8  # batches up to this many keys are looked up key by key (see lookup_lines)

_TAG_VALUE = np.uint64(0xFFFFFFFF)
_TAG_SPAN = np.uint64(1 << 32)  # (tag ^ high) below this: the tag's top 32 bits are the key's
_HIGH_TOP = 0xFFFFFFFF00000000
_LINE = np.dtype((np.void, 2 * WAYS * 8))  # one bucket as one item


# A shared index file: this header, then the table. `moved` is MOVED (and `next` names the replacement
# file) when the writer grows the table, and readers then map the new file; it is CLOSED when the
# writer stops, and readers then raise instead of answering from a dead table.
_HEADER = struct.Struct("<4sIQQ256s")  # magic, moved, buckets, generation, next path
HEADER_BYTES = 4096
MAGIC = b"KVI2"
MOVED, CLOSED = 1, 2


def find_slot(table: np.ndarray, low: int, high: int, any_high: bool = False) -> tuple[int, int] | None:
    """(bucket, way) of the live key (low, high) in a [buckets, 2 * WAYS] table, or of any live key with
    this low half; None if there is none. One key, in plain Python: two rows read."""
    for bucket in _choices(low, high, table.shape[0] - 1):
        row = table[bucket].tolist()
        if low not in row:  # searched in C: most probes of a bucket find nothing
            continue
        for way in range(WAYS):
            tag = row[WAYS + way]
            if row[way] == low and tag & 0xFFFFFFFF and (any_high or (tag ^ high) < 1 << 32):
                return bucket, way
    return None


def lookup_lines(lines: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """The batch lookup of [n, 2] uint64 keys in a table seen as one item per bucket (`_lines`; shared by
    the writer and by read-only mappings): values, EMPTY where absent.

    Both buckets of every key are gathered at once. Reading the first-choice buckets first and then
    the second-choice buckets of the keys not found there reads fewer lines, but the second pass is a
    dozen more numpy calls whenever one key of the batch sits in its second bucket: at 10^6 chunks
    (~3% of keys there) most lookups of 128 keys, at 10^3 almost none. Timed alone (2,000 lookups of
    128 stored keys, p50, three rounds): 52-70 us at 10^3 and 83-97 us at 10^6 in two passes; 58-64 and
    73-78 us in one.

    A few keys (a put's batch) are looked up one by one instead: the numpy calls cost more than that
    for them (warm caches: 14 against 17 us at 8 keys, 22 against 16 at 12), more so right after a
    put's copy has evicted numpy's own state from the caches."""
    if len(packed) == 0:
        return np.empty(0, dtype=np.int64)
    if len(packed) <= SCALAR_LOOKUP_MAX:
        table = lines.view(np.uint64).reshape(len(lines), 2 * WAYS)
        return np.array([_value_at(table, find_slot(table, low, high)) for low, high in packed.tolist()],
                        dtype=np.int64)
    mask = np.uint64(len(lines) - 1)
    buckets = np.concatenate((packed[:, 0] & mask, (packed[:, 1] >> np.uint64(32)) & mask))
    # [choice, key, slot fields]: one 64-byte line per bucket, gathered as one item (numpy copies whole
    # items with fewer stalls than rows of a 2-D array)
    rows = lines[buckets.astype(np.intp)].view(np.uint64).reshape(2, len(packed), 2 * WAYS)
    tags = rows[:, :, WAYS:]
    hit = (rows[:, :, :WAYS] == packed[:, :1]) & ((tags ^ packed[:, 1:]) < _TAG_SPAN)
    # a key sits in one slot (two while a kick moves it, with one value); a free slot's value field is 0,
    # so a miss decodes to EMPTY
    return np.where(hit, tags & _TAG_VALUE, 0).max(axis=(0, 2)).astype(np.int64) - 1


def _map_table(buf, buckets: int) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint64, count=buckets * 2 * WAYS, offset=HEADER_BYTES).reshape(buckets, 2 * WAYS)


def _lines(table: np.ndarray) -> np.ndarray:
    return table.view(_LINE).reshape(-1)


def _prefer_huge_pages(mapping: mmap.mmap) -> None:
    """Ask for 2 MiB pages where the file system can back the file with them: a lookup reads one cache
    line per key at a random place, and with 4 KiB pages each of those also misses the TLB."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            mapping.madvise(advice)
        except OSError:
            pass


def _choices(low: int, high: int, mask: int) -> tuple[int, int]:
    """A key's first and second bucket; `high` may be its tag, which keeps the bits the second uses."""
    return low & mask, (high >> 32) & mask


def _tag(high: int, value: int) -> int:
    if not 0 <= value <= MAX_VALUE:
        raise ValueError(f"index values must be in [0, {MAX_VALUE}], not {value}")
    return (high & _HIGH_TOP) | (value + 1)


def _value_at(table: np.ndarray, slot: tuple[int, int] | None) -> int:
    """The value in a (bucket, way) slot of `find_slot`, EMPTY for None."""
    return EMPTY if slot is None else (int(table[slot[0], WAYS + slot[1]]) & 0xFFFFFFFF) - 1


class CuckooIndex:
    """16-byte key -> int value in [0, MAX_VALUE]. Private memory by default; with `shm_dir`, the table
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
        self._pending: tuple[int, int] | None = None

    def _alloc(self, buckets: int) -> None:
        self._mask = buckets - 1
        if self.shm_dir is None:
            self._table = np.zeros((buckets, 2 * WAYS), dtype=np.uint64)
            self._lines = _lines(self._table)
            return
        old_path, old_mmap = self.path, self._mmap
        self._generation += 1
        path = str(Path(self.shm_dir) / f"{self.name}-{os.getpid()}-{secrets.token_hex(4)}")
        size = HEADER_BYTES + buckets * 2 * WAYS * 8
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)  # zero-filled: every slot free
            self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            _prefer_huge_pages(self._mmap)
        finally:
            os.close(fd)
        self._table = _map_table(self._mmap, buckets)
        self._lines = _lines(self._table)
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
        return self._table.shape[0] * WAYS

    @property
    def nbytes(self) -> int:
        return self._table.nbytes

    def __len__(self) -> int:
        return self.count

    # ---- batch lookup ---------------------------------------------------------------------------
    def lookup(self, packed: np.ndarray) -> np.ndarray:
        """Values for [n, 2] uint64 keys (low, high halves); EMPTY where absent."""
        return lookup_lines(self._lines, packed)

    # ---- single-key updates -----------------------------------------------------------------------
    def _buckets(self, low: int, tag: int) -> tuple[int, int]:
        return _choices(low, tag, self._mask)

    def _slot(self, low: int, high: int, any_high: bool = False) -> tuple[int, int] | None:
        """(bucket, way) of the live key (low, high), or of any live key with this low half."""
        return find_slot(self._table, low, high, any_high)

    def get(self, low: int, high: int) -> int:
        return _value_at(self._table, self._slot(low, high))

    def insert(self, low: int, high: int, value: int) -> bool:
        """Add a key; False (and no change) if it, or a key sharing its low half, is present."""
        tag = _tag(high, value)  # checks the value's range
        if low == 0:
            return False  # indistinguishable from a free slot (odds 2^-64 for a digest): not indexed
        if self._slot(low, high, any_high=True) is not None:
            return False
        self._add(low, tag)
        return True

    def set(self, low: int, high: int, value: int) -> None:
        """Insert the key with `value`, or change the value of a present key (one probe either way).
        Like insert, it leaves alone a key sharing the low half of another that is present."""
        tag = _tag(high, value)
        slot = self._slot(low, high, any_high=True)
        if slot is None:
            if low != 0:
                self._add(low, tag)
        elif (int(self._table[slot[0], WAYS + slot[1]]) ^ high) < 1 << 32:  # the key itself
            self._table[slot[0], WAYS + slot[1]] = tag

    def _add(self, low: int, tag: int) -> None:
        """Place an absent key, growing the table first if it is full enough."""
        if (self.count + 1) > MAX_LOAD * self.capacity:
            self._grow()
        if not self._place(low, tag):
            self._grow()  # the new key is in; the entry it finally displaced is re-placed by growing
        self.count += 1

    def remove(self, low: int, high: int) -> int:
        """Drop a key; returns its value, or EMPTY if it was absent."""
        slot = self._slot(low, high)
        if slot is None:
            return EMPTY
        bucket, way = slot
        value = _value_at(self._table, slot)
        self._table[bucket, WAYS + way] = 0  # free first: a reader never sees a live tag on a stale key
        self._table[bucket, way] = 0
        self.count -= 1
        return value

    def _place(self, low: int, tag: int) -> bool:
        """Put an absent key into a free slot, kicking residents to their other bucket as needed.
        False if MAX_KICKS moves did not end in a free slot: the key is in the table then, and the
        last displaced entry waits in `_pending` for `_grow` to re-place it."""
        table = self._table
        bucket = self._buckets(low, tag)[0]
        for _ in range(MAX_KICKS):
            for b in self._buckets(low, tag):
                tags = table[b, WAYS:].tolist()  # a Python scan: a numpy search costs 10x more for 4 ways
                if 0 in tags:
                    way = tags.index(0)
                    table[b, way] = low  # the key before the tag: a reader never matches half an entry
                    table[b, WAYS + way] = tag
                    return True
            # both buckets full: swap with a resident of `bucket`, which then goes to its other bucket
            way = self._kick_slot = (self._kick_slot + 1) % WAYS
            old = int(table[bucket, way]), int(table[bucket, WAYS + way])
            table[bucket, way], table[bucket, WAYS + way] = low, tag
            low, tag = old
            first, second = self._buckets(low, tag)
            bucket = second if first == bucket else first
        self._pending = (low, tag)  # homeless after MAX_KICKS: _grow re-places it
        return False

    # ---- growth -----------------------------------------------------------------------------------
    def _grow(self) -> None:
        """Double the table and re-place every entry: two vectorised passes, then kicks for the rest."""
        old = self._table
        live = old[:, WAYS:] != 0
        lows, tags = old[:, :WAYS][live], old[:, WAYS:][live]
        if self._pending is not None:
            lows = np.append(lows, np.uint64(self._pending[0]))
            tags = np.append(tags, np.uint64(self._pending[1]))
            self._pending = None
        self._alloc(2 * old.shape[0])
        table, mask = self._table, np.uint64(self._mask)
        rest = np.arange(len(lows))
        for choice in (lows, tags >> np.uint64(32)):  # first choice, then second, for whoever is left
            if rest.size == 0:
                break
            buckets = (choice[rest] & mask).astype(np.intp)
            order = np.argsort(buckets, kind="stable")
            sorted_buckets = buckets[order]
            starts = np.searchsorted(sorted_buckets, sorted_buckets, side="left")
            used = (table[sorted_buckets, WAYS:] != 0).sum(axis=1)
            way = used + np.arange(len(order)) - starts  # next free way in the bucket, in arrival order
            fits = way < WAYS
            chosen = rest[order[fits]]
            b, w = sorted_buckets[fits], way[fits]
            table[b, w], table[b, WAYS + w] = lows[chosen], tags[chosen]
            rest = rest[order[~fits]]
        for i in rest.tolist():  # rare: both buckets full
            if not self._place(int(lows[i]), int(tags[i])):
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
            # populated now: a lookup's random reads would otherwise fault each page in on first touch
            self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                   prot=mmap.PROT_READ)
            _prefer_huge_pages(self._mmap)
        finally:
            os.close(fd)
        magic, moved, buckets, _, _ = _HEADER.unpack_from(self._mmap, 0)
        if magic != MAGIC:
            raise ValueError(f"{path} is not a kvstore index")
        self._lines = _lines(_map_table(self._mmap, buckets))
        self.path = path

    def lookup(self, packed: np.ndarray) -> np.ndarray:
        for _ in range(8):  # follow growth: each step names its successor
            magic, moved, _, _, successor = _HEADER.unpack_from(self._mmap, 0)
            if not moved:
                return lookup_lines(self._lines, packed)
            if moved == CLOSED:
                raise OSError("the index's writer has stopped")
            try:
                self._open(successor.rstrip(b"\0").decode())
            except FileNotFoundError:  # moved again since: only the writer knows where it is now
                if self.resolve is None:
                    raise
                self._open(self.resolve())
        raise OSError("shared index kept moving")
