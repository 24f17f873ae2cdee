"""A ChunkQuery (a namespace and a prompt: token ids, or chunk hashes) as the key blob agents take."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import InvalidArgument
from ..keys import chunk_keys
from ..proto import kvstore_pb2 as pb
from ..vocab import KEY_BYTES, key_count
from .auth import Principal
from .catalog import Catalog

_ONE_OF = "token_ids, token_ids_le32, chunk_hashes, chunk_hashes_packed"


class Keys(NamedTuple):
    namespace: bytes  # digest
    blob: bytes  # the chunk keys, 16 bytes each, concatenated: what the agent takes, never split and re-joined
    chunk_tokens: int  # tokens per chunk of the namespace (0 if its description does not say)


def query_keys(query: pb.ChunkQuery, catalog: Catalog, principal: Principal, context, limit: int) -> Keys:
    """The keys of a query, validated: its namespace visible to the caller, at most `limit` chunks."""
    description = catalog.describe(query.namespace, principal, context)
    chunk_tokens = int(description.get("chunk_tokens") or 0)
    # the fields set (non-empty), each read out of the message once (a bytes field is copied per read)
    fields = {field.name: value for field, value in query.ListFields() if field.name != "namespace"}
    given = sorted(fields)
    if len(given) != 1:
        raise InvalidArgument(f"give exactly one of {_ONE_OF}" + (f" (got {', '.join(given)})" if given else ""))
    kind, value = given[0], fields[given[0]]
    if kind in ("chunk_hashes", "chunk_hashes_packed"):
        if kind == "chunk_hashes":
            if any(len(k) != KEY_BYTES for k in value):
                raise InvalidArgument(f"every chunk hash must be {KEY_BYTES} bytes")
            blob = b"".join(value)
        else:
            blob = value
            if len(blob) % KEY_BYTES:
                raise InvalidArgument(f"chunk_hashes_packed must be a multiple of {KEY_BYTES} bytes long")
        if key_count(blob) > limit:
            raise InvalidArgument(f"{key_count(blob)} chunk hashes exceed control.max_request_chunks ({limit})")
        return Keys(query.namespace, blob, chunk_tokens)
    if kind == "token_ids_le32":
        if len(value) % 4:
            raise InvalidArgument("token_ids_le32 must be a multiple of 4 bytes long")
        n_tokens = len(value) // 4
    else:
        n_tokens = len(value)
    if not chunk_tokens:
        raise InvalidArgument(f"namespace {query.namespace.hex()} has no description to hash tokens with "
                              f"(recovered from disk?); send chunk hashes")
    if n_tokens > limit * chunk_tokens:
        raise InvalidArgument(f"{n_tokens} tokens exceed control.max_request_chunks ({limit}) chunks of {chunk_tokens}")
    namespace = catalog.hasher(query.namespace, description)
    tokens = np.frombuffer(value, dtype="<u4") if kind == "token_ids_le32" else np.array(value, dtype=np.uint32)
    return Keys(query.namespace, b"".join(chunk_keys(namespace, tokens)), chunk_tokens)
