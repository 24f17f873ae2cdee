"""The put path: arena slots reserved for a client (`reserve`), written by it, then published (`commit`).

A reservation belongs to its connection and ends with `commit`, `abort`, the connection's end or its TTL
(agent.lease_ttl_s). Without keys it is a **credit**: the client names the key of each slot at commit,
so its next put costs one round trip. A commit checks each chunk's header against its reservation and
namespace before it indexes it; a chunk that fails is freed and reported by index, never published.

Locks: decisions over the arena (what is stored, claimed, allocated, indexed) are taken under the
arena's lock (CpuTier.lock); this room's own lock guards its table of reservations only.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np

from .. import codec
from ..codec import HEADER_BYTES, ChunkHeader
from ..config import KVStoreConfig
from ..errors import CapacityExhausted, ChunkTooLarge, GeometryMismatch, InvalidArgument, KVStoreError, NotFound
from ..tiers.cpu import CpuTier
from ..tiers.disk import DiskTier
from ..vocab import KEY_BYTES, Tier
from ..wire.messages import RESERVE_EXISTS, RESERVE_NO_SPACE, CommitReply, ReserveReply
from .counters import Counters
from .directory import NodeDirectory
from .leases import random_ids
from .namespaces import NamespaceInfo, Namespaces
from .writebehind import WriteBehind

CommitListener = Callable[[int, bytes, list[bytes]], None]  # (connection, namespace digest, keys stored)


class _Slot(NamedTuple):  # a tuple: a put of thousands of chunks makes thousands of these
    index: int  # in the request (for a credit: the slot's position)
    key: bytes | None  # None: a credit slot not named yet
    offset: int
    nbytes: int


@dataclass
class _Reservation:
    conn: int
    expiry: float  # monotonic
    ns_id: int
    slots: list[_Slot]


class Puts:
    """Reservations and commits. Thread-safe."""

    def __init__(self, cfg: KVStoreConfig, namespaces: Namespaces, cpu: CpuTier, disk: DiskTier | None,
                 directory: NodeDirectory, writebehind: WriteBehind | None, counters: Counters):
        self.cfg = cfg
        self._namespaces, self._cpu, self._disk = namespaces, cpu, disk
        self._directory, self._writebehind, self._counters = directory, writebehind, counters
        self._lock = threading.Lock()
        self._reservations: dict[int, _Reservation] = {}
        self._ids = random_ids()
        self.on_commit: CommitListener | None = None  # the cluster's replication

    def __len__(self) -> int:
        return len(self._reservations)

    def on_disk(self, keys: Sequence[bytes], digest: bytes) -> np.ndarray:
        """Which keys the disk tier holds in namespace `digest`."""
        if self._disk is None or not keys:
            return np.zeros(len(keys), dtype=bool)
        return np.asarray(self._disk.contains(keys, digest), dtype=bool)

    # ---- reserve ----------------------------------------------------------------------------------
    def reserve(self, conn: int, info: NamespaceInfo, keys: Sequence[bytes] | None, sizes: list) -> ReserveReply:
        """Arena slots for chunks of `sizes` bytes (header included). Per key: an offset, or
        RESERVE_EXISTS (already stored or being written), or RESERVE_NO_SPACE. With keys=None the slots
        are a credit, named at commit."""
        if keys is None:
            keys = [None] * len(sizes)
        if len(sizes) != len(keys) or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
            raise InvalidArgument("reserve needs one integer size per key")
        for size in sizes:
            if size <= HEADER_BYTES:
                raise InvalidArgument(f"chunk size {size} does not exceed the {HEADER_BYTES}-byte header")
            if size > self._cpu.pool.max_alloc:
                raise ChunkTooLarge(f"a {size}-byte chunk exceeds the arena's largest slot "
                                    f"({self._cpu.pool.max_alloc} bytes; raise cpu.slab_bytes)")
        offsets: list[int] = []
        slots: list[_Slot] = []
        cpu = self._cpu
        with cpu.lock:
            named = [k for k in keys if k is not None]
            stored = iter(cpu.contains(named) | self.on_disk(named, info.digest)) if named else iter(())
            for i, (key, size) in enumerate(zip(keys, sizes)):
                if key is not None and (next(stored) or cpu.claimed(key)):
                    offsets.append(RESERVE_EXISTS)
                    continue
                try:
                    offset = cpu.allocate(size)
                except CapacityExhausted:
                    offsets.append(RESERVE_NO_SPACE)
                    self._counters.add("reserve_no_space")
                    continue
                if key is not None:
                    cpu.claim(key)
                slots.append(_Slot(i, key, offset, size))
                offsets.append(offset)
        ttl = self.cfg.agent.lease_ttl_s
        with self._lock:
            rid = next(self._ids)
            if slots:
                self._reservations[rid] = _Reservation(conn, time.monotonic() + ttl, info.ns_id, slots)
        return ReserveReply(rid, offsets, ttl)

    # ---- commit -----------------------------------------------------------------------------------
    def commit(self, conn: int, rid: int, named: dict | None = None, renew: list | None = None,
               keep: bool = False) -> CommitReply:
        """Publish the chunks of a reservation. Invalid chunks are dropped and reported per index.

        For a credit, `named` maps slot index -> the key written there; unnamed slots are freed, and a
        named key that is stored by now counts as existing (its slot is freed). With `keep` the unnamed
        slots stay reserved under `rid` instead, for a later commit (a client commits the first chunks
        of a put while it still writes the others). `renew`: sizes of a new credit to reserve in the
        same round trip."""
        if named is not None and not all(isinstance(i, int) for i in named):
            raise InvalidArgument("named maps slot indexes (ints) to keys")
        slots, info = self._take(conn, rid, named, keep)
        errors: list[list] = []
        stored: list[bytes] = []
        existing = 0
        cpu = self._cpu
        with cpu.lock:
            if any(slot.key is None for slot in slots):  # a credit: the client names the keys now
                slots, existing = self._name_credit(info, slots, named or {})
            for slot in slots:
                try:
                    self._check_chunk(info, slot)
                except (KVStoreError, ValueError) as exc:
                    cpu.unclaim(slot.key)
                    cpu.release_slot(slot.offset)
                    errors.append([slot.index, exc.code if isinstance(exc, KVStoreError) else "invalid_argument",
                                   str(exc)])
                    self._counters.add("commit_rejected")
                    continue
                if cpu.insert(slot.key, slot.offset, slot.nbytes, info.ns_id):
                    stored.append(slot.key)
                else:  # in the arena already (or twice in this commit): first writer wins
                    existing += 1
                cpu.unclaim(slot.key)
            if stored:  # one directory update, event and write-behind pass for the whole batch
                self._directory.publish(stored, Tier.CPU, info.ns_id)
                if self._writebehind is not None and self.cfg.disk.admission == "always":
                    for eid, key in zip(cpu.find(stored).tolist(), stored):
                        self._writebehind.enqueue(eid, key)
        self._counters.add("chunks_stored", len(stored))
        if self.on_commit is not None and stored:
            self.on_commit(conn, info.digest, stored)
        credit = self.reserve(conn, info, None, renew) if renew else None
        return CommitReply(len(stored), existing, errors, credit)

    def _take(self, conn: int, rid: int, named: dict | None, keep: bool) -> tuple[list[_Slot], NamespaceInfo]:
        """The slots of reservation `rid` that this commit covers; the reservation ends unless `keep`
        leaves slots in it."""
        with self._lock:
            reservation = self._reservations.get(rid)
            if reservation is None or reservation.conn != conn:
                raise NotFound(f"reservation {rid} is unknown or expired")
            slots = reservation.slots
            credit = any(slot.key is None for slot in slots)
            if keep and not credit:
                raise InvalidArgument("keep applies to a credit reservation")
            if keep:
                named = named or {}
                reservation.slots = [slot for slot in slots if slot.index not in named]
                slots = [slot for slot in slots if slot.index in named]
            if not keep or not reservation.slots:
                del self._reservations[rid]
        info = self._namespaces.by_id(reservation.ns_id)
        assert info is not None
        return slots, info

    def _name_credit(self, info: NamespaceInfo, slots: list[_Slot], named: dict) -> tuple[list[_Slot], int]:
        """The credit slots the client named with a key not stored yet (now claimed), and how many named
        keys were stored meanwhile (first writer wins). Every other slot goes back to the arena (caller
        holds the arena's lock)."""
        keys = [named.get(slot.index) for slot in slots]
        valid = [isinstance(key, bytes) and len(key) == KEY_BYTES for key in keys]
        # Only the disk tier is asked here: a key the arena holds already is refused by its insert at
        # commit (counted as existing, slot freed), which saves a batch lookup per put.
        on_disk = iter(self.on_disk([key for key, ok in zip(keys, valid) if ok], info.digest))
        kept, existing = [], 0
        for slot, key, ok in zip(slots, keys, valid):
            if not ok:
                self._cpu.release_slot(slot.offset)  # unused (or unnamed) credit slot
            elif next(on_disk) or not self._cpu.claim(key):
                self._cpu.release_slot(slot.offset)
                existing += 1
            else:
                kept.append(_Slot(slot.index, key, slot.offset, slot.nbytes))
        return kept, existing

    def _check_chunk(self, info: NamespaceInfo, slot: _Slot) -> ChunkHeader:
        header = ChunkHeader.unpack(self._cpu.view(slot.offset, HEADER_BYTES))
        if header.key != slot.key:
            raise InvalidArgument("chunk header names another key than the one reserved")
        if header.namespace != info.digest:
            raise InvalidArgument("chunk header names another namespace than the request")
        if header.geometry != info.geometry:
            raise GeometryMismatch(f"chunk geometry {header.geometry} differs from the namespace's {info.geometry}")
        if header.total_len != slot.nbytes:
            raise InvalidArgument(f"chunk header says {header.total_len} bytes, {slot.nbytes} were reserved")
        expected = codec.payload_nbytes(header.geometry, header.codec, header.group)
        if expected is not None and expected != header.payload_len:
            raise InvalidArgument(f"a {header.codec} payload of this geometry is {expected} bytes, "
                                  f"not {header.payload_len}")
        return header

    # ---- ending reservations ----------------------------------------------------------------------
    def abort(self, conn: int, rid: int) -> None:
        self._end(lambda r_id, r: r_id == rid and r.conn == conn)

    def end_connection(self, conn: int) -> None:
        self._end(lambda rid, r: r.conn == conn)

    def expire(self) -> int:
        now = time.monotonic()
        return self._end(lambda rid, r: r.expiry < now)

    def _end(self, ends) -> int:
        with self._lock:
            ended = [self._reservations.pop(rid) for rid, r in list(self._reservations.items()) if ends(rid, r)]
        if ended:
            with self._cpu.lock:
                for reservation in ended:
                    for slot in reservation.slots:
                        if slot.key is not None:
                            self._cpu.unclaim(slot.key)
                        self._cpu.release_slot(slot.offset)
        return len(ended)
