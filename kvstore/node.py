"""The node agent: one process per node that owns the node's tiers and serves local clients.

`NodeStore` is the policy layer over the tiers (the tiers themselves only put/get/contains/evict):
namespaces and their geometry, reservations and leases (pins with a TTL, scoped to a connection, or
to none for an operator's pin), moves between tiers on request, write-behind from the CPU arena to disk through a bounded queue, promotion from disk on a hit, and an
optional admission filter. `AgentServer` speaks the local protocol (docs/local-protocol.md) over a Unix
socket, one thread per connection; data never crosses the socket, only arena offsets.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import codec
from .codec import HEADER_BYTES, ChunkHeader
from .config import KVStoreConfig, resolve_auto
from .errors import (AgentUnavailable, CapacityExhausted, ChunkTooLarge, CorruptChunk, GeometryMismatch,
                     InvalidArgument, KVStoreError, NotFound, ProtocolError)
from .layout import Geometry
from .protocol import (NO_REPLY, PROTOCOL_VERSION, ConnectionClosed, ConnectionServer, FrameReader, error_reply,
                       pack, split_keys)
from .recorder import RequestRecorder
from .tiers.cpu import CpuTier
from .tiers.disk import DiskTier
from .tiers.index import MAX_VALUE, CuckooIndex
from .tiers.memory import FLAG_ON_DISK, FLAG_QUEUED, KEY_HALVES, pack_keys

log = logging.getLogger("kvstore.agent")

# Tier codes on the wire (docs/local-protocol.md).
TIER_NONE, TIER_GPU, TIER_CPU, TIER_DISK, TIER_REMOTE = 0, 1, 2, 3, 4
TIER_NAMES = {TIER_GPU: "gpu", TIER_CPU: "cpu", TIER_DISK: "disk", TIER_REMOTE: "remote"}

# Tier bits in the shared directory's values: value = namespace id << 8 | tier bits.
DIR_BITS = {TIER_GPU: 1, TIER_CPU: 2, TIER_DISK: 4}
MAX_NAMESPACE_ID = MAX_VALUE >> 8  # a directory value is ns_id << 8 | tier bits

# Reserve status codes (instead of an offset).
RESERVE_EXISTS = -1  # already stored (or being written by someone else): nothing to write
RESERVE_NO_SPACE = -2  # nothing evictable: everything is pinned, reserved or queued

# The owner of operator pin leases (the `pin` op): no connection (clients get ids from 1 up), so a pin
# outlives the request that made it and ends by `unpin`, its TTL or `clear` of its namespace.
PIN_CONN = 0

EVENT_BUFFER = 4096  # events the agent keeps for watchers (`events` op); older ones are dropped


def _placeholder(description: dict) -> bool:
    """A description the agent made up for a namespace it knows only from its disk or from chunks
    received, not from an engine's registration."""
    return not description or "recovered" in description or "imported" in description


@dataclass
class _NamespaceInfo:
    ns_id: int
    digest: bytes
    geometry: Geometry
    description: dict


@dataclass
class _Reservation:
    conn: int
    expiry: float
    ns_id: int
    items: list[tuple[int, bytes, int, int]]  # (index in request, key, offset, nbytes)


@dataclass
class _Lease:
    conn: int
    expiry: float
    eids: np.ndarray
    ns_id: int = 0  # pin leases (conn PIN_CONN) only: their namespace and the bytes they hold
    nbytes: int = 0


@dataclass
class _Counters:
    values: Counter = field(default_factory=Counter)

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] += n


