"""Frames: how the local protocol and the peer link put messages on a stream (docs/local-protocol.md).

A frame is a little-endian u32 body length followed by a msgpack body. Requests are ``[op, args]``;
replies are ``["ok", result]`` or ``["err", code, message]``. What goes inside `args` and `result` is
defined by the typed messages (messages.py).
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import msgpack

from ..errors import ERRORS_BY_CODE, KVStoreError, ProtocolError

PROTOCOL_VERSION = 1
_LEN = struct.Struct("<I")


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
