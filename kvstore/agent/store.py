"""NodeStore: a node's tiers and the rooms that keep them, composed; one batched request per method.

The tiers themselves only put, get, contain and evict. The policy is in rooms that own their state:
- Namespaces (namespaces.py): digest -> id and geometry;
- NodeDirectory (directory.py): which tier holds each chunk, in shared memory, and the event feed;
- Puts (puts.py): reservations and commits;
- Reads (reads.py): acquire (with promotion from disk) and touch;
- Leases (leases.py): readers' pins and operators' pins, each with a deadline;
- WriteBehind (writebehind.py): the bounded queue from the arena to disk and its writer thread.
This class wires them together and adds what spans them: lookups, evict/clear, moves between tiers,
operator pins, inspection, the sweeper of expired leases and reservations, and startup and shutdown.

Locks, outermost first: the arena's (CpuTier.lock), under which every decision over arena entries is
taken and kept consistent with the directory; then write-behind's; then the leaf locks of the other rooms
(none of which calls out while holding its own). The disk tier reports evictions without its locks held.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from typing import Sequence

import numpy as np

from ..config import KVStoreConfig, resolve_auto
from ..errors import CapacityExhausted, CorruptChunk, InvalidArgument, NotFound
from ..layout import Geometry
from ..shm import EMPTY
from ..tiers.cpu import CpuTier
from ..tiers.disk import DiskTier
from ..tiers.memory import FLAG_ON_DISK, FLAG_QUEUED
from ..vocab import BIT_OF_TIER, MissReason, Tier, pack_keys
from ..wire.messages import (AcquireReply, ChunksReply, CommitReply, EventsReply, EvictReply, FlushReply, LookupReply,
                             MoveReply, PinReply, ReserveReply, UnpinReply)
from .counters import Counters
from .directory import HoldingsListener, NodeDirectory
from .leases import PIN_CONN, Leases
from .namespaces import RECOVERED, NamespaceInfo, Namespaces
from .puts import CommitListener, Puts
from .reads import Reads
from .writebehind import WriteBehind

log = logging.getLogger("kvstore.agent")

_SWEEP_S = 0.5


class NodeStore:
    """All of a node's tiers; thread-safe. Connections are named by ints: clients 1 and up, PIN_CONN for
    operators' pins, negative ones for the agent's own requests (the cluster's pulls and imports)."""

    def __init__(self, cfg: KVStoreConfig):
        self.cfg = cfg = resolve_auto(cfg)
        _map_big_allocations()
        self.counters = Counters()
        self.namespaces = Namespaces()
        self.cpu = CpuTier(cfg.cpu, cfg.cpu.arena_bytes, on_evict=self._cpu_evicted)
        self.directory = NodeDirectory(cfg.cpu.shm_dir)
        self.disk = DiskTier(cfg.disk, on_evict=self._disk_evicted) if cfg.disk.enabled else None
        self.writebehind = None if self.disk is None else WriteBehind(
            cfg.disk, self.cpu, self.disk, self.directory, self.counters, self._remove_from_arena)
        self.leases = Leases(self.cpu, cfg.agent.lease_ttl_s)
        self.puts = Puts(cfg, self.namespaces, self.cpu, self.disk, self.directory, self.writebehind, self.counters)
        self.reads = Reads(cfg, self.cpu, self.disk, self.directory, self.leases, self.writebehind, self.counters)
        self._stopping = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="kvstore-sweeper", daemon=True)
        if self.disk is not None:
            self._recover_namespaces()
            self.writebehind.start()
        self._sweeper.start()

    # ---- hooks for the cluster --------------------------------------------------------------------
    def watch_holdings(self, listener: HoldingsListener | None) -> None:
        """Call `listener(keys, tier bits now)` whenever the node directory changes (it must only queue work)."""
        self.directory.listen(listener)

    def watch_commits(self, listener: CommitListener | None) -> None:
        """Call `listener(connection, namespace digest, keys)` after a commit stored new chunks."""
        self.puts.on_commit = listener

    # ---- namespaces -------------------------------------------------------------------------------
    def register(self, digest: bytes, geometry: Geometry, description: dict | None = None) -> int:
        """Declare a namespace and its chunk geometry (the first registration fixes it); its id."""
        return self.namespaces.register(digest, geometry, description).ns_id

    def namespace(self, digest: object) -> NamespaceInfo:
        """The registered namespace `digest`; NotFound otherwise."""
        return self.namespaces.get(digest)

    def _recover_namespaces(self) -> None:
        """Register the namespaces found on disk (geometry from a chunk's header) and publish its chunks."""
        assert self.disk is not None
        for key, digest, _ in self.disk.entries():
            if not self.namespaces.known(digest):
                try:
                    record = bytearray(self.disk.record_nbytes(key) or 0)
                    header = self.disk.read_into(key, memoryview(record))
                except (NotFound, CorruptChunk):
                    continue
                self.namespaces.register(digest, header.geometry, RECOVERED)
        for key, digest, _ in self.disk.entries():
            if self.namespaces.known(digest):
                self.directory.publish([key], Tier.DISK, self.namespaces.get(digest).ns_id)

    # ---- lookup -----------------------------------------------------------------------------------
    def _tiers(self, info: NamespaceInfo, blob: bytes) -> np.ndarray:
        """Tier code of every key in a blob of 16-byte keys (NONE: not stored in this namespace)."""
        with self.cpu.lock:
            eids = self.cpu.find_packed(pack_keys(blob))
            hit = eids >= 0
            wrong_ns = hit & (self.cpu.namespace_ids(eids) != info.ns_id)
            if wrong_ns.any():  # same key under another namespace: a miss with a reason, never its data
                self.counters.add(MissReason.NAMESPACE.counter, int(wrong_ns.sum()))
                hit &= ~wrong_ns
            tiers = np.where(hit, Tier.CPU, Tier.NONE).astype(np.uint8)
            if self.disk is not None and not hit.all():
                rest = np.flatnonzero(~hit)
                on_disk = self.puts.on_disk([blob[16 * i:16 * i + 16] for i in rest.tolist()], info.digest)
                tiers[rest[on_disk]] = Tier.DISK
        return tiers

    def lookup(self, digest: bytes, blob: bytes) -> LookupReply:
        """Longest contiguous run of stored chunks from the first key, with each chunk's tier."""
        tiers = self._tiers(self.namespace(digest), blob)
        misses = np.flatnonzero(tiers == Tier.NONE)
        matched = int(misses[0]) if misses.size else len(tiers)
        self.counters.add("lookups")
        self.counters.add("lookup_hit_chunks", matched)
        self.counters.add("lookup_miss_chunks", len(tiers) - matched)
        return LookupReply(matched, tiers[:matched].tobytes())

    def contains(self, digest: bytes, blob: bytes) -> bytes:
        """Per-key tier code (0 = absent), not only the prefix."""
        return self._tiers(self.namespace(digest), blob).tobytes()

    # ---- put and get ------------------------------------------------------------------------------
    def reserve(self, conn: int, digest: bytes, keys: Sequence[bytes] | None, sizes: list) -> ReserveReply:
        return self.puts.reserve(conn, self.namespace(digest), keys, sizes)

    def commit(self, conn: int, rid: int, named: dict | None = None, renew: list | None = None,
               keep: bool = False) -> CommitReply:
        return self.puts.commit(conn, rid, named, renew, keep)

    def abort(self, conn: int, rid: int) -> None:
        self.puts.abort(conn, rid)

    def acquire(self, conn: int, digest: bytes, keys: Sequence[bytes], prefix: bool = True) -> AcquireReply:
        return self.reads.acquire(conn, self.namespace(digest), keys, prefix)

    def release(self, conn: int, lid: int) -> None:
        self.leases.release(conn, lid)

    def touch(self, digest: bytes, keys: Sequence[bytes]) -> int:
        return self.reads.touch(self.namespace(digest), keys)

    def disconnect(self, conn: int) -> None:
        """A client went away: its leases and reservations end now, not at their TTL."""
        self.leases.end_connection(conn)
        self.puts.end_connection(conn)

    def _sweep_loop(self) -> None:
        """Reclaim expired leases and reservations (a stuck client cannot hold space forever), and every
        few seconds of activity give freed heap back to the OS (glibc keeps request garbage)."""
        trim = _malloc_trim()
        last_trim, served_at_trim, served_before = time.monotonic(), 0, 0
        while not self._stopping.wait(_SWEEP_S):
            now = time.monotonic()
            served = self.counters.total()
            quiet = served == served_before  # nothing served for the last half second
            if trim is not None and served != served_at_trim and (quiet or now - last_trim > 2.0):
                trim(0)
                last_trim, served_at_trim = now, served
            served_before = served
            for name, ended in (("leases_expired", self.leases.expire()), ("reservations_expired", self.puts.expire())):
                if ended:
                    self.counters.add(name, ended)

    # ---- operator pins and moves (the control plane's Pin, Unpin, Move, Prefetch) -----------------
    def pin(self, digest: bytes, keys: Sequence[bytes], ttl: float) -> PinReply:
        """Pin the stored chunks among `keys` in the arena for `ttl` seconds, disk-only ones promoted
        first (through `acquire`), under a lease of no connection (PIN_CONN). All or nothing: refused if
        a disk chunk finds no arena space, or if operator pins would hold more than
        agent.max_pinned_fraction of the arena."""
        agent = self.cfg.agent
        self._check_pin_ttl(ttl)
        info = self.namespace(digest)
        reply = self.reads.acquire(PIN_CONN, info, keys, prefix=False)
        no_space = sum(1 for reason in reply.reasons.values() if reason == MissReason.NO_SPACE)
        if no_space:
            self.leases.release(PIN_CONN, reply.lid)
            raise CapacityExhausted(f"{no_space} disk chunk(s) found no arena space to be pinned in "
                                    f"(everything is pinned, reserved or queued)")
        budget = int(agent.max_pinned_fraction * self.cpu.capacity)
        lease, held, nbytes = self.leases.make_pin(reply.lid, info.ns_id, ttl, budget)
        if lease is None:
            if nbytes:
                raise CapacityExhausted(f"pinning {nbytes} bytes would put pins at {held + nbytes} bytes, over "
                                        f"agent.max_pinned_fraction ({agent.max_pinned_fraction}) of the "
                                        f"{self.cpu.capacity}-byte arena ({budget} bytes); unpin something first")
            return PinReply(0, 0, 0, ttl)  # nothing of it is stored here
        self.counters.add("pins")
        return PinReply(reply.lid, len(lease.eids), nbytes, ttl)

    def renew_pin(self, lid: int, digest: bytes, ttl: float) -> PinReply:
        """Extend a live pin lease of namespace `digest` to `ttl` seconds from now (an operator keeping a
        system prompt pinned renews before the TTL runs out). NotFound once it expired or ended."""
        self._check_pin_ttl(ttl)
        lease = self.leases.renew_pin(lid, self._pin_namespace(digest), ttl)
        return PinReply(lid, len(lease.eids), lease.nbytes, ttl)

    def unpin(self, lid: int, digest: bytes | None = None) -> UnpinReply:
        """End a pin lease now. With `digest`, the lease must belong to that namespace (the controller
        checks the caller may see it), else it is as unknown as one that expired."""
        return UnpinReply(len(self.leases.unpin(lid, self._pin_namespace(digest)).eids))

    def _pin_namespace(self, digest: bytes | None) -> int | None:
        """The id a pin lease must have for namespace `digest` (None: any); an unknown namespace has no pins."""
        if digest is None:
            return None
        return self.namespaces.get(digest).ns_id if self.namespaces.known(digest) else -1

    def _check_pin_ttl(self, ttl: float) -> None:
        limit = self.cfg.agent.max_pin_ttl_s
        if not 0 < ttl <= limit:
            raise InvalidArgument(f"pin ttl {ttl} s is outside (0, agent.max_pin_ttl_s = {limit}]")

    def move(self, conn: int, digest: bytes, keys: Sequence[bytes], tier: str, timeout: float = 60.0) -> MoveReply:
        """Move the stored chunks among `keys` between this node's tiers; `moved` counts the keys the
        target tier holds afterwards. "cpu": promote disk-only chunks into the arena (through
        `acquire`; the disk copy stays, the arena caches it). "disk": write the arena chunks with no
        disk copy now, ahead of their turn, waiting up to `timeout` s, then drop the arena copy of every
        chunk on disk except pinned ones (`pinned`); chunks not written by then stay (`pending`)."""
        info = self.namespace(digest)
        if tier == "cpu":
            reply = self.reads.acquire(conn, info, keys, prefix=False)
            self.leases.release(conn, reply.lid)
            return MoveReply(sum(1 for offset in reply.offsets if offset >= 0))
        if tier != "disk":
            raise InvalidArgument(f"move to tier {tier!r}: this node moves chunks to cpu or disk")
        if self.writebehind is None:
            raise InvalidArgument("this node has no disk tier (disk.enabled is false)")
        written, pending = self._write_now(info, keys, timeout)
        removed = self.evict(digest, written, ("cpu",))
        return MoveReply(int(self.puts.on_disk(keys, digest).sum()), removed.pinned, pending)

    def _write_now(self, info: NamespaceInfo, keys: Sequence[bytes], timeout: float) -> tuple[list[bytes], int]:
        """Queue the namespace's arena chunks among `keys` that have no disk copy for write-behind and
        wait until they are written (or `timeout`). Returns (keys of those chunks on disk now, how many
        are still waiting). They stay pinned meanwhile, so arena pressure cannot drop them unwritten."""
        assert self.writebehind is not None
        deadline = time.monotonic() + timeout
        cpu = self.cpu
        with cpu.lock:
            eids = cpu.find(keys)
            eids = np.unique(eids[(eids >= 0) & (cpu.namespace_ids(eids) == info.ns_id)])
            cpu.pin(eids)
            eid_keys = [cpu.key_of(eid) for eid in eids.tolist()]  # pinned: the entries stay theirs
            self.writebehind.enqueue_unwritten(eids.tolist(), eid_keys)
        try:
            while True:
                with cpu.lock:
                    flags = cpu.flags(eids)
                    waiting = (flags & FLAG_ON_DISK == 0) & ((flags & FLAG_QUEUED != 0)
                                                             | self.writebehind.waiting(eid_keys))
                left = deadline - time.monotonic()
                if not waiting.any() or left <= 0 or self._stopping.is_set():
                    break
                self.writebehind.wait(min(left, 0.1))  # the writer notifies after every batch
            on_disk = (cpu.flags(eids) & FLAG_ON_DISK != 0).tolist()
            return [key for key, done in zip(eid_keys, on_disk) if done], int(waiting.sum())
        finally:
            cpu.unpin(eids)

    # ---- removal ----------------------------------------------------------------------------------
    def evict(self, digest: bytes, keys: Sequence[bytes], tiers: Sequence[str] = ("cpu", "disk")) -> EvictReply:
        """Drop `keys` from the named tiers (pinned chunks stay in the arena and are reported)."""
        self.namespace(digest)
        unknown = set(tiers) - {"cpu", "disk"}
        if unknown:
            raise InvalidArgument(f"unknown tier(s) {sorted(unknown)}; known: cpu, disk")
        cpu_removed = pinned = disk_removed = 0
        if "cpu" in tiers:
            with self.cpu.lock:
                cpu_removed, pinned = self._evict_from_arena(keys)
        if "disk" in tiers and self.disk is not None:
            if self.writebehind is not None:
                self.writebehind.delete_when_written(keys)
            disk_removed = self.disk.delete(keys)
            with self.cpu.lock:
                self.directory.unpublish(keys, Tier.DISK)
                self._forget_disk_copies(keys)
        return EvictReply(cpu_removed, disk_removed, pinned)

    def _evict_from_arena(self, keys: Sequence[bytes]) -> tuple[int, int]:
        """Remove `keys` from the arena: (removed, kept because pinned). A chunk that only write-behind
        has pinned goes once it is written (caller holds the arena lock)."""
        leaving = []
        if self.writebehind is not None:
            self.writebehind.withdraw(set(keys))
            writing = self.writebehind.writing(keys)
            if writing:  # only the writer's pin: removed once written; pinned by others too: it stays
                counts = self.cpu.pin_counts(self.cpu.find(writing)).tolist()
                leaving = [key for key, n in zip(writing, counts) if n == 1]
                self.writebehind.remove_when_written(leaving)
        removed, pinned = self._remove_from_arena(keys)
        return removed + len(leaving), pinned - len(leaving)

    def _remove_from_arena(self, keys: Sequence[bytes]) -> tuple[int, int]:
        """cpu.remove(keys), and the directory told of the chunks that left: (removed, kept because
        pinned) (caller holds the arena lock)."""
        removed, pinned = self.cpu.remove(keys)
        if keys:
            still = self.cpu.contains(keys)
            self.directory.unpublish([k for k, s in zip(keys, still) if not s], Tier.CPU)
        return removed, pinned

    def _forget_disk_copies(self, keys: Sequence[bytes]) -> None:
        """The arena entries of `keys` have no disk copy any more (caller holds the arena lock)."""
        eids = self.cpu.find(keys)
        for eid in eids[eids >= 0].tolist():
            self.cpu.set_flags(eid, clear_bits=FLAG_ON_DISK)

    def clear(self, digest: bytes) -> EvictReply:
        """Remove every chunk of a namespace from every tier. Clearing is explicit: the namespace's pin
        leases end first (chunks a reader has acquired stay until released)."""
        info = self.namespace(digest)
        self.leases.end_pins_of(info.ns_id)
        with self.cpu.lock:
            keys = self.cpu.keys_in_namespaces([info.ns_id])
        result = self.evict(digest, keys, ("cpu",))
        disk_removed = 0
        if self.disk is not None:
            if self.writebehind is not None:  # those being written now are deleted again once written
                self.writebehind.delete_when_written(keys)
            on_disk = [key for key, ns, _ in self.disk.entries() if ns == digest]
            disk_removed = self.disk.delete(on_disk)
            self.directory.unpublish(on_disk, Tier.DISK)
        self.directory.cleared(info.ns_id)
        return EvictReply(result.cpu, disk_removed, result.pinned)

    def _cpu_evicted(self, keys: list[bytes]) -> None:
        """The arena evicted `keys` (called under its lock)."""
        self.counters.add("cpu_evicted_chunks", len(keys))
        self.directory.unpublish(keys, Tier.CPU)

    def _disk_evicted(self, keys: list[bytes]) -> None:
        self.counters.add("disk_evicted_chunks", len(keys))
        with self.cpu.lock:
            self.directory.unpublish(keys, Tier.DISK)
            self._forget_disk_copies(keys)

    def flush(self, timeout: float = 60.0) -> FlushReply:
        """Wait until write-behind has put every committed chunk on disk (or `timeout` passes)."""
        if self.writebehind is None:
            return FlushReply(True)
        result = self.writebehind.flush(timeout)
        return FlushReply(result["flushed"], result["queued"])

    # ---- inspection -------------------------------------------------------------------------------
    def events(self, since: int, limit: int = 1000) -> EventsReply:
        """Events after seq `since` (at most `limit`)."""
        page = self.directory.events.since(since, limit)
        events = []
        for event in page.events:
            info = self.namespaces.by_id(event.ns_id)
            events.append({"seq": event.seq, "time": event.time, "kind": event.kind,
                           "ns": info.digest if info else b"", "tier": event.tier, "keys": event.keys})
        return EventsReply(events, page.next, page.dropped, page.last)

    def chunks(self, digest: bytes | None, tier: int, start: int, limit: int, pinned: bool = False) -> ChunksReply:
        """One page of the chunks held in registered namespaces, sorted by key: [key, namespace digest,
        tier bits] from position `start`, at most `limit`, filtered by namespace, tier (0: any) and, with
        `pinned`, to the chunks pin leases hold."""
        keys, values = self._held()
        pins = None
        if pinned:
            with self.cpu.lock:
                pins = {self.cpu.key_of(eid) for eid in self.leases.pinned_eids().tolist()}
        bit = BIT_OF_TIER.get(Tier(tier), 0) if tier else 0
        rows = []
        for key, value in sorted(zip(keys, values.tolist())):
            if tier and not value & bit or pins is not None and key not in pins:
                continue
            info = self.namespaces.by_id(value >> 8)
            if info is None or (digest is not None and info.digest != digest):
                continue
            rows.append([key, info.digest, value & 0xFF])
        page = rows[start:start + limit]
        return ChunksReply(page, start + len(page) if start + len(page) < len(rows) else 0)

    def holdings(self) -> tuple[list[bytes], np.ndarray]:
        """Every key this node holds in a registered namespace, with its tier bits (as in the node
        directory): what a cluster directory is rebuilt from."""
        keys, values = self._held()
        return keys, values & 0xFF

    def _held(self) -> tuple[list[bytes], np.ndarray]:
        """Every key held in a registered namespace, with its node-directory value."""
        with self.cpu.lock:
            keys = self.cpu.keys_in_namespaces(self.namespaces.ids())
        if self.disk is not None:
            keys = list(dict.fromkeys(keys + [key for key, _, _ in self.disk.entries()]))
        if not keys:
            return [], np.zeros(0, dtype=np.int64)
        values = self.directory.values(keys)
        held = values != EMPTY
        return [key for key, h in zip(keys, held.tolist()) if h], values[held]

    def arena_bytes(self, keys: Sequence[bytes]) -> int:
        """Bytes (header and payload) of the chunks among `keys` in the arena."""
        if not keys:
            return 0
        with self.cpu.lock:
            eids = self.cpu.find(keys)
            return int(self.cpu.slots(eids[eids >= 0])[1].sum())

    def arena(self) -> np.ndarray:
        """The arena's bytes (what clients map): where the agent's own requests read and write slots."""
        return self.cpu.arena.array

    def stats(self) -> dict:
        result = {"namespaces": len(self.namespaces), "leases": len(self.leases), "reservations": len(self.puts),
                  "writebehind_queue_bytes": 0, "writebehind_queue_chunks": 0, "writebehind_deferred_chunks": 0,
                  "tiers": {"cpu": self.cpu.stats()}, "counters": self.counters.snapshot()}
        if self.writebehind is not None:
            result.update(self.writebehind.stats())
        if self.disk is not None:
            result["tiers"]["disk"] = self.disk.stats()
        return result

    def list_namespaces(self) -> list[dict]:
        return self.namespaces.records()

    def close(self) -> None:
        self._stopping.set()
        if self.writebehind is not None:
            self.writebehind.stop()
        self._sweeper.join(timeout=10)
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


_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
_MMAP_THRESHOLD_BYTES = 1 << 20


def _map_big_allocations() -> None:
    """Have glibc serve every allocation of 1 MiB or more with its own mapping, returned to the system the
    moment it is freed. Left to itself glibc raises that threshold to the size of each big block freed,
    so the tiers' tables, which double as they grow, come from the heap after the first doubling, and the
    halves they leave behind stay resident: measured with 10^6 chunks of `bench lookup`, 183 MB of
    private memory instead of 128 MB. Without glibc, nothing changes."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass
