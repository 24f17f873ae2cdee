"""The client's read side: prefix lookups and gets.

A lookup is answered from the agent's shared node directory, with no round trip (one a second checks
that the agent is alive); a cluster member's misses may be other nodes' hits, which it asks the agent
for. A get first copies the chunks the arena holds straight out of their slots, with no round trip,
each copy checked by its slot's serial (docs/local-protocol.md, Get); from the first chunk not read so,
one `acquire` per batch pins the rest (the agent brings disk and remote hits into the arena first) and
they are copied or decoded from their pinned slots. Corrupt bytes are never returned: they are a miss.
"""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch

from .. import codec
from ..bytecopy import as_numpy, byte_rows
from ..codec import CODEC_AT, HEADER_BYTES, KEY_AT, NAMESPACE_AT, PAYLOAD_LEN_AT, ChunkHeader
from ..errors import CorruptChunk, InvalidArgument, LeaseExpired
from ..shm import LOCATION_UNIT, serial_word
from ..vocab import MissReason, key_count, pack_keys, stored_prefix, tier_labels
from ..wire.messages import (Acquire, AcquireReply, Contains, Lookup, LookupReply, Prefetch, PrefetchReply, Release,
                             Touch)
from .binding import Binding
from .puts import lease_deadline
from .results import ClusterLookupResult, GetResult, LookupResult

_RAW = codec.CODEC_IDS["raw"]
# Loads seen in program order (x86-64 keeps them so), which reading a slot without a pin relies on
# (Reader._copy_published); other machines pin every chunk they read.
_IN_ORDER_LOADS = platform.machine().lower() in ("x86_64", "amd64")


