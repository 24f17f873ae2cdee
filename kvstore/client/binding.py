"""One namespace and chunk geometry on one agent connection: what a client's puts and reads share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..keys import Namespace
from ..layout import Geometry
from ..shm import namespace_bits
from ..vocab import pack_keys
from .connection import AgentConnection


@dataclass
class Binding:
    conn: AgentConnection
    namespace: Namespace
    geometry: Geometry
    codec: str
    ns_id: int = -1  # the agent's id of the namespace, set at every (re)connect (-1: none yet)

    def stored(self, keys: Sequence[bytes]) -> list[bool]:
        """Which keys the shared directory shows as stored in this namespace (all False without it)."""
        if self.conn.directory is None:
            return [False] * len(keys)
        try:
            values = self.conn.directory.lookup(pack_keys(keys)).tolist()
        except (OSError, ValueError):
            return [False] * len(keys)
        # per key in Python: a put's few keys cost less so than numpy calls
        ns_id = self.ns_id
        return [value >> 8 == ns_id and value & 0xFF != 0 for value in values]  # absent: -1 >> 8 == -1

    def directory_bits(self, keys: Sequence[bytes]) -> np.ndarray:
        """Tier bits of each key in the shared directory; 0 where absent or in another namespace."""
        return namespace_bits(self.conn.directory.lookup(pack_keys(keys)), self.ns_id)
