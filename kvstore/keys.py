"""Chunk keys: a namespace digest and chained prefix hashes over fixed-size token chunks.

Byte layouts are specified in docs/hashing.md with known-answer vectors, so any process, machine or
language computes the same keys. Nothing here uses Python's ``hash()`` or pickle.

- ``Namespace.digest``: xxh3-128 of a tagged, length-prefixed encoding of the namespace fields.
- ``chunk_keys(ns, tokens)``: key_i = xxh3-128(0x01 || key_{i-1} || tokens of chunk i as u32 LE), with
  key_{-1} = the namespace digest. Every key therefore commits to the namespace and the whole prefix.
- ``fold_block_hashes(ns, block_hashes, blocks_per_chunk)``: the same chain over engine-provided block
  hashes (tag 0x02), for engines that already hash their blocks (vLLM ``request.block_hashes``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np
import xxhash

from .errors import InvalidArgument
from .vocab import ChunkKey

NAMESPACE_TAG = b"kvstore/ns/v1\x00"
TOKENS_TAG = b"\x01"
BLOCKS_TAG = b"\x02"
MAX_TOKEN_ID = (1 << 32) - 1


def _field(text: str) -> bytes:
    return struct.pack("<H", len(raw := text.encode("utf-8"))) + raw


@dataclass(frozen=True)
class Namespace:
    """Everything that must match for two engines to share a chunk.

    ``model`` is a fingerprint of the weights (name plus revision, or a hash of the files); ``layout`` names
    the KV layout/codec the chunk holds; ``tenant`` is a salt that keeps tenants apart.
    """

    model: str
    kv_dtype: str = "bfloat16"
    layout: str = "canonical"
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tenant: str = ""
    chunk_tokens: int = 256

    def __post_init__(self) -> None:
        for name in ("model", "kv_dtype", "layout", "tenant"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise InvalidArgument(f"namespace.{name} must be a str, got {type(value).__name__}")
            try:
                size = len(value.encode("utf-8"))
            except UnicodeEncodeError:
                raise InvalidArgument(f"namespace.{name} is not encodable as UTF-8") from None
            if size > 0xFFFF:
                raise InvalidArgument(f"namespace.{name} is longer than 65535 UTF-8 bytes")
        if not self.model:
            raise InvalidArgument("namespace.model must not be empty")
        for name in ("tp_rank", "tp_size", "pp_rank", "pp_size", "chunk_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
                raise InvalidArgument(f"namespace.{name} must be an int in [0, 2^32), got {value!r}")
        if self.chunk_tokens == 0 or self.tp_size == 0 or self.pp_size == 0:
            raise InvalidArgument("namespace chunk_tokens, tp_size and pp_size must be positive")
        if self.tp_rank >= self.tp_size or self.pp_rank >= self.pp_size:
            raise InvalidArgument("namespace rank must be below its size")

    def encode(self) -> bytes:
        """The exact bytes the digest is taken over (docs/hashing.md)."""
        return b"".join([
            NAMESPACE_TAG,
            _field(self.model), _field(self.kv_dtype), _field(self.layout), _field(self.tenant),
            struct.pack("<5I", self.tp_rank, self.tp_size, self.pp_rank, self.pp_size, self.chunk_tokens),
        ])

    @cached_property
    def digest(self) -> bytes:
        """16-byte namespace digest (xxh3-128, canonical big-endian digest bytes)."""
        return xxhash.xxh3_128_digest(self.encode())


def as_token_array(tokens) -> np.ndarray:
    """Validate token ids (ints in [0, 2^32)) and return them as little-endian uint32, in one pass."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise InvalidArgument(f"tokens must be a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype="<u4")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgument(f"token ids must be integers, got dtype {arr.dtype}")
    if int(arr.min()) < 0 or int(arr.max()) > MAX_TOKEN_ID:
        raise InvalidArgument("token ids must be in [0, 2^32)")
    return arr.astype("<u4", copy=False)


def _chain(root: bytes, tag: bytes, pieces: Iterable[memoryview]) -> list[ChunkKey]:
    keys: list[ChunkKey] = []  # ChunkKey is a NewType: plain bytes at run time, no per-key wrapping
    parent = root
    digest = xxhash.xxh3_128_digest
    append = keys.append
    for piece in pieces:  # one hash call per chunk, never per token
        parent = digest(b"".join((tag, parent, piece)))
        append(parent)
    return keys


def chunk_keys(namespace: Namespace, tokens) -> list[ChunkKey]:
    """Keys of every full chunk of `tokens` (a trailing partial chunk has no key)."""
    arr = as_token_array(tokens)
    step = namespace.chunk_tokens
    n_chunks = arr.size // step
    raw = memoryview(np.ascontiguousarray(arr[: n_chunks * step])).cast("B")
    width = step * 4
    return _chain(namespace.digest, TOKENS_TAG, (raw[start:start + width] for start in range(0, len(raw), width)))


def block_hash_bytes(block_hash) -> bytes:
    """An engine block hash as bytes: bytes pass through; ints are 16-byte little-endian two's complement."""
    if isinstance(block_hash, (bytes, bytearray, memoryview)):
        if len(raw := bytes(block_hash)) > 0xFFFF:
            raise InvalidArgument("a block hash is longer than 65535 bytes")
        return raw
    if isinstance(block_hash, int):
        if not -(1 << 127) <= block_hash < 1 << 127:
            raise InvalidArgument("an integer block hash must be in [-2^127, 2^127)")
        return block_hash.to_bytes(16, "little", signed=True)
    raise InvalidArgument(f"block hash must be bytes or int, got {type(block_hash).__name__}")


def fold_block_hashes(namespace: Namespace, block_hashes: Sequence, blocks_per_chunk: int) -> list[ChunkKey]:
    """Chunk keys from engine block hashes, `blocks_per_chunk` blocks per chunk (partial tail dropped).

    Each chunk's input is the concatenation of its blocks' hash bytes, each prefixed by its length (u16 LE),
    so hashes of any width fold unambiguously.
    """
    if blocks_per_chunk <= 0:
        raise InvalidArgument("blocks_per_chunk must be positive")
    n_chunks = len(block_hashes) // blocks_per_chunk
    pieces = []
    for c in range(n_chunks):
        parts = [block_hash_bytes(b) for b in block_hashes[c * blocks_per_chunk:(c + 1) * blocks_per_chunk]]
        pieces.append(memoryview(b"".join(struct.pack("<H", len(p)) + p for p in parts)))
    return _chain(namespace.digest, BLOCKS_TAG, pieces)
