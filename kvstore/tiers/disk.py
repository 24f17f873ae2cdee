"""Disk tier: chunks in append-only segment files, indexed in memory, verified on every read.

Format (docs/disk-format.md; the files and their I/O: segments.py): append-only segment files of records,
a delete being a tombstone record. Opening the tier rebuilds the index by scanning the segments in id
order.

Invariants:
- Only the newest segment can have a torn tail: a segment is fsynced when it is sealed, before the next
  one receives a byte. So recovery verifies payloads only in the newest segment and cuts it at the first
  bad record; a bad record in an older segment is real damage and costs the rest of that segment.
- A record enters the index only after its batch is fsynced, so a reader never sees unsynced bytes.
- One writer at a time (``_append_lock``: append, delete, compaction, eviction) and any number of
  readers. ``_lock`` guards the index and segment metadata only; no I/O happens under it.
- A retired segment's fd stays open until its last reader is done (``readers`` refcount); its file is
  unlinked at once, which Linux allows while the fd is open.
- A tombstone is kept (carried forward when its segment is rewritten) only while an older segment may
  still hold a record of its key.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..codec import HEADER_BYTES, ChunkHeader
from ..config import AUTO, DiskConfig, auto_disk_capacity
from ..errors import CapacityExhausted, ConfigError, CorruptChunk, InvalidArgument, KVStoreError, NotFound
from .segments import (ALIGN, SEGMENT_HEADER_BYTES, SEGMENT_NAME, ZEROS, Entry, Segment, SegmentIO,
                       check_direct_io, fsync_directory, groups, lock_directory, padded_size, preadv_all,
                       read_segment, segment_header, tombstone, verify_record)

log = logging.getLogger(__name__)

_ANY = object()  # _publish: replace whatever the key maps to

class DiskTier:
    """Chunks on a local file system: append in batches, read one chunk straight into a caller's buffer."""

    def __init__(self, cfg: DiskConfig, on_evict: Callable[[list[bytes]], None] | None = None):
        if cfg.segment_bytes < 2 * ALIGN:
            raise ConfigError(f"disk.segment_bytes must be at least {2 * ALIGN}, got {cfg.segment_bytes}")
        if not 0 < cfg.compact_garbage_ratio <= 1:
            raise ConfigError(f"disk.compact_garbage_ratio must be in (0, 1], got {cfg.compact_garbage_ratio}")
        if cfg.capacity_bytes < 0:
            raise ConfigError(f"disk.capacity_bytes must not be negative, got {cfg.capacity_bytes}")
        self._cfg = cfg
        self._on_evict = on_evict
        self._dir = Path(cfg.path).expanduser()
        self._lock = threading.Lock()
        self._append_lock = threading.Lock()
        self._index: dict[bytes, Entry] = {}
        self._segments: dict[int, Segment] = {}  # in id order: oldest first
        self._namespaces: dict[bytes, bytes] = {}  # interned, so entries share one object per namespace
        self._counters = dict.fromkeys(
            ("bytes_written", "bytes_read", "corrupt_reads", "evicted_chunks", "recovered_chunks",
             "truncated_bytes", "compactions", "skipped_records"), 0)
        self._direct = cfg.o_direct
        self._io: SegmentIO | None = None
        self._verify_pool: ThreadPoolExecutor | None = None  # read_many's checksums (started on first use)
        self._closed = False
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_directory(self._dir)
        try:
            if self._direct:
                check_direct_io(self._dir)
            self._io = SegmentIO(self._direct, cfg.fsync)
            self._recover()
            self._capacity = self._resolve_capacity()
            # Eviction frees a segment at a time, so a segment must be a small part of the capacity.
            self._segment_limit = max(2 * ALIGN, min(cfg.segment_bytes, self._capacity // 4) // ALIGN * ALIGN)
            self._active = (next(reversed(self._segments.values())) if self._segments
                            else self._create_segment(1))
            with self._append_lock:
                evicted = self._reclaim()  # the capacity may be smaller than last time
        except BaseException:
            self.close()
            raise
        self._report_evicted(evicted)

    # ---- public API -------------------------------------------------------------------------------

    def append(self, chunks: Sequence[tuple[ChunkHeader, memoryview]]) -> None:
        """Write a batch of (header, payload) durably (one fsync), then index it; a key written again replaces.
        A header that carries a payload checksum keeps it (a wrong one makes the record a miss on read,
        never data); others get one computed here."""
        records = []
        for header, payload in chunks:
            payload = memoryview(payload).cast("B")
            if header.is_tombstone or len(header.key) != 16 or len(payload) != header.payload_len:
                raise InvalidArgument(
                    f"bad chunk {header.key.hex()}: payload is {len(payload)} bytes, header says "
                    f"{header.payload_len}; keys are 16 bytes; tombstones are internal")
            if not header.has_checksum:
                header = header.with_checksum(payload)
            records.append((header, header.pack(), payload))
        batch_bytes = sum(padded_size(header.total_len) for header, _, _ in records)
        if batch_bytes > self._capacity:
            raise CapacityExhausted(f"a batch of {batch_bytes} bytes exceeds disk.capacity_bytes={self._capacity}")
        if not records:
            return
        with self._append_lock:
            self._write_and_publish(records)
            evicted = self._reclaim()
        self._report_evicted(evicted)

    def contains(self, keys: Sequence[bytes], namespace: bytes | None = None) -> list[bool]:
        """Which keys are on disk (under `namespace`, when given: another namespace's chunk is absent)."""
        with self._lock:
            if namespace is None:
                return [key in self._index for key in keys]
            get = self._index.get
            return [(entry := get(key)) is not None and entry.namespace == namespace for key in keys]

    def record_nbytes(self, key: bytes) -> int | None:
        """HEADER_BYTES + payload_len of the chunk, or None if absent (index only, no I/O)."""
        with self._lock:
            entry = self._index.get(key)
        return entry.nbytes if entry else None

    def read_into(self, key: bytes, out: memoryview) -> ChunkHeader:
        """Read header + payload into out[:record_nbytes(key)] with one preadv, verified.

        With O_DIRECT and a 4096-aligned `out` at least the padded record long, the read goes straight
        into `out` and may also fill out[record_nbytes:padded]. Raises NotFound if absent; on
        CorruptChunk the key is dropped, so it is a miss from then on.
        """
        out = memoryview(out).cast("B")
        entry, segment = self._start_read(key, out)
        outcome = "error"
        try:
            self._io.read_record(segment.fd, entry.offset, entry.nbytes, out)
            header = self._verified(out, key, entry, segment)
            outcome = "hit"
            return header
        except CorruptChunk:
            outcome = "corrupt"
            raise
        finally:
            self._finish_read(key, entry, segment, outcome)

    def read_many(self, requests: Sequence[tuple[bytes, memoryview]]) -> list[ChunkHeader | KVStoreError]:
        """read_into for each (key, out), in order; per request the verified header, or the NotFound,
        InvalidArgument or CorruptChunk it raised. Each record is verified on a helper thread while the
        next one is read (xxhash and preadv both let go of the GIL): hashing a 5.9 MB chunk takes
        ~0.7 ms, during which a read in the same thread would leave the device waiting."""
        results: list = [None] * len(requests)
        verifying = []
        try:
            for i, (key, out) in enumerate(requests):
                out = memoryview(out).cast("B")
                try:
                    entry, segment = self._start_read(key, out)
                except KVStoreError as exc:
                    results[i] = exc
                    continue
                try:
                    self._io.read_record(segment.fd, entry.offset, entry.nbytes, out)
                except BaseException:
                    self._finish_read(key, entry, segment, "error")
                    raise
                verifying.append((i, key, entry, segment,
                                  self._verifier().submit(self._verified, out, key, entry, segment)))
        finally:  # every read started is finished, even when a later one failed
            failure = None
            for i, key, entry, segment, future in verifying:
                outcome = "error"
                try:
                    results[i] = future.result()
                    outcome = "hit"
                except CorruptChunk as exc:
                    results[i], outcome = exc, "corrupt"
                except BaseException as exc:  # not a verdict on the record: raised once all are finished
                    failure = failure or exc
                finally:
                    self._finish_read(key, entry, segment, outcome)
            if failure is not None:
                raise failure
        return results

    def _verifier(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._verify_pool is None:
                self._verify_pool = ThreadPoolExecutor(1, thread_name_prefix="kvstore-disk-verify")
            return self._verify_pool

    def _start_read(self, key: bytes, out: memoryview) -> tuple["Entry", "Segment"]:
        """The index entry of `key` and its segment, held open until _finish_read."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                raise NotFound(f"chunk {key.hex()} is not on disk")
            if len(out) < entry.nbytes:
                raise InvalidArgument(f"buffer of {len(out)} bytes is too small for a {entry.nbytes}-byte record")
            segment = self._segments[entry.segment]
            segment.readers += 1
        return entry, segment

    def _verified(self, record: memoryview, key: bytes, entry: "Entry", segment: "Segment") -> ChunkHeader:
        try:
            return verify_record(record, key, entry)
        except CorruptChunk as exc:
            log.warning("disk: chunk %s in %s at %d is corrupt: %s", key.hex(), segment.path.name, entry.offset, exc)
            raise

    def _finish_read(self, key: bytes, entry: "Entry", segment: "Segment", outcome: str) -> None:
        """Count a read ("hit", "corrupt" or "error"); a corrupt record leaves the index."""
        with self._lock:
            self._end_read(segment)
            self._counters["bytes_read"] += entry.nbytes
            current = self._still_at(key, entry)
            if outcome == "corrupt":
                self._counters["corrupt_reads"] += 1
                if current:
                    self._forget(key)
            elif outcome == "hit" and current and not entry.hit:
                self._index[key] = entry._replace(hit=True)

    def delete(self, keys: Sequence[bytes]) -> int:
        """Delete durably (tombstones, one batch, one fsync); returns how many of `keys` were present."""
        with self._append_lock:
            with self._lock:
                doomed = {key: self._index[key].namespace for key in keys if key in self._index}
            if not doomed:
                return 0
            self._write_and_publish([tombstone(key, namespace) for key, namespace in doomed.items()])
            evicted = self._reclaim()
        self._report_evicted(evicted)
        return len(doomed)

    def delete_namespace(self, namespace: bytes) -> int:
        with self._lock:
            keys = [key for key, entry in self._index.items() if entry.namespace == namespace]
        return self.delete(keys)

    def entries(self) -> Iterator[tuple[bytes, bytes, int]]:
        """Snapshot of (key, namespace, record_nbytes) for every chunk on disk."""
        with self._lock:
            return iter([(key, entry.namespace, entry.nbytes) for key, entry in self._index.items()])

    def prefetch(self, keys: Sequence[bytes]) -> None:
        """Ask the kernel to start reading these records now (POSIX_FADV_WILLNEED), so that a batch's
        device reads overlap with the verification of the chunks read before them. Where the records
        lie back to back in a segment (write-behind appends a prompt's chunks in order), also read
        ahead as many bytes again past them, at most `disk.readahead_bytes`: a prefix read in batches
        then finds its next batch on the way while the client copies this one. A lone record, or
        scattered ones, read nothing ahead."""
        if self._direct:  # O_DIRECT bypasses the page cache
            return
        spans: dict[int, list[tuple[int, int]]] = {}
        with self._lock:
            for key in keys:
                entry = self._index.get(key)
                if entry is not None:
                    fd = self._segments[entry.segment].fd
                    os.posix_fadvise(fd, entry.offset, padded_size(entry.nbytes), os.POSIX_FADV_WILLNEED)
                    spans.setdefault(entry.segment, []).append((entry.offset, entry.offset + padded_size(entry.nbytes)))
            for segment_id, records in spans.items():
                records.sort()
                back_to_back = all(records[i][0] == records[i - 1][1] for i in range(1, len(records)))
                if len(records) < 2 or not back_to_back or not self._cfg.readahead_bytes:
                    continue
                segment, end = self._segments[segment_id], records[-1][1]
                ahead = min(self._cfg.readahead_bytes, end - records[0][0], segment.size - end)
                if ahead > 0:
                    os.posix_fadvise(segment.fd, end, ahead, os.POSIX_FADV_WILLNEED)

    def drop_page_cache(self) -> None:
        """Evict the segments from the OS page cache, so the next reads really hit the device."""
        with self._lock:
            for segment in self._segments.values():
                os.posix_fadvise(segment.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def stats(self) -> dict[str, int]:
        """bytes_used, garbage_bytes and file_bytes count padded on-disk bytes."""
        with self._lock:
            segments = self._segments.values()
            return {
                "chunks": len(self._index),
                "bytes_used": sum(s.live_bytes for s in segments),
                "file_bytes": sum(s.size for s in segments),
                "capacity_bytes": self._capacity,
                "segments": len(segments),
                "garbage_bytes": sum(s.dead_bytes for s in segments),
                **self._counters,
            }

    def close(self) -> None:
        with self._append_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            for segment in self._segments.values():
                segment.retired = True  # a reader still inside read_into closes the fd when done
                if segment.readers == 0:
                    os.close(segment.fd)
            self._segments.clear()
            self._index.clear()
            if self._io is not None:
                self._io.close()
            os.close(self._lock_fd)  # releases the flock
            pool, self._verify_pool = self._verify_pool, None
        if pool is not None:
            pool.shutdown()

    # ---- writing ----------------------------------------------------------------------------------

    def _write_and_publish(self, records: list, replaces: list | None = None) -> None:
        """Write (header, header_bytes, payload) records durably, then index them.

        `replaces[i]`, if given, is the entry record i was copied from: it is published only if its key
        still maps to that entry (a reader may have dropped it meanwhile).
        """
        if not records:
            return
        placements = self._write(records)
        with self._lock:
            for (header, _, _), (segment, offset, padded), expected in zip(
                    records, placements, replaces or itertools.repeat(_ANY)):
                self._publish(segment, header, offset, padded, expected)
                segment.size = max(segment.size, offset + padded)
                self._counters["bytes_written"] += padded

    def _write(self, records: list) -> list[tuple[Segment, int, int]]:
        """Write records back to back into the active segment, rolling as needed; durable on return.

        Returns (segment, offset, padded length) per record. On failure every touched segment is cut
        back, so nothing of an unacknowledged batch survives to be recovered.
        """
        placements: list[tuple[Segment, int, int]] = []
        touched: list[tuple[Segment, int]] = []
        segment = self._active
        start = end = segment.size
        buffers: list = []
        try:
            for _, header_bytes, payload in records:
                padded = padded_size(HEADER_BYTES + len(payload))
                if end > SEGMENT_HEADER_BYTES and end + padded > self._segment_limit:
                    touched.append((segment, start))
                    self._io.write(segment.fd, start, buffers, durably=True)  # sealed: synced before the next gets a byte
                    segment = self._roll()
                    start = end = segment.size
                    buffers = []
                buffers += (header_bytes, payload, ZEROS[:padded - HEADER_BYTES - len(payload)])
                placements.append((segment, end, padded))
                end += padded
            touched.append((segment, start))
            self._io.write(segment.fd, start, buffers, durably=True)
        except OSError:
            for touched_segment, touched_start in touched:
                with contextlib.suppress(OSError):
                    os.ftruncate(touched_segment.fd, touched_start)
            raise
        return placements

    def _roll(self) -> Segment:
        self._active = self._create_segment(self._active.id + 1)
        return self._active

    def _create_segment(self, segment_id: int) -> Segment:
        path = self._dir / f"seg-{segment_id:08d}.kvs"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | self._direct_flag(), 0o644)
        header = segment_header(segment_id)
        try:
            # Synced with the segment's first batch; a crash before that leaves a newest segment with a
            # bad header, which recovery removes.
            self._io.write(fd, 0, [header, ZEROS[len(header):]])
            if self._cfg.fsync:
                fsync_directory(self._dir)
        except OSError:
            os.close(fd)
            path.unlink()
            raise
        segment = Segment(segment_id, path, fd, SEGMENT_HEADER_BYTES)
        with self._lock:
            self._segments[segment_id] = segment
            self._counters["bytes_written"] += SEGMENT_HEADER_BYTES
        return segment

    def _direct_flag(self) -> int:
        return os.O_DIRECT if self._direct else 0

    # ---- index ------------------------------------------------------------------------------------

    def _publish(self, segment: Segment, header: ChunkHeader, offset: int, padded: int, expected=_ANY) -> None:
        """Index one written record (caller holds _lock)."""
        key = header.key
        if header.is_tombstone:
            segment.tombstones.append((key, header.namespace))
            self._forget(key)
            return
        segment.keys.append(key)
        if expected is not _ANY and not self._still_at(key, expected):
            segment.dead_bytes += padded  # a copy whose original went away while it was being written
            return
        self._forget(key)
        namespace = self._namespaces.setdefault(header.namespace, header.namespace)
        self._index[key] = Entry(segment.id, offset, header.total_len, namespace, False)
        segment.live_bytes += padded

    def _forget(self, key: bytes) -> None:
        """Drop `key` from the index; its record becomes garbage (caller holds _lock)."""
        entry = self._index.pop(key, None)
        if entry is not None:
            segment = self._segments[entry.segment]
            segment.live_bytes -= padded_size(entry.nbytes)
            segment.dead_bytes += padded_size(entry.nbytes)

    def _still_at(self, key: bytes, entry: Entry) -> bool:
        """Whether `key` still maps to the record `entry` names (its hit flag may have changed since)."""
        current = self._index.get(key)
        return current is not None and (current.segment, current.offset) == (entry.segment, entry.offset)

    def _live_entries(self, segment: Segment) -> list[tuple[bytes, Entry]]:
        with self._lock:
            return [(key, entry) for key in dict.fromkeys(segment.keys)
                    if (entry := self._index.get(key)) is not None and entry.segment == segment.id]

    # ---- reading ----------------------------------------------------------------------------------

    def _end_read(self, segment: Segment) -> None:
        """Caller holds _lock."""
        segment.readers -= 1
        if segment.retired and segment.readers == 0:
            os.close(segment.fd)

    # ---- reclaiming space -------------------------------------------------------------------------

    def _reclaim(self) -> list[bytes]:
        """Compact garbage-heavy sealed segments, then evict the oldest while over capacity.

        Returns the keys that left the tier. Caller holds _append_lock.
        """
        gone: list[bytes] = []
        for segment in list(self._segments.values()):
            if (segment is not self._active and not segment.retired and segment.dead_bytes
                    and segment.garbage_share() >= self._cfg.compact_garbage_ratio):
                gone += self._compact(segment)
        while True:
            with self._lock:
                over = sum(s.size for s in self._segments.values()) > self._capacity
                oldest = next(iter(self._segments.values()))
            if not over or oldest is self._active:
                return gone
            gone += self._evict(oldest)

    def _compact(self, segment: Segment) -> list[bytes]:
        """Move the live records forward, keep the tombstones still needed, delete the file."""
        lost = self._copy_forward(segment, self._live_entries(segment))
        self._write_and_publish([tombstone(key, namespace) for key, namespace in self._needed_tombstones(segment)])
        self._retire(segment)
        with self._lock:
            self._counters["compactions"] += 1
        log.info("disk: compacted %s", segment.path.name)
        return lost

    def _evict(self, segment: Segment) -> list[bytes]:
        """Drop the oldest segment. Records read since written get a second chance (copied forward),
        bounded to half the segment so the drop always frees space; the rest leave the tier."""
        live = self._live_entries(segment)
        budget, second_chance = segment.size // 2, []
        for key, entry in live:
            if entry.hit and padded_size(entry.nbytes) <= budget:
                budget -= padded_size(entry.nbytes)
                second_chance.append((key, entry))
        lost = self._copy_forward(segment, second_chance) if second_chance else []
        kept = {key for key, _ in second_chance}
        evicted = []
        with self._lock:
            for key, entry in live:
                if key not in kept and self._still_at(key, entry):
                    self._forget(key)
                    evicted.append(key)
            self._counters["evicted_chunks"] += len(evicted)
        # Being the oldest, no older segment can hold its tombstones' keys: they all go.
        self._retire(segment)
        return evicted + lost

    def _copy_forward(self, segment: Segment, entries: list[tuple[bytes, Entry]]) -> list[bytes]:
        """Rewrite these records of `segment` into the active segment, a batch at a time.

        Each is verified first; a corrupt one is dropped and its key returned.
        """
        lost: list[bytes] = []
        for group in groups(entries, self._cfg.batch_bytes):
            buffer = memoryview(mmap.mmap(-1, sum(padded_size(entry.nbytes) for _, entry in group)))  # aligned
            records, replaces, position = [], [], 0
            for key, entry in group:
                record = buffer[position:position + padded_size(entry.nbytes)]
                position += len(record)
                try:
                    # The whole padded record, so the read is aligned for O_DIRECT.
                    if preadv_all(segment.fd, record, entry.offset) < entry.nbytes:
                        raise CorruptChunk("short read")
                    header = verify_record(record, key, entry)
                except CorruptChunk as exc:
                    log.warning("disk: dropping corrupt chunk %s from %s: %s", key.hex(), segment.path.name, exc)
                    with self._lock:
                        self._counters["corrupt_reads"] += 1
                        if self._still_at(key, entry):
                            self._forget(key)
                    lost.append(key)
                    continue
                records.append((header, record[:HEADER_BYTES], record[HEADER_BYTES:entry.nbytes]))
                replaces.append(entry)
            self._write_and_publish(records, replaces)
        return lost

    def _needed_tombstones(self, segment: Segment) -> list[tuple[bytes, bytes]]:
        """Tombstones of `segment` that still delete something: an older segment holds a record of the
        key, and the key has not been written again since (a newer record wins without them)."""
        with self._lock:
            older = [s for s in self._segments.values() if s.id < segment.id]
            if not segment.tombstones or not older:
                return []
            held = set().union(*(s.keys for s in older))
            return [(key, namespace) for key, namespace in dict(segment.tombstones).items()
                    if key in held and key not in self._index]

    def _retire(self, segment: Segment) -> None:
        """Forget the segment and delete its file; the fd closes when its last reader is done."""
        with self._lock:
            del self._segments[segment.id]
            segment.retired = True
            if segment.readers == 0:
                os.close(segment.fd)
        segment.path.unlink()
        if self._cfg.fsync:
            fsync_directory(self._dir)  # else a crash could bring back records whose tombstones are gone

    # ---- recovery ---------------------------------------------------------------------------------

    def _recover(self) -> None:
        found = sorted((int(match[1]), path) for path in self._dir.iterdir()
                       if (match := SEGMENT_NAME.fullmatch(path.name)))
        for position, (segment_id, path) in enumerate(found):
            self._recover_segment(segment_id, path, newest=position == len(found) - 1)
        self._counters["recovered_chunks"] = len(self._index)
        if found:
            log.info("disk: recovered %d chunks from %d segments in %s", len(self._index), len(found), self._dir)

    def _recover_segment(self, segment_id: int, path: Path, newest: bool) -> None:
        """Index one segment's records from their headers (and, in the newest, verify payloads)."""
        segment, records = read_segment(path, segment_id, newest, self._direct_flag(), self._counters)
        if segment is None:
            return
        with self._lock:
            self._segments[segment_id] = segment
            for header, offset, padded in records:
                self._publish(segment, header, offset, padded)

    def _resolve_capacity(self) -> int:
        if self._cfg.capacity_bytes != AUTO:
            return self._cfg.capacity_bytes
        return auto_disk_capacity(str(self._dir), self._cfg.segment_bytes)

    def _report_evicted(self, keys: list[bytes]) -> None:
        # Called without our locks, so the callback may call back into the tier.
        if keys and self._on_evict is not None:
            self._on_evict(keys)
