"""Leases: arena pins held for a reader, each with a deadline.

A reader's lease (the `acquire` op) belongs to its connection and ends with `release`, the connection's
end, or its TTL (agent.lease_ttl_s), so a client that dies or gets stuck never holds space forever. An
operator's pin (the `pin` op) is a lease that belongs to no connection (PIN_CONN): it ends by `unpin`,
its own TTL, `clear` of its namespace, or the agent stopping; pins may hold at most
agent.max_pinned_fraction of the arena together.

Lease ids start at a random point, so an agent restarted on the same socket never hands out an id a
client or an operator still holds from before (a pin lease's id would otherwise name someone else's pin).

Locks: this room's lock guards its table only; pins are dropped in the arena (CpuTier.unpin) after it is
released.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from ..errors import NotFound
from ..tiers.cpu import CpuTier

# The owner of operator pin leases: no connection (clients get ids from 1 up, the agent's own requests
# negative ones).
PIN_CONN = 0


def random_ids() -> Iterable[int]:
    """Lease and reservation ids: consecutive from a random point below 2^40 (docs/local-protocol.md)."""
    return itertools.count(secrets.randbits(40) + 1)


@dataclass
class Lease:
    conn: int
    expiry: float  # monotonic
    eids: np.ndarray  # arena entries pinned for it
    ns_id: int = 0  # pin leases only: their namespace and the bytes they hold
    nbytes: int = 0

    @property
    def is_pin(self) -> bool:
        return self.conn == PIN_CONN and self.ns_id != 0


class Leases:
    """The live leases. Thread-safe."""

    def __init__(self, cpu: CpuTier, ttl_s: float):
        self._cpu = cpu
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._leases: dict[int, Lease] = {}
        self._ids = random_ids()

    def __len__(self) -> int:
        return len(self._leases)

    def grant(self, conn: int, eids: np.ndarray) -> int:
        """A lease of `conn` on entries the caller pinned; returns its id."""
        with self._lock:
            lid = next(self._ids)
            self._leases[lid] = Lease(conn, time.monotonic() + self.ttl_s, eids)
            return lid

    def release(self, conn: int, lid: int) -> None:
        """End lease `lid` of `conn` (a lease of another connection, or an unknown one, is left alone)."""
        with self._lock:
            lease = self._leases.get(lid)
            if lease is None or lease.conn != conn:
                return
            del self._leases[lid]
        self._cpu.unpin(lease.eids)

    def end_connection(self, conn: int) -> None:
        """A client went away: its leases end now, not at their TTL."""
        self._end(lambda lease: lease.conn == conn)

    def expire(self) -> int:
        """End every lease past its deadline; returns how many ended."""
        now = time.monotonic()
        return self._end(lambda lease: lease.expiry < now)

    def end_pins_of(self, ns_id: int) -> None:
        """End the pin leases of namespace `ns_id` (it is being cleared)."""
        self._end(lambda lease: lease.is_pin and lease.ns_id == ns_id)

    def _end(self, ends) -> int:
        with self._lock:
            ended = [lid for lid, lease in self._leases.items() if ends(lease)]
            leases = [self._leases.pop(lid) for lid in ended]
        for lease in leases:
            self._cpu.unpin(lease.eids)
        return len(leases)

    # ---- operator pins ----------------------------------------------------------------------------
    def make_pin(self, lid: int, ns_id: int, ttl: float, budget: int) -> tuple[Lease | None, int, int]:
        """Turn the PIN_CONN lease `lid` (from acquire) into a pin of namespace `ns_id` lasting `ttl`
        seconds, if it pins anything and the bytes it pins fit in `budget` beside the other pins.
        Returns (the pin, or None when it was ended instead; bytes the other pins hold; bytes it pins)."""
        with self._lock:
            held = sum(lease.nbytes for lease in self._leases.values() if lease.is_pin)
            lease = self._leases[lid]
            nbytes = int(self._cpu.slots(lease.eids)[1].sum())
            if held + nbytes <= budget and len(lease.eids):
                lease.expiry, lease.ns_id, lease.nbytes = time.monotonic() + ttl, ns_id, nbytes
                return lease, held, nbytes
        self.release(PIN_CONN, lid)
        return None, held, nbytes

    def renew_pin(self, lid: int, ns_id: int | None, ttl: float) -> Lease:
        """Extend a live pin lease (of namespace `ns_id` when given) to `ttl` seconds from now."""
        with self._lock:
            lease = self._pin(lid, ns_id)
            lease.expiry = time.monotonic() + ttl
            return lease

    def unpin(self, lid: int, ns_id: int | None) -> Lease:
        """End a pin lease now (of namespace `ns_id` when given; else it is as unknown as one that expired)."""
        with self._lock:
            lease = self._pin(lid, ns_id)
            del self._leases[lid]
        self._cpu.unpin(lease.eids)
        return lease

    def _pin(self, lid: int, ns_id: int | None) -> Lease:
        """The live pin lease `lid`, else NotFound (caller holds the lock)."""
        lease = self._leases.get(lid)
        if lease is None or not lease.is_pin or ns_id is not None and lease.ns_id != ns_id:
            raise NotFound(f"pin lease {lid} is unknown, expired or released")
        return lease

    def pinned_eids(self) -> np.ndarray:
        """Arena entries that pin leases hold."""
        with self._lock:
            held = [lease.eids for lease in self._leases.values() if lease.is_pin]
        return np.unique(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
