"""Reading and damaging the disk tier's segment files (docs/disk-format.md), as tests of recovery and
corruption do."""

from __future__ import annotations

from pathlib import Path

from kvstore.codec import ChunkHeader
from kvstore.tiers.disk import ALIGN, SEGMENT_HEADER_BYTES


def padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def segment_files(path: Path) -> list[Path]:
    return sorted(path.glob("seg-*.kvs"))


def records_in(segment: Path) -> list[tuple[int, ChunkHeader]]:
    """(offset, header) of each record, read per docs/disk-format.md."""
    data = segment.read_bytes()
    records, offset = [], SEGMENT_HEADER_BYTES
    while offset < len(data):
        header = ChunkHeader.unpack(data, offset)
        records.append((offset, header))
        offset += padded(header.total_len)
    return records


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        value = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([value ^ 0xFF]))
