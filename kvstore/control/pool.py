"""The controller's connections to its node agent: a small pool, each call with a deadline.

Lookups read the agent's shared node directory through one connection's mapping (kvstore/shm.py), with
no round trip; everything else is a request on a pooled connection.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import numpy as np

from ..client import AgentConnection
from ..errors import AgentUnavailable
from ..shm import namespace_bits
from ..wire.messages import Reply, Request



class AgentPool:
    """Up to `size` connections to the agent, each used by one call at a time."""

    def __init__(self, socket_path: str, size: int):
        self.socket_path = socket_path
        self._idle: queue.LifoQueue[AgentConnection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._directory_lock = threading.Lock()
        self._directory_conn: AgentConnection | None = None
        self._ns_ids: dict[bytes, int] = {}  # namespace ids as the directory connection's agent numbers them

    def request(self, message: Request, reply: type[Reply] | None, timeout: float) -> Any:
        """`message`'s reply (decoded as `reply`, when given), within `timeout` seconds."""
        result = self.call(message.OP.value, message.to_wire(), timeout)
        return reply.decode(result) if reply is not None else result

    def call(self, op: str, args: dict, timeout: float) -> Any:
        """One raw round trip within `timeout` seconds (the control plane's fan-out passes ops through)."""
        if timeout <= 0:
            raise AgentUnavailable(f"agent call {op} timed out (no time left in the RPC's deadline)")
        if not self._slots.acquire(timeout=timeout):
            raise AgentUnavailable(f"agent call {op} timed out waiting for a free connection")
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = AgentConnection(self.socket_path, timeout=timeout)
            try:
                result = conn.call(op, args, timeout=timeout)
            except AgentUnavailable:
                conn.close()
                raise
            self._idle.put(conn)
            return result
        finally:
            self._slots.release()

    def is_cluster(self, timeout: float) -> bool:
        """Whether the agent is a cluster member (its hello says so): lookups then ask the cluster."""
        with self._directory_lock:
            return self._directory(timeout).cluster

    def node(self, timeout: float) -> str:
        """The agent's cluster node id, as its hello said ("" off a cluster)."""
        with self._directory_lock:
            return self._directory(timeout).node

    def _directory(self, timeout: float) -> AgentConnection:
        """The connection whose mapping of the node directory lookups read (caller holds the lock)."""
        if self._directory_conn is None:
            self._directory_conn = AgentConnection(self.socket_path, timeout=timeout)
            self._ns_ids = {}  # another agent (or the same restarted) may number namespaces otherwise
        return self._directory_conn

    def directory_tiers(self, digest: bytes, packed: np.ndarray, timeout: float,
                        resolve_ns_id: Callable[[bytes], int]) -> np.ndarray | None:
        """Tier bits of each key from the agent's shared node directory (the map LocalClient reads: no
        round trip; once a second one checks that the agent is alive), 0 where absent or in another
        namespace. None when the directory cannot be mapped here (then ask the agent)."""
        with self._directory_lock:
            conn = self._directory(timeout)
            try:
                conn.ensure_alive()
                if conn.directory is None:
                    return None
                ns_id = self._ns_ids.get(digest)
                if ns_id is None:
                    ns_id = self._ns_ids[digest] = resolve_ns_id(digest)
                values = conn.directory.lookup(packed)
            except AgentUnavailable:
                conn.close()
                self._directory_conn = None
                raise
            except (OSError, ValueError):  # e.g. the agent stopped and closed it: start over next time
                conn.close()
                self._directory_conn = None
                return None
        return namespace_bits(values, ns_id)

    def close(self) -> None:
        with self._directory_lock:
            if self._directory_conn is not None:
                self._directory_conn.close()
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
