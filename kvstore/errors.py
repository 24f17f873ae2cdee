"""Typed errors a caller can act on. Every error the agent sends back maps onto one of these."""

from __future__ import annotations


class KVStoreError(Exception):
    """Base class; `code` is the stable wire name of the error (docs/local-protocol.md)."""

    code = "internal"


class InvalidArgument(KVStoreError):
    """The request itself is wrong (bad shape, unknown codec, malformed frame, bad key)."""

    code = "invalid_argument"


class GeometryMismatch(InvalidArgument):
    """A chunk's geometry or dtype differs from what its namespace was registered with."""

    code = "geometry_mismatch"


class ChunkTooLarge(InvalidArgument):
    """A chunk is larger than the biggest slot the tier can hold."""

    code = "chunk_too_large"


class UnknownCodec(InvalidArgument):
    code = "unknown_codec"


class CorruptChunk(KVStoreError):
    """Bytes failed their checksum or header validation: always treated as a miss, never as data."""

    code = "corrupt_chunk"


class CapacityExhausted(KVStoreError):
    """No space could be freed (everything pinned or reserved); retry later or raise capacity."""

    code = "capacity_exhausted"


class NotFound(KVStoreError):
    code = "not_found"


class LeaseExpired(KVStoreError):
    code = "lease_expired"


class AgentUnavailable(KVStoreError):
    """The node agent cannot be reached (not running, socket gone, or it closed the connection)."""

    code = "unavailable"


class ProtocolError(KVStoreError):
    """The peer sent something that is not a valid frame."""

    code = "protocol_error"


class Unauthenticated(KVStoreError):
    """The controller does not know the caller: no bearer token, or an unknown one (UNAUTHENTICATED)."""

    code = "unauthenticated"


class PermissionDenied(KVStoreError):
    """The caller's token is valid, but not for this tenant's namespaces (PERMISSION_DENIED)."""

    code = "permission_denied"


class ConfigError(KVStoreError):
    """A configuration key or value is invalid; the message names the key."""

    code = "config_error"


ERRORS_BY_CODE = {
    cls.code: cls
    for cls in (
        KVStoreError, InvalidArgument, GeometryMismatch, ChunkTooLarge, UnknownCodec, CorruptChunk,
        CapacityExhausted, NotFound, LeaseExpired, AgentUnavailable, ProtocolError, Unauthenticated,
        PermissionDenied, ConfigError,
    )
}
