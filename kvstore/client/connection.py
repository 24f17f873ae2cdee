"""The socket to the node agent and the mappings of what it shares (kvstore/shm.py).

Every call has a deadline (`timeout`); a transport failure closes the connection, raises
AgentUnavailable, and the next call reconnects. Requests are typed messages (kvstore/wire/messages.py);
`submit` sends one and reads its reply later, so the agent works on it while the caller goes on.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np
import torch

from ..config import KVStoreConfig, load_config
from ..errors import AgentUnavailable, KVStoreError
from ..shm import SharedIndexReader, map_arena
from ..vocab import NO_REPLY
from ..wire.framing import PROTOCOL_VERSION, ConnectionClosed, FrameReader, pack, raise_for_reply
from ..wire.messages import Hello, HelloReply, Reply, Request

_ALIVE_CHECK_S = 1.0  # how long a lookup trusts the shared directory without hearing from the agent


class PendingReply:
    """The reply to a request sent with `AgentConnection.submit`. It is read off the socket when
    `result()` asks for it, or earlier, when a later request needs the socket: the agent answers a
    connection's requests in order, so every reply before one's own is read first."""

    __slots__ = ("op", "_conn", "_decode", "_on_result", "_done", "_value", "_error")

    def __init__(self, conn: "AgentConnection", op: str, decode: Callable[[Any], Any] | None,
                 on_result: Callable[[Any], None] | None = None):
        self.op = op
        self._conn = conn
        self._decode = decode  # wire result -> typed reply
        self._on_result = on_result  # called with the result once read (under the connection's lock)
        self._done = False
        self._value = None
        self._error: Exception | None = None

    def _settle(self, frame=None, error: Exception | None = None) -> None:
        if error is None:
            try:
                value = raise_for_reply(frame)
                self._value = self._decode(value) if self._decode is not None else value
            except KVStoreError as exc:
                error = exc
        self._error = error
        self._done = True
        if error is None and self._on_result is not None:
            self._on_result(self._value)

    def done(self) -> bool:
        return self._done

    def wait(self) -> None:
        """Read up to this reply; an error (a lost connection too) is kept for result()."""
        if not self._done:
            try:
                self._conn.read_until(self)
            except AgentUnavailable:
                pass  # the connection closed: every unread reply is settled with that error

    def result(self):
        """The reply's result; raises its typed error (AgentUnavailable if the connection was lost)."""
        if not self._done:
            self._conn.read_until(self)
        if self._error is not None:
            raise self._error
        return self._value


