"""The peer link: the one transport between agents for everything but finding them.

Ray finds the members (named actors, pings with a deadline) and, in each ping reply, hands an agent its
peer's link address and secret: Ray is the trusted channel that says who may connect. Everything agents
then ask of each other goes over persistent TCP connections speaking the local protocol's frames
(kvstore/wire): directory queries and updates, chunks pulled and pushed (straight from pinned arena slots
to the socket and from the socket into reserved slots: transfers.py), operator ops run on members.
Why not Ray for these: on this machine's loopback a Ray actor call costs ~1 ms and an object transfer
moves 0.3-0.9 GB/s after a copy into the object store and another out of it; the link costs one round
trip of ~0.1-0.2 ms and moves 2-3 GB/s with no copy beyond the socket's.

Every exchange has a deadline (socket timeouts); a connection that failed or timed out mid-stream is
closed, never reused, so a stream cannot be read out of step. An exchange that failed is a LinkError
whose reason is the miss reason of the chunks it was for.
"""

from __future__ import annotations

import hmac
import logging
import queue
import socket
import time
from typing import Any, Callable

from ..errors import InvalidArgument, KVStoreError, ProtocolError
from ..vocab import MissReason
from ..wire.framing import PROTOCOL_VERSION, ConnectionClosed, FrameReader, error_reply, pack, raise_for_reply
from ..wire.server import ConnectionServer

log = logging.getLogger("kvstore.cluster")

MAX_FRAME = 64 << 20  # a holders reply for a large request; chunk bytes travel outside frames
_IDLE_PER_PEER = 8

# A link op's server side: (socket, args) -> result (sent as the ok reply), or None when the handler
# sent its own reply (an export streams chunks after it). It reads what its request streams from the
# FrameReader it is given.
LinkHandler = Callable[[socket.socket, FrameReader, dict], Any]


class LinkError(Exception):
    """The peer could not be reached or did not answer in time; `reason` is the miss reason."""

    def __init__(self, reason: MissReason, message: str):
        super().__init__(message)
        self.reason = reason


NO_REPLY = object()  # what a handler returns when it sent its reply itself


# ---- serving side ---------------------------------------------------------------------------------
class LinkServer:
    """Accepts peers' connections on `host` (port chosen by the OS) and serves the link ops in
    `handlers`. The first frame of a connection must carry the secret."""

    def __init__(self, node: str, handlers: dict[str, LinkHandler], host: str, secret: str, timeout_s: float):
        self.node = node
        self.handlers = handlers
        self.secret = secret
        self.timeout_s = timeout_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = ConnectionServer((host, 0), family, self._serve, "kvstore-link")
        self.host = host
        self.port = self._server.address[1]

    def start(self) -> "LinkServer":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()  # also wakes the handlers waiting for a next request

    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        frames = FrameReader(sock, MAX_FRAME)
        try:
            sock.settimeout(self.timeout_s)
            op, args = frames.read()
            if op != "hello" or not isinstance(args, dict) or not hmac.compare_digest(str(args.get("secret", "")),
                                                                                     self.secret):
                sock.sendall(pack(["err", "unauthenticated", "peer link: wrong secret"]))
                return
            sock.sendall(pack(["ok", {"node": self.node, "version": PROTOCOL_VERSION}]))
            while True:
                sock.settimeout(None)  # an idle pooled connection waits as long as the peer keeps it
                op, args = frames.read()
                sock.settimeout(self.timeout_s)  # a peer that stops reading cannot hold a thread forever
                try:
                    handler = self.handlers.get(op) if isinstance(op, str) else None
                    if handler is None:
                        raise InvalidArgument(f"peer link: unknown op {op!r}")
                    if not isinstance(args, dict):
                        raise InvalidArgument("peer link: request arguments must be a map")
                    result = handler(sock, frames, args)
                except KVStoreError as exc:  # raised before any byte of the answer was sent: still in step
                    sock.sendall(pack(error_reply(exc)))
                    continue
                if result is not NO_REPLY:
                    sock.sendall(pack(["ok", result]))
        except (ConnectionClosed, OSError, ValueError, TypeError, KVStoreError):
            return  # the peer went away or sent garbage: drop the connection


