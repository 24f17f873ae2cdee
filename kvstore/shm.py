"""What the agent shares with client processes through shared memory, and how a reader reads it.

Three things live in tmpfs files that the agent writes and every client on the node maps:
- the **arena**: chunk slots (header + payload) at offsets the agent hands out (`map_arena`); a published
  slot's header carries a nonzero serial at `SERIAL_AT`, which the agent zeroes before it frees the slot;
- the **node directory**: key -> namespace id and tier bits (`directory_value`), for prefix lookups
  without a round trip;
- the **locations** index: key -> arena offset / LOCATION_UNIT, for gets without a round trip.

Both indexes are cuckoo tables in one file format: a 4096-byte header, then buckets of WAYS slots, one
64-byte cache line per bucket (the writer, tiers/index.py, documents the table). `SharedIndexReader`
maps one read-only and follows it when the writer grows it into a new file. Reads race with the
writer's updates, so everything read here is advice: a chunk copied out is checked by its slot serial
and header names, and anything else read through the arena is verified.
"""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np

from .codec import SERIAL_AT

# ---- the arena ----------------------------------------------------------------------------------------
LOCATION_UNIT = 64  # the locations index holds a slot's offset in these units (slots align to it)


def map_arena(path: str, nbytes: int, populate: bool) -> mmap.mmap:
    """Map an arena file shared and writable; `populate` pre-faults its pages into this process."""
    fd = os.open(path, os.O_RDWR)
    try:
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate and hasattr(mmap, "MAP_POPULATE") else 0)
        return mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def serial_word(offset: int) -> int:
    """Index, in the arena seen as uint64 words, of the serial of the slot at `offset`."""
    return (offset + SERIAL_AT) >> 3


# ---- the node directory's values --------------------------------------------------------------------
def directory_value(ns_id: int, bits: int) -> int:
    """A node-directory value: the namespace id over the tier bits (TierBits) that hold the chunk."""
    return ns_id << 8 | bits


def namespace_bits(values: np.ndarray, ns_id: int) -> np.ndarray:
    """Tier bits from node-directory values (EMPTY where absent); 0 where absent or in another namespace
    (EMPTY >> 8 is -1, never a namespace id)."""
    return np.where(values >> 8 == ns_id, values & 0xFF, 0)


# ---- the index file format --------------------------------------------------------------------------
WAYS = 4  # slots per bucket: WAYS low halves + WAYS tags = 64 bytes, one cache line
EMPTY = -1  # the value of an absent key
MAX_VALUE = 2**32 - 2  # values are stored as value + 1 in a tag's low 32 bits
MAX_NAMESPACE_ID = MAX_VALUE >> 8  # a directory value is ns_id << 8 | tier bits
SCALAR_LOOKUP_MAX = 8  # batches up to this many keys are looked up key by key (see lookup_lines)

_TAG_VALUE = np.uint64(0xFFFFFFFF)
_TAG_SPAN = np.uint64(1 << 32)  # (tag ^ high) below this: the tag's top 32 bits are the key's
_LINE = np.dtype((np.void, 2 * WAYS * 8))  # one bucket as one item

# The header, then the table. `moved` is MOVED (and `next` names the replacement file) when the writer
# grows the table, and readers then map the new file; it is CLOSED when the writer stops, and readers
# then raise instead of answering from a dead table.
INDEX_HEADER = struct.Struct("<4sIQQ256s")  # magic, moved, buckets, generation, next path
INDEX_HEADER_BYTES = 4096
INDEX_MAGIC = b"KVI2"
MOVED, CLOSED = 1, 2


def bucket_choices(low: int, high: int, mask: int) -> tuple[int, int]:
    """A key's first and second bucket; `high` may be its tag, which keeps the bits the second uses."""
    return low & mask, (high >> 32) & mask


def find_slot(table: np.ndarray, low: int, high: int, any_high: bool = False) -> tuple[int, int] | None:
    """(bucket, way) of the live key (low, high) in a [buckets, 2 * WAYS] table, or of any live key with
    this low half; None if there is none. One key, in plain Python: two rows read."""
    for bucket in bucket_choices(low, high, table.shape[0] - 1):
        row = table[bucket].tolist()
        if low not in row:  # searched in C: most probes of a bucket find nothing
            continue
        for way in range(WAYS):
            tag = row[WAYS + way]
            if row[way] == low and tag & 0xFFFFFFFF and (any_high or (tag ^ high) < 1 << 32):
                return bucket, way
    return None


def value_at(table: np.ndarray, slot: tuple[int, int] | None) -> int:
    """The value in a (bucket, way) slot of `find_slot`, EMPTY for None."""
    return EMPTY if slot is None else (int(table[slot[0], WAYS + slot[1]]) & 0xFFFFFFFF) - 1


def lookup_lines(lines: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """The batch lookup of [n, 2] uint64 keys in a table seen as one item per bucket (`table_lines`;
    shared by the writer and by read-only mappings): values, EMPTY where absent.

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
        return np.array([value_at(table, find_slot(table, low, high)) for low, high in packed.tolist()],
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


def map_table(buf, buckets: int) -> np.ndarray:
    """The [buckets, 2 * WAYS] table of an index file's mapping."""
    return np.frombuffer(buf, dtype=np.uint64, count=buckets * 2 * WAYS,
                         offset=INDEX_HEADER_BYTES).reshape(buckets, 2 * WAYS)


def table_lines(table: np.ndarray) -> np.ndarray:
    """The table as one item per bucket (what lookup_lines gathers)."""
    return table.view(_LINE).reshape(-1)


def prefer_huge_pages(mapping: mmap.mmap) -> None:
    """Ask for 2 MiB pages where the file system can back the file with them: a lookup reads one cache
    line per key at a random place, and with 4 KiB pages each of those also misses the TLB."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            mapping.madvise(advice)
        except OSError:
            pass


class SharedIndexReader:
    """A read-only view of another process's shared index; follows it when the writer grows it.

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
            prefer_huge_pages(self._mmap)
        finally:
            os.close(fd)
        magic, _, buckets, _, _ = INDEX_HEADER.unpack_from(self._mmap, 0)
        if magic != INDEX_MAGIC:
            raise ValueError(f"{path} is not a kvstore index")
        self._lines = table_lines(map_table(self._mmap, buckets))
        self.path = path

    def lookup(self, packed: np.ndarray) -> np.ndarray:
        """Values of [n, 2] uint64 keys (vocab.pack_keys), EMPTY where absent. OSError once the writer
        has stopped."""
        for _ in range(8):  # follow growth: each step names its successor
            _, moved, _, _, successor = INDEX_HEADER.unpack_from(self._mmap, 0)
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
