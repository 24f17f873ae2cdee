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

This module is the writer. The file format and everything a reader needs (the batch lookup, and
SharedIndexReader for other processes' mappings) are in kvstore/shm.py, which clients import without
importing the tiers.
"""

from __future__ import annotations

import mmap
import os
import secrets
from pathlib import Path

import numpy as np

from ..shm import (CLOSED, EMPTY, INDEX_HEADER, INDEX_HEADER_BYTES, INDEX_MAGIC, MAX_VALUE, MOVED, WAYS,
                   bucket_choices, find_slot, lookup_lines, map_table, prefer_huge_pages, table_lines, value_at)

MAX_LOAD = 0.85
MAX_KICKS = 256
_HIGH_TOP = 0xFFFFFFFF00000000


def _tag(high: int, value: int) -> int:
    if not 0 <= value <= MAX_VALUE:
        raise ValueError(f"index values must be in [0, {MAX_VALUE}], not {value}")
    return (high & _HIGH_TOP) | (value + 1)


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
            self._lines = table_lines(self._table)
            return
        old_path, old_mmap = self.path, self._mmap
        self._generation += 1
        path = str(Path(self.shm_dir) / f"{self.name}-{os.getpid()}-{secrets.token_hex(4)}")
        size = INDEX_HEADER_BYTES + buckets * 2 * WAYS * 8
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)  # zero-filled: every slot free
            self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            prefer_huge_pages(self._mmap)
        finally:
            os.close(fd)
        self._table = map_table(self._mmap, buckets)
        self._lines = table_lines(self._table)
        INDEX_HEADER.pack_into(self._mmap, 0, INDEX_MAGIC, 0, buckets, self._generation, b"")
        self.path = path
        self._previous = (old_path, old_mmap) if old_mmap is not None else None

    def _retire_previous(self) -> None:
        """Point readers of the previous file at this one (once it is filled) and unlink it."""
        previous, self._previous = getattr(self, "_previous", None), None
        if previous is not None:
            old_path, old_mmap = previous
            INDEX_HEADER.pack_into(old_mmap, 0, INDEX_MAGIC, MOVED, 0, self._generation - 1, self.path.encode())
            os.unlink(old_path)

    def close(self) -> None:
        if self.path is not None:
            INDEX_HEADER.pack_into(self._mmap, 0, INDEX_MAGIC, CLOSED, 0, self._generation, b"")
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
        return bucket_choices(low, tag, self._mask)

    def _slot(self, low: int, high: int, any_high: bool = False) -> tuple[int, int] | None:
        """(bucket, way) of the live key (low, high), or of any live key with this low half."""
        return find_slot(self._table, low, high, any_high)

    def get(self, low: int, high: int) -> int:
        return value_at(self._table, self._slot(low, high))

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
        value = value_at(self._table, slot)
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
