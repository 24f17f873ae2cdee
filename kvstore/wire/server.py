"""The threaded stream-socket server that serves frames: the agent's Unix socket and the peer links."""

from __future__ import annotations

import socket
import socketserver
import threading
from typing import Callable


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
