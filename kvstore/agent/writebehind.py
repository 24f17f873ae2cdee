"""Write-behind: committed arena chunks go to the disk tier on a thread of their own, in batches.

A queued chunk is pinned in the arena (and flagged FLAG_QUEUED) until it is written, so arena pressure
cannot drop it unwritten. The queue is bounded (disk.queue_bytes): past that, keys wait unpinned in a
deferred list, and may be evicted before their turn. A chunk evicted from the arena while being
written is removed once written ("leaving"); one deleted from disk while being written is deleted
again once written ("doomed").

Locks: the caller holds the arena's lock (CpuTier.lock) for every method that touches arena entries;
this room's own condition variable is taken inside it, never the other way round.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, NamedTuple, Sequence

import numpy as np

from ..codec import HEADER_BYTES, ChunkHeader
from ..config import DiskConfig
from ..errors import KVStoreError
from ..tiers.cpu import CpuTier
from ..tiers.disk import DiskTier
from ..tiers.memory import FLAG_ON_DISK, FLAG_QUEUED
from ..vocab import Tier
from .counters import Counters
from .directory import NodeDirectory

log = logging.getLogger("kvstore.agent")

_LINGER_S = 0.005  # a batch waits this long for more chunks to reach disk.batch_bytes


class _Queued(NamedTuple):
    eid: int
    key: bytes
    nbytes: int


class WriteBehind:
    """The bounded queue from the arena to the disk tier, and the thread that drains it."""

    def __init__(self, cfg: DiskConfig, cpu: CpuTier, disk: DiskTier, directory: NodeDirectory,
                 counters: Counters, remove_from_arena: Callable[[list[bytes]], object]):
        self.cfg = cfg
        self._cpu, self._disk, self._directory, self._counters = cpu, disk, directory, counters
        self._remove_from_arena = remove_from_arena  # arena removal that also updates the directory
        self._cv = threading.Condition(threading.RLock())
        self._queue: deque[_Queued] = deque()
        self._queue_bytes = 0
        self._deferred: deque[bytes] = deque()  # committed while the queue was full: queued as it drains
        self._writing: set[bytes] = set()
        self._doomed: set[bytes] = set()  # deleted from disk while being written: delete again once written
        self._leaving: set[bytes] = set()  # evicted from the arena while being written: remove once written
        self._stopping = False
        self._thread = threading.Thread(target=self._writer_loop, name="kvstore-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Write what was taken, then stop the writer."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    # ---- queueing (caller holds the arena lock) -----------------------------------------------------
    def enqueue(self, eid: int, key: bytes) -> None:
        """Queue a committed arena chunk for disk; while the queue is full it waits as deferred."""
        nbytes = self._cpu.entry(eid).nbytes
        with self._cv:
            if self._queue_bytes and self._queue_bytes + nbytes > self.cfg.queue_bytes:
                self._deferred.append(key)
                self._counters.add("writebehind_deferred")
                return
            self._cpu.pin(np.array([eid]))
            self._cpu.set_flags(eid, set_bits=FLAG_QUEUED)
            self._queue.append(_Queued(eid, key, nbytes))
            self._queue_bytes += nbytes
            self._cv.notify_all()

    def enqueue_unwritten(self, eids: Sequence[int], keys: Sequence[bytes]) -> None:
        """Queue those of the entries that have no disk copy and are not queued yet."""
        todo = self._cpu.flags(np.asarray(eids, dtype=np.int64)) & (FLAG_ON_DISK | FLAG_QUEUED) == 0
        for eid, key, unwritten in zip(eids, keys, todo.tolist()):
            if unwritten:
                self.enqueue(eid, key)

    def withdraw(self, keys: set[bytes]) -> None:
        """Take `keys` out of the queue (they are being removed from the arena)."""
        with self._cv:
            if not self._queue or not keys:
                return
            kept: deque[_Queued] = deque()
            for item in self._queue:
                if item.key in keys:
                    self._queue_bytes -= item.nbytes
                    self._cpu.set_flags(item.eid, clear_bits=FLAG_QUEUED)
                    self._cpu.unpin(np.array([item.eid]))
                else:
                    kept.append(item)
            self._queue = kept

    def writing(self, keys: Sequence[bytes]) -> list[bytes]:
        """The keys among `keys` the writer holds right now."""
        with self._cv:
            return [key for key in keys if key in self._writing]

    def remove_when_written(self, keys: Sequence[bytes]) -> None:
        """Remove these chunks from the arena once the writer is done with them."""
        with self._cv:
            self._leaving.update(keys)

    def delete_when_written(self, keys: Sequence[bytes]) -> None:
        """Delete those of these chunks being written now from disk again once written."""
        with self._cv:
            self._doomed.update(key for key in keys if key in self._writing)

    def waiting(self, keys: Sequence[bytes]) -> np.ndarray:
        """Which keys wait in the deferred list (not queued for lack of room)."""
        with self._cv:
            deferred = set(self._deferred)
        return np.array([key in deferred for key in keys], dtype=bool)

    def _requeue_deferred(self) -> None:
        """Move deferred keys into the queue while it has room."""
        while self._deferred and self._queue_bytes < self.cfg.queue_bytes:
            key = self._deferred.popleft()
            eid = int(self._cpu.find([key])[0])
            if eid >= 0 and not self._cpu.entry(eid).flags & (FLAG_ON_DISK | FLAG_QUEUED):
                self.enqueue(eid, key)
                if self._deferred and self._deferred[-1] is key:  # still no room after all
                    self._deferred.appendleft(self._deferred.pop())
                    break

    # ---- waiting ----------------------------------------------------------------------------------
    def wait(self, timeout: float) -> None:
        """Sleep until the writer finishes a batch (or `timeout`)."""
        with self._cv:
            self._cv.wait(timeout)

    def flush(self, timeout: float = 60.0) -> dict:
        """Wait until every queued chunk is on disk (or `timeout` passes)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while (self._queue or self._writing or self._deferred) and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"flushed": False,
                            "queued": len(self._queue) + len(self._writing) + len(self._deferred)}
                self._cv.wait(min(left, 0.1))
        return {"flushed": True, "queued": 0}

    def stats(self) -> dict:
        with self._cv:
            return {"writebehind_queue_bytes": self._queue_bytes, "writebehind_queue_chunks": len(self._queue),
                    "writebehind_deferred_chunks": len(self._deferred)}

    # ---- the writer --------------------------------------------------------------------------------
    def _take_batch(self, wait: bool = True) -> list[_Queued]:
        """Wait for queued chunks; gather at least batch_bytes (or what came within a short linger).
        Without `wait`, what is queued now (perhaps nothing)."""
        with self._cv:
            while wait and not self._queue and not self._stopping:
                self._cv.wait(0.5)
            deadline = time.monotonic() + _LINGER_S
            while wait and self._queue_bytes < self.cfg.batch_bytes and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch, size = [], 0
            while self._queue and (size < self.cfg.batch_bytes or not batch):
                item = self._queue.popleft()
                self._queue_bytes -= item.nbytes
                size += item.nbytes
                batch.append(item)
                self._writing.add(item.key)
            return batch

    def _writer_loop(self) -> None:
        """Batches from the queue to the disk tier. The checksums of one batch are computed on a helper
        thread while the batch before it is written and synced (hashing a 5.9 MB chunk takes ~0.7 ms, a
        tenth of writing it), so the device is not left waiting for them."""
        checksummer = ThreadPoolExecutor(1, thread_name_prefix="kvstore-writer-checksum")
        ahead = None  # (batch, future of its checksummed chunks), taken while the one before was written
        try:
            while not self._stopping:
                batch = self._take_batch(wait=ahead is None)
                taken = (batch, checksummer.submit(self._checksummed, batch)) if batch else None
                if ahead is not None:
                    self._write_batch(*ahead)
                ahead = taken
            if ahead is not None:  # stopping: what was taken is written, as a batch in hand always was
                self._write_batch(*ahead)
        finally:
            checksummer.shutdown()

    def _checksummed(self, batch: list[_Queued]) -> list[tuple[ChunkHeader, memoryview]]:
        """(header with the payload's checksum, payload view) of each queued (pinned) chunk."""
        chunks = []
        for item in batch:
            offset = self._cpu.entry(item.eid).offset
            header = ChunkHeader.unpack(self._cpu.view(offset, HEADER_BYTES))
            payload = self._cpu.view(offset + HEADER_BYTES, item.nbytes - HEADER_BYTES)
            chunks.append((header.with_checksum(payload), payload))
        return chunks

    def _write_batch(self, batch: list[_Queued], checksummed: Future) -> None:
        ok = True
        try:
            self._disk.append(checksummed.result())
        except (KVStoreError, OSError) as exc:
            ok = False
            log.error("write-behind of %d chunks failed: %s", len(batch), exc)
            self._counters.add("writebehind_failed", len(batch))
        with self._cpu.lock, self._cv:
            for item in batch:
                if ok:
                    self._directory.publish([item.key], Tier.DISK, self._cpu.entry(item.eid).ns_id)
                self._cpu.set_flags(item.eid, set_bits=FLAG_ON_DISK if ok else 0, clear_bits=FLAG_QUEUED)
                self._cpu.unpin(np.array([item.eid]))
                self._writing.discard(item.key)
            doomed = [item.key for item in batch if item.key in self._doomed]
            self._doomed.difference_update(doomed)
            leaving = [item.key for item in batch if item.key in self._leaving]
            self._leaving.difference_update(leaving)
            self._remove_from_arena(leaving)
            if ok:
                self._counters.add("writebehind_chunks", len(batch))
                self._counters.add("writebehind_bytes", sum(item.nbytes for item in batch))
            self._requeue_deferred()
            self._cv.notify_all()
        if doomed:
            self._disk.delete(doomed)
            self._directory.unpublish(doomed, Tier.DISK)
