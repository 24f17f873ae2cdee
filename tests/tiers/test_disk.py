"""DiskTier on real files: round trips, recovery after restarts, torn tails and crashes, corruption,
eviction with second chance, compaction, capacity, the directory lock and O_DIRECT."""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kvstore.codec import HEADER_BYTES, ChunkHeader
from kvstore.config import DiskConfig
from kvstore.errors import CapacityExhausted, ConfigError, CorruptChunk, InvalidArgument, NotFound
from kvstore.layout import Geometry
from kvstore.tiers.disk import DiskTier

from ..support.disk import flip_byte, padded, records_in, segment_files

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
GEOMETRY = Geometry(layers=2, heads=1, head_dim=8, tokens=16, dtype="float16")
NAMESPACE = xxhash.xxh3_128_digest(b"model-a")
OTHER_NAMESPACE = xxhash.xxh3_128_digest(b"model-b")
PAGE = 4096
SEGMENT = 64 << 10
SMALL = 12000  # payload bytes: a record then takes 12 KiB, so exactly 5 fill a 64 KiB segment


def key_of(i: int) -> bytes:
    return xxhash.xxh3_128_digest(i.to_bytes(8, "little"))


def payload_of(key: bytes, nbytes: int | None = None) -> bytes:
    """Deterministic in the key (and its size too, unless given), so a reader can check any chunk."""
    if nbytes is None:
        nbytes = 1 + int.from_bytes(key[:2], "little") % 30000
    return np.random.default_rng(int.from_bytes(key[:8], "little")).bytes(nbytes)


def chunk(key: bytes, nbytes: int | None = None, namespace: bytes = NAMESPACE):
    payload = payload_of(key, nbytes)
    header = ChunkHeader(codec="lz4", geometry=GEOMETRY, payload_len=len(payload), namespace=namespace, key=key)
    return header, memoryview(payload)


def config(path: Path, **overrides) -> DiskConfig:
    base = dict(path=str(path), capacity_bytes=64 << 20, segment_bytes=SEGMENT, batch_bytes=64 << 10)
    return DiskConfig(**{**base, **overrides})


def read(tier: DiskTier, key: bytes) -> tuple[ChunkHeader, bytes]:
    out = bytearray(tier.record_nbytes(key))
    header = tier.read_into(key, memoryview(out))
    return header, bytes(out[HEADER_BYTES:])


def assert_intact(tier: DiskTier, key: bytes, nbytes: int | None = None, namespace: bytes = NAMESPACE) -> None:
    header, payload = read(tier, key)
    assert payload == payload_of(key, nbytes)
    assert (header.key, header.namespace, header.codec, header.geometry) == (key, namespace, "lz4", GEOMETRY)
    assert header.has_checksum and not header.is_tombstone


@pytest.fixture
def open_tier():
    """Open DiskTiers that are closed after the test, whatever happens."""
    tiers = []

    def _open(cfg: DiskConfig, **kwargs) -> DiskTier:
        tiers.append(DiskTier(cfg, **kwargs))
        return tiers[-1]

    yield _open
    for tier in tiers:
        tier.close()


def test_round_trip_across_segments(tmp_path, open_tier):
    tier = open_tier(config(tmp_path))
    keys = [key_of(i) for i in range(60)]
    for start in range(0, 60, 10):
        tier.append([chunk(key) for key in keys[start:start + 10]])
    assert tier.stats()["segments"] >= 3
    assert tier.contains(keys + [key_of(999)]) == [True] * 60 + [False]
    for key in keys:
        assert tier.record_nbytes(key) == HEADER_BYTES + len(payload_of(key))
        assert_intact(tier, key)
    assert sorted(tier.entries()) == sorted((k, NAMESPACE, HEADER_BYTES + len(payload_of(k))) for k in keys)
    with pytest.raises(NotFound):
        tier.read_into(key_of(999), memoryview(bytearray(100)))
    with pytest.raises(InvalidArgument):
        tier.read_into(keys[0], memoryview(bytearray(HEADER_BYTES)))


