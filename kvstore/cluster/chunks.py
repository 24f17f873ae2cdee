"""Moving chunks between agents: export from one node's arena, verify and import into another's.

A chunk travels as two arrays, its 128-byte header and its payload, with the header carrying the
payload's xxh3-64 checksum (the one the disk tier keeps): the exporting agent keeps a checksum the
header already has (a chunk read from disk or received from a peer) and computes it otherwise, so the
importing agent checks the bytes end to end. A chunk that fails is a miss with the reason `checksum`,
never data. Import goes through the store's own reserve/commit, so an imported chunk is validated,
indexed, published and written behind like any other.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np

from ..codec import HEADER_BYTES, ChunkHeader
from ..errors import CorruptChunk, GeometryMismatch, KVStoreError, NotFound
from ..node import RESERVE_EXISTS, RESERVE_NO_SPACE, NodeStore

# Connection ids of the agent's own requests to its store (clients get ids from 1 up): the store's
# commit hook tells imports apart from client commits by them (imports are never replicated again).
PULL_CONN, REPLICA_CONN, EXPORT_CONN = -1, -2, -3
IMPORTED = {"imported": True}  # the description of a namespace known only from chunks received


@contextmanager
def pinned_chunks(store: NodeStore, digest: bytes, keys: Sequence[bytes]) -> Iterator[tuple[list[int], list]]:
    """Pin the chunks this node holds among `keys` and yield (indexes found, [(header, payload view of
    the arena slot), ...]); `wire_header` makes the bytes to send. Released on exit."""
    try:
        reply = store.acquire(EXPORT_CONN, digest, list(keys), prefix=False)
    except NotFound:  # namespace unknown here: nothing of it is held
        yield [], []
        return
    arena = store.cpu.arena.array
    found: list[int] = []
    pairs: list[tuple[ChunkHeader, np.ndarray]] = []
    try:
        for i, (offset, size) in enumerate(zip(reply["offsets"], reply["sizes"])):
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
        store.release(EXPORT_CONN, reply["lid"])


def wire_header(header: ChunkHeader, payload: np.ndarray) -> bytes:
    """The header bytes a chunk travels with: carrying its payload checksum (the one the disk tier
    keeps, or computed now), so the receiver checks the bytes end to end."""
    return (header if header.has_checksum else header.with_checksum(payload)).pack()


def carried_description(store: NodeStore, digest: bytes) -> dict:
    """The namespace description that travels with exported chunks, so the receiving agent knows the
    namespace as its engine registered it (model, tenant, chunk size: what the controller needs)."""
    try:
        return store._namespace(digest).description or IMPORTED
    except NotFound:
        return IMPORTED


def export_chunks(store: NodeStore, digest: bytes, keys: Sequence[bytes], put) -> tuple[list[int], object, dict]:
    """Hand the chunks this node holds among `keys` to `put` as [header, payload, header, payload, ...]
    (ray.put: one copy out of the arena while the chunks are pinned).
    Returns (indexes of the keys found, what `put` returned, the namespace's description)."""
    with pinned_chunks(store, digest, keys) as (found, pairs):
        return found, put([part for header, payload in pairs
                           for part in (np.frombuffer(wire_header(header, payload), dtype=np.uint8), payload)]), \
            carried_description(store, digest)


def verified_header(raw_header, payload, key: bytes, digest: bytes) -> ChunkHeader:
    """The header of a chunk received for `key` in namespace `digest`, once its payload checks out;
    CorruptChunk otherwise."""
    header = ChunkHeader.unpack(raw_header)
    if header.key != key or header.namespace != digest:
        raise CorruptChunk("chunk names another key or namespace")
    header.verify(payload)
    return header


def import_chunks(store: NodeStore, conn: int, digest: bytes, keys: Sequence[bytes],
                  parts: Sequence[np.ndarray], description: dict) -> tuple[list[int], dict[int, str]]:
    """Verify chunks received for `keys` (parts as export_chunks made them, one pair per key) and store
    them, registering the namespace with the `description` that came along. Returns (indexes now held
    here, {index: reason} for the ones that were not stored)."""
    if len(parts) != 2 * len(keys):
        raise ValueError(f"{len(parts)} parts for {len(keys)} keys")
    reasons: dict[int, str] = {}
    good: list[tuple[int, np.ndarray, np.ndarray, ChunkHeader]] = []
    registered = None  # the geometry the namespace was registered with: once per batch, not per chunk
    for i, key in enumerate(keys):
        raw_header, payload = parts[2 * i], parts[2 * i + 1]
        try:
            header = verified_header(raw_header, payload, key, digest)
            if header.geometry != registered:
                store.register(digest, header.geometry, description)
                registered = header.geometry
        except CorruptChunk:
            reasons[i] = "checksum"
            continue
        except GeometryMismatch:
            reasons[i] = "geometry"
            continue
        good.append((i, raw_header, payload, header))
    if not good:
        return [], reasons
    sizes = [HEADER_BYTES + int(payload.size) for _, _, payload, _ in good]
    reply = store.reserve(conn, digest, [keys[i] for i, _, _, _ in good], sizes)
    arena = store.cpu.arena.array
    held: list[int] = []
    for (i, raw_header, payload, _), offset in zip(good, reply["offsets"]):
        if offset == RESERVE_EXISTS:  # stored meanwhile (another pull, a client): as good
            held.append(i)
        elif offset == RESERVE_NO_SPACE:
            reasons[i] = "no_space"
        else:
            arena[offset:offset + HEADER_BYTES] = raw_header
            arena[offset + HEADER_BYTES:offset + HEADER_BYTES + payload.size] = payload
    if any(offset >= 0 for offset in reply["offsets"]):
        try:
            result = store.commit(conn, reply["rid"])
        except KVStoreError:
            result = {"errors": [[n, "internal", "reservation lost"] for n in range(len(good))]}
        refused = {index for index, _, _ in result["errors"]}
        for n, ((i, _, _, _), offset) in enumerate(zip(good, reply["offsets"])):
            if offset >= 0:
                if n in refused:
                    reasons[i] = "invalid"
                else:
                    held.append(i)
    return sorted(held), reasons
