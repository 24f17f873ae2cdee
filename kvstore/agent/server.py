"""The agent's Unix socket: one thread per connection reads frames, `AgentOps` answers them.

Data never crosses the socket, only arena offsets. A connection's leases and reservations end with it.
The agent's own Prometheus endpoint (agent.metrics_address) reads its stats in process.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from pathlib import Path

from ..errors import AgentUnavailable, ProtocolError
from ..vocab import NO_REPLY
from ..wire.framing import ConnectionClosed, FrameReader, error_reply, pack
from ..wire.server import ConnectionServer
from .ops import AgentOps

log = logging.getLogger("kvstore.agent")


class AgentServer:
    """Serves an agent's ops on a Unix socket until `shutdown()`."""

    def __init__(self, ops: AgentOps, socket_path: str):
        self.ops = ops
        self.cfg = ops.store.cfg
        self.socket_path = socket_path
        Path(socket_path).parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(socket_path)
        self._server = ConnectionServer(socket_path, socket.AF_UNIX, self._serve_connection, "kvstore-agent")
        os.chmod(socket_path, 0o600)
        ops.connections = lambda: self._server.connections
        self._conn_ids = itertools.count(1)
        self._metrics = None

    @property
    def store(self):
        return self.ops.store

    @property
    def metrics_port(self) -> int:
        return self.ops.metrics_port

    def start(self) -> "AgentServer":
        self._server.start()
        self._serve_metrics()
        return self

    def _serve_metrics(self) -> None:
        """The agent's own Prometheus endpoint; a taken port is a warning, not a dead agent."""
        address = self.cfg.agent.metrics_address
        if not address:
            return
        from ..metrics import AgentMetrics  # not at import time: the agent without metrics needs none of it

        self._metrics = AgentMetrics(self.ops.stats)
        try:
            self.ops.metrics_port = self._metrics.serve(address)
        except OSError as exc:
            log.warning("agent metrics endpoint not started on %s: %s", address, exc)
            self._metrics = None
            return
        log.info("kvstore agent metrics on http://%s:%d/metrics", address.rpartition(":")[0], self.metrics_port)

    def shutdown(self) -> None:
        """Stop accepting, and end every open connection (clients see the agent go, not a stale store)."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        self._server.stop()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def _serve_connection(self, sock: socket.socket) -> None:
        conn = next(self._conn_ids)
        agent = self.cfg.agent
        frames = FrameReader(sock, agent.max_frame_bytes, agent.busy_poll_us / 1e6)
        try:
            while True:
                try:
                    request = frames.read()
                except ProtocolError as exc:
                    sock.sendall(pack(error_reply(exc)))
                    if "exceeds" in str(exc):
                        return  # cannot find the next frame boundary: close
                    continue
                op, reply = self.ops.dispatch(conn, request)
                if op not in NO_REPLY:
                    sock.sendall(pack(reply))
        except (ConnectionClosed, ConnectionError, OSError):
            pass
        finally:
            self.ops.disconnect(conn)


def _remove_stale_socket(path: str) -> None:
    """Refuse to start over a live agent; remove a socket file left by a dead one."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise AgentUnavailable(f"another agent is already listening on {path}")