def test_read_into_arena_slice(tmp_path, open_tier):
    tier = open_tier(config(tmp_path))
    keys = [key_of(i) for i in range(8)]
    tier.append([chunk(key) for key in keys])
    arena = mmap.mmap(-1, 1 << 20)
    view = memoryview(arena)
    offset = 100  # deliberately unaligned
    for key in keys:
        nbytes = tier.record_nbytes(key)
        header = tier.read_into(key, view[offset:offset + nbytes])
        assert header.key == key
        assert bytes(view[offset + HEADER_BYTES:offset + nbytes]) == payload_of(key)
        offset += nbytes
    view.release()
    arena.close()


def test_restart_finds_everything(tmp_path):
    keys = [key_of(i) for i in range(40)]
    tier = DiskTier(config(tmp_path))
    for start in range(0, 40, 8):
        tier.append([chunk(key) for key in keys[start:start + 8]])
    before = tier.stats()
    tier.close()
    tier = DiskTier(config(tmp_path))
    try:
        stats = tier.stats()
        assert stats["recovered_chunks"] == stats["chunks"] == 40
        assert stats["truncated_bytes"] == 0
        assert (stats["file_bytes"], stats["bytes_used"]) == (before["file_bytes"], before["bytes_used"])
        for key in keys:
            assert_intact(tier, key)
    finally:
        tier.close()


def test_delete_is_durable(tmp_path):
    keys = [key_of(i) for i in range(20)]
    others = [key_of(i) for i in range(100, 106)]
    tier = DiskTier(config(tmp_path, compact_garbage_ratio=1.0))
    tier.append([chunk(key) for key in keys] + [chunk(key, namespace=OTHER_NAMESPACE) for key in others])
    assert tier.delete(keys[:5] + [key_of(999)]) == 5
    assert tier.delete(keys[:5]) == 0
    assert tier.delete_namespace(OTHER_NAMESPACE) == len(others)
    assert tier.contains(keys[:5] + others) == [False] * 11
    tier.close()
    tier = DiskTier(config(tmp_path))
    try:
        assert tier.contains(keys[:5] + others) == [False] * 11
        for key in keys[5:]:
            assert_intact(tier, key)
        assert tier.stats()["chunks"] == 15
    finally:
        tier.close()


def test_append_again_replaces(tmp_path):
    key = key_of(1)
    tier = DiskTier(config(tmp_path))
    tier.append([chunk(key, 5000)])
    tier.append([chunk(key, 9000)])
    assert tier.record_nbytes(key) == HEADER_BYTES + 9000
    assert_intact(tier, key, 9000)
    stats = tier.stats()
    assert stats["chunks"] == 1 and stats["garbage_bytes"] == padded(HEADER_BYTES + 5000)
    tier.close()
    tier = DiskTier(config(tmp_path))
    try:
        assert_intact(tier, key, 9000)
    finally:
        tier.close()


def test_torn_tail_is_cut_on_restart(tmp_path, open_tier):
    keys = [key_of(i) for i in range(12)]
    tier = DiskTier(config(tmp_path))
    for start in range(0, 12, 4):
        tier.append([chunk(key, SMALL) for key in keys[start:start + 4]])
    tier.close()
    newest = segment_files(tmp_path)[-1]
    (bad_offset, bad), (torn_offset, torn) = records_in(newest)[-2:]
    flip_byte(newest, bad_offset + HEADER_BYTES + 10)  # a payload byte: only its checksum can tell
    os.truncate(newest, torn_offset + HEADER_BYTES + 100)  # the crash came mid-record

    tier = open_tier(config(tmp_path))
    assert tier.contains([bad.key, torn.key]) == [False, False]
    for key in keys:
        if key not in (bad.key, torn.key):
            assert_intact(tier, key, SMALL)
    assert newest.stat().st_size == bad_offset
    assert tier.stats()["truncated_bytes"] == torn_offset + HEADER_BYTES + 100 - bad_offset
    tier.append([chunk(bad.key, SMALL)])  # the cut segment takes appends again
    assert_intact(tier, bad.key, SMALL)


