"""The cluster directory: chunk key -> holders (node id, tier bits), partitioned over the agents.

Each agent keeps the shard of keys it owns by rendezvous hashing (placement.py) over the current
members. Holders report their own changes in batches (`apply`): the tier bits a node now has for a
key, 0 when it no longer holds it. The shard is advice, like the node directory: a holder may have
evicted a chunk since, and every pull re-checks and verifies what it gets.

Invariants: a key's entry maps each holder to non-zero tier bits (a holder with 0 bits is deleted, an
entry with no holder is deleted); the entries of a node that left are dropped when it leaves.
"""

from __future__ import annotations

import threading
from typing import Iterable, Sequence

import numpy as np

from .placement import owners

Holders = dict[str, int]  # node id -> tier bits (vocab.TierBits)


def by_owner(blob: bytes, members: list[str]):
    """(owner node, indexes of its keys) for every directory owner of the 16-byte keys in `blob`."""
    if not blob:
        return
    owner = owners(blob, members)
    for m, node in enumerate(members):
        picked = np.flatnonzero(owner == m)
        if picked.size:
            yield node, picked


class DirectoryShard:
    """The part of the cluster directory one agent owns. Thread-safe."""

    def __init__(self):
        self._entries: dict[bytes, Holders] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def apply(self, node: str, keys: Sequence[bytes], bits: Sequence[int]) -> None:
        """Record that `node` now holds each key in tiers `bits` (0: not any more)."""
        with self._lock:
            entries = self._entries
            for key, value in zip(keys, bits):
                if value:
                    entries.setdefault(key, {})[node] = value
                else:
                    holders = entries.get(key)
                    if holders is not None:
                        holders.pop(node, None)
                        if not holders:
                            del entries[key]

    def lookup(self, keys: Iterable[bytes]) -> list[Holders | None]:
        """The holders of each key (None where nobody is known to hold it)."""
        with self._lock:
            get = self._entries.get
            return [dict(h) if (h := get(key)) else None for key in keys]

    def drop_node(self, node: str) -> int:
        """Forget every entry of a node that left; returns how many keys lost a holder."""
        dropped = 0
        with self._lock:
            for key in [k for k, h in self._entries.items() if node in h]:
                holders = self._entries[key]
                del holders[node]
                dropped += 1
                if not holders:
                    del self._entries[key]
        return dropped

    def keep_owned(self, me: str, members: Sequence[str]) -> int:
        """Drop the keys another member owns now (membership changed); returns how many."""
        with self._lock:
            if not self._entries or not members:
                return 0
            keys = list(self._entries)
            owner = owners(b"".join(keys), members)
            mine = members.index(me) if me in members else -1
            moved = np.flatnonzero(owner != mine).tolist()
            for i in moved:
                del self._entries[keys[i]]
            return len(moved)
