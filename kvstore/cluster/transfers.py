"""Chunks between agents: sent from one node's pinned arena slots, received into another's reserved slots.

A chunk travels as its 128-byte header, carrying the payload's xxh3-64 checksum (the one the disk tier
keeps: the sender keeps a checksum the header already has, a chunk read from disk or received from a
peer, and computes it otherwise), then its payload. The receiver reads both straight into an arena slot
of a credit reservation, verifies the header and checksum there, and commits the good ones through the
store's own commit, so a received chunk is validated, indexed, published and written behind like any
other. A chunk that fails is a miss with the reason `remote_checksum`, never data.
"""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np

from ..agent import NodeStore
from ..agent.namespaces import IMPORTED
from ..codec import HEADER_BYTES, ChunkHeader
from ..errors import CorruptChunk, GeometryMismatch, InvalidArgument, NotFound, ProtocolError
from ..layout import Geometry
from ..vocab import MissReason

# Connection ids of the agent's own requests to its store (clients get ids from 1 up): the store's
# commit hook tells received chunks apart from client commits by them (they are never replicated again).
PULL_CONN, REPLICA_CONN, EXPORT_CONN = -1, -2, -3


@contextmanager
def pinned_chunks(store: NodeStore, digest: bytes, keys: Sequence[bytes]) -> Iterator[tuple[list[int], list]]:
    """Pin the chunks this node holds among `keys` and yield (indexes found, [(header, payload view of the
    arena slot), ...]); released on exit."""
    try:
        reply = store.acquire(EXPORT_CONN, digest, list(keys), prefix=False)
    except NotFound:  # namespace unknown here: nothing of it is held
        yield [], []
        return
    arena = store.arena()
    found: list[int] = []
    pairs: list[tuple[ChunkHeader, np.ndarray]] = []
    try:
        for i, (offset, size) in enumerate(zip(reply.offsets, reply.sizes)):
            if offset < 0:
                continue
            try:
                header = ChunkHeader.unpack(arena[offset:offset + HEADER_BYTES])
            except CorruptChunk:
                continue
            pairs.append((header, arena[offset + HEADER_BYTES:offset + size]))
            found.append(i)
        yield found, pairs
    finally:
        store.release(EXPORT_CONN, reply.lid)


def description_of(store: NodeStore, digest: bytes) -> dict:
    """The namespace description that travels with chunks, so the receiving agent knows the namespace as
    its engine registered it (model, tenant, chunk size: what the controller needs)."""
    try:
        return store.namespace(digest).description or IMPORTED
    except NotFound:
        return IMPORTED


def send_chunks(send: Callable[[bytes | memoryview], None], pairs: list) -> None:
    """Each chunk's header (with its payload checksum) and payload, straight from its pinned slot;
    checksummed one at a time, so the receiver verifies chunk k while this side hashes k + 1."""
    for header, payload in pairs:
        send(header.pack() if header.has_checksum else header.with_checksum(payload).pack())
        send(memoryview(payload))


def verified_header(raw_header, payload, key: bytes, digest: bytes) -> ChunkHeader:
    """The header of a chunk received for `key` in namespace `digest`, once its payload checks out;
    CorruptChunk otherwise."""
    header = ChunkHeader.unpack(raw_header)
    if header.key != key or header.namespace != digest:
        raise CorruptChunk("chunk names another key or namespace")
    header.verify(payload)
    return header


def check_stream(keys: Sequence[bytes], found: list, sizes: list) -> None:
    """A stream's announcement must name distinct known indexes, one size each (a header and more)."""
    if len(found) != len(sizes) or any(not isinstance(i, int) or not 0 <= i < len(keys) for i in found) \
            or len(set(found)) != len(found) or any(not isinstance(s, int) or s <= HEADER_BYTES for s in sizes):
        raise ProtocolError("peer link: malformed chunk stream")


def receive_chunks(store: NodeStore, conn_id: int, digest: bytes, keys: Sequence[bytes], found: list, sizes: list,
                   geometry: list, description: dict, read_into: Callable[[memoryview], None]
                   ) -> tuple[list[int], dict[int, MissReason]]:
    """Read a stream of chunks for keys[found[n]] of `sizes[n]` bytes each into this node's arena: reserve
    slots, receive each chunk into its slot, verify it there, and commit the good ones. Returns (indexes
    now held, {index: reason} of the found ones that are not). Every byte of the stream is read, stored or
    not; a transport failure raises (the stream is out of step then) and the reservation is given back."""
    check_stream(keys, found, sizes)
    reasons: dict[int, MissReason] = {}
    try:
        store.register(digest, Geometry.from_wire(geometry), description or IMPORTED)
        refused = None
    except (GeometryMismatch, InvalidArgument):
        refused = MissReason.GEOMETRY
    # A credit: the slots are named at commit, so a chunk that fails verification is simply left unnamed
    # and its slot goes back to the arena.
    reservation = store.reserve(conn_id, digest, None, sizes) if refused is None else None
    offsets = reservation.offsets if reservation else [-1] * len(sizes)
    arena = store.arena()
    named: dict[int, bytes] = {}
    try:
        for n, (i, size, offset) in enumerate(zip(found, sizes, offsets)):
            if offset < 0:  # no room (or a namespace we cannot hold): read past it
                read_into(memoryview(np.empty(size, dtype=np.uint8)))
                reasons[i] = refused or MissReason.NO_SPACE
                continue
            slot = arena[offset:offset + size]
            read_into(memoryview(slot))
            try:
                verified_header(slot[:HEADER_BYTES], slot[HEADER_BYTES:], keys[i], digest)
            except CorruptChunk:
                reasons[i] = MissReason.REMOTE_CHECKSUM
                continue
            named[n] = keys[i]
        if reservation and not named:  # nothing to keep (no slot was granted, or none checked out)
            store.abort(conn_id, reservation.rid)
    except BaseException:
        if reservation:
            store.abort(conn_id, reservation.rid)
        raise
    if not named:
        return [], reasons
    result = store.commit(conn_id, reservation.rid, named=named)
    rejected = {index for index, _, _ in result.errors}
    held = []
    for n, key in named.items():
        if n in rejected:
            reasons[found[n]] = MissReason.INVALID
        else:
            held.append(found[n])
    return sorted(held), reasons


def drain(sock: socket.socket, frames, nbytes: int) -> None:
    """Read and drop `nbytes` of a stream (a request refused after its chunks were sent)."""
    scratch = memoryview(np.empty(min(nbytes, 8 << 20), dtype=np.uint8))
    while nbytes > 0:
        chunk = min(nbytes, len(scratch))
        frames.read_into(scratch[:chunk])
        nbytes -= chunk