# ---- calling side ---------------------------------------------------------------------------------
class LinkConnection:
    """One connection to a peer's LinkServer, authenticated."""

    def __init__(self, address: tuple[str, int], secret: str, timeout: float):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.frames = FrameReader(self.sock, MAX_FRAME)
        try:
            self.send("hello", {"secret": secret, "version": PROTOCOL_VERSION})
            self.reply(time.monotonic() + timeout)
        except BaseException:  # refused or silent: do not leak the socket
            self.sock.close()
            raise

    def send(self, op: str, args: dict) -> None:
        self.sock.sendall(pack([op, args]))

    def send_bytes(self, data, deadline: float) -> None:
        """Raw bytes after a request frame (chunks pushed to the peer)."""
        self._deadline(deadline)
        self.sock.sendall(data)

    def reply(self, deadline: float) -> Any:
        self._deadline(deadline)
        return raise_for_reply(self.frames.read())

    def read_into(self, view: memoryview, deadline: float) -> None:
        """Raw bytes after a reply frame (chunks streamed by the peer), straight into `view`."""
        self._deadline(deadline)
        self.frames.read_into(view)

    def _deadline(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("deadline passed")
        self.sock.settimeout(left)

    def close(self) -> None:
        self.sock.close()


class PeerLink:
    """Connections to one peer's LinkServer: an idle pool, one connection per exchange in flight."""

    def __init__(self, node: str, host: str, port: int, secret: str, connect_timeout: float):
        self.node = node
        self.address = (host, port)
        self.secret = secret
        self.connect_timeout = connect_timeout
        self._idle: queue.LifoQueue[LinkConnection] = queue.LifoQueue()

    def open(self, deadline: float) -> LinkConnection:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        try:
            return LinkConnection(self.address, self.secret,
                                  max(0.001, min(self.connect_timeout, deadline - time.monotonic())))
        except (OSError, ConnectionClosed, ProtocolError, KVStoreError) as exc:
            raise LinkError(MissReason.REMOTE_UNAVAILABLE, f"peer link to {self.node[:8]}: {exc}") from None

    def send(self, op: str, args: dict, deadline: float) -> LinkConnection:
        """Send a request on a connection of its own; read the answer with `reply` (or a stream's reader)."""
        conn = self.open(deadline)
        try:
            conn.send(op, args)
        except OSError as exc:
            conn.close()
            raise failure(exc, self.node) from None
        return conn

    def reply(self, conn: LinkConnection, deadline: float) -> Any:
        """The answer to the request sent on `conn`; the connection goes back to the pool if in step."""
        try:
            result = conn.reply(deadline)
        except (OSError, ConnectionClosed, ProtocolError) as exc:
            conn.close()
            raise failure(exc, self.node) from None
        except KVStoreError as exc:  # an error reply: the stream is still in step
            self.done(conn)
            raise LinkError(MissReason.REMOTE_UNAVAILABLE, f"peer {self.node[:8]}: {exc}") from None
        self.done(conn)
        return result

    def ask(self, op: str, args: dict, deadline: float) -> Any:
        """One request and its answer."""
        return self.reply(self.send(op, args, deadline), deadline)

    def done(self, conn: LinkConnection) -> None:
        """Return a connection whose exchange completed in full (it is in step) to the pool."""
        if self._idle.qsize() < _IDLE_PER_PEER:
            self._idle.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


def failure(exc: BaseException, node: str) -> LinkError:
    """The LinkError (miss reason) for a failed exchange."""
    if isinstance(exc, LinkError):
        return exc
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return LinkError(MissReason.REMOTE_TIMEOUT, f"peer {node[:8]} answered late")
    return LinkError(MissReason.REMOTE_UNAVAILABLE, f"peer {node[:8]}: {exc}")
