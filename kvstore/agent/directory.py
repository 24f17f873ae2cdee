"""The node directory: which of this node's tiers hold each chunk, in shared memory.

Clients map it (kvstore/shm.py) and answer prefix lookups from it without a round trip; the agent keeps
it in step with its tiers here. Every change also goes to the event feed, and to a listener (the
cluster, which tells the cluster directory): called under this directory's lock, so changes reach it in
order; it must only queue work.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np

from ..shm import EMPTY, directory_value
from ..tiers.index import CuckooIndex
from ..vocab import BIT_OF_TIER, KEY_HALVES, Tier, join_keys, pack_keys
from .events import EventFeed

HoldingsListener = Callable[[list[bytes], list[int]], None]  # (keys, their tier bits now; 0: gone)


class NodeDirectory:
    """key -> namespace id and tier bits. Thread-safe."""

    def __init__(self, shm_dir: str):
        self._index = CuckooIndex(shm_dir=shm_dir, name="kvstore-directory")
        self._lock = threading.Lock()
        self.events = EventFeed()
        self._listener: HoldingsListener | None = None

    @property
    def path(self) -> str | None:
        """The shared file clients map (it moves when the table grows; readers follow)."""
        return self._index.path

    def listen(self, listener: HoldingsListener | None) -> None:
        self._listener = listener

    def values(self, keys: bytes | Sequence[bytes]) -> np.ndarray:
        """Directory values (shm.directory_value) of `keys`, EMPTY where absent."""
        with self._lock:
            return self._index.lookup(pack_keys(keys))

    def publish(self, keys: Sequence[bytes], tier: Tier, ns_id: int) -> None:
        """Record that `tier` now holds `keys` (of namespace `ns_id`)."""
        if not keys:
            return
        bit = BIT_OF_TIER[tier]
        with self._lock:
            current = self._index.lookup(pack_keys(keys))  # one vectorised read, then a set per key
            bits = (np.where(current >= 0, current & 0xFF, 0) | bit).tolist()
            for key, value in zip(keys, bits):
                self._index.set(*KEY_HALVES.unpack(key), directory_value(ns_id, value))
            self.events.append("stored", ns_id, tier, join_keys(keys))
            if self._listener is not None:
                self._listener(list(keys), bits)

    def unpublish(self, keys: Sequence[bytes], tier: Tier) -> None:
        """Record that `tier` no longer holds `keys`."""
        bit = BIT_OF_TIER[tier]
        gone, left = [], []
        by_ns: dict[int, list[bytes]] = {}
        with self._lock:
            for key in keys:
                low, high = KEY_HALVES.unpack(key)
                current = self._index.get(low, high)
                if current == EMPTY:
                    continue
                if current & 0xFF & ~bit:
                    self._index.set(low, high, current & ~bit)
                else:
                    self._index.remove(low, high)
                gone.append(key)
                left.append(current & 0xFF & ~bit)
                by_ns.setdefault(current >> 8, []).append(key)
            for ns_id, ns_keys in by_ns.items():
                self.events.append("removed", ns_id, tier, join_keys(ns_keys))
            if self._listener is not None and gone:
                self._listener(gone, left)

    def cleared(self, ns_id: int) -> None:
        """Note in the event feed that a namespace was cleared."""
        self.events.append("cleared", ns_id, Tier.NONE, b"")

    def close(self) -> None:
        with self._lock:
            self._index.close()