class NodeStore:
    """All of a node's tiers behind one lock; every public method is one batched request."""

    def __init__(self, cfg: KVStoreConfig):
        self.cfg = cfg = resolve_auto(cfg)
        self.counters = _Counters()
        # Hooks for the cluster layer (kvstore/cluster): called with the keys whose tier bits changed
        # and their new bits (0: gone), under the store's lock, so they must only queue work; and with
        # (conn, namespace digest, keys) after a commit stored new chunks.
        self.on_holdings_change: Callable[[list[bytes], list[int]], None] | None = None
        self.on_commit: Callable[[int, bytes, list[bytes]], None] | None = None
        self.cpu = CpuTier(cfg.cpu, cfg.cpu.arena_bytes, on_evict=self._cpu_evicted)
        self.lock = self.cpu.lock  # one lock for the store's metadata and the arena index
        # The node directory: which tiers hold each chunk, in shared memory, so clients look up
        # prefixes without a round trip (advice: reads are always verified).
        self.directory = CuckooIndex(shm_dir=cfg.cpu.shm_dir, name="kvstore-directory")
        self.disk = DiskTier(cfg.disk, on_evict=self._disk_evicted) if cfg.disk.enabled else None
        self._namespaces: dict[bytes, _NamespaceInfo] = {}
        self._ns_by_id: list[_NamespaceInfo | None] = [None]  # id 0 = unknown (e.g. recovered, not registered)
        self._reservations: dict[int, _Reservation] = {}
        self._leases: dict[int, _Lease] = {}
        # Lease and reservation ids start at a random point, so that an agent restarted on the same socket
        # never hands out an id a client or an operator still holds from before (a pin lease token would
        # otherwise name someone else's new pin).
        self._ids = itertools.count(secrets.randbits(40) + 1)
        self._inflight: set[bytes] = set()  # keys reserved but not committed
        self._queue: deque[tuple[int, bytes]] = deque()  # write-behind (eid, key), entries pinned
        self._queue_bytes = 0
        self._deferred: deque[bytes] = deque()  # committed while the queue was full: queued as it drains
        self._writing: set[bytes] = set()
        self._doomed: set[bytes] = set()  # deleted from disk while being written: delete again once written
        self._leaving: set[bytes] = set()  # evicted from the arena while being written: remove once written
        self._queue_cv = threading.Condition(self.lock)
        # The event feed: (seq, unix time, kind, namespace id, tier, keys), appended where the directory
        # changes; a watcher polls with the last seq it saw and learns how many it missed.
        self._events: deque[tuple[int, float, str, int, int, list[bytes]]] = deque(maxlen=EVENT_BUFFER)
        self._event_seq = 0
        self._stopping = False
        self._threads = [threading.Thread(target=self._sweep_loop, name="kvstore-sweeper", daemon=True)]
        if self.disk is not None:
            self._recover_namespaces()
            self._threads.append(threading.Thread(target=self._writer_loop, name="kvstore-writer", daemon=True))
        for thread in self._threads:
            thread.start()

    # ---- namespaces ------------------------------------------------------------------------------
    def register(self, digest: bytes, geometry: Geometry, description: dict | None = None) -> int:
        """Declare a namespace and its chunk geometry; the first registration fixes the geometry."""
        if not isinstance(digest, bytes) or len(digest) != 16:
            raise InvalidArgument("namespace digest must be 16 bytes")
        with self.lock:
            info = self._namespaces.get(digest)
            if info is None:
                if len(self._ns_by_id) > MAX_NAMESPACE_ID:
                    raise CapacityExhausted(f"this agent already holds {MAX_NAMESPACE_ID} namespaces, the most "
                                            f"its directory can name; restart it to start afresh")
                info = _NamespaceInfo(len(self._ns_by_id), digest, geometry, dict(description or {}))
                self._namespaces[digest] = info
                self._ns_by_id.append(info)
            elif info.geometry != geometry:
                raise GeometryMismatch(f"namespace {digest.hex()} holds chunks of {info.geometry}, "
                                       f"not {geometry}")
            elif description and _placeholder(info.description) and not _placeholder(description):
                info.description = dict(description)  # what an engine registered beats "recovered"/"imported"
            return info.ns_id

    def _namespace(self, digest: Any) -> _NamespaceInfo:
        info = self._namespaces.get(digest) if isinstance(digest, bytes) else None
        if info is None:
            raise NotFound(f"namespace {digest.hex() if isinstance(digest, bytes) else digest!r} is not "
                           f"registered on this agent (call register first)")
        return info

    def _recover_namespaces(self) -> None:
        """Re-register namespaces found in the disk tier's headers (geometry comes from the header)."""
        assert self.disk is not None
        for key, ns, _ in self.disk.entries():
            if ns not in self._namespaces:
                try:
                    record = bytearray(self.disk.record_nbytes(key) or 0)
                    header = self.disk.read_into(key, memoryview(record))
                except (NotFound, CorruptChunk):
                    continue
                self.register(ns, header.geometry, {"recovered": True})
        with self.lock:
            for key, ns, _ in self.disk.entries():
                info = self._namespaces.get(ns)
                if info is not None:
                    self._publish([key], TIER_DISK, info.ns_id)

    # ---- the shared directory --------------------------------------------------------------------
    def _publish(self, keys, tier: int, ns_id: int) -> None:
        """Record that `tier` holds `keys` (caller holds the lock)."""
        if not keys:
            return
        current = self.directory.lookup(pack_keys(keys))  # one vectorised read, then a set per key
        changed = (np.where(current >= 0, current & 0xFF, 0) | DIR_BITS[tier]).tolist()
        for key, bits in zip(keys, changed):
            low, high = KEY_HALVES.unpack(key)
            self.directory.set(low, high, ns_id << 8 | bits)
        self._event("stored", ns_id, tier, keys)
        if self.on_holdings_change is not None and changed:
            self.on_holdings_change(list(keys), changed)

    def _unpublish(self, keys, tier: int) -> None:
        """Record that `tier` no longer holds `keys` (caller holds the lock)."""
        bit = DIR_BITS[tier]
        gone, left = [], []
        by_ns: dict[int, list[bytes]] = {}
        for key in keys:
            low, high = KEY_HALVES.unpack(key)
            current = self.directory.get(low, high)
            if current < 0:
                continue
            if current & 0xFF & ~bit:
                self.directory.set(low, high, current & ~bit)
            else:
                self.directory.remove(low, high)
            gone.append(key)
            left.append(current & 0xFF & ~bit)
            by_ns.setdefault(current >> 8, []).append(key)
        for ns_id, ns_keys in by_ns.items():
            self._event("removed", ns_id, tier, ns_keys)
        if self.on_holdings_change is not None and gone:
            self.on_holdings_change(gone, left)

    def _event(self, kind: str, ns_id: int, tier: int, keys) -> None:
        """Append to the event feed (caller holds the lock); the keys are kept as one blob, as sent."""
        if keys or kind == "cleared":
            self._event_seq += 1
            self._events.append((self._event_seq, time.time(), kind, ns_id, tier, b"".join(keys)))

    def events(self, since: int, limit: int = 1000) -> dict:
        """Events after seq `since` (at most `limit`); `next` is the seq to ask from next time and
        `dropped` how many after `since` are no longer buffered."""
        with self.lock:
            first = self._events[0][0] if self._events else self._event_seq + 1
            dropped = max(0, first - since - 1)
            out = []
            skip = max(0, since + 1 - first)  # sequence numbers in the ring are consecutive
            for seq, at, kind, ns_id, tier, keys in itertools.islice(self._events, skip, skip + limit):
                info = self._ns_by_id[ns_id] if 0 < ns_id < len(self._ns_by_id) else None
                out.append({"seq": seq, "time": at, "kind": kind, "ns": info.digest if info else b"",
                            "tier": tier, "keys": keys})
            return {"events": out, "next": out[-1]["seq"] if out else max(since, self._event_seq),
                    "dropped": dropped, "last": self._event_seq}

    def chunks(self, digest: bytes | None, tier: int, start: int, limit: int, pinned: bool = False) -> dict:
        """One page of the chunks held in registered namespaces, sorted by key: [key, namespace digest,
        tier bits] from position `start`, at most `limit`, filtered by namespace, tier (0: any) and,
        with `pinned`, to the chunks pin leases hold."""
        keys, values = self._held()
        with self.lock:
            pins = self._pinned_keys() if pinned else None
            rows = []
            for key, value in sorted(zip(keys, values.tolist())):
                if tier and not value & DIR_BITS.get(tier, 0):
                    continue
                if pins is not None and key not in pins:
                    continue
                info = self._ns_by_id[value >> 8] if 0 < value >> 8 < len(self._ns_by_id) else None
                if info is None or (digest is not None and info.digest != digest):
                    continue
                rows.append([key, info.digest, value & 0xFF])
        page = rows[start:start + limit]
        return {"chunks": page, "next": start + len(page) if start + len(page) < len(rows) else 0}

    def _cpu_removed(self, keys: list[bytes]) -> None:
        """After cpu.remove(keys): unpublish the ones that really left the arena (caller holds the lock)."""
        still = self.cpu.contains(keys) if keys else []
        self._unpublish([k for k, s in zip(keys, still) if not s], TIER_CPU)

    # ---- lookup ----------------------------------------------------------------------------------
    def _disk_has(self, keys: list[bytes], ns: bytes) -> np.ndarray:
        if self.disk is None or not keys:
            return np.zeros(len(keys), dtype=bool)
        return np.asarray(self.disk.contains(keys, ns), dtype=bool)

    def _tiers(self, info: _NamespaceInfo, blob: bytes) -> np.ndarray:
        """Tier code of every key in a blob of 16-byte keys (0 = not stored in this namespace)."""
        packed = pack_keys(blob)
        with self.lock:
            eids = self.cpu.find_packed(packed)
            hit = eids >= 0
            wrong_ns = hit & (self.cpu.namespace_ids(eids) != info.ns_id)
            if wrong_ns.any():  # same key under another namespace: a miss with a reason, never its data
                self.counters.add("miss_namespace", int(wrong_ns.sum()))
                hit &= ~wrong_ns
            tiers = np.where(hit, TIER_CPU, TIER_NONE).astype(np.uint8)
            if self.disk is not None and not hit.all():
                rest = np.flatnonzero(~hit)
                on_disk = self._disk_has([blob[16 * i:16 * i + 16] for i in rest.tolist()], info.digest)
                tiers[rest[on_disk]] = TIER_DISK
        return tiers

    def lookup(self, digest: bytes, blob: bytes) -> dict:
        """Longest contiguous run of stored chunks from the first key, with each chunk's tier."""
        tiers = self._tiers(self._namespace(digest), blob)
        misses = np.flatnonzero(tiers == TIER_NONE)
        matched = int(misses[0]) if misses.size else len(tiers)
        self.counters.add("lookups")
        self.counters.add("lookup_hit_chunks", matched)
        self.counters.add("lookup_miss_chunks", len(tiers) - matched)
        return {"matched": matched, "tiers": tiers[:matched].tobytes()}

    def contains(self, digest: bytes, blob: bytes) -> bytes:
        """Per-key tier code (0 = absent), not only the prefix."""
        return self._tiers(self._namespace(digest), blob).tobytes()

    # ---- put: reserve, (client writes), commit ---------------------------------------------------
    def reserve(self, conn: int, digest: bytes, keys: list[bytes] | None, sizes: list[int]) -> dict:
        """Arena slots for chunks of `sizes` bytes (header included). Per key: an offset, or
        RESERVE_EXISTS (already stored or in flight), or RESERVE_NO_SPACE. With keys=None the slots are
        a credit: the keys are named at commit (so a client's next put costs one round trip)."""
        info = self._namespace(digest)
        if keys is None:
            keys = [None] * len(sizes)
        if len(sizes) != len(keys) or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
            raise InvalidArgument("reserve needs one integer size per key")
        for size in sizes:
            if size <= HEADER_BYTES:
                raise InvalidArgument(f"chunk size {size} does not exceed the {HEADER_BYTES}-byte header")
            if size > self.cpu.pool.max_alloc:
                raise ChunkTooLarge(f"a {size}-byte chunk exceeds the arena's largest slot "
                                    f"({self.cpu.pool.max_alloc} bytes; raise cpu.slab_bytes)")
        offsets: list[int] = []
        items = []
        with self.lock:
            named = [k for k in keys if k is not None]
            present = iter(self.cpu.contains(named) | self._disk_has(named, digest)) if named else iter(())
            for i, (key, size) in enumerate(zip(keys, sizes)):
                if key is not None and (next(present) or key in self._inflight):
                    offsets.append(RESERVE_EXISTS)
                    continue
                try:
                    offset = self.cpu.allocate(size)
                except CapacityExhausted:
                    offsets.append(RESERVE_NO_SPACE)
                    self.counters.add("reserve_no_space")
                    continue
                if key is not None:
                    self._inflight.add(key)
                items.append((i, key, offset, size))
                offsets.append(offset)
            rid = next(self._ids)
            if items:
                self._reservations[rid] = _Reservation(conn, time.monotonic() + self.cfg.agent.lease_ttl_s,
                                                       info.ns_id, items)
        return {"rid": rid, "offsets": offsets, "ttl": self.cfg.agent.lease_ttl_s}

    def _check_chunk(self, info: _NamespaceInfo, key: bytes, offset: int, nbytes: int) -> ChunkHeader:
        header = ChunkHeader.unpack(self.cpu.view(offset, HEADER_BYTES))
        if header.key != key:
            raise InvalidArgument("chunk header names another key than the one reserved")
        if header.namespace != info.digest:
            raise InvalidArgument("chunk header names another namespace than the request")
        if header.geometry != info.geometry:
            raise GeometryMismatch(f"chunk geometry {header.geometry} differs from the namespace's "
                                   f"{info.geometry}")
        if header.total_len != nbytes:
            raise InvalidArgument(f"chunk header says {header.total_len} bytes, {nbytes} were reserved")
        expected = codec.payload_nbytes(header.geometry, header.codec, header.group)
        if expected is not None and expected != header.payload_len:
            raise InvalidArgument(f"a {header.codec} payload of this geometry is {expected} bytes, "
                                  f"not {header.payload_len}")
        return header

    def commit(self, conn: int, rid: int, named: dict[int, bytes] | None = None,
               renew: list[int] | None = None, keep: bool = False) -> dict:
        """Publish the chunks of a reservation. Invalid chunks are dropped and reported per index.

        For a credit (keyless) reservation, `named` maps slot index -> the key written there; unnamed
        slots are freed, and a named key that is stored by now counts as existing (its slot is freed).
        With `keep` the unnamed slots stay reserved under `rid` instead, for a later commit (a client
        commits the first chunks of a put while it still writes the others).
        `renew`: sizes of a new credit to reserve in the same round trip."""
        errors: list[list] = []
        existing = 0
        stored_keys: list[bytes] = []
        with self.lock:
            reservation = self._reservations.get(rid)
            if reservation is None or reservation.conn != conn:
                raise NotFound(f"reservation {rid} is unknown or expired")
            info = self._ns_by_id[reservation.ns_id]
            assert info is not None
            items = reservation.items
            credit = any(key is None for _, key, _, _ in items)
            if keep and not credit:
                raise InvalidArgument("keep applies to a credit reservation")
            if keep:
                named = named or {}
                reservation.items = [item for item in items if item[0] not in named]
                items = [item for item in items if item[0] in named]
            if not keep or not reservation.items:
                del self._reservations[rid]
            if credit:  # the client names the keys now
                items, existing = self._name_credit(info, items, named or {})
            for index, key, offset, nbytes in items:
                self._inflight.discard(key)
                try:
                    self._check_chunk(info, key, offset, nbytes)
                except (KVStoreError, ValueError) as exc:
                    code = exc.code if isinstance(exc, KVStoreError) else "invalid_argument"
                    errors.append([index, code, str(exc)])
                    self.cpu.release_slot(offset)
                    self.counters.add("commit_rejected")
                    continue
                if self.cpu.insert(key, offset, nbytes, info.ns_id):
                    stored_keys.append(key)
                else:  # in the arena already (or twice in this commit): first writer wins
                    existing += 1
            if stored_keys:  # one directory update, event and write-behind pass for the whole batch
                self._publish(stored_keys, TIER_CPU, info.ns_id)
                if self.disk is not None and self.cfg.disk.admission == "always":
                    for eid, key in zip(self.cpu.find(stored_keys).tolist(), stored_keys):
                        self._enqueue(eid, key)
            self.counters.add("chunks_stored", len(stored_keys))
        if self.on_commit is not None and stored_keys:
            self.on_commit(conn, info.digest, stored_keys)
        result = {"stored": len(stored_keys), "existing": existing, "errors": errors}
        if renew:
            credit = self.reserve(conn, info.digest, None, renew)
            result["next"] = {"rid": credit["rid"], "offsets": credit["offsets"], "ttl": credit["ttl"]}
        return result

    def _name_credit(self, info: _NamespaceInfo, items: list, named: dict) -> tuple[list, int]:
        """The (index, key, offset, nbytes) items of a credit reservation whose slots the client named
        with a key not stored yet, and how many named keys were stored meanwhile (first writer wins).
        Every other slot goes back to the arena (caller holds the lock)."""
        keys = [named.get(index) for index, _, _, _ in items]
        valid = [isinstance(key, bytes) and len(key) == 16 for key in keys]
        candidates = [key for key, ok in zip(keys, valid) if ok]
        # Only the disk tier is asked here: a key the arena holds already is refused by its insert
        # at commit (counted as existing, slot freed), which saves a batch lookup per put.
        stored = iter(self._disk_has(candidates, info.digest) if candidates else ())
        kept, existing = [], 0
        for (index, _, offset, nbytes), key, ok in zip(items, keys, valid):
            if not ok:
                self.cpu.release_slot(offset)  # unused (or unnamed) credit slot
            elif next(stored) or key in self._inflight:
                self.cpu.release_slot(offset)
                existing += 1
            else:
                kept.append((index, key, offset, nbytes))
        return kept, existing

    def abort(self, conn: int, rid: int) -> None:
        with self.lock:
            reservation = self._reservations.get(rid)
            if reservation is not None and reservation.conn == conn:
                self._drop_reservation(rid)

    def _drop_reservation(self, rid: int) -> None:
        reservation = self._reservations.pop(rid)
        for _, key, offset, _ in reservation.items:
            self._inflight.discard(key)
            self.cpu.release_slot(offset)

    # ---- get: acquire (pins, promotes from disk), (client reads), release --------------------------
    def acquire(self, conn: int, digest: bytes, keys: list[bytes], prefix: bool = True) -> dict:
        """Pin the stored chunks among `keys` in the arena (bringing disk hits up first) and return
        their slots. With `prefix`, stop at the first miss. Misses carry a reason."""
        info = self._namespace(digest)
        n = len(keys)
        offsets = [-1] * n
        sizes = [0] * n
        reasons: dict[int, str] = {}
        promote: list[tuple[int, bytes, int, int]] = []  # (index, key, offset, nbytes)
        with self.lock:
            eids = self.cpu.find(keys)
            found = eids >= 0
            wrong_ns = found & (self.cpu.namespace_ids(eids) != info.ns_id)
            for i in np.flatnonzero(wrong_ns).tolist():
                reasons[i] = "namespace"  # the same key under another namespace: never served
            eids[wrong_ns] = -1
            found = np.flatnonzero(eids >= 0)
            self.cpu.pin(eids[found])  # before promotions below allocate (and may evict) arena space
            limit = n
            for i in np.flatnonzero(eids < 0).tolist():  # misses only: try the disk tier, in order
                if i not in reasons and keys[i] not in self._inflight and self.disk is not None \
                        and self._disk_has([keys[i]], digest)[0]:
                    size = self.disk.record_nbytes(keys[i])
                    if size is not None:
                        try:
                            offset = self.cpu.allocate(size)
                        except (CapacityExhausted, ChunkTooLarge):
                            reasons[i] = "no_space"
                        else:
                            self._inflight.add(keys[i])
                            promote.append((i, keys[i], offset, size))
                            continue
                reasons.setdefault(i, "not_found")
                if prefix:
                    limit = i
                    break
            hits = found[found < limit]
            self.cpu.unpin(eids[found[found >= limit]])  # beyond the first miss of a prefix
            hit_eids = eids[hits]
            self._used(hit_eids, [keys[i] for i in hits.tolist()])
            hit_off, hit_len, _ = self.cpu.slots(hit_eids)
            for i, off, size in zip(hits.tolist(), hit_off.tolist(), hit_len.tolist()):
                offsets[i], sizes[i] = off, size
        pinned = [hit_eids]
        if promote:
            pinned.append(self._promote(info, promote, offsets, sizes, reasons))
        if prefix:  # a failed promotion shortens the prefix: unpin what lies beyond it
            first_miss = min(reasons) if reasons else n
            beyond = [i for i in range(first_miss, n) if offsets[i] >= 0]
            if beyond:
                drop = self.cpu.find([keys[i] for i in beyond])
                self.cpu.unpin(drop)
                for i in beyond:
                    offsets[i], sizes[i] = -1, 0
                pinned = [np.setdiff1d(np.concatenate(pinned), drop)]
        all_pinned = np.concatenate(pinned) if pinned else np.empty(0, dtype=np.int64)
        lid = next(self._ids)
        with self.lock:
            self._leases[lid] = _Lease(conn, time.monotonic() + self.cfg.agent.lease_ttl_s, all_pinned)
        self.counters.add("get_hit_chunks", sum(1 for o in offsets if o >= 0))
        for reason in reasons.values():
            self.counters.add(f"miss_{reason}")
        return {"lid": lid, "offsets": offsets, "sizes": sizes, "ttl": self.cfg.agent.lease_ttl_s,
                "reasons": {i: r for i, r in reasons.items()},
                "promoted": [i for i, _, _, _ in promote if offsets[i] >= 0]}

    def touch(self, digest: bytes, keys: list[bytes]) -> int:
        """Count chunks a client copied out of the arena without a pin (get's fast path: the slot's
        serial proved the copy whole) as hits, and mark them used. Returns how many are still here."""
        info = self._namespace(digest)
        with self.lock:
            eids = self.cpu.find(keys)
            held = np.flatnonzero((eids >= 0) & (self.cpu.namespace_ids(eids) == info.ns_id))
            self._used(eids[held], [keys[i] for i in held.tolist()])
        self.counters.add("get_hit_chunks", len(held))
        return len(held)

    def _used(self, eids: np.ndarray, keys: list[bytes]) -> None:
        """Chunks just read from the arena: later to be evicted, and with admission `second_use` now
        due on disk (caller holds the lock)."""
        self.cpu.touch(eids)
        if self.cfg.disk.admission == "second_use" and self.disk is not None:
            for eid, key in zip(eids.tolist(), keys):
                if not self.cpu.entry(eid)[4] & (FLAG_ON_DISK | FLAG_QUEUED):
                    self._enqueue(eid, key)

    def _promote(self, info: _NamespaceInfo, items, offsets, sizes, reasons) -> np.ndarray:
        """Read disk hits straight into their arena slots (outside the lock), then index and pin them."""
        assert self.disk is not None
        self.disk.prefetch([key for _, key, _, _ in items])
        results = self.disk.read_many([(key, self.cpu.view(offset, nbytes)) for _, key, offset, nbytes in items])
        done: list[tuple[int, bytes, int, int, bool]] = []
        for (index, key, offset, nbytes), result in zip(items, results):
            ok = isinstance(result, ChunkHeader) and result.namespace == info.digest
            if isinstance(result, CorruptChunk):  # the disk tier has dropped it
                reasons[index] = "checksum"
                with self.lock:
                    self._unpublish([key], TIER_DISK)
            elif isinstance(result, NotFound):  # evicted from disk since the plan was made
                reasons[index] = "evicted"
            elif isinstance(result, KVStoreError):
                raise result
            elif not ok:
                reasons[index] = "namespace"
            done.append((index, key, offset, nbytes, ok))
        pinned = []
        with self.lock:
            for index, key, offset, nbytes, ok in done:
                self._inflight.discard(key)
                if not ok:
                    self.cpu.release_slot(offset)
                    continue
                if self.cpu.insert(key, offset, nbytes, info.ns_id, FLAG_ON_DISK):
                    self._publish([key], TIER_CPU, info.ns_id)
                # else someone promoted it meanwhile: our slot was freed, use theirs
                eid = int(self.cpu.find([key])[0])
                _, offsets[index], sizes[index], _, _ = self.cpu.entry(eid)
                pinned.append(eid)
            eids = np.asarray(pinned, dtype=np.int64)
            self.cpu.pin(eids)
            self.counters.add("promoted_chunks", len(pinned))
            self.counters.add("promoted_bytes", sum(nbytes for _, _, _, nbytes, ok in done if ok))
        return eids

    def release(self, conn: int, lid: int) -> None:
        with self.lock:
            lease = self._leases.get(lid)
            if lease is not None and lease.conn == conn:
                del self._leases[lid]
                self.cpu.unpin(lease.eids)

    def disconnect(self, conn: int) -> None:
        """A client went away: its leases and reservations end now, not at their TTL."""
        with self.lock:
            for lid in [lid for lid, lease in self._leases.items() if lease.conn == conn]:
                self.cpu.unpin(self._leases.pop(lid).eids)
            for rid in [rid for rid, r in self._reservations.items() if r.conn == conn]:
                self._drop_reservation(rid)

    def _sweep_loop(self) -> None:
        """Reclaim expired leases and reservations (a stuck client cannot hold space forever), and
        every few seconds of activity give freed heap back to the OS (glibc keeps request garbage)."""
        trim = _malloc_trim()
        last_trim, served_at_trim, served_before = time.monotonic(), 0, 0
        while not self._stopping:
            time.sleep(0.5)
            now = time.monotonic()
            served = sum(self.counters.values.values())
            quiet = served == served_before  # nothing served for the last half second
            if trim is not None and served != served_at_trim and (quiet or now - last_trim > 2.0):
                trim(0)
                last_trim, served_at_trim = now, served
            served_before = served
            with self.lock:
                for lid in [lid for lid, lease in self._leases.items() if lease.expiry < now]:
                    self.cpu.unpin(self._leases.pop(lid).eids)
                    self.counters.add("leases_expired")
                for rid in [rid for rid, r in self._reservations.items() if r.expiry < now]:
                    self._drop_reservation(rid)
                    self.counters.add("reservations_expired")

    # ---- operator pins and moves (the control plane's Pin, Unpin, Move, Prefetch) -----------------
    def pin(self, digest: bytes, keys: list[bytes], ttl: float) -> dict:
        """Pin the stored chunks among `keys` in the arena for `ttl` seconds, disk-only ones promoted
        first (through `acquire`). The lease belongs to no connection (PIN_CONN): it ends by `unpin`,
        its TTL (the sweeper) or `clear`. All or nothing: refused if a disk chunk finds no arena space,
        or if operator pins would hold more than agent.max_pinned_fraction of the arena."""
        agent = self.cfg.agent
        self._check_pin_ttl(ttl)
        info = self._namespace(digest)
        reply = self.acquire(PIN_CONN, digest, keys, prefix=False)
        no_space = sum(1 for reason in reply["reasons"].values() if reason == "no_space")
        with self.lock:
            lease = self._leases[reply["lid"]]
            nbytes = int(self.cpu.slots(lease.eids)[1].sum())
            held = sum(other.nbytes for other in self._leases.values() if other.conn == PIN_CONN)
            budget = int(agent.max_pinned_fraction * self.cpu.capacity)
            if no_space or held + nbytes > budget or not len(lease.eids):
                self.release(PIN_CONN, reply["lid"])
                if no_space:
                    raise CapacityExhausted(f"{no_space} disk chunk(s) found no arena space to be pinned in "
                                            f"(everything is pinned, reserved or queued)")
                if nbytes:
                    raise CapacityExhausted(f"pinning {nbytes} bytes would put pins at {held + nbytes} bytes, over "
                                            f"agent.max_pinned_fraction ({agent.max_pinned_fraction}) of the "
                                            f"{self.cpu.capacity}-byte arena ({budget} bytes); unpin something first")
                return {"lease": 0, "pinned": 0, "bytes": 0, "ttl": ttl}  # nothing of it is stored here
            lease.expiry, lease.ns_id, lease.nbytes = time.monotonic() + ttl, info.ns_id, nbytes
            self.counters.add("pins")
        return {"lease": reply["lid"], "pinned": len(lease.eids), "bytes": nbytes, "ttl": ttl}

    def renew_pin(self, lid: int, digest: bytes, ttl: float) -> dict:
        """Extend a live pin lease of namespace `digest` to `ttl` seconds from now (an operator keeping
        a system prompt pinned renews before the TTL runs out). NotFound once it expired or ended."""
        self._check_pin_ttl(ttl)
        with self.lock:
            lease = self._pin_lease(lid, digest)
            lease.expiry = time.monotonic() + ttl
        return {"lease": lid, "pinned": len(lease.eids), "bytes": lease.nbytes, "ttl": ttl}

    def _check_pin_ttl(self, ttl: float) -> None:
        limit = self.cfg.agent.max_pin_ttl_s
        if not 0 < ttl <= limit:
            raise InvalidArgument(f"pin ttl {ttl} s is outside (0, agent.max_pin_ttl_s = {limit}]")

    def _pin_lease(self, lid: int, digest: bytes | None) -> _Lease:
        """The live pin lease `lid` (of namespace `digest` when given), else NotFound (caller holds the lock)."""
        lease = self._leases.get(lid)
        info = self._ns_by_id[lease.ns_id] if lease is not None and lease.conn == PIN_CONN else None
        if info is None or digest is not None and info.digest != digest:
            raise NotFound(f"pin lease {lid} is unknown, expired or released")
        return lease

    def unpin(self, lid: int, digest: bytes | None = None) -> dict:
        """End a pin lease now. With `digest`, the lease must belong to that namespace (the controller
        checks the caller may see it), else it is as unknown as one that expired."""
        with self.lock:
            lease = self._pin_lease(lid, digest)
            del self._leases[lid]
            self.cpu.unpin(lease.eids)
        return {"unpinned": len(lease.eids)}

    def _pinned_keys(self) -> set[bytes]:
        """Keys of the chunks pin leases hold (caller holds the lock)."""
        held = [lease.eids for lease in self._leases.values() if lease.conn == PIN_CONN and lease.ns_id]
        if not held:
            return set()
        return {self.cpu.key_of(eid) for eid in np.unique(np.concatenate(held)).tolist()}

    def move(self, conn: int, digest: bytes, keys: list[bytes], tier: str, timeout: float = 60.0) -> dict:
        """Move the stored chunks among `keys` between this node's tiers; `moved` counts the keys the
        target tier holds afterwards. "cpu": promote disk-only chunks into the arena (through `acquire`;
        the disk copy stays, the arena caches it). "disk": write the arena chunks with no disk copy now,
        ahead of their turn, waiting up to `timeout` s, then drop the arena copy of every chunk on disk
        except pinned ones (`pinned`); chunks not written by then stay in the arena (`pending`)."""
        info = self._namespace(digest)
        if tier == "cpu":
            reply = self.acquire(conn, digest, keys, prefix=False)
            self.release(conn, reply["lid"])
            return {"moved": sum(1 for offset in reply["offsets"] if offset >= 0)}
        if tier != "disk":
            raise InvalidArgument(f"move to tier {tier!r}: this node moves chunks to cpu or disk")
        if self.disk is None:
            raise InvalidArgument("this node has no disk tier (disk.enabled is false)")
        written, pending = self._write_now(info, keys, timeout)
        removed = self.evict(digest, written, ("cpu",))
        return {"moved": int(self._disk_has(keys, digest).sum()), "pinned": removed["pinned"], "pending": pending}

    def _write_now(self, info: _NamespaceInfo, keys: list[bytes], timeout: float) -> tuple[list[bytes], int]:
        """Queue the namespace's arena chunks among `keys` that have no disk copy for write-behind and
        wait until they are written (or `timeout`). Returns (keys of those chunks on disk now, how many
        are still queued). They stay pinned meanwhile, so arena pressure cannot drop them unwritten."""
        deadline = time.monotonic() + timeout
        with self._queue_cv:
            eids = self.cpu.find(keys)
            eids = np.unique(eids[(eids >= 0) & (self.cpu.namespace_ids(eids) == info.ns_id)])
            self.cpu.pin(eids)
            eid_keys = [self.cpu.key_of(eid) for eid in eids.tolist()]  # pinned: the entries stay theirs
            try:
                unwritten = self.cpu.flags(eids) & (FLAG_ON_DISK | FLAG_QUEUED) == 0
                for eid, key, todo in zip(eids.tolist(), eid_keys, unwritten.tolist()):
                    if todo:
                        self._enqueue(eid, key)  # or deferred while the queue is full
                while True:
                    flags = self.cpu.flags(eids)
                    deferred = set(self._deferred)  # waiting for room in the queue
                    in_deferred = np.array([key in deferred for key in eid_keys], dtype=bool) if deferred else False
                    waiting = (flags & FLAG_ON_DISK == 0) & ((flags & FLAG_QUEUED != 0) | in_deferred)
                    left = deadline - time.monotonic()
                    if not waiting.any() or left <= 0 or self._stopping:
                        break
                    self._queue_cv.wait(min(left, 0.1))  # the writer notifies after every batch
                on_disk = (self.cpu.flags(eids) & FLAG_ON_DISK != 0).tolist()
                return [key for key, done in zip(eid_keys, on_disk) if done], int(waiting.sum())
            finally:
                self.cpu.unpin(eids)

    # ---- removal ---------------------------------------------------------------------------------
    def evict(self, digest: bytes, keys: list[bytes], tiers: tuple[str, ...] = ("cpu", "disk")) -> dict:
        """Drop `keys` from the named tiers (pinned chunks stay in the arena and are reported)."""
        self._namespace(digest)
        unknown = set(tiers) - {"cpu", "disk"}
        if unknown:
            raise InvalidArgument(f"unknown tier(s) {sorted(unknown)}; known: cpu, disk")
        removed = {"cpu": 0, "disk": 0, "pinned": 0}
        with self.lock:
            if "cpu" in tiers:
                self._unqueue(set(keys))
                writing = [k for k in keys if k in self._writing]  # pinned by write-behind for a moment
                if writing:  # only the writer's pin: removed once written; pinned by others too: stays
                    writing = [k for k, n in zip(writing, self.cpu.pin_counts(self.cpu.find(writing)).tolist())
                               if n == 1]
                self._leaving.update(writing)
                removed["cpu"], removed["pinned"] = self.cpu.remove(keys)
                self._cpu_removed(keys)
                removed["cpu"] += len(writing)
                removed["pinned"] -= len(writing)
            if "disk" in tiers:
                self._doomed.update(k for k in keys if k in self._writing)
        if "disk" in tiers and self.disk is not None:
            removed["disk"] = self.disk.delete(keys)
            with self.lock:
                self._unpublish(keys, TIER_DISK)
                on_disk = self.cpu.find(keys)
                for eid in on_disk[on_disk >= 0].tolist():
                    self.cpu.set_flags(eid, clear_bits=FLAG_ON_DISK)
        return removed

    def clear(self, digest: bytes) -> dict:
        """Remove every chunk of a namespace from every tier. Clearing is explicit: the namespace's pin
        leases end first (chunks a reader has acquired stay until released)."""
        info = self._namespace(digest)
        with self.lock:
            for lid in [lid for lid, lease in self._leases.items()
                        if lease.conn == PIN_CONN and lease.ns_id == info.ns_id]:
                self.cpu.unpin(self._leases.pop(lid).eids)
            keys = self.cpu.keys_in_namespaces([info.ns_id])
        result = self.evict(digest, keys, ("cpu",))
        if self.disk is not None:
            with self.lock:
                self._doomed.update(k for k in self._writing)
            on_disk = [key for key, ns, _ in self.disk.entries() if ns == digest]
            result["disk"] = self.disk.delete(on_disk)
            with self.lock:
                self._unpublish(on_disk, TIER_DISK)
        with self.lock:
            self._event("cleared", info.ns_id, TIER_NONE, [])
        return result

    def _cpu_evicted(self, keys: list[bytes]) -> None:
        self.counters.add("cpu_evicted_chunks", len(keys))
        self._unpublish(keys, TIER_CPU)  # called from inside the arena's (our) lock

    def _disk_evicted(self, keys: list[bytes]) -> None:
        self.counters.add("disk_evicted_chunks", len(keys))
        with self.lock:
            self._unpublish(keys, TIER_DISK)
            eids = self.cpu.find(keys)
            for eid in eids[eids >= 0].tolist():
                self.cpu.set_flags(eid, clear_bits=FLAG_ON_DISK)

    # ---- write-behind ----------------------------------------------------------------------------
    def _enqueue(self, eid: int, key: bytes) -> None:
        """Queue a committed arena chunk for disk (caller holds the lock). While the queue is full the
        key waits in `_deferred` (unpinned: under memory pressure it may be evicted before it is written)."""
        nbytes = self.cpu.entry(eid)[2]
        if self._queue_bytes and self._queue_bytes + nbytes > self.cfg.disk.queue_bytes:
            self._deferred.append(key)
            self.counters.add("writebehind_deferred")
            return
        self.cpu.pin(np.array([eid]))
        self.cpu.set_flags(eid, set_bits=FLAG_QUEUED)
        self._queue.append((eid, key))
        self._queue_bytes += nbytes
        self._queue_cv.notify_all()

    def _unqueue(self, keys: set[bytes]) -> None:
        """Take `keys` out of the write-behind queue (caller holds the lock)."""
        if not self._queue or not keys:
            return
        kept = deque()
        for eid, key in self._queue:
            if key in keys:
                self._queue_bytes -= self.cpu.entry(eid)[2]
                self.cpu.set_flags(eid, clear_bits=FLAG_QUEUED)
                self.cpu.unpin(np.array([eid]))
            else:
                kept.append((eid, key))
        self._queue = kept

    def _requeue_deferred(self) -> None:
        """Move deferred keys into the queue while it has room (caller holds the lock)."""
        while self._deferred and self._queue_bytes < self.cfg.disk.queue_bytes:
            key = self._deferred.popleft()
            eid = int(self.cpu.find([key])[0])
            if eid >= 0 and not self.cpu.entry(eid)[4] & (FLAG_ON_DISK | FLAG_QUEUED):
                self._enqueue(eid, key)
                if self._deferred and self._deferred[-1] is key:  # still no room after all
                    self._deferred.appendleft(self._deferred.pop())
                    break

    def _take_batch(self, wait: bool = True) -> list[tuple[int, bytes]]:
        """Wait for queued chunks; gather at least batch_bytes (or what came within a short linger).
        Without `wait`, what is queued now (perhaps nothing)."""
        with self._queue_cv:
            while wait and not self._queue and not self._stopping:
                self._queue_cv.wait(0.5)
            deadline = time.monotonic() + 0.005
            while wait and self._queue_bytes < self.cfg.disk.batch_bytes and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._queue_cv.wait(left)
            batch, size = [], 0
            while self._queue and (size < self.cfg.disk.batch_bytes or not batch):
                eid, key = self._queue.popleft()
                nbytes = self.cpu.entry(eid)[2]
                self._queue_bytes -= nbytes
                size += nbytes
                batch.append((eid, key))
                self._writing.add(key)
            return batch

    def _writer_loop(self) -> None:
        """Write-behind: batches from the queue to the disk tier. The checksums of one batch are computed
        on a helper thread while the batch before it is written and synced (hashing a 5.9 MB chunk
        takes ~0.7 ms, a tenth of writing it), so the device is not left waiting for them."""
        assert self.disk is not None
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

    def _checksummed(self, batch: list[tuple[int, bytes]]) -> list[tuple[ChunkHeader, memoryview]]:
        """(header with the payload's checksum, payload view) of each queued (pinned) chunk."""
        chunks = []
        for eid, _ in batch:
            _, offset, nbytes, _, _ = self.cpu.entry(eid)
            header = ChunkHeader.unpack(self.cpu.view(offset, HEADER_BYTES))
            payload = self.cpu.view(offset + HEADER_BYTES, nbytes - HEADER_BYTES)
            chunks.append((header.with_checksum(payload), payload))
        return chunks

    def _write_batch(self, batch: list[tuple[int, bytes]], checksummed: Future) -> None:
        batch_bytes = sum(self.cpu.entry(eid)[2] for eid, _ in batch)
        ok = True
        try:
            self.disk.append(checksummed.result())
        except (KVStoreError, OSError) as exc:
            ok = False
            log.error("write-behind of %d chunks failed: %s", len(batch), exc)
            self.counters.add("writebehind_failed", len(batch))
        with self.lock:
            for eid, key in batch:
                if ok:
                    self._publish([key], TIER_DISK, self.cpu.entry(eid)[3])
                self.cpu.set_flags(eid, set_bits=FLAG_ON_DISK if ok else 0, clear_bits=FLAG_QUEUED)
                self.cpu.unpin(np.array([eid]))
                self._writing.discard(key)
            doomed = [key for _, key in batch if key in self._doomed]
            self._doomed.difference_update(doomed)
            leaving = [key for _, key in batch if key in self._leaving]
            self._leaving.difference_update(leaving)
            self.cpu.remove(leaving)
            self._cpu_removed(leaving)
            if ok:
                self.counters.add("writebehind_chunks", len(batch))
                self.counters.add("writebehind_bytes", batch_bytes)
            self._requeue_deferred()
            self._queue_cv.notify_all()
        if doomed:
            self.disk.delete(doomed)
            with self.lock:
                self._unpublish(doomed, TIER_DISK)

    def flush(self, timeout: float = 60.0) -> dict:
        """Wait until every queued chunk is on disk (or `timeout` passes)."""
        deadline = time.monotonic() + timeout
        with self._queue_cv:
            while (self._queue or self._writing or self._deferred) and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"flushed": False,
                            "queued": len(self._queue) + len(self._writing) + len(self._deferred)}
                self._queue_cv.wait(min(left, 0.1))
        return {"flushed": True, "queued": 0}

    # ---- inspection ------------------------------------------------------------------------------
    def holdings(self) -> tuple[list[bytes], np.ndarray]:
        """Every key this node holds in a registered namespace, with its tier bits (as in the node
        directory): what a cluster directory is rebuilt from."""
        keys, values = self._held()
        return keys, values & 0xFF

    def _held(self) -> tuple[list[bytes], np.ndarray]:
        """Every key held in a registered namespace, with its node-directory value (ns_id << 8 | bits)."""
        with self.lock:
            keys = self.cpu.keys_in_namespaces(list(range(1, len(self._ns_by_id))))
        if self.disk is not None:
            keys = list(dict.fromkeys(keys + [key for key, _, _ in self.disk.entries()]))
        if not keys:
            return [], np.zeros(0, dtype=np.int64)
        with self.lock:
            values = self.directory.lookup(pack_keys(keys))
        held = values >= 0
        return [key for key, h in zip(keys, held.tolist()) if h], values[held]

    def stats(self) -> dict:
        with self.lock:
            result = {
                "namespaces": len(self._namespaces),
                "leases": len(self._leases),
                "reservations": len(self._reservations),
                "writebehind_queue_bytes": self._queue_bytes,
                "writebehind_queue_chunks": len(self._queue),
                "writebehind_deferred_chunks": len(self._deferred),
                "tiers": {"cpu": self.cpu.stats()},
                "counters": dict(self.counters.values),
            }
        if self.disk is not None:
            result["tiers"]["disk"] = self.disk.stats()
        return result

    def list_namespaces(self) -> list[dict]:
        with self.lock:
            return [{"digest": info.digest, "geometry": _geometry_wire(info.geometry),
                     "description": info.description} for info in self._namespaces.values()]

    def close(self) -> None:
        self._stopping = True
        with self._queue_cv:
            self._queue_cv.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)
        if self.disk is not None:
            self.disk.close()
        self.cpu.close()
        self.directory.close()


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _geometry_wire(g: Geometry) -> list:
    return [g.layers, g.heads, g.head_dim, g.tokens, g.planes, g.dtype]


