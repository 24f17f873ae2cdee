"""The peer link: direct agent-to-agent connections for a request's traffic between nodes.

Ray finds the members (named actors, pings with a deadline) and, in each ping reply, hands an agent
its peer's link address and secret: Ray is the trusted channel that says who may connect. What a
request then needs from a peer goes over a persistent TCP connection speaking the local protocol's
frames (kvstore/protocol.py):
  holders  the directory owner's holder map of some keys (the cluster lookup);
  export   the chunks a holder has among some keys: a reply frame (found indexes, chunk sizes, the
           namespace's geometry), then each chunk's 128-byte header (with its payload checksum) and
           payload, sent straight from the holder's pinned arena slots and received straight into the
           puller's reserved slots, where the checksum is verified before the chunk is committed.
Why not Ray for these: on this machine's loopback a Ray actor call costs ~1 ms and an object transfer
moves 0.3-0.9 GB/s after a copy into the object store, and another out of it; the link costs one
round trip of ~0.1-0.2 ms and moves 2-3 GB/s with no copy beyond the socket's. Peers without a link
(cluster.peer_link = false) are served over Ray actor calls as before.

Every exchange has a deadline (socket timeouts); a connection that failed or timed out mid-stream is
closed, never reused, so a stream cannot be read out of step.
"""

from __future__ import annotations

import hmac
import logging
import queue
import socket
import time
from typing import Any, Sequence

import numpy as np

from ..codec import HEADER_BYTES
from ..errors import CorruptChunk, GeometryMismatch, InvalidArgument, KVStoreError, NotFound, ProtocolError
from ..node import RESERVE_NO_SPACE, NodeStore, _arg, _geometry_wire, geometry_from_wire
from ..protocol import (PROTOCOL_VERSION, ConnectionClosed, ConnectionServer, FrameReader, error_reply, pack,
                        raise_for_reply, split_keys)
from .chunks import IMPORTED, carried_description, pinned_chunks, verified_header, wire_header

log = logging.getLogger("kvstore.cluster")

MAX_FRAME = 64 << 20  # a holders reply for a large request; chunk bytes travel outside frames
_IDLE_PER_PEER = 8


