"""Eviction policies for the memory tiers. They order entries; the tier decides what may go (pins).

Entries are small ints (entry ids) owned by the tier; per-entry policy state lives in numpy arrays so
a million entries cost a few bytes each, not a Python object each.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Callable

import numpy as np

Evictable = Callable[[int], bool]


class _Grow:
    """A numpy array indexed by entry id that grows by doubling."""

    def __init__(self, dtype, size: int = 1024):
        self.a = np.zeros(size, dtype=dtype)

    def ensure(self, eid: int) -> None:
        if eid >= self.a.size:
            grown = np.zeros(max(eid + 1, self.a.size * 2), dtype=self.a.dtype)
            grown[: self.a.size] = self.a
            self.a = grown


class LRUPolicy:
    """Least recently used, by a logical clock per entry.

    Victims come from a batch of the oldest entries taken with one argpartition, so choosing a victim
    costs O(n / batch) amortised instead of keeping a linked list (and a Python object) per entry.
    A batched candidate touched since the batch was taken is skipped.
    """

    name = "lru"

    def __init__(self) -> None:
        self._clock = 1
        self._atime = _Grow(np.uint64)  # 0: not tracked
        self._batch: list[tuple[int, int]] = []  # (eid, atime when batched), oldest last

    def inserted(self, eid: int, key: bytes) -> None:
        self._atime.ensure(eid)
        self._atime.a[eid] = self._clock
        self._clock += 1

    def touched(self, eids: np.ndarray) -> None:
        if len(eids):
            self._atime.a[eids] = self._clock
            self._clock += 1

    def removed(self, eid: int) -> None:
        self._atime.a[eid] = 0

    def next_victim(self, evictable: Evictable) -> int | None:
        for attempt in range(2):
            while self._batch:
                eid, stamp = self._batch.pop()
                if self._atime.a[eid] == stamp and evictable(eid):
                    return eid
            if attempt == 0:
                self._refill(evictable)
        return None

    def _refill(self, evictable: Evictable) -> None:
        """Batch the oldest evictable entries; widen the window while all of it is unevictable."""
        live = np.flatnonzero(self._atime.a)
        if live.size == 0:
            return
        stamps = self._atime.a[live]
        k = min(live.size, max(64, live.size // 64))
        while True:
            oldest = np.argpartition(stamps, k - 1)[:k] if k < live.size else np.arange(live.size)
            oldest = oldest[np.argsort(stamps[oldest])[::-1]]  # newest first, so pop() yields the oldest
            self._batch = [(int(live[i]), int(stamps[i])) for i in oldest if evictable(int(live[i]))]
            if self._batch or k == live.size:
                return
            k = min(live.size, k * 4)


class S3FIFOPolicy:
    """S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO and a ghost FIFO of keys.

    New entries enter the small queue (or main, if their key is in the ghost); an entry leaving small
    moves to main if it was hit meanwhile, else it is evicted and its key remembered in the ghost. Main
    is a FIFO with reinsertion while the entry's hit counter (max 3) is positive.
    """

    name = "s3fifo"
    SMALL_SHARE = 0.1

    def __init__(self) -> None:
        self._freq = _Grow(np.uint8)
        self._gen = _Grow(np.uint32)  # queue items carry the generation so a reused id is not confused
        self._where = _Grow(np.uint8)  # 0 none, 1 small, 2 main
        self._small: deque[tuple[int, int]] = deque()
        self._main: deque[tuple[int, int]] = deque()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._keys: dict[int, bytes] = {}
        self._n_small = 0
        self._n_main = 0

    def inserted(self, eid: int, key: bytes) -> None:
        for arr in (self._freq, self._gen, self._where):
            arr.ensure(eid)
        self._gen.a[eid] += 1
        self._freq.a[eid] = 0
        self._keys[eid] = key
        if self._ghost.pop(key, False) is None:
            self._push(eid, 2)
        else:
            self._push(eid, 1)

    def _push(self, eid: int, where: int) -> None:
        self._where.a[eid] = where
        item = (eid, int(self._gen.a[eid]))
        if where == 1:
            self._small.append(item)
            self._n_small += 1
        else:
            self._main.append(item)
            self._n_main += 1

    def touched(self, eids: np.ndarray) -> None:
        if len(eids):
            self._freq.a[eids] = np.minimum(self._freq.a[eids] + 1, 3)

    def removed(self, eid: int) -> None:
        where = self._where.a[eid]
        if where == 1:
            self._n_small -= 1
        elif where == 2:
            self._n_main -= 1
        self._where.a[eid] = 0
        self._keys.pop(eid, None)

    def _pop(self, queue: deque, where: int) -> int | None:
        """Next live entry of `queue` (dropping stale items), taken out of the queue."""
        while queue:
            eid, gen = queue.popleft()
            if self._where.a[eid] == where and self._gen.a[eid] == gen:
                self._where.a[eid] = 0
                if where == 1:
                    self._n_small -= 1
                else:
                    self._n_main -= 1
                return eid
        return None

    def next_victim(self, evictable: Evictable) -> int | None:
        # Each live entry is looked at a bounded number of times: a hit counter (max 3) is spent once per
        # look in main, plus one look in small. Unevictable (pinned) entries go back to the tail of their
        # own queue; once a whole queue has been seen unevictable, the other queue is tried.
        budget = 5 * (self._n_small + self._n_main) + 8
        stuck = {1: 0, 2: 0}  # consecutive unevictable looks per queue
        while budget > 0:
            budget -= 1
            small_ok = self._n_small > 0 and stuck[1] < self._n_small
            main_ok = self._n_main > 0 and stuck[2] < self._n_main
            if not small_ok and not main_ok:
                return None
            total = self._n_small + self._n_main
            from_small = small_ok and (self._n_small >= self.SMALL_SHARE * total or not main_ok)
            where = 1 if from_small else 2
            eid = self._pop(self._small if from_small else self._main, where)
            if eid is None:
                continue
            if not evictable(eid):
                self._push(eid, where)
                stuck[where] += 1
                continue
            stuck[where] = 0
            if self._freq.a[eid] > 0:
                if from_small:
                    self._freq.a[eid] = 0
                else:
                    self._freq.a[eid] -= 1
                self._push(eid, 2)
                continue
            if from_small:
                self._ghost[self._keys[eid]] = None
                while len(self._ghost) > max(self._n_main, 16):
                    self._ghost.popitem(last=False)
            return eid  # already out of its queue; removed() will find it in none
        return None


def make_policy(name: str):
    if name == "lru":
        return LRUPolicy()
    if name == "s3fifo":
        return S3FIFOPolicy()
    raise ValueError(f"unknown eviction policy {name!r}; known: lru, s3fifo")