class Reader:
    """Lookups and gets of one namespace."""

    def __init__(self, binding: Binding):
        self.binding = binding

    @property
    def _conn(self):
        return self.binding.conn

    def _batches(self, keys: Sequence[bytes]) -> Iterator[bytes]:
        step = self._conn.max_batch
        for start in range(0, len(keys), step):
            yield b"".join(keys[start:start + step])

    # ---- lookup -----------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """Longest run of stored chunks from the start (advice: every read is verified)."""
        conn, chunk = self._conn, self.binding.geometry.tokens
        if conn.directory is not None and keys:
            conn.ensure_alive()
            try:
                matched, codes = stored_prefix(self.binding.directory_bits(keys))
                if matched == len(keys) or not conn.cluster:
                    return LookupResult(matched, matched * chunk, codes)
                return self.cluster_lookup(keys)  # the rest of the prefix may be on other nodes
            except (OSError, ValueError):
                conn.directory = None  # unusable now: fall back to asking the agent
        if conn.cluster and keys:
            return self.cluster_lookup(keys)
        matched, tiers = 0, b""
        for blob in self._batches(keys):
            reply = conn.request(Lookup(self.binding.namespace.digest, blob), LookupReply)
            matched += reply.matched
            tiers += reply.tiers
            if reply.matched < key_count(blob):
                break
        return LookupResult(matched, matched * chunk, tiers)

    def cluster_lookup(self, keys: Sequence[bytes]) -> ClusterLookupResult:
        """The longest prefix held anywhere in the cluster (tier remote for chunks only other nodes
        hold) and, for every node holding a prefix, its length and tiers: one round trip to the local
        agent, which asks the directory owners (with a deadline)."""
        chunk = self.binding.geometry.tokens
        if not self._conn.cluster:
            local = self.lookup(keys)
            return ClusterLookupResult(local.chunks, local.tokens, local.tier_codes,
                                       (("local", local.chunks, local.tiers),) if local.chunks else ())
        if len(keys) > self._conn.max_batch:
            raise InvalidArgument(f"a cluster lookup takes at most {self._conn.max_batch} keys at once")
        reply = self._conn.request(Lookup(self.binding.namespace.digest, b"".join(keys), cluster=True), LookupReply)
        nodes = tuple(sorted((node, held["chunks"], tier_labels(held["tiers"])) for node, held in reply.nodes.items()))
        return ClusterLookupResult(reply.matched, reply.matched * chunk, reply.tiers, nodes, reply.node)

    def prefetch(self, keys: Sequence[bytes]) -> int:
        """Ask a cluster agent to start pulling the chunks among `keys` that other nodes hold; returns
        how many are not local yet."""
        if not self._conn.cluster or not keys:
            return 0
        return sum(self._conn.request(Prefetch(self.binding.namespace.digest, blob), PrefetchReply).missing
                   for blob in self._batches(keys))

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        out: list[bool] = []
        for blob in self._batches(keys):
            out.extend(t != 0 for t in self._conn.request(Contains(self.binding.namespace.digest, blob)))
        return out

    # ---- get --------------------------------------------------------------------------------------
    def read(self, keys: Sequence[bytes], out: torch.Tensor | None = None) -> GetResult:
        """The stored prefix of `keys` and why the rest was not served (see the module docstring)."""
        geometry = self.binding.geometry
        if out is not None and (tuple(out.shape[1:]) != geometry.shape or out.shape[0] < len(keys)
                                or out.dtype != geometry.torch_dtype):
            raise InvalidArgument(f"out must be [>= {len(keys)}, *{geometry.shape}] {geometry.torch_dtype}")
        misses: dict[int, MissReason] = {}
        remote: list[int] = []
        results = []
        step = self._conn.max_batch
        for start in range(0, len(keys), step):
            batch = keys[start:start + step]
            if out is None:
                target = torch.empty((len(batch), *geometry.shape), dtype=geometry.torch_dtype)
            else:
                target = out[start:start + len(batch)]
            got = self._copy_published(batch, target)
            if got < len(batch):
                got += self._copy_pinned(batch[got:], target[got:], start + got, misses, remote)
            results.append(target[:got])
            if got < len(batch):
                break
        if out is not None:
            chunks = out[: sum(len(r) for r in results)]
        elif not results:
            chunks = torch.empty((0, *geometry.shape), dtype=geometry.torch_dtype)
        else:
            chunks = results[0] if len(results) == 1 else torch.cat(results)
        return GetResult(chunks, misses, tuple(remote))

    def _copy_published(self, keys: Sequence[bytes], target: torch.Tensor) -> int:
        """Copy the leading chunks of `keys` that the arena holds, raw, into target's rows without pinning
        them; returns how many (the first one missing, of another codec or changed meanwhile ends it).

        The agent stamps a published slot's header with a fresh nonzero serial and zeroes it before the
        slot can be freed (tiers/cpu.py), and a writer only gets the slot after that. So when the serial
        reads the same before and after the copy, and the header still names this namespace and key, no
        byte of the copy came from anyone else's write. That needs the CPU to keep loads in program order
        (x86-64 does); elsewhere every get pins. One message, not waited for, tells the agent of the hits
        (eviction order, hit counts)."""
        conn = self._conn
        locations = conn.locations
        if locations is None or not _IN_ORDER_LOADS or not keys:
            return 0
        try:
            places = locations.lookup(pack_keys(keys)).tolist()
        except (OSError, ValueError):  # the agent stopped (or moved the index away): pin instead
            return 0
        arena, words = conn.arena_np, conn.arena_words
        nbytes = self.binding.geometry.nbytes
        end = HEADER_BYTES + nbytes
        digest = self.binding.namespace.digest
        rows = byte_rows(target)
        copied = 0
        for key, place in zip(keys, places):
            offset = place * LOCATION_UNIT
            if place < 0 or offset + end > arena.size:
                break
            stamp = serial_word(offset)
            serial = int(words[stamp])
            names = arena[offset + NAMESPACE_AT:offset + KEY_AT + 16]  # the header's namespace, then key
            expected = digest + key
            if (serial == 0 or names.tobytes() != expected or arena[offset + CODEC_AT] != _RAW
                    or int(words[(offset + PAYLOAD_LEN_AT) >> 3]) != nbytes):
                break
            _copy_raw(arena[offset + HEADER_BYTES:offset + end], rows, target, copied)
            if int(words[stamp]) != serial or names.tobytes() != expected:
                break  # unpublished during the copy: pinned and copied again below
            copied += 1
        if copied:
            conn.request(Touch(digest, b"".join(keys[:copied])))
        return copied

    def _copy_pinned(self, keys: Sequence[bytes], target: torch.Tensor, first: int, misses: dict,
                     remote: list) -> int:
        """Pin the stored prefix of `keys` with one acquire and copy (or decode) it into target's rows;
        returns how many. Misses and remote hits are noted by index in the caller's request, keys[0]
        being `first`."""
        raw_size = HEADER_BYTES + self.binding.geometry.nbytes
        arena = self._conn.arena_np
        with self._pinned_slots(keys, True, first, misses, remote) as slots:
            rows = byte_rows(target)
            for n, (_, offset, size) in enumerate(slots):
                if size == raw_size and arena[offset + CODEC_AT] == _RAW:  # raw: one copy straight out
                    _copy_raw(arena[offset + HEADER_BYTES:offset + size], rows, target, n)
                else:
                    header = ChunkHeader.unpack(arena[offset:offset + HEADER_BYTES])
                    codec.decode(header, self._conn.arena[offset + HEADER_BYTES:offset + size], out=target[n])
            return len(slots)

    @contextmanager
    def _pinned_slots(self, keys: Sequence[bytes], prefix: bool, first: int = 0, misses: dict | None = None,
                      remote: list | None = None) -> Iterator[list[tuple[int, int, int]]]:
        """Pin the stored chunks among `keys`; yield (index, offset, size) of each hit, valid inside the
        block. Each slot's header must name its key (the agent validated the header at commit)."""
        conn = self._conn
        if len(keys) > conn.max_batch:
            raise InvalidArgument(f"acquire takes at most {conn.max_batch} keys at once")
        sent = time.monotonic()
        reply = conn.request(Acquire(self.binding.namespace.digest, b"".join(keys), prefix), AcquireReply)
        if misses is not None:
            misses.update({first + i: MissReason(reason) for i, reason in reply.reasons.items()})
        if remote is not None:
            remote.extend(first + i for i in reply.remote or ())
        arena = conn.arena_np
        try:
            slots = []
            for i, (offset, size) in enumerate(zip(reply.offsets, reply.sizes)):
                if offset < 0:
                    continue
                if arena[offset + KEY_AT:offset + KEY_AT + 16].tobytes() != keys[i]:
                    raise CorruptChunk(f"arena slot of chunk {i} holds another chunk")
                slots.append((i, offset, size))
            yield slots
            if time.monotonic() > lease_deadline(sent, reply.ttl):
                raise LeaseExpired("lease expired while the chunks were being read; data discarded")
        finally:
            if conn.connected:
                conn.request(Release(reply.lid))

    @contextmanager
    def acquire(self, keys: Sequence[bytes], prefix: bool = True) -> Iterator[list[tuple[ChunkHeader, torch.Tensor]]]:
        """Pin the stored chunks among `keys` and yield (header, payload view) for each hit, in order
        (with `prefix`, up to the first miss). The views are only valid inside the `with` block."""
        arena = self._conn.arena
        with self._pinned_slots(keys, prefix) as slots:
            views = []
            for i, offset, size in slots:
                header = ChunkHeader.unpack(arena[offset:offset + HEADER_BYTES].numpy())
                if header.total_len != size:
                    raise CorruptChunk(f"arena slot of chunk {i} holds a chunk of another size")
                views.append((header, arena[offset + HEADER_BYTES:offset + size]))
            yield views


def _copy_raw(payload: np.ndarray, rows: np.ndarray | None, target: torch.Tensor, n: int) -> None:
    """Copy a raw chunk's payload bytes into target[n]: one flat copy into `rows` (byte_rows(target))
    when target is contiguous, else into the strided view in its dtype's width."""
    if rows is not None:
        np.copyto(rows[n], payload)
    else:
        dst = as_numpy(target[n])
        np.copyto(dst, payload.view(dst.dtype).reshape(dst.shape), casting="no")