def with_a_rotten_record(tier: DiskTier, path: Path) -> tuple[list[bytes], ChunkHeader]:
    """Append 15 small chunks, then flip the last payload byte of the third record on disk: (keys, the
    header of the rotten record)."""
    keys = [key_of(i) for i in range(15)]
    tier.append([chunk(key, SMALL) for key in keys])
    oldest = segment_files(path)[0]
    offset, victim = records_in(oldest)[2]
    flip_byte(oldest, offset + HEADER_BYTES + SMALL - 1)
    return keys, victim


def test_corrupt_sealed_record_becomes_a_miss(tmp_path, open_tier):
    tier = open_tier(config(tmp_path))
    keys, victim = with_a_rotten_record(tier, tmp_path)
    with pytest.raises(CorruptChunk):
        read(tier, victim.key)
    assert tier.contains([victim.key]) == [False]
    with pytest.raises(NotFound):
        tier.read_into(victim.key, memoryview(bytearray(HEADER_BYTES + SMALL)))
    assert tier.stats()["corrupt_reads"] == 1
    for key in keys:
        if key != victim.key:
            assert_intact(tier, key, SMALL)


def test_read_many_reads_in_order_and_reports_each_miss_in_its_place(tmp_path, open_tier):
    tier = open_tier(config(tmp_path))
    keys, victim = with_a_rotten_record(tier, tmp_path)
    wanted = keys[:6] + [key_of(999)]  # the victim among them, and a key never stored
    buffers = [bytearray(HEADER_BYTES + SMALL) for _ in wanted]
    buffers[1] = bytearray(HEADER_BYTES)  # too small for its record
    results = tier.read_many([(key, memoryview(buf)) for key, buf in zip(wanted, buffers)])
    kinds = [type(result).__name__ for result in results]
    victim_at = wanted.index(victim.key)
    assert kinds[1] == "InvalidArgument" and kinds[victim_at] == "CorruptChunk" and kinds[-1] == "NotFound"
    for i, (key, result) in enumerate(zip(wanted, results)):
        if kinds[i] == "ChunkHeader":
            assert result.key == key and bytes(buffers[i][HEADER_BYTES:]) == payload_of(key, SMALL)
    assert kinds.count("ChunkHeader") == 4
    assert tier.contains([victim.key]) == [False] and tier.stats()["corrupt_reads"] == 1  # dropped, counted
    assert_intact(tier, keys[1], SMALL)  # the refused buffer cost the chunk nothing


def test_read_many_finishes_every_read_before_raising_an_unexpected_error(tmp_path, open_tier, monkeypatch):
    tier = open_tier(config(tmp_path))
    keys = [key_of(i) for i in range(4)]
    tier.append([chunk(key, SMALL) for key in keys])
    verified = tier._verified

    def fails_on_the_second(record, key, entry, segment):
        if key == keys[1]:
            raise RuntimeError("not a verdict on the record")
        return verified(record, key, entry, segment)

    monkeypatch.setattr(tier, "_verified", fails_on_the_second)
    with pytest.raises(RuntimeError):
        tier.read_many([(key, memoryview(bytearray(HEADER_BYTES + SMALL))) for key in keys])
    assert all(segment.readers == 0 for segment in tier._segments.values())  # none left open
    monkeypatch.undo()
    for key in keys:  # nothing was dropped: it was not a checksum failure
        assert_intact(tier, key, SMALL)


