"""The read path: pin stored chunks in the arena for a reader (`acquire`), promoting disk hits first.

A disk hit is read straight into a newly allocated arena slot, verified against its checksum, then
indexed and pinned like any other hit; a chunk that fails verification is dropped from disk and is a
miss with the reason `checksum`, never data. Chunks a client copied out of the arena without a pin
(`touch`) count as hits here too. Every miss carries a MissReason.

Locks: decisions over the arena are taken under its lock (CpuTier.lock); disk reads run outside it.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from ..codec import ChunkHeader
from ..config import KVStoreConfig
from ..errors import CapacityExhausted, ChunkTooLarge, CorruptChunk, KVStoreError, NotFound
from ..tiers.cpu import CpuTier
from ..tiers.disk import DiskTier
from ..tiers.memory import FLAG_ON_DISK, FLAG_QUEUED
from ..vocab import MissReason, Tier
from ..wire.messages import AcquireReply
from .counters import Counters
from .directory import NodeDirectory
from .leases import Leases
from .namespaces import NamespaceInfo
from .writebehind import WriteBehind


class _Promotion(NamedTuple):
    index: int  # in the request
    key: bytes
    offset: int  # the arena slot it is read into
    nbytes: int


class Reads:
    """acquire and touch. Thread-safe."""

    def __init__(self, cfg: KVStoreConfig, cpu: CpuTier, disk: DiskTier | None, directory: NodeDirectory,
                 leases: Leases, writebehind: WriteBehind | None, counters: Counters):
        self.cfg = cfg
        self._cpu, self._disk, self._directory = cpu, disk, directory
        self._leases, self._writebehind, self._counters = leases, writebehind, counters

    def acquire(self, conn: int, info: NamespaceInfo, keys: Sequence[bytes], prefix: bool = True) -> AcquireReply:
        """Pin the stored chunks among `keys` in the arena (bringing disk hits up first) under a lease of
        `conn`, and return their slots. With `prefix`, stop at the first miss."""
        n = len(keys)
        offsets, sizes = [-1] * n, [0] * n
        reasons: dict[int, MissReason] = {}
        promote: list[_Promotion] = []
        cpu = self._cpu
        with cpu.lock:
            eids = cpu.find(keys)
            found = eids >= 0
            wrong_ns = found & (cpu.namespace_ids(eids) != info.ns_id)
            for i in np.flatnonzero(wrong_ns).tolist():
                reasons[i] = MissReason.NAMESPACE  # the same key under another namespace: never served
            eids[wrong_ns] = -1
            found = np.flatnonzero(eids >= 0)
            cpu.pin(eids[found])  # before promotions below allocate (and may evict) arena space
            limit = n
            for i in np.flatnonzero(eids < 0).tolist():  # misses only: try the disk tier, in order
                if i not in reasons:
                    plan = self._plan_promotion(info, keys[i])
                    if isinstance(plan, tuple):
                        promote.append(_Promotion(i, keys[i], *plan))
                        continue
                    if plan is not None:
                        reasons[i] = plan
                reasons.setdefault(i, MissReason.NOT_FOUND)
                if prefix:
                    limit = i
                    break
            hits = found[found < limit]
            cpu.unpin(eids[found[found >= limit]])  # beyond the first miss of a prefix
            hit_eids = eids[hits]
            self._used(hit_eids, [keys[i] for i in hits.tolist()])
            hit_offsets, hit_sizes, _ = cpu.slots(hit_eids)
            for i, offset, size in zip(hits.tolist(), hit_offsets.tolist(), hit_sizes.tolist()):
                offsets[i], sizes[i] = offset, size
        pinned = [hit_eids]
        if promote:
            pinned.append(self._promote(info, promote, offsets, sizes, reasons))
        if prefix:  # a failed promotion shortens the prefix: unpin what lies beyond it
            first_miss = min(reasons) if reasons else n
            beyond = [i for i in range(first_miss, n) if offsets[i] >= 0]
            if beyond:
                drop = cpu.find([keys[i] for i in beyond])
                cpu.unpin(drop)
                for i in beyond:
                    offsets[i], sizes[i] = -1, 0
                pinned = [np.setdiff1d(np.concatenate(pinned), drop)]
        lid = self._leases.grant(conn, np.concatenate(pinned))
        self._counters.add("get_hit_chunks", sum(1 for o in offsets if o >= 0))
        for reason in reasons.values():
            self._counters.add(reason.counter)
        return AcquireReply(lid, offsets, sizes, self._leases.ttl_s, reasons,
                            [p.index for p in promote if offsets[p.index] >= 0])

    def _plan_promotion(self, info: NamespaceInfo, key: bytes) -> tuple[int, int] | MissReason | None:
        """For a key the arena lacks: (offset, size) of an arena slot to read its disk copy into (the key
        claimed), the reason it cannot have one, or None when the disk does not hold it (caller holds the
        arena lock)."""
        if self._disk is None or self._cpu.claimed(key) or not self._disk.contains([key], info.digest)[0]:
            return None
        size = self._disk.record_nbytes(key)
        if size is None:
            return None
        try:
            offset = self._cpu.allocate(size)
        except (CapacityExhausted, ChunkTooLarge):
            return MissReason.NO_SPACE
        self._cpu.claim(key)
        return offset, size

    def _promote(self, info: NamespaceInfo, items: list[_Promotion], offsets: list[int], sizes: list[int],
                 reasons: dict[int, MissReason]) -> np.ndarray:
        """Read disk hits straight into their arena slots (outside the lock), then index and pin them."""
        assert self._disk is not None
        self._disk.prefetch([item.key for item in items])
        results = self._disk.read_many([(item.key, self._cpu.view(item.offset, item.nbytes)) for item in items])
        done: list[tuple[_Promotion, bool]] = []
        for item, result in zip(items, results):
            ok = isinstance(result, ChunkHeader) and result.namespace == info.digest
            if isinstance(result, CorruptChunk):  # the disk tier has dropped it
                reasons[item.index] = MissReason.CHECKSUM
                self._directory.unpublish([item.key], Tier.DISK)
            elif isinstance(result, NotFound):  # evicted from disk since the plan was made
                reasons[item.index] = MissReason.EVICTED
            elif isinstance(result, KVStoreError):
                raise result
            elif not ok:
                reasons[item.index] = MissReason.NAMESPACE
            done.append((item, ok))
        pinned = []
        cpu = self._cpu
        with cpu.lock:
            for item, ok in done:
                cpu.unclaim(item.key)
                if not ok:
                    cpu.release_slot(item.offset)
                    continue
                if cpu.insert(item.key, item.offset, item.nbytes, info.ns_id, FLAG_ON_DISK):
                    self._directory.publish([item.key], Tier.CPU, info.ns_id)
                # else someone promoted it meanwhile: our slot was freed, use theirs
                eid = int(cpu.find([item.key])[0])
                entry = cpu.entry(eid)
                offsets[item.index], sizes[item.index] = entry.offset, entry.nbytes
                pinned.append(eid)
            eids = np.asarray(pinned, dtype=np.int64)
            cpu.pin(eids)
        self._counters.add("promoted_chunks", len(pinned))
        self._counters.add("promoted_bytes", sum(item.nbytes for item, ok in done if ok))
        return eids

    def touch(self, info: NamespaceInfo, keys: Sequence[bytes]) -> int:
        """Count chunks a client copied out of the arena without a pin (get's fast path: the slot's
        serial proved the copy whole) as hits, and mark them used. Returns how many are still here."""
        with self._cpu.lock:
            eids = self._cpu.find(keys)
            held = np.flatnonzero((eids >= 0) & (self._cpu.namespace_ids(eids) == info.ns_id))
            self._used(eids[held], [keys[i] for i in held.tolist()])
        self._counters.add("get_hit_chunks", len(held))
        return len(held)

    def _used(self, eids: np.ndarray, keys: list[bytes]) -> None:
        """Chunks just read from the arena: later to be evicted, and with admission `second_use` now due
        on disk (caller holds the arena lock)."""
        self._cpu.touch(eids)
        if self._writebehind is not None and self.cfg.disk.admission == "second_use":
            for eid, key in zip(eids.tolist(), keys):
                if not self._cpu.entry(eid).flags & (FLAG_ON_DISK | FLAG_QUEUED):
                    self._writebehind.enqueue(eid, key)