class AgentConnection:
    """The socket to the node agent and the arena mapping; knows nothing of namespaces."""

    def __init__(self, socket_path: str | None = None, timeout: float = 10.0, cfg: KVStoreConfig | None = None,
                 on_connect: Callable[["AgentConnection"], None] | None = None):
        self.socket_path = socket_path or (cfg or load_config()).socket_path
        self.timeout = timeout
        self.on_connect = on_connect  # called after every (re)connect, e.g. to register namespaces
        self._sock: socket.socket | None = None
        self._arena_path: str | None = None
        self._lock = threading.RLock()  # one request/reply exchange at a time on the socket
        self._unread: deque[PendingReply] = deque()  # submitted requests whose replies are not read yet
        self.connect()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(f"no kvstore agent at {self.socket_path} ({exc}); start one with "
                                   f"`kvstore serve`") from None
        self._sock = sock
        self._frames = FrameReader(sock, 1 << 30)
        hello = self.hello = self.request(Hello(PROTOCOL_VERSION), HelloReply)
        self._frames.busy_poll_s = hello.busy_poll_us / 1e6  # the agent's setting, both ends
        if self._arena_path != hello.arena_path:
            self._mmap = map_arena(hello.arena_path, hello.arena_bytes, populate=hello.prefault)
            self.arena = torch.frombuffer(self._mmap, dtype=torch.uint8)
            self.arena_np = np.frombuffer(self._mmap, dtype=np.uint8)  # cheaper to slice per chunk
            self.arena_words = np.frombuffer(self._mmap, dtype=np.uint64, count=hello.arena_bytes // 8)
            self._arena_path = hello.arena_path
        self.directory = self._shared_index(hello.directory_path, "directory_path")  # lookups, no round trip
        self.locations = self._shared_index(hello.locations_path, "locations_path")  # gets, no round trip
        self.lease_ttl_s = hello.lease_ttl_s
        self.arena_bytes = hello.arena_bytes
        self.max_batch = hello.max_batch_chunks
        self.agent_pid = hello.pid
        self.cluster = hello.cluster  # the agent is a cluster member: misses may be remote hits
        self.node = hello.node  # a cluster member's Ray node id ("" off a cluster)
        self._alive_at = time.monotonic()
        if self.on_connect is not None:
            self.on_connect(self)

    def ensure_alive(self, every_s: float = _ALIVE_CHECK_S) -> None:
        """At most once every `every_s`, one round trip to the agent. The shared directory's mapping
        outlives an agent that was killed, so lookups answered from it alone would trust a dead
        agent's index forever; this makes them notice (AgentUnavailable) within a second."""
        now = time.monotonic()
        if now - self._alive_at >= every_s:
            self.request(Hello(PROTOCOL_VERSION))
            self._alive_at = now

    def _shared_index(self, path: str | None, field: str) -> SharedIndexReader | None:
        """A reader of the shared index at `path`, or None: another host's or a vanished file (and an
        older agent's hello names none); what it serves then goes over the socket."""
        if not path:
            return None
        try:
            return SharedIndexReader(path, resolve=lambda: getattr(self.request(Hello(PROTOCOL_VERSION), HelloReply),
                                                                   field))
        except OSError:
            return None

    # ---- exchanges --------------------------------------------------------------------------------
    def request(self, message: Request, reply: type[Reply] | None = None, timeout: float | None = None):
        """Send `message` and return its reply (decoded as `reply` when given, else the wire result;
        None for a one-way op). Thread-safe."""
        result = self.call(message.OP.value, message.to_wire(), timeout)
        return reply.decode(result) if reply is not None and message.OP not in NO_REPLY else result

    def submit(self, message: Request, reply: type[Reply] | None = None,
               on_result: Callable[[Any], None] | None = None) -> PendingReply:
        """Send a request now and read its reply later (PendingReply.result). `on_result` sees the result
        as soon as it is read. Thread-safe."""
        with self._lock:
            self._send(message.OP.value, message.to_wire())
            pending = PendingReply(self, message.OP.value, None if reply is None else reply.decode, on_result)
            self._unread.append(pending)
            return pending

    def call(self, op: str, args: dict, timeout: float | None = None):
        """One round trip of raw wire args and result (or a one-way message for NO_REPLY ops): what
        `request` sends, and what a test of the protocol itself sends. Thread-safe."""
        with self._lock:
            if self._sock is None:
                self.connect()
            if timeout is not None:
                self._sock.settimeout(timeout)
            self._send(op, args)
            if op in NO_REPLY:
                return None
            self._read_unread()
            frame = self._read(op)
            if timeout is not None and self._sock is not None:
                self._sock.settimeout(self.timeout)
            return raise_for_reply(frame)

    def read_until(self, pending: PendingReply) -> None:
        """Read replies off the socket, in order, until `pending`'s."""
        with self._lock:
            while not pending.done() and self._unread:
                self._read_next()

    def _read_unread(self) -> None:
        while self._unread:
            self._read_next()

    def _read_next(self) -> None:
        pending = self._unread.popleft()
        try:
            frame = self._read(pending.op)
        except AgentUnavailable as exc:
            pending._settle(error=exc)
            raise
        pending._settle(frame)

    def _send(self, op: str, args: dict) -> None:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        try:
            self._sock.sendall(pack([op, args]))
        except OSError as exc:
            self._fail(op, exc)

    def _read(self, op: str):
        try:
            return self._frames.read()
        except (OSError, ConnectionClosed) as exc:
            self._fail(op, exc)

    def _fail(self, op: str, exc: Exception):
        self.close()
        kind = "timed out" if isinstance(exc, socket.timeout) else f"failed ({exc})"
        raise AgentUnavailable(f"agent call {op} {kind}") from None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
        while self._unread:  # their replies went with the socket
            pending = self._unread.popleft()
            pending._settle(error=AgentUnavailable(f"connection to the agent closed before the reply to {pending.op}"))