def test_append_keeps_a_given_checksum_so_a_wrong_one_is_a_miss_not_data(tmp_path, open_tier):
    tier = open_tier(config(tmp_path))
    good, bad = key_of(1), key_of(2)
    header, payload = chunk(good)
    given = header.with_checksum(payload)  # computed ahead, as write-behind's helper thread does
    wrong = chunk(bad)[0].with_checksum(payload_of(good))  # a checksum of other bytes
    tier.append([(given, payload), (wrong, chunk(bad)[1])])
    assert_intact(tier, good)
    with pytest.raises(CorruptChunk):
        read(tier, bad)
    assert tier.contains([good, bad]) == [True, False]


def test_bad_header_in_sealed_segment_skips_rest_of_it(tmp_path, open_tier):
    keys = [key_of(i) for i in range(15)]
    tier = DiskTier(config(tmp_path))
    tier.append([chunk(key, SMALL) for key in keys])
    tier.close()
    oldest = segment_files(tmp_path)[0]
    records = records_in(oldest)
    flip_byte(oldest, records[2][0] + 40)

    tier = open_tier(config(tmp_path))
    lost = {header.key for _, header in records[2:]}
    assert tier.contains(list(lost)) == [False] * len(lost)
    for key in set(keys) - lost:
        assert_intact(tier, key, SMALL)
    assert tier.stats()["skipped_records"] == 1


def test_capacity_evicts_oldest_with_second_chance(tmp_path, open_tier):
    evicted: list[bytes] = []
    tier = open_tier(config(tmp_path, capacity_bytes=4 * SEGMENT), on_evict=evicted.extend)
    keys = [key_of(i) for i in range(25)]
    tier.append([chunk(key, SMALL) for key in keys[:5]])
    hit = keys[2]
    read(tier, hit)
    for start in range(5, 25, 5):
        tier.append([chunk(key, SMALL) for key in keys[start:start + 5]])

    stats = tier.stats()
    assert stats["file_bytes"] <= 4 * SEGMENT
    assert set(keys[:5]) - {hit} <= set(evicted)
    assert hit not in evicted
    assert_intact(tier, hit, SMALL)
    # Oldest first: everything evicted was written before everything kept (the hit aside).
    assert evicted == [key for key in keys if key in set(evicted)]
    assert keys.index(evicted[-1]) < min(keys.index(k) for k in keys if k not in evicted and k != hit)
    assert tier.contains(evicted) == [False] * len(evicted)
    assert stats["evicted_chunks"] == len(evicted)
    for key in keys:
        if key not in evicted:
            assert_intact(tier, key, SMALL)


def test_compaction_reclaims_a_mostly_deleted_segment(tmp_path):
    keys = [key_of(i) for i in range(15)]
    tier = DiskTier(config(tmp_path))
    for start in range(0, 15, 5):
        tier.append([chunk(key, SMALL) for key in keys[start:start + 5]])
    first = segment_files(tmp_path)[0]
    assert tier.delete(keys[:4]) == 4
    assert not first.exists()
    assert tier.stats()["compactions"] == 1
    assert_intact(tier, keys[4], SMALL)
    tier.close()
    tier = DiskTier(config(tmp_path))
    try:
        assert tier.contains(keys[:4]) == [False] * 4
        for key in keys[4:]:
            assert_intact(tier, key, SMALL)
    finally:
        tier.close()


def test_compaction_keeps_tombstones_an_older_segment_needs(tmp_path):
    a = [key_of(i) for i in range(5)]
    b = [key_of(i) for i in range(100, 104)]
    tier = DiskTier(config(tmp_path))
    tier.append([chunk(key, SMALL) for key in a])  # fills segment 1
    tier.delete([a[0]])  # the tombstone opens segment 2; segment 1 keeps a[0]'s record
    tombstone_segment = segment_files(tmp_path)[-1]
    tier.append([chunk(key, SMALL) for key in b])
    tier.append([chunk(key, SMALL) for key in b])  # segment 2 is now mostly garbage: compacted
    assert not tombstone_segment.exists()
    assert segment_files(tmp_path)[0].name == "seg-00000001.kvs"
    tier.close()
    tier = DiskTier(config(tmp_path))
    try:
        assert tier.contains([a[0]]) == [False]
        for key in a[1:] + b:
            assert_intact(tier, key, SMALL)
    finally:
        tier.close()


