"""The words every layer shares: tiers, miss reasons, op names and chunk keys as they travel.

Everything here is a stable wire value (docs/local-protocol.md): tier codes and tier bits, the miss
reasons an agent reports, the names of the local protocol's ops. Keys travel between processes as one
binary blob of 16-byte keys; the helpers at the bottom are the only code that cuts or joins such blobs.
"""

from __future__ import annotations

import struct
from enum import Enum, IntEnum, IntFlag
from typing import NewType, Sequence

import numpy as np

from .errors import InvalidArgument

KEY_BYTES = 16
ChunkKey = NewType("ChunkKey", bytes)  # 16 bytes: a chunk's prefix hash (keys.py)
KEY_HALVES = struct.Struct("<QQ")  # a key as its (low, high) little-endian 64-bit halves (the indexes' form)


class Tier(IntEnum):
    """Where a chunk is held, as the wire's tier code (one byte per chunk in lookup replies)."""

    NONE = 0
    GPU = 1  # a code reserved on the wire; no agent builds a GPU tier yet
    CPU = 2  # the shared-memory arena
    DISK = 3  # segment files on local SSD
    REMOTE = 4  # only on other nodes of the cluster

    @property
    def label(self) -> str:
        """The tier's name in stats, metrics and the CLI ('cpu', 'disk', ...; 'none' for NONE)."""
        return self.name.lower()

    @classmethod
    def named(cls, label: str) -> "Tier":
        try:
            return cls[label.upper()]
        except KeyError:
            raise InvalidArgument(f"unknown tier {label!r}; known: {', '.join(t.label for t in cls)}") from None


class TierBits(IntFlag):
    """The tiers of this node holding a chunk, as bits (the node and cluster directories store these)."""

    GPU = 1
    CPU = 2
    DISK = 4


# as plain ints: the bit arithmetic on them (~bit, a mask of a directory value) must not stay in the flag's range
BIT_OF_TIER = {Tier.GPU: int(TierBits.GPU), Tier.CPU: int(TierBits.CPU), Tier.DISK: int(TierBits.DISK)}
LOCAL_TIERS = tuple(BIT_OF_TIER)  # the tiers a node holds itself, fastest first


def fastest_tier(bits: int) -> Tier:
    """The fastest tier among tier bits (NONE if none is set)."""
    return next((tier for tier in LOCAL_TIERS if bits & BIT_OF_TIER[tier]), Tier.NONE)


# The tier code of every combination of tier bits, for a vectorised lookup: the fastest tier holding it.
TIER_OF_BITS = np.array([fastest_tier(bits) for bits in range(256)], dtype=np.uint8)


def stored_prefix(bits: np.ndarray) -> tuple[int, bytes]:
    """(chunks held from the first, tier code of each: the fastest tier holding it) from tier bits."""
    codes = TIER_OF_BITS[bits]
    misses = np.flatnonzero(codes == Tier.NONE)
    matched = int(misses[0]) if misses.size else len(codes)
    return matched, codes[:matched].tobytes()


def tier_labels(codes: bytes) -> tuple[str, ...]:
    """Tier names of wire tier codes."""
    return tuple(Tier(code).label for code in codes)


class MissReason(str, Enum):
    """Why a chunk asked for was not served. Every miss carries one; none of them is ever served as data."""

    NOT_FOUND = "not_found"  # not stored (or not any more)
    NAMESPACE = "namespace"  # the key is stored under another namespace: never served
    CHECKSUM = "checksum"  # the disk copy failed verification and was dropped
    EVICTED = "evicted"  # gone between the plan and the read
    NO_SPACE = "no_space"  # no arena slot to bring it into
    GEOMETRY = "geometry"  # received for a namespace this node holds with another geometry
    INVALID = "invalid"  # received, but its header was refused at commit
    REMOTE_CHECKSUM = "remote_checksum"  # a chunk pulled from a peer failed verification
    REMOTE_TIMEOUT = "remote_timeout"  # the holder answered too late
    REMOTE_UNAVAILABLE = "remote_unavailable"  # the holder is gone
    REMOTE_EVICTED = "remote_evicted"  # the holder no longer has it
    DIRECTORY_UNAVAILABLE = "directory_unavailable"  # the cluster directory's owner did not answer

    __hash__ = str.__hash__  # equal to its value as a dict key or set member, on every Python version

    def __str__(self) -> str:
        return self.value

    @property
    def counter(self) -> str:
        """The agent counter of this reason (`miss_<reason>`; kvstore_misses_total{reason})."""
        return f"miss_{self.value}"


LOCAL_MISS_REASONS = (MissReason.NOT_FOUND, MissReason.NAMESPACE, MissReason.CHECKSUM, MissReason.EVICTED,
                      MissReason.NO_SPACE)


class Op(str, Enum):
    """The local protocol's ops (docs/local-protocol.md)."""

    HELLO = "hello"
    REGISTER = "register"
    LOOKUP = "lookup"
    CONTAINS = "contains"
    RESERVE = "reserve"
    COMMIT = "commit"
    ABORT = "abort"
    ACQUIRE = "acquire"
    RELEASE = "release"
    TOUCH = "touch"
    EVICT = "evict"
    CLEAR = "clear"
    FLUSH = "flush"
    STATS = "stats"
    LIST = "list"
    EVENTS = "events"
    CHUNKS = "chunks"
    PIN = "pin"
    UNPIN = "unpin"
    MOVE = "move"
    # a cluster agent's (docs/cluster.md)
    PREFETCH = "prefetch"
    PULL = "pull"
    ON_MEMBERS = "on_members"

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value


NO_REPLY = frozenset({Op.RELEASE, Op.ABORT, Op.TOUCH})  # fire-and-forget: a get costs at most one round trip


# ---- keys as they travel: one blob of 16-byte keys --------------------------------------------------
def join_keys(keys: Sequence[bytes]) -> bytes:
    """The blob of `keys`, in order."""
    return b"".join(keys)


def split_keys(blob: object) -> list[ChunkKey]:
    """The 16-byte keys in a key blob; InvalidArgument for anything that is not one."""
    if not isinstance(blob, bytes) or len(blob) % KEY_BYTES:
        raise InvalidArgument(f"keys must be a binary blob whose length is a multiple of {KEY_BYTES}")
    return [ChunkKey(blob[i:i + KEY_BYTES]) for i in range(0, len(blob), KEY_BYTES)]


def pick_keys(blob: bytes, picked) -> bytes:
    """The keys at indexes `picked` of a key blob, as one blob (one numpy gather)."""
    return np.frombuffer(blob, dtype=f"V{KEY_BYTES}")[picked].tobytes()


def key_count(blob: bytes) -> int:
    return len(blob) // KEY_BYTES


def pack_keys(keys: bytes | Sequence[bytes]) -> np.ndarray:
    """16-byte keys (a blob or a sequence) as an [n, 2] uint64 array of their (low, high) little-endian
    halves: what the cuckoo indexes take. No copy of a blob."""
    blob = keys if isinstance(keys, (bytes, bytearray, memoryview)) else b"".join(keys)
    return np.frombuffer(blob, dtype="<u8").reshape(-1, 2)
