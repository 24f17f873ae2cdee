"""Local protocol framing between engine processes and the node agent (docs/local-protocol.md).

A frame is a little-endian u32 body length followed by a msgpack body. Requests are ``[op, args]``;
replies are ``["ok", result]`` or ``["err", code, message]``. Ops in NO_REPLY get no reply (releases
and touches are fire-and-forget, so a get costs at most one round trip). Keys travel as one binary
blob of 16-byte keys.
ConnectionServer is the threaded socket server that serves such frames: the agent's Unix socket and
the cluster's peer links.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from typing import Any, Callable

import msgpack
import numpy as np

from .errors import ERRORS_BY_CODE, InvalidArgument, KVStoreError, ProtocolError

PROTOCOL_VERSION = 1
_LEN = struct.Struct("<I")
NO_REPLY = frozenset({"release", "abort", "touch"})


class ConnectionClosed(EOFError):
    """The peer closed the connection (between frames or in the middle of one)."""


def pack(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Reads frames from a socket: usually one recv per frame, straight into a reused buffer (a
    buffered file object would cost two reads and a copy per frame on the latency-critical path)."""

    def __init__(self, sock, max_bytes: int, busy_poll_s: float = 0.0):
        self.sock = sock
        self.max_bytes = max_bytes
        # Poll the socket this long before blocking in recv: on virtual machines a vCPU that halts
        # while its thread waits costs hundreds of microseconds to wake, more than a whole request.
        self.busy_poll_s = busy_poll_s
        self._buf = bytearray(1 << 16)
        self._start = self._end = 0

    def read(self) -> Any:
        """The next frame's decoded body. Raises ConnectionClosed at EOF, ProtocolError for an oversize
        length (the stream cannot be resynchronised then) and for a body that is not msgpack (the
        stream is still in sync)."""
        self._want(4)
        (length,) = _LEN.unpack_from(self._buf, self._start)
        if length > self.max_bytes:
            raise ProtocolError(f"frame of {length} bytes exceeds the {self.max_bytes}-byte limit")
        self._want(4 + length)
        body = memoryview(self._buf)[self._start + 4:self._start + 4 + length]
        self._start += 4 + length
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types for bad input
            raise ProtocolError(f"frame body is not valid msgpack: {exc}") from None
        finally:
            body.release()
            if self._start == self._end:
                self._start = self._end = 0

    def read_into(self, view: memoryview) -> None:
        """Fill `view` with the raw bytes that follow the last frame (a chunk streamed after its reply
        frame): first what is already buffered, then straight from the socket into `view`."""
        view = view.cast("B")
        buffered = min(len(view), self._end - self._start)
        view[:buffered] = self._buf[self._start:self._start + buffered]
        self._start += buffered
        if self._start == self._end:
            self._start = self._end = 0
        got = buffered
        while got < len(view):
            received = self.sock.recv_into(view[got:])
            if received == 0:
                raise ConnectionClosed("connection closed inside a chunk")
            got += received

    def _want(self, nbytes: int) -> None:
        """Receive until `nbytes` unread bytes are buffered."""
        while self._end - self._start < nbytes:
            if self._start + nbytes > len(self._buf):  # make room: move unread bytes to the front
                unread = self._buf[self._start:self._end]
                if nbytes > len(self._buf):
                    self._buf = bytearray(max(nbytes, 2 * len(self._buf)))
                self._buf[:len(unread)] = unread
                self._start, self._end = 0, len(unread)
            with memoryview(self._buf) as view:
                received = self._poll(view[self._end:]) if self.busy_poll_s else None
                if received is None:
                    received = self.sock.recv_into(view[self._end:])
            if received == 0:
                raise ConnectionClosed("connection closed" if self._end == self._start
                                       else "connection closed inside a frame")
            self._end += received


    def _poll(self, view: memoryview) -> int | None:
        """recv without blocking for up to busy_poll_s; None if nothing came (then block as usual)."""
        deadline = time.perf_counter() + self.busy_poll_s
        flags = socket.MSG_DONTWAIT
        while True:
            try:
                return self.sock.recv_into(view, 0, flags)
            except BlockingIOError:
                if time.perf_counter() >= deadline:
                    return None


def error_reply(exc: KVStoreError) -> list:
    return ["err", exc.code, str(exc)]


def raise_for_reply(reply: Any) -> Any:
    """The result of an ok reply; raise the typed error of an err reply."""
    if isinstance(reply, list) and reply and reply[0] == "ok" and len(reply) == 2:
        return reply[1]
    if isinstance(reply, list) and len(reply) == 3 and reply[0] == "err":
        raise ERRORS_BY_CODE.get(reply[1], KVStoreError)(reply[2])
    raise ProtocolError(f"malformed reply from agent: {reply!r:.200}")


def pick_keys(blob: bytes, picked) -> bytes:
    """The keys at indexes `picked` of a blob of 16-byte keys, as one blob (one numpy gather)."""
    return np.frombuffer(blob, dtype="V16")[picked].tobytes()


def split_keys(blob: Any) -> list[bytes]:
    """The 16-byte keys in a key blob."""
    if not isinstance(blob, bytes) or len(blob) % 16:
        raise InvalidArgument("keys must be a binary blob whose length is a multiple of 16")
    return [blob[i:i + 16] for i in range(0, len(blob), 16)]


class ConnectionServer:
    """A stream socket server (Unix or TCP) with one daemon thread per connection, each running
    `serve(sock)` until it returns. `stop()` stops accepting and shuts every open connection down, so
    handlers blocked reading their next frame wake and end: peers see the server go, not silence."""

    def __init__(self, address: str | tuple[str, int], family: socket.AddressFamily,
                 serve: Callable[[socket.socket], None], name: str):
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with outer._lock:
                    if outer._stopped:  # accepted just before stop(): end it, as stop() ended the others
                        return
                    outer._open.add(self.request)
                try:
                    serve(self.request)
                finally:
                    with outer._lock:
                        outer._open.discard(self.request)

        class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):  # TCPServer serves AF_UNIX too
            daemon_threads = True
            allow_reuse_address = True
            address_family = family

        self._open: set[socket.socket] = set()
        self._stopped = False
        self._lock = threading.Lock()
        self._server = Server(address, Handler)
        self.address = self._server.server_address
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=name, daemon=True)

    @property
    def connections(self) -> int:
        return len(self._open)

    def start(self) -> "ConnectionServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        with self._lock:
            self._stopped = True
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