def test_batch_larger_than_capacity_is_refused_whole(tmp_path, open_tier):
    tier = open_tier(config(tmp_path, capacity_bytes=4 * SEGMENT))
    kept = [key_of(i) for i in range(5)]
    tier.append([chunk(key, SMALL) for key in kept])
    before = tier.stats()
    huge = [key_of(i) for i in range(100, 130)]
    with pytest.raises(CapacityExhausted):
        tier.append([chunk(key, SMALL) for key in huge])
    assert tier.contains(huge) == [False] * len(huge)
    assert tier.stats()["file_bytes"] == before["file_bytes"]
    for key in kept:
        assert_intact(tier, key, SMALL)


def test_directory_lock(tmp_path):
    tier = DiskTier(config(tmp_path))
    with pytest.raises(ConfigError, match="in use"):
        DiskTier(config(tmp_path))
    tier.close()
    DiskTier(config(tmp_path)).close()


def test_o_direct_round_trip(tmp_path):
    try:
        tier = DiskTier(config(tmp_path, o_direct=True))
    except ConfigError as exc:
        pytest.skip(f"the file system under {tmp_path} refuses O_DIRECT: {exc}")
    keys = [key_of(i) for i in range(30)]
    try:
        for start in range(0, 30, 10):
            tier.append([chunk(key) for key in keys[start:start + 10]])
        assert tier.stats()["segments"] >= 3
        arena = mmap.mmap(-1, 1 << 20)
        view = memoryview(arena)
        for key in keys:
            nbytes = tier.record_nbytes(key)
            for out in (view[:padded(nbytes)], view[1:1 + nbytes]):  # aligned, then unaligned
                out[:] = bytes(len(out))
                assert tier.read_into(key, out).key == key
                assert bytes(out[HEADER_BYTES:nbytes]) == payload_of(key)
        del out
        view.release()
        arena.close()
    finally:
        tier.close()
    tier = DiskTier(config(tmp_path, o_direct=True))
    try:
        for key in keys:
            assert_intact(tier, key)
    finally:
        tier.close()


def test_reads_run_during_appends_eviction_and_compaction(tmp_path, open_tier):
    tier = open_tier(config(tmp_path, capacity_bytes=8 * SEGMENT, fsync=False))  # about locking, not durability
    written = [key_of(i) for i in range(8)]
    tier.append([chunk(key) for key in written])
    expected = {key_of(i): payload_of(key_of(i)) for i in range(8 * 24)}
    failures: list[BaseException] = []
    done = threading.Event()

    def reader(seed: int) -> None:
        rng, out = random.Random(seed), bytearray(64 << 10)
        while not done.is_set():
            key = rng.choice(written[-32:])  # mostly chunks still on disk, many in the oldest segments
            try:
                tier.read_into(key, memoryview(out))
                assert out[HEADER_BYTES:HEADER_BYTES + len(expected[key])] == expected[key]
            except NotFound:
                pass  # evicted or deleted meanwhile: a miss is fine, wrong bytes or errors are not
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
                return

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(2)]
    for thread in threads:
        thread.start()
    try:
        for batch in range(1, 24):
            keys = [key_of(batch * 8 + i) for i in range(8)]
            tier.append([chunk(key) for key in keys])
            written.extend(keys)
            tier.delete(keys[:3])
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[0]
    stats = tier.stats()
    assert stats["evicted_chunks"] > 0 and stats["compactions"] > 0 and stats["corrupt_reads"] == 0


def _append_until_killed(path: str) -> None:
    """Crash-test child: append batches forever, printing each batch's keys once append() returned."""
    tier = DiskTier(config(Path(path), segment_bytes=256 << 10, capacity_bytes=1 << 30))
    for batch in range(100_000):
        keys = [key_of(batch * 8 + i) for i in range(8)]
        tier.append([chunk(key) for key in keys])
        print(" ".join(key.hex() for key in keys), flush=True)