def geometry_from_wire(value: Any) -> Geometry:
    if not isinstance(value, list) or len(value) != 6:
        raise InvalidArgument("geometry must be [layers, heads, head_dim, tokens, planes, dtype]")
    layers, heads, head_dim, tokens, planes, dtype = value
    return Geometry(layers=layers, heads=heads, head_dim=head_dim, tokens=tokens, planes=planes, dtype=dtype)


# ---- the socket server ------------------------------------------------------------------------------
def _arg(args: dict, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    value = args.get(name, default)
    if value is ...:
        raise InvalidArgument(f"missing argument {name!r}")
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise InvalidArgument(f"argument {name!r} has the wrong type {type(value).__name__}")
    return value


class AgentServer:
    """Serves a NodeStore on a Unix socket until `shutdown()`."""

    def __init__(self, store: NodeStore, socket_path: str):
        self.store = store
        self.socket_path = socket_path
        Path(socket_path).parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(socket_path)
        self._server = ConnectionServer(socket_path, socket.AF_UNIX, self._serve_connection, "kvstore-agent")
        os.chmod(socket_path, 0o600)
        self._conn_ids = itertools.count(1)
        self._handlers: dict[str, Callable[[int, dict], Any]] = {
            "hello": self._hello, "register": self._register, "lookup": self._lookup,
            "contains": self._contains, "reserve": self._reserve, "commit": self._commit,
            "abort": self._abort, "acquire": self._acquire, "release": self._release, "touch": self._touch,
            "evict": self._evict, "clear": self._clear, "flush": self._flush, "stats": self._stats,
            "list": self._list, "events": self._events, "chunks": self._chunks,
            "pin": self._pin, "unpin": self._unpin, "move": self._move,
        }
        # Requests timed per tier, and how each one's tier and tokens are read off its reply.
        self.recorder = RequestRecorder()
        self._observers: dict[str, Callable[[dict, Any], tuple[str, dict | None]]] = {
            "lookup": self._observe_lookup, "reserve": _observe_put, "commit": _observe_put,
            "acquire": self._observe_acquire, "touch": self._observe_touch}
        self._metrics = None
        self.metrics_port = 0  # the agent's Prometheus endpoint (agent.metrics_address), once started

    def start(self) -> "AgentServer":
        self._server.start()
        self._serve_metrics()
        return self

    def _serve_metrics(self) -> None:
        """The agent's own Prometheus endpoint, read in process; a taken port is a warning, not a dead agent."""
        address = self.store.cfg.agent.metrics_address
        if not address:
            return
        from .metrics import AgentMetrics  # not at import time: engine processes import this module

        self._metrics = AgentMetrics(self.stats)
        try:
            self.metrics_port = self._metrics.serve(address)
        except OSError as exc:
            log.warning("agent metrics endpoint not started on %s: %s", address, exc)
            self._metrics = None
            return
        log.info("kvstore agent metrics on http://%s:%d/metrics", address.rpartition(":")[0], self.metrics_port)

    def stats(self) -> dict:
        """The store's statistics, plus this server's requests (by op, latency, tokens, in flight)."""
        return {**self.store.stats(), "metrics_port": self.metrics_port,
                "requests": {**self.recorder.snapshot(), "connections": self._server.connections}}

    def shutdown(self) -> None:
        """Stop accepting, and end every open connection (clients see the agent go, not a stale store)."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        self._server.stop()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def _serve_connection(self, sock: socket.socket) -> None:
        conn = next(self._conn_ids)
        frames = FrameReader(sock, self.store.cfg.agent.max_frame_bytes, self.store.cfg.agent.busy_poll_us / 1e6)
        try:
            while True:
                try:
                    request = frames.read()
                except ProtocolError as exc:
                    sock.sendall(pack(error_reply(exc)))
                    if "exceeds" in str(exc):
                        return  # cannot find the next frame boundary: close
                    continue
                op, reply = self._dispatch(conn, request)
                if op not in NO_REPLY:
                    sock.sendall(pack(reply))
        except (ConnectionClosed, ConnectionError, OSError):
            pass
        finally:
            self.store.disconnect(conn)

    def _dispatch(self, conn: int, request: Any) -> tuple[str | None, list]:
        if (not isinstance(request, list) or len(request) != 2 or not isinstance(request[0], str)
                or not isinstance(request[1], dict)):
            return None, error_reply(ProtocolError("a request is [op, {args}]"))
        op, args = request
        handler = self._handlers.get(op)
        if handler is None:
            return None, error_reply(InvalidArgument(f"unknown op {op!r}"))
        self.recorder.begin()
        started = time.perf_counter()
        try:
            result = handler(conn, args)
        except KVStoreError as exc:
            self.recorder.end(op, 0.0, None, failed=True)
            return op, error_reply(exc)
        except Exception as exc:  # a bug must not take the agent down; the client gets the message
            self.recorder.end(op, 0.0, None, failed=True)
            log.exception("op %s failed", op)
            return op, error_reply(KVStoreError(f"internal error in {op}: {exc}"))
        self._record(op, args, result, time.perf_counter() - started)
        return op, ["ok", result]

    def _record(self, op: str, args: dict, result: Any, seconds: float) -> None:
        """Count a request that succeeded; time it by the tier that served it, and add its tokens."""
        observe = self._observers.get(op)
        tier = tokens = None
        if observe is not None:
            try:
                tier, tokens = observe(args, result)
            except Exception:  # metrics never fail a request
                log.exception("recording op %s failed", op)
        self.recorder.end(op, seconds, tier, tokens)

    def _chunk_tokens(self, args: dict) -> int:
        """Tokens per chunk of the request's namespace (registered: the request succeeded)."""
        return self.store._namespace(args["ns"]).geometry.tokens

    def _observe_lookup(self, args: dict, result: dict) -> tuple[str, dict]:
        """Tier: the deepest tier in the matched prefix (none: no match). Tokens by tier, none past it."""
        tiers: bytes = result["tiers"]
        per_chunk = self._chunk_tokens(args)
        counts = [(name, tiers.count(code)) for code, name in TIER_NAMES.items()]  # codes ascending
        by_tier = {name: n * per_chunk for name, n in counts if n}
        by_tier["none"] = (len(args["keys"]) // 16 - result["matched"]) * per_chunk
        return next((name for name, n in reversed(counts) if n), "none"), {"lookup": by_tier}

    def _observe_acquire(self, args: dict, result: dict) -> tuple[str, dict]:
        """Tier: the slowest that served any chunk (remote pull > disk promotion > cpu; none: nothing).
        Tokens served by tier, and not served by reason (past a prefix's first miss: that miss's reason)."""
        offsets, reasons = result["offsets"], result["reasons"]
        served = len(offsets) - offsets.count(-1)
        remote, promoted = result.get("remote", ()), result.get("promoted", ())
        disk = len(set(promoted) - set(remote)) if remote and promoted else len(promoted)
        per_chunk = self._chunk_tokens(args)
        hit = {"cpu": (served - len(remote) - disk) * per_chunk, "disk": disk * per_chunk,
               "remote": len(remote) * per_chunk}
        missed: dict[str, int] = {}
        for reason in reasons.values():  # misses only, usually one: a prefix read stops at the first
            missed[reason] = missed.get(reason, 0) + 1
        unexplained = len(offsets) - served - len(reasons)
        if unexplained > 0:
            first = reasons[min(reasons)] if reasons else "not_found"
            missed[first] = missed.get(first, 0) + unexplained
        tier = "remote" if remote else "disk" if disk else "cpu" if served else "none"
        return tier, {"get_hit": hit, "get_miss": {r: n * per_chunk for r, n in missed.items()}}

    def _observe_touch(self, args: dict, touched: int) -> tuple[str, dict]:
        """Chunks read in place are arena hits (a miss goes on to `acquire`, which counts it)."""
        return ("cpu" if touched else "none"), {"get_hit": {"cpu": touched * self._chunk_tokens(args)}}

    def _key_blob(self, args: dict) -> bytes:
        """The request's keys as one blob of 16-byte keys, checked for shape and batch size."""
        blob = _arg(args, "keys", bytes)
        if len(blob) % 16:
            raise InvalidArgument("keys must be a binary blob whose length is a multiple of 16")
        if len(blob) // 16 > self.store.cfg.agent.max_batch_chunks:
            raise InvalidArgument(f"{len(blob) // 16} keys exceed agent.max_batch_chunks "
                                  f"({self.store.cfg.agent.max_batch_chunks})")
        return blob

    def _keys(self, args: dict) -> list[bytes]:
        return split_keys(self._key_blob(args))

    # handlers: argument checking and wire shapes only
    def _hello(self, conn: int, args: dict) -> dict:
        version = _arg(args, "version", int)
        if version != PROTOCOL_VERSION:
            raise InvalidArgument(f"protocol version {version} not supported (agent speaks {PROTOCOL_VERSION})")
        store = self.store
        return {"version": PROTOCOL_VERSION, "arena_path": store.cpu.arena_path,
                "arena_bytes": store.cpu.capacity, "lease_ttl_s": store.cfg.agent.lease_ttl_s,
                "chunk_tokens": store.cfg.chunk_tokens, "pid": os.getpid(),
                "prefault": store.cfg.cpu.prefault, "max_batch_chunks": store.cfg.agent.max_batch_chunks,
                "busy_poll_us": store.cfg.agent.busy_poll_us, "directory_path": store.directory.path,
                "locations_path": store.cpu.locations.path}

    def _register(self, conn: int, args: dict) -> int:
        return self.store.register(_arg(args, "ns", bytes), geometry_from_wire(_arg(args, "geometry", list)),
                                   _arg(args, "description", dict, {}))

    def _lookup(self, conn: int, args: dict) -> dict:
        return self.store.lookup(_arg(args, "ns", bytes), self._key_blob(args))

    def _contains(self, conn: int, args: dict) -> bytes:
        return self.store.contains(_arg(args, "ns", bytes), self._key_blob(args))

    def _reserve(self, conn: int, args: dict) -> dict:
        keys = self._keys(args) if "keys" in args else None  # no keys: a credit, named at commit
        return self.store.reserve(conn, _arg(args, "ns", bytes), keys, _arg(args, "sizes", list))

    def _commit(self, conn: int, args: dict) -> dict:
        named, renew = args.get("named"), args.get("renew")
        if named is not None and (not isinstance(named, dict) or not all(isinstance(i, int) for i in named)):
            raise InvalidArgument("named maps slot indexes (ints) to keys")
        if renew is not None and not isinstance(renew, list):
            raise InvalidArgument("renew is a list of chunk sizes")
        return self.store.commit(conn, _arg(args, "rid", int), named, renew, _arg(args, "keep", bool, False))

    def _abort(self, conn: int, args: dict) -> None:
        self.store.abort(conn, _arg(args, "rid", int))

    def _acquire(self, conn: int, args: dict) -> dict:
        return self.store.acquire(conn, _arg(args, "ns", bytes), self._keys(args),
                                  bool(_arg(args, "prefix", bool, True)))

    def _touch(self, conn: int, args: dict) -> int:
        return self.store.touch(_arg(args, "ns", bytes), self._keys(args))

    def _release(self, conn: int, args: dict) -> None:
        self.store.release(conn, _arg(args, "lid", int))

    def _evict(self, conn: int, args: dict) -> dict:
        tiers = tuple(_arg(args, "tiers", list, ["cpu", "disk"]))
        return self.store.evict(_arg(args, "ns", bytes), self._keys(args), tiers)

    def _clear(self, conn: int, args: dict) -> dict:
        return self.store.clear(_arg(args, "ns", bytes))

    def _flush(self, conn: int, args: dict) -> dict:
        return self.store.flush(float(_arg(args, "timeout", (int, float), 60.0)))

    def _stats(self, conn: int, args: dict) -> dict:
        return self.stats()

    def _list(self, conn: int, args: dict) -> list:
        return self.store.list_namespaces()

    def _events(self, conn: int, args: dict) -> dict:
        since, limit = _arg(args, "since", int, 0), _arg(args, "limit", int, 1000)
        if since < 0 or not 0 < limit <= 100_000:
            raise InvalidArgument("events needs since >= 0 and 0 < limit <= 100000")
        return self.store.events(since, limit)

    def _chunks(self, conn: int, args: dict) -> dict:
        ns = args.get("ns")
        if ns is not None and not isinstance(ns, bytes):
            raise InvalidArgument("ns must be a namespace digest (bytes)")
        tier, start, limit = _arg(args, "tier", int, 0), _arg(args, "start", int, 0), _arg(args, "limit", int, 1000)
        if tier not in (0, *DIR_BITS) or start < 0 or not 0 < limit <= 100_000:
            raise InvalidArgument("chunks needs a known tier code, start >= 0 and 0 < limit <= 100000")
        return self.store.chunks(ns, tier, start, limit, _arg(args, "pinned", bool, False))

    def _pin(self, conn: int, args: dict) -> dict:
        digest, ttl = _arg(args, "ns", bytes), float(_arg(args, "ttl", (int, float)))
        if "renew" in args:  # an existing lease: a new TTL, no keys
            return self.store.renew_pin(_arg(args, "renew", int), digest, ttl)
        return self.store.pin(digest, self._keys(args), ttl)

    def _unpin(self, conn: int, args: dict) -> dict:
        ns = args.get("ns")
        if ns is not None and not isinstance(ns, bytes):
            raise InvalidArgument("ns must be a namespace digest (bytes)")
        return self.store.unpin(_arg(args, "lease", int), ns)

    def _move(self, conn: int, args: dict) -> dict:
        return self.store.move(conn, _arg(args, "ns", bytes), self._keys(args), _arg(args, "tier", str),
                               float(_arg(args, "timeout", (int, float), 60.0)))


def _observe_put(args: dict, result: dict) -> tuple[str, None]:
    """A reserve or commit: puts land in the arena."""
    return "cpu", None


def _remove_stale_socket(path: str) -> None:
    """Refuse to start over a live agent; remove a socket file left by a dead one."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise AgentUnavailable(f"another agent is already listening on {path}")


def run_agent(cfg: KVStoreConfig, ready: Callable[[AgentServer], None] | None = None) -> None:
    """Run the agent in the foreground until SIGINT or SIGTERM, then stop cleanly."""
    store = NodeStore(cfg)
    try:
        server = AgentServer(store, cfg.socket_path)
    except BaseException:
        store.close()
        raise
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    server.start()
    log.info("kvstore agent listening on %s (arena %s, %d bytes; disk %s)", cfg.socket_path,
             store.cpu.arena_path, store.cpu.capacity,
             store.cfg.disk.path if store.disk is not None else "off")
    if ready is not None:
        ready(server)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        store.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("kvstore agent stopped")
