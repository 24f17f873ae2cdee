"""The disk tier's files (docs/disk-format.md): segment files of records, and the file I/O they are
written and read with.

A segment file ``seg-NNNNNNNN.kvs`` is a 4096-byte segment header (magic, format version, segment id,
creation time, an xxh3-64 of those) followed by records: the 128-byte chunk header (carrying the payload
checksum), the payload, zero padding to a multiple of 4096. A delete is a tombstone record: a header with
FLAG_TOMBSTONE and no payload. disk.py keeps the index and the policy over these files.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import xxhash

from ..codec import FLAG_TOMBSTONE, HEADER_BYTES, ChunkHeader
from ..errors import ConfigError, CorruptChunk
from ..layout import Geometry

log = logging.getLogger("kvstore.tiers.disk")

ALIGN = 4096  # records start and end on this boundary: the page size and the O_DIRECT block size
SEGMENT_HEADER_BYTES = ALIGN
SEGMENT_MAGIC = b"KVSG"
SEGMENT_VERSION = 1
# magic, format version, reserved, segment id, created (ns since the epoch); then an xxh3-64 of these.
SEGMENT_HEADER = struct.Struct("<4sHHQQ")
SEGMENT_CHECK = struct.Struct("<Q")
SEGMENT_NAME = re.compile(r"seg-(\d{8,})\.kvs")
ZEROS = bytes(ALIGN)
_IOV_MAX = os.sysconf("SC_IOV_MAX")
STAGING_BYTES = 8 << 20  # O_DIRECT write staging buffer
# A tombstone carries no payload; the header still needs a valid geometry.
_TOMBSTONE_GEOMETRY = Geometry(layers=1, heads=1, head_dim=1, tokens=1, planes=1, dtype="uint8")


class Entry(NamedTuple):
    """Index value: a plain tuple, so a million entries cost tuples, not objects with a __dict__."""

    segment: int
    offset: int
    nbytes: int  # HEADER_BYTES + payload_len; the record occupies padded_size(nbytes) on disk
    namespace: bytes
    hit: bool  # read since written: earns one second chance when its segment is evicted


@dataclass(eq=False, slots=True)
class Segment:
    """One segment file. Byte counts are of padded records; `size` is the file length."""

    id: int
    path: Path
    fd: int
    size: int
    live_bytes: int = 0
    dead_bytes: int = 0
    keys: list = field(default_factory=list)  # key of every chunk record here, live or not
    tombstones: list = field(default_factory=list)  # (key, namespace) of every tombstone here
    readers: int = 0
    retired: bool = False

    def garbage_share(self) -> float:
        area = self.size - SEGMENT_HEADER_BYTES
        return self.dead_bytes / area if area > 0 else 0.0


def padded_size(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def address(buffer: memoryview) -> int:
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


def tombstone(key: bytes, namespace: bytes) -> tuple[ChunkHeader, bytes, bytes]:
    header = ChunkHeader(codec="raw", geometry=_TOMBSTONE_GEOMETRY, payload_len=0, namespace=namespace,
                         key=key, flags=FLAG_TOMBSTONE).with_checksum(b"")
    return header, header.pack(), b""


def verify_record(record: memoryview, key: bytes, entry: Entry) -> ChunkHeader:
    """Decode and check a record read from disk against the index entry that pointed at it."""
    header = ChunkHeader.unpack(record)
    if header.key != key or header.namespace != entry.namespace or header.is_tombstone:
        raise CorruptChunk(f"record at offset {entry.offset} belongs to another chunk")
    header.verify(record[HEADER_BYTES:entry.nbytes])
    return header


def scan_records(fd: int, size: int, verify_payloads: bool) -> tuple[list, int]:
    """Walk a segment's records up to the first bad or incomplete one.

    Returns ([(header, offset, padded)], end): `end` is where the good records stop.
    """
    records, offset = [], SEGMENT_HEADER_BYTES
    while offset < size:
        try:
            header = ChunkHeader.unpack(os.pread(fd, HEADER_BYTES, offset))
            padded = padded_size(header.total_len)
            if offset + padded > size:
                raise CorruptChunk(f"record of {padded} bytes runs past the end of the file")
            if verify_payloads:
                header.verify(os.pread(fd, header.payload_len, offset + HEADER_BYTES))
        except CorruptChunk:
            break
        records.append((header, offset, padded))
        offset += padded
    return records, offset


def read_segment(path: Path, segment_id: int, newest: bool, open_flags: int, counters: dict
                 ) -> tuple[Segment | None, list]:
    """Open a segment found at startup: (the segment, its good records [(header, offset, padded)]).

    Only the newest segment can have a torn tail or a torn header (it is fsynced before the next one
    gets a byte): its payloads are verified, a torn tail is cut and a torn header removes it (None).
    Damage in an older segment costs the rest of that segment. `counters` ("truncated_bytes",
    "skipped_records") count what was lost."""
    with open(path, "rb", buffering=0) as file:  # buffered I/O: O_DIRECT would need aligned reads
        fd = file.fileno()
        size = os.fstat(fd).st_size
        if not valid_segment_header(os.pread(fd, SEGMENT_HEADER_BYTES, 0), segment_id):
            if newest:  # created, but the crash came before its first fsync
                log.warning("disk: removing %s: torn segment header", path.name)
                counters["truncated_bytes"] += size
                path.unlink()
                return None, []
            log.error("disk: %s has a bad segment header; its records are unreadable", path.name)
            counters["skipped_records"] += 1
            records, end = [], SEGMENT_HEADER_BYTES
        else:
            records, end = scan_records(fd, size, verify_payloads=newest)
    if end < size:
        if newest:
            log.warning("disk: %s: cutting a torn tail of %d bytes at offset %d", path.name, size - end, end)
            os.truncate(path, end)
            counters["truncated_bytes"] += size - end
        else:
            log.error("disk: %s: bad record at offset %d; skipping the last %d bytes", path.name, end, size - end)
            counters["skipped_records"] += 1
    segment = Segment(segment_id, path, os.open(path, os.O_RDWR | os.O_CLOEXEC | open_flags),
                      size=max(end if newest else size, SEGMENT_HEADER_BYTES))
    segment.dead_bytes = segment.size - max(end, SEGMENT_HEADER_BYTES)
    return segment, records


def valid_segment_header(raw: bytes, segment_id: int) -> bool:
    if len(raw) < SEGMENT_HEADER.size + SEGMENT_CHECK.size:
        return False
    magic, version, _, stored_id, _ = SEGMENT_HEADER.unpack_from(raw)
    (check,) = SEGMENT_CHECK.unpack_from(raw, SEGMENT_HEADER.size)
    return (magic == SEGMENT_MAGIC and version == SEGMENT_VERSION and stored_id == segment_id
            and check == xxhash.xxh3_64_intdigest(raw[:SEGMENT_HEADER.size]))


def groups(entries: list[tuple[bytes, Entry]], batch_bytes: int) -> Iterator[list[tuple[bytes, Entry]]]:
    """Split entries into runs of about `batch_bytes` (at least one entry each)."""
    group, size = [], 0
    for item in entries:
        group.append(item)
        size += padded_size(item[1].nbytes)
        if size >= batch_bytes:
            yield group
            group, size = [], 0
    if group:
        yield group


def pwritev_all(fd: int, buffers: list, offset: int) -> None:
    """pwritev the buffers back to back from `offset`, IOV_MAX at a time, resuming after short writes."""
    pending = [view for view in (memoryview(b).cast("B") for b in buffers) if len(view)]
    while pending:
        group = pending[:_IOV_MAX]
        written = os.pwritev(fd, group, offset)
        offset += written
        done = 0
        while done < len(group) and written >= len(group[done]):
            written -= len(group[done])
            done += 1
        pending = pending[done:]
        if written:
            pending[0] = pending[0][written:]


def preadv_all(fd: int, out: memoryview, offset: int) -> int:
    """Fill `out` from `offset` (one preadv unless the kernel returns short); returns bytes read."""
    total = 0
    while total < len(out):
        n = os.preadv(fd, [out[total:]], offset + total)
        if n == 0:
            break
        total += n
    return total


def lock_directory(directory: Path) -> int:
    fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"disk.path: {directory} is in use by another kvstore agent") from None
    return fd


def check_direct_io(directory: Path) -> None:
    """Raise ConfigError unless the file system at `directory` accepts aligned O_DIRECT I/O."""
    probe = directory / ".o_direct-probe"
    buffer = mmap.mmap(-1, ALIGN)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, buffer, 0)
            os.preadv(fd, [buffer], 0)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConfigError(f"disk.o_direct is not supported at {directory}: {exc}") from None
    finally:
        buffer.close()
        probe.unlink(missing_ok=True)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentIO:
    """Writes and reads of records: plain pwritev/preadv, or with O_DIRECT through page-aligned staging
    buffers (every write here is a multiple of ALIGN at an aligned offset; a read into an unaligned
    destination goes through a per-thread buffer)."""

    def __init__(self, direct: bool, fsync: bool):
        self.direct = direct
        self.fsync = fsync
        self._staging = memoryview(mmap.mmap(-1, STAGING_BYTES)) if direct else None  # page-aligned
        self._read_staging = threading.local()

    def write(self, fd: int, offset: int, buffers: list, durably: bool = False) -> None:
        """Write `buffers` back to back from `offset` (and fdatasync them when `durably`, unless
        disk.fsync is off)."""
        if self._staging is None:
            pwritev_all(fd, buffers, offset)
        else:
            staging, fill = self._staging, 0
            for buffer in buffers:
                buffer = memoryview(buffer).cast("B")
                while len(buffer):
                    n = min(len(buffer), len(staging) - fill)
                    staging[fill:fill + n] = buffer[:n]
                    fill += n
                    buffer = buffer[n:]
                    if fill == len(staging):
                        pwritev_all(fd, [staging], offset)
                        offset, fill = offset + fill, 0
            if fill:
                pwritev_all(fd, [staging[:fill]], offset)
        if durably and self.fsync:
            os.fdatasync(fd)

    def read_record(self, fd: int, offset: int, nbytes: int, out: memoryview) -> None:
        """Read the `nbytes` record at `offset` into out[:nbytes] (with O_DIRECT straight into `out` when
        it is aligned and long enough for the padded record); CorruptChunk on a short read."""
        if self.direct:
            padded = padded_size(nbytes)
            if len(out) >= padded and address(out) % ALIGN == 0:
                got = preadv_all(fd, out[:padded], offset)
            else:
                staging = self._read_buffer(padded)
                got = preadv_all(fd, staging[:padded], offset)
                if got >= nbytes:
                    out[:nbytes] = staging[:nbytes]
        else:
            got = preadv_all(fd, out[:nbytes], offset)
        if got < nbytes:
            raise CorruptChunk(f"short read: {got} of {nbytes} bytes")

    def _read_buffer(self, nbytes: int) -> memoryview:
        buffer = getattr(self._read_staging, "buffer", None)
        if buffer is None or len(buffer) < nbytes:
            buffer = memoryview(mmap.mmap(-1, max(nbytes, 1 << 20)))
            self._read_staging.buffer = buffer
        return buffer

    def close(self) -> None:
        if self._staging is not None:
            staging_map = self._staging.obj
            self._staging.release()
            staging_map.close()
            self._staging = None


def segment_header(segment_id: int) -> bytes:
    """The header bytes of a new segment (before their padding to SEGMENT_HEADER_BYTES)."""
    header = SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0, segment_id, time.time_ns())
    return header + SEGMENT_CHECK.pack(xxhash.xxh3_64_intdigest(header))