def test_sigkill_mid_stream_loses_nothing_acknowledged(tmp_path):
    # the child runs this very module's _append_until_killed (the repository on its path)
    child_code = "import sys; from tests.tiers.test_disk import _append_until_killed; _append_until_killed(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", child_code, str(tmp_path)],
                             stdout=subprocess.PIPE, env=env, text=True)
    lines = []
    deadline = time.monotonic() + 60
    while len(lines) < 40 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        lines.append(line)
    time.sleep(random.uniform(0, 0.02))  # land the kill anywhere in the next append, not always before it
    child.send_signal(signal.SIGKILL)
    rest, _ = child.communicate()
    assert len(lines) == 40, "the child died or stalled before printing 40 batches"
    acknowledged = [bytes.fromhex(word) for line in lines + rest.splitlines(keepends=True)
                    if line.endswith("\n") for word in line.split()]

    tier = DiskTier(config(tmp_path, segment_bytes=256 << 10, capacity_bytes=1 << 30))
    try:
        assert tier.contains(acknowledged) == [True] * len(acknowledged)
        for key, _, _ in tier.entries():  # acknowledged or not, whatever is indexed must read back whole
            assert_intact(tier, key)
    finally:
        tier.close()


def test_header_fields_survive_verbatim(tmp_path, open_tier):
    tier = open_tier(config(tmp_path))
    header, payload = chunk(key_of(7), 3000)
    header = replace(header, codec="int8", group=64, geometry=Geometry(layers=3, heads=1, head_dim=16,
                                                                       tokens=32, planes=1, dtype="bfloat16"))
    tier.append([(header, payload)])
    got, data = read(tier, key_of(7))
    assert got == header.with_checksum(payload)
    assert data == bytes(payload)


def test_prefetch_reads_ahead_only_past_records_that_lie_back_to_back(tmp_path, open_tier, monkeypatch):
    tier = open_tier(config(tmp_path, segment_bytes=1 << 20, readahead_bytes=5 * padded(HEADER_BYTES + SMALL)))
    keys = [key_of(i) for i in range(20)]
    tier.append([chunk(key, SMALL) for key in keys])  # one batch: the records lie in order, back to back
    (segment,) = segment_files(tmp_path)
    ends = {header.key: offset + padded(header.total_len) for offset, header in records_in(segment)}
    record = padded(HEADER_BYTES + SMALL)
    advised: list[tuple[int, int]] = []
    real_fadvise = os.posix_fadvise

    def recording(fd, offset, length, advice):  # the real call still runs: this only notes what was asked
        if advice == os.POSIX_FADV_WILLNEED:
            advised.append((offset, length))
        return real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", recording)

    def ahead_of(batch: list[bytes]) -> list[tuple[int, int]]:
        """The WILLNEED ranges beyond the batch's own records."""
        advised.clear()
        tier.prefetch(batch)
        own = {(ends[key] - record, record) for key in batch}
        return [span for span in advised if span not in own]

    assert ahead_of(keys[0:3]) == [(ends[keys[2]], 3 * record)]  # as many bytes again as the batch read
    assert ahead_of(keys[2:10]) == [(ends[keys[9]], 5 * record)]  # capped by disk.readahead_bytes (5 records)
    assert ahead_of(keys[12:18]) == [(ends[keys[17]], 2 * record)]  # clipped at the end of the segment
    assert ahead_of([keys[4]]) == []  # a lone record: nothing to go by
    assert ahead_of([keys[0], keys[4]]) == []  # not back to back: a random read
    assert ahead_of(keys[18:20]) == []  # nothing past the segment's end
    quiet = open_tier(config(tmp_path / "quiet", readahead_bytes=0))
    quiet.append([chunk(key, SMALL) for key in keys[:3]])
    advised.clear()
    quiet.prefetch(keys[:3])
    assert len(advised) == 3  # each record's own range, and no more
