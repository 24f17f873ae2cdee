"""The namespaces an agent knows: digest -> a small id (what its directories store) and a geometry.

The first registration of a digest fixes its chunk geometry; a later one with another geometry is
refused. A namespace known only from chunks on disk or received from a peer carries a placeholder
description until an engine registers it with its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..errors import CapacityExhausted, GeometryMismatch, InvalidArgument, NotFound
from ..layout import Geometry
from ..shm import MAX_NAMESPACE_ID

RECOVERED = {"recovered": True}  # the description of a namespace known only from the disk tier
IMPORTED = {"imported": True}  # the description of a namespace known only from chunks received


def is_placeholder(description: dict) -> bool:
    """A description the agent made up (RECOVERED, IMPORTED or none), not an engine's registration."""
    return not description or "recovered" in description or "imported" in description


@dataclass(frozen=True)
class NamespaceInfo:
    ns_id: int
    digest: bytes
    geometry: Geometry
    description: dict

    def record(self) -> dict:
        """What the `list` op returns for it."""
        return {"digest": self.digest, "geometry": self.geometry.to_wire(), "description": self.description}


class Namespaces:
    """Thread-safe registry; ids start at 1 (0 is "no namespace" in the directories) and are never reused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_digest: dict[bytes, NamespaceInfo] = {}
        self._by_id: list[NamespaceInfo | None] = [None]

    def register(self, digest: bytes, geometry: Geometry, description: dict | None = None) -> NamespaceInfo:
        """Declare a namespace and its chunk geometry; the first registration fixes the geometry."""
        if not isinstance(digest, bytes) or len(digest) != 16:
            raise InvalidArgument("namespace digest must be 16 bytes")
        with self._lock:
            info = self._by_digest.get(digest)
            if info is None:
                if len(self._by_id) > MAX_NAMESPACE_ID:
                    raise CapacityExhausted(f"this agent already holds {MAX_NAMESPACE_ID} namespaces, the most "
                                            f"its directory can name; restart it to start afresh")
                info = NamespaceInfo(len(self._by_id), digest, geometry, dict(description or {}))
            elif info.geometry != geometry:
                raise GeometryMismatch(f"namespace {digest.hex()} holds chunks of {info.geometry}, not {geometry}")
            elif description and is_placeholder(info.description) and not is_placeholder(description):
                info = NamespaceInfo(info.ns_id, digest, geometry, dict(description))  # an engine's beats ours
            else:
                return info
            self._by_digest[digest] = info
            if info.ns_id == len(self._by_id):
                self._by_id.append(info)
            else:
                self._by_id[info.ns_id] = info
            return info

    def get(self, digest: object) -> NamespaceInfo:
        """The registered namespace `digest`; NotFound otherwise."""
        info = self._by_digest.get(digest) if isinstance(digest, bytes) else None
        if info is None:
            shown = digest.hex() if isinstance(digest, bytes) else repr(digest)
            raise NotFound(f"namespace {shown} is not registered on this agent (call register first)")
        return info

    def known(self, digest: bytes) -> bool:
        return digest in self._by_digest

    def by_id(self, ns_id: int) -> NamespaceInfo | None:
        by_id = self._by_id
        return by_id[ns_id] if 0 < ns_id < len(by_id) else None

    def ids(self) -> list[int]:
        return list(range(1, len(self._by_id)))

    def records(self) -> list[dict]:
        with self._lock:
            return [info.record() for info in self._by_digest.values()]

    def __len__(self) -> int:
        return len(self._by_digest)