class LinkError(Exception):
    """The peer could not be reached or did not answer in time; `reason` is the miss reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---- serving side ---------------------------------------------------------------------------------
class LinkServer:
    """Accepts peers' connections on `host` (port chosen by the OS) and answers holders and export
    requests for `cluster` (a ClusterNode). The first frame of a connection must carry the secret."""

    def __init__(self, cluster: Any, host: str, secret: str, timeout_s: float):
        self.cluster = cluster
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
            sock.sendall(pack(["ok", {"node": self.cluster.node, "version": PROTOCOL_VERSION}]))
            while True:
                sock.settimeout(None)  # an idle pooled connection waits as long as the peer keeps it
                op, args = frames.read()
                sock.settimeout(self.timeout_s)  # a peer that stops reading cannot hold a thread forever
                try:
                    self._answer(sock, op, args)
                except KVStoreError as exc:  # raised before any byte of the answer was sent: still in step
                    sock.sendall(pack(error_reply(exc)))
        except (ConnectionClosed, OSError, ValueError, TypeError, KVStoreError):
            return  # the peer went away or sent garbage: drop the connection

    def _answer(self, sock: socket.socket, op: Any, args: Any) -> None:
        if not isinstance(args, dict):
            raise InvalidArgument("peer link: request arguments must be a map")
        if op == "holders":
            sock.sendall(pack(["ok", self.cluster.shard.lookup(split_keys(_arg(args, "keys", bytes)))]))
        elif op == "export":
            self._export(sock, _arg(args, "ns", bytes), split_keys(_arg(args, "keys", bytes)))
        else:
            raise InvalidArgument(f"peer link: unknown op {op!r}")

    def _export(self, sock: socket.socket, digest: bytes, keys: list[bytes]) -> None:
        store: NodeStore = self.cluster.store
        try:
            geometry = _geometry_wire(store._namespace(digest).geometry)
        except NotFound:
            sock.sendall(pack(["ok", {"found": [], "sizes": []}]))
            return
        with pinned_chunks(store, digest, keys) as (found, pairs):
            sizes = [HEADER_BYTES + payload.size for _, payload in pairs]
            sock.sendall(pack(["ok", {"found": found, "sizes": sizes, "geometry": geometry,
                                      "description": carried_description(store, digest)}]))
            for header, payload in pairs:  # from the pinned slots to the socket: no copy in between
                # checksummed one chunk at a time, so the puller verifies chunk k while we hash k + 1
                sock.sendall(wire_header(header, payload))
                sock.sendall(memoryview(payload))
        self.cluster.counters["link_exported_chunks"] += len(found)


# ---- calling side ---------------------------------------------------------------------------------
class _Connection:
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

    def reply(self, deadline: float) -> Any:
        self._deadline(deadline)
        return raise_for_reply(self.frames.read())

    def read_into(self, view: memoryview, deadline: float) -> None:
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
        self._idle: queue.LifoQueue[_Connection] = queue.LifoQueue()

    def open(self, deadline: float) -> _Connection:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        try:
            return _Connection(self.address, self.secret, max(0.001, min(self.connect_timeout,
                                                                         deadline - time.monotonic())))
        except (OSError, ConnectionClosed, ProtocolError, KVStoreError) as exc:
            raise LinkError("remote_unavailable", f"peer link to {self.node[:8]}: {exc}") from None

    def send(self, op: str, args: dict, deadline: float) -> _Connection:
        """Send a request on a connection of its own; read the answer with `reply` (or receive_chunks)."""
        conn = self.open(deadline)
        try:
            conn.send(op, args)
        except OSError as exc:
            conn.close()
            raise failure(exc, self.node) from None
        return conn

    def reply(self, conn: _Connection, deadline: float) -> Any:
        """The answer to the request sent on `conn`; the connection goes back to the pool if in step."""
        try:
            result = conn.reply(deadline)
        except (OSError, ConnectionClosed, ProtocolError) as exc:
            conn.close()
            raise failure(exc, self.node) from None
        except KVStoreError as exc:  # an error reply: the stream is still in step
            self.done(conn)
            raise LinkError("remote_unavailable", f"peer {self.node[:8]}: {exc}") from None
        self.done(conn)
        return result

    def done(self, conn: _Connection) -> None:
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
        return LinkError("remote_timeout", f"peer {node[:8]} answered late")
    return LinkError("remote_unavailable", f"peer {node[:8]}: {exc}")


def receive_chunks(store: NodeStore, conn_id: int, digest: bytes, keys: Sequence[bytes], conn: _Connection,
                   deadline: float) -> tuple[list[int], dict[int, str]]:
    """Read an export reply for `keys` from `conn` into this node's arena: reserve slots, receive each
    chunk into its slot, verify its header and checksum there, and commit the good ones.
    Returns (indexes now held, {index: reason}). Raises on a transport failure (the stream is then
    out of step and the caller closes `conn`); the reservation is given back."""
    reply = conn.reply(deadline)
    found, sizes = reply["found"], reply["sizes"]
    reasons = {i: "remote_evicted" for i in range(len(keys))}  # the directory said so; the holder has not
    if not found:
        return [], reasons
    if len(found) != len(sizes) or any(not 0 <= i < len(keys) for i in found):
        raise ProtocolError("peer link: malformed export reply")
    try:
        store.register(digest, geometry_from_wire(reply["geometry"]), reply.get("description") or IMPORTED)
        writable = True
    except GeometryMismatch:
        writable = False
    # A credit reservation: the slots are named at commit, so a chunk that fails verification is
    # simply left unnamed and its slot goes back to the arena.
    reservation = store.reserve(conn_id, digest, None, sizes) if writable else None
    offsets = reservation["offsets"] if reservation else [RESERVE_NO_SPACE] * len(sizes)
    arena = store.cpu.arena.array
    named: dict[int, bytes] = {}
    try:
        for n, (i, size, offset) in enumerate(zip(found, sizes, offsets)):
            if offset < 0:  # no room (or a namespace we cannot hold): read past it
                conn.read_into(memoryview(np.empty(size, dtype=np.uint8)), deadline)
                reasons[i] = "no_space" if writable else "geometry"
                continue
            slot = arena[offset:offset + size]
            conn.read_into(memoryview(slot), deadline)
            try:
                verified_header(slot[:HEADER_BYTES], slot[HEADER_BYTES:], keys[i], digest)
            except CorruptChunk:
                reasons[i] = "remote_checksum"
                continue
            named[n] = keys[i]
        if reservation and not named:  # nothing to keep (no slot was granted, or none checked out)
            store.abort(conn_id, reservation["rid"])
    except BaseException:
        if reservation:
            store.abort(conn_id, reservation["rid"])
        raise
    if not named:
        return [], reasons
    result = store.commit(conn_id, reservation["rid"], named=named)
    refused = {index for index, _, _ in result["errors"]}
    held = []
    for n, key in named.items():
        i = found[n]
        if n in refused:
            reasons[i] = "invalid"
        else:
            held.append(i)
            reasons.pop(i, None)
    return sorted(held), reasons
